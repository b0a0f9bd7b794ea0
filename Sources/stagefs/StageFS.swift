import ArgumentParser
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The `stagefs` command.
struct StageFS: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stagefs",
        abstract: "A POSIX file system for HPC and AI clusters: data in object storage, metadata in Redis or SQLite, hot data on node-local cache.",
        discussion: """
            META-URL names the metadata store:
              sqlite3:///abs/path/meta.db
                  embedded, one node
              redis://[[user]:password@]host[:port][/db]
                  shared (port 6379, db 0 by default)
              rediss://host[:port][/db]?tls-ca-cert-file=CA
                  over TLS (also tls-cert-file=, tls-key-file=, insecure-skip-verify=true)
              redis://[[user]:password@]MASTER,HOST[:PORT],...[/db]
                  the master the Sentinels name (their port is 26379 by default; SENTINEL_PASSWORD from the environment)
              ...?wait-replicas=N&wait-timeout=MS
                  every change waits for N replicas
              stagefs+unix:///run/stagefs/NAME.sock
                  a volume through this node's gateway (no secret; README "Multi-tenant clusters")
              stagefs://HOST:PORT
                  a volume through a gateway over TCP (MUNGE proves who you are)

            A Redis password is best given as META_PASSWORD, or in a file named by
            META_PASSWORD_FILE, with a URL that has none: one given in the URL is hidden from
            the process's arguments (ps) as soon as the command starts, and a mount passes it
            to its background process through the environment, never its arguments.

            Exit codes: 0 success, 1 runtime failure, 2 usage error; `stage` and `job prolog` \
            also 3 (partial), 4 (failed) and 130 (interrupted).
            """,
        version: stageFSVersion,
        subcommands: [Format.self, Mount.self, Umount.self, Status.self, Info.self, Stage.self, Cache.self, TrashCmd.self, QuotaCmd.self, CloneCmd.self, DumpCmd.self, LoadCmd.self, BackupCmd.self, FsckCmd.self, GCCmd.self, ConfigCmd.self, DestroyCmd.self, BindConfig.self, Job.self, GatewayCmd.self, Stats.self]
    )
}

/// Entry point: usage errors exit 2, runtime failures exit 1 with one `stagefs:` line.
@main
enum Main {
    static func main() {
        // The arguments as given, kept before a password in them is hidden from `ps`.
        _ = CommandLine.arguments
        Secrets.blankArguments()
        do {
            var command = try StageFS.parseAsRoot()
            try command.run()
        } catch let e as FSError {
            fail(e)
        } catch let e as ExitCode {
            // The command already said what went wrong.
            exit(e.rawValue)
        } catch {
            let code = StageFS.exitCode(for: error)
            if code == .success {
                // --help, help, --version.
                print(HelpLayout.help(for: error, width: HelpLayout.width))
                exit(0)
            }
            if let mistyped = unknownSubcommand(Array(CommandLine.arguments.dropFirst())) {
                printError("stagefs: \(mistyped)")
                exit(2)
            }
            let text = StageFS.fullMessage(for: error)
            let width = HelpLayout.width
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false).flatMap { line in
                line.hasPrefix("Usage: ") ? HelpLayout.synopsis(String(line), width: width) : [String(line)]
            }
            let message = lines.joined(separator: "\n")
            printError((message.hasPrefix("Error: ") ? "stagefs: " + message.dropFirst(7) : "stagefs: " + message) + "\n")
            if !text.contains("Usage:") && !text.contains("--help") { printError("See 'stagefs --help'.\n") }
            exit(2)
        }
    }

    static func fail(_ e: FSError) -> Never {
        printError("stagefs: \(e.message)\n")
        exit(e.isUsage ? 2 : 1)
    }

    /// For arguments that did not parse: the message for a word where a subcommand belongs
    /// that names none ("stagefs moutn", "stagefs job prolgo"), with the likely one.
    static func unknownSubcommand(_ args: [String]) -> String? {
        var command: ParsableCommand.Type = StageFS.self
        var path = ["stagefs"]
        // `stagefs help job prolog` names subcommands too.
        var rest = args.first == "help" ? args.dropFirst() : args[...]
        while let word = rest.first {
            let subcommands = command.configuration.subcommands
            if subcommands.isEmpty || word.hasPrefix("-") { return nil }
            if let next = subcommands.first(where: { $0._commandName == word || $0.configuration.aliases.contains(word) }) {
                command = next
                path.append(word)
                rest = rest.dropFirst()
                continue
            }
            let names = subcommands.map { $0._commandName }
            let prefix = path.dropFirst().map { $0 + " " }.joined()
            let guesses = closestMatches(to: word, in: names).map { "'\(prefix)\($0)'" }
            let hint =
                guesses.isEmpty
                ? "the commands are \(names.joined(separator: ", "))" : "did you mean \(guesses.joined(separator: " or "))?"
            return "unknown command '\(prefix)\(word)': \(hint) (see '\(path.joined(separator: " ")) --help')"
        }
        return nil
    }
}
