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
              sqlite3:///abs/path/meta.db                     embedded, one node
              redis://[[user]:password@]host[:port][/db]        shared (port 6379, db 0 by default)
              rediss://host[:port][/db]?tls-ca-cert-file=CA   over TLS (also tls-cert-file=,
                                                              tls-key-file=, insecure-skip-verify=true)
              redis://[[user]:password@]MASTER,HOST1[:PORT],HOST2[:PORT][/db]
                                                              the master the Sentinels name (port
                                                              26379; SENTINEL_PASSWORD from the
                                                              environment)
              ...?wait-replicas=N&wait-timeout=MS             every change waits for N replicas

            Exit codes: 0 success, 1 runtime failure, 2 usage error; `stage` and `job prolog` also
            3 (partial), 4 (failed) and 130 (interrupted).
            """,
        version: stageFSVersion,
        subcommands: [Format.self, Mount.self, Umount.self, Status.self, Info.self, Stage.self, Cache.self, BindConfig.self, Job.self]
    )
}

/// Entry point: usage errors exit 2, runtime failures exit 1 with one `stagefs:` line.
@main
enum Main {
    static func main() {
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
            if code == .success { StageFS.exit(withError: error) }
            let text = StageFS.fullMessage(for: error)
            printError((text.hasPrefix("Error: ") ? "stagefs: " + text.dropFirst(7) : "stagefs: " + text) + "\n")
            if !text.contains("Usage:") && !text.contains("--help") { printError("See 'stagefs --help'.\n") }
            exit(2)
        }
    }

    static func fail(_ e: FSError) -> Never {
        printError("stagefs: \(e.message)\n")
        exit(e.isUsage ? 2 : 1)
    }
}
