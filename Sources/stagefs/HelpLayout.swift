import ArgumentParser

#if canImport(Glibc)
    import Glibc
#endif

/// The help of a META-URL argument (every form is in `stagefs --help`).
/// The first argument of `mount`: the META-URL, left out when `STAGEFS_VOLUME` names it.
let volumeOrFirstHelp = ArgumentHelp(
    "Metadata store (every form: stagefs --help); leave it out to use $STAGEFS_VOLUME ('module load fs-client' sets it).",
    valueName: "meta-url")

/// The volume `STAGEFS_VOLUME` names (the `fs-client` module sets it): the META-URL of `mount`,
/// `stage` and `status` when none is given.
func defaultVolume() -> String? {
    guard let v = getenv("STAGEFS_VOLUME").map({ String(cString: $0) }), !v.isEmpty else { return nil }
    return v
}

let metaURLHelp = ArgumentHelp(
    "Metadata store: sqlite3:///abs/path.db, redis://host[:port][/db] or a gateway's stagefs+unix:///path/NAME.sock (every form: stagefs --help).",
    valueName: "meta-url")

/// Lays `--help` text out at the terminal's width.
///
/// argument-parser wraps each line of a command's discussion on its own, so paragraphs broken
/// by hand and two-column tables come out ragged at any width but the one they were typed for,
/// and it never wraps the USAGE line. Discussions are therefore read as a small layout language
/// and set here; the sections argument-parser sets well (ARGUMENTS, OPTIONS, SUBCOMMANDS) are
/// kept as it renders them.
///
/// - A run of unindented lines is one paragraph, joined and wrapped; a line ending in ':' (a
///   heading) ends it.
/// - An indented line with a gap of two or more spaces is a definition, `term  description`;
///   the more deeply indented lines after it continue the description. An indented line with
///   no gap followed by more deeply indented lines is a term whose description they are.
///   The description stays in its column when the width leaves room for it, else it goes
///   under the term.
/// - Any other indented line is verbatim (a command, a URL form); a line ending in ` \` and the
///   lines after it are one shell command. Verbatim lines too long for the width are broken at
///   a space with ` \`.
enum HelpLayout {
    /// The width help is set to: `COLUMNS`, else the terminal's, else 80 (as argument-parser).
    static var width: Int {
        if let c = getenv("COLUMNS").flatMap({ Int(String(cString: $0)) }), c > 0 { return c }
        var w = winsize()
        if ioctl(1, UInt(TIOCGWINSZ), &w) == 0 && w.ws_col > 0 { return Int(w.ws_col) }
        return 80
    }

    /// The help text of the command `error` asks for (a help request), set at `width`.
    static func help(for error: Error, width: Int) -> String {
        let wide = rendered(error, columns: 1_000_000)
        let narrow = rendered(error, columns: width)
        let wideLines = wide.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let narrowLines = narrow.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        guard let u = wideLines.firstIndex(where: { $0.hasPrefix("USAGE: ") }),
            let n = narrowLines.firstIndex(where: { $0.hasPrefix("USAGE: ") })
        else { return narrow }
        var out = discussion(Array(wideLines[..<u]), width: width)
        var usage = [wideLines[u]]
        var rest = n + 1
        while rest < narrowLines.count && narrowLines[rest].hasPrefix("       ") {
            usage.append(narrowLines[rest])
            rest += 1
        }
        out += usage.flatMap { synopsis($0, width: width) }
        out += narrowLines[rest...]
        return out.joined(separator: "\n")
    }

    /// argument-parser's full message for `error`, with `COLUMNS` set for the call.
    private static func rendered(_ error: Error, columns: Int) -> String {
        let saved = getenv("COLUMNS").map { String(cString: $0) }
        setenv("COLUMNS", String(columns), 1)
        defer {
            if let saved { setenv("COLUMNS", saved, 1) } else { unsetenv("COLUMNS") }
        }
        return StageFS.fullMessage(for: error)
    }

    /// A USAGE line (or an error's `Usage:` line) wrapped at spaces outside brackets, continued
    /// under the command.
    static func synopsis(_ line: String, width: Int) -> [String] {
        guard line.count > width else { return [line] }
        var words: [String] = []
        var word = ""
        var depth = 0
        for c in line {
            if c == "[" || c == "<" || c == "(" { depth += 1 }
            if c == "]" || c == ">" || c == ")" { depth -= 1 }
            if c == " " && depth <= 0 {
                if !word.isEmpty { words.append(word) }
                word = ""
            } else {
                word.append(c)
            }
        }
        if !word.isEmpty { words.append(word) }
        // An option stays with its value: "--cache-dir <cache-dir>".
        var units: [String] = []
        for w in words {
            if w.hasPrefix("<"), let last = units.last, last.hasPrefix("-") { units[units.count - 1] += " " + w } else { units.append(w) }
        }
        return fill(units, width: width, firstIndent: "", indent: String(repeating: " ", count: 7))
    }

    /// One item of a discussion.
    private enum Block {
        case blank
        case paragraph([String])
        /// `term`, its indentation and the column its description starts at.
        case definition(indent: Int, term: String, column: Int, description: [String])
        /// A command (one or more lines joined by ` \`), without the ` \`.
        case verbatim(indent: Int, lines: [String])
    }

