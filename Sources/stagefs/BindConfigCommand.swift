import ArgumentParser
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

struct BindConfig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bind-config",
        abstract: "Print Apptainer/Singularity bind options for StageFS mounts and caches.",
        discussion: """
            Without paths: the current job's mount and cache ($STAGEFS_MOUNT, and your directory \
            under $STAGEFS_CACHE_DIR), or else your StageFS mounts on this node and their caches. \
            Paths keep the same place inside the container.

            Formats:
              env    a src[:dest[:ro]] list for APPTAINER_BIND (comma-separated)
              args   -B options for apptainer exec
              mount  --mount options (CSV-quoted, so paths may hold ',' and ':')
              conf   'bind path = ...' lines for apptainer.conf (admins)

            The env and args formats cannot carry paths with ',' or ':'; use --format mount.

            Examples:
              export APPTAINER_BIND=$(stagefs bind-config --format env)
              eval apptainer exec \\
                  $(stagefs bind-config --format args) image.sif cmd
              eval apptainer exec \\
                  $(stagefs bind-config --format mount) image.sif cmd
            """
    )

    enum Format: String, ExpressibleByArgument, CaseIterable {
        case env, args, mount, conf
    }

    @Argument(help: "Directories to bind (default: the job's, or your StageFS mounts and caches).")
    var paths: [String] = []

    @Option(help: "env, args, mount or conf.")
    var format: Format = .env

    @Flag(help: "Bind read-only.")
    var readOnly = false

    func run() throws {
        let sources = paths.isEmpty ? defaultSources() : paths.map { absolutePath($0) }
        if sources.isEmpty {
            throw FSError(ENOENT, "nothing to bind: no job mount ($STAGEFS_MOUNT) and no StageFS mount of uid \(getuid()) on this node; name paths")
        }
        print(try render(sources, format: format, readOnly: readOnly))
    }

    /// The job's mount and cache, or the user's mounts and their caches.
    private func defaultSources() -> [String] {
        var out: [String] = []
        let env = { (n: String) in getenv(n).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } }
        if let m = env("STAGEFS_MOUNT") { out.append(m) }
        if let c = env("STAGEFS_CACHE_DIR") {
            out.append(Sys.stat("\(c)/\(getuid())") != nil ? "\(c)/\(getuid())" : c)
        }
        if !out.isEmpty { return out }
        for m in MountTable.all() where m.fsType == "fuse.stagefs" {
            guard let r = Runtime.load(m.mountPoint) else { continue }
            out.append(m.mountPoint)
            for d in r.cacheDirs ?? [] where !out.contains("\(d)/\(getuid())") { out.append("\(d)/\(getuid())") }
        }
        return out
    }
}

/// Renders binds (same path inside and outside) in one of the formats.
func render(_ sources: [String], format: BindConfig.Format, readOnly: Bool) throws(FSError) -> String {
    switch format {
    case .env, .args:
        for s in sources where s.contains(",") || s.contains(":") {
            throw FSError.usage("'\(s)' contains ',' or ':', which the \(format.rawValue) format cannot carry; use --format mount")
        }
        let specs = sources.map { readOnly ? "\($0):\($0):ro" : $0 }
        if format == .env { return specs.joined(separator: ",") }
        return specs.map { "-B \(shellQuote($0))" }.joined(separator: " ")
    case .mount:
        return sources.map { s in
            var fields = ["type=bind", csvField("src=\(s)"), csvField("dst=\(s)")]
            if readOnly { fields.append("ro") }
            return "--mount \(shellQuote(fields.joined(separator: ",")))"
        }.joined(separator: " ")
    case .conf:
        var lines: [String] = []
        if readOnly { lines.append("# apptainer.conf bind paths take no read-only flag; use --format mount for read-only binds") }
        for s in sources {
            if s.contains(":") || s.contains(",") { throw FSError.usage("'\(s)' contains ',' or ':', which apptainer.conf bind paths cannot carry") }
            lines.append("bind path = \(s)")
        }
        return lines.joined(separator: "\n")
    }
}

/// A CSV field: quoted (with doubled quotes) when it holds a comma, a quote or a space.
func csvField(_ s: String) -> String {
    guard s.contains(",") || s.contains("\"") || s.contains(" ") else { return s }
    return "\"" + s.replacing("\"", with: "\"\"") + "\""
}

/// A word for a POSIX shell: single-quoted unless it is plain.
func shellQuote(_ s: String) -> String {
    let plain = s.utf8.allSatisfy { c in
        (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || "/._-:=,+@%".utf8.contains(c)
    }
    if plain && !s.isEmpty { return s }
    return "'" + s.replacing("'", with: "'\\''") + "'"
}