    /// The OVERVIEW and discussion lines (as typed) set at `width`.
    static func discussion(_ lines: [String], width: Int) -> [String] {
        var out: [String] = []
        for block in parse(lines) {
            switch block {
            case .blank: out.append("")
            case .paragraph(let words): out += fill(words, width: width, firstIndent: "", indent: "")
            case .verbatim(let indent, let lines):
                let pad = String(repeating: " ", count: indent)
                for (i, l) in lines.enumerated() {
                    let last = i == lines.count - 1
                    var set = command(l, width: last ? width : width - 2, pad: i == 0 ? pad : pad + "    ")
                    if !last { set[set.count - 1] += " \\" }
                    out += set
                }
            case .definition(let indent, let term, let column, let description):
                let pad = String(repeating: " ", count: indent)
                // The description keeps its column while that leaves it 36 characters.
                let side = width - column >= 36
                let descIndent = String(repeating: " ", count: side ? column : indent + 4)
                var text = fill(description, width: width, firstIndent: descIndent, indent: descIndent)
                if side && indent + term.count + 2 <= column {
                    text[0] = pad + term + String(repeating: " ", count: column - indent - term.count) + text[0].dropFirst(column)
                    out += text
                } else {
                    out += command(term, width: width, pad: pad) + text
                }
            }
        }
        return out
    }

    private static func indentation(_ line: String) -> Int { line.prefix { $0 == " " }.count }

    private static func words(_ s: Substring) -> [String] { s.split(separator: " ").map(String.init) }

    private static func parse(_ lines: [String]) -> [Block] {
        var blocks: [Block] = []
        var i = 0
        // The description column of the definition just before: one typed a column or two off
        // is aligned with it.
        var lastColumn: Int?
        while i < lines.count {
            let line = lines[i]
            let indent = indentation(line)
            let previousColumn = lastColumn
            lastColumn = nil
            if indent == line.count {
                blocks.append(.blank)
                i += 1
            } else if indent == 0 {
                // A paragraph, up to a blank or indented line, or a line ending in ':'.
                var text: [String] = []
                while i < lines.count, indentation(lines[i]) == 0, !lines[i].isEmpty {
                    text += words(lines[i][...])
                    i += 1
                    if lines[i - 1].hasSuffix(":") { break }
                }
                blocks.append(.paragraph(text))
            } else if line.hasSuffix(" \\") {
                var cmd = [String(line.dropFirst(indent).dropLast(2))]
                i += 1
                while i < lines.count, indentation(lines[i]) > indent {
                    let more = lines[i].trimmed
                    i += 1
                    cmd.append(more.hasSuffix(" \\") ? String(more.dropLast(2)) : more)
                    if !more.hasSuffix(" \\") { break }
                }
                blocks.append(.verbatim(indent: indent, lines: cmd))
            } else {
                let text = line.dropFirst(indent)
                var term = String(text)
                var column: Int?
                var description: [String] = []
                let twoSpaces = text.indices.dropLast().first { text[$0] == " " && text[text.index(after: $0)] == " " }
                if let gap = twoSpaces {
                    let end = text[gap...].firstIndex { $0 != " " } ?? text.endIndex
                    term = String(text[..<gap])
                    column = indent + text.distance(from: text.startIndex, to: end)
                    description = words(text[end...])
                }
                i += 1
                while i < lines.count, indentation(lines[i]) > indent, indentation(lines[i]) < lines[i].count {
                    if column == nil { column = indentation(lines[i]) }
                    description += words(lines[i][...])
                    i += 1
                }
                if var column, !description.isEmpty {
                    if let c = previousColumn, abs(c - column) <= 2 { column = c }
                    blocks.append(.definition(indent: indent, term: term, column: column, description: description))
                    lastColumn = column
                    continue
                }
                blocks.append(.verbatim(indent: indent, lines: [term]))
            }
        }
        return blocks
    }

    /// Words filled into lines of at most `width` (a longer word stands alone).
    private static func fill(_ words: [String], width: Int, firstIndent: String, indent: String) -> [String] {
        var lines: [String] = []
        var line = firstIndent
        var empty = true
        for w in words {
            if !empty && line.count + 1 + w.count > width {
                lines.append(line)
                line = indent
                empty = true
            }
            line += (empty ? "" : " ") + w
            empty = false
        }
        lines.append(line)
        return lines
    }

    /// A verbatim line: as it is when it fits, else broken at spaces with ` \`, continued four
    /// columns in.
    private static func command(_ text: String, width: Int, pad: String) -> [String] {
        if pad.count + text.count <= width { return [pad + text] }
        // An option stays with its value: "-o allow_root".
        var units: [String] = []
        for w in words(text[...]) {
            if !w.hasPrefix("-"), let last = units.last, last.hasPrefix("-"), !last.contains(" ") {
                units[units.count - 1] += " " + w
            } else {
                units.append(w)
            }
        }
        var lines = fill(units, width: width - 2, firstIndent: pad, indent: pad + "    ")
        for k in lines.indices.dropLast() { lines[k] += " \\" }
        return lines
    }
}
