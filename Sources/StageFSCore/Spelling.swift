/// Edit distance between two words: insertions, deletions, substitutions and swaps of two
/// neighbouring characters count one each ("moutn" is one from "mount").
package func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a.lowercased()), b = Array(b.lowercased())
    if a.isEmpty || b.isEmpty { return max(a.count, b.count) }
    var d = [[Int]](repeating: [Int](repeating: 0, count: b.count + 1), count: a.count + 1)
    for i in 0...a.count { d[i][0] = i }
    for j in 0...b.count { d[0][j] = j }
    for i in 1...a.count {
        for j in 1...b.count {
            let cost = a[i - 1] == b[j - 1] ? 0 : 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] { d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1) }
        }
    }
    return d[a.count][b.count]
}

/// The candidates a mistyped `word` most likely meant: the closest within two edits (one for
/// words of up to four characters, where two edits reach unrelated words: "frob", "job"), or
/// else those it is the start of; empty when none is close.
package func closestMatches(to word: String, in candidates: [String]) -> [String] {
    let limit = word.count <= 4 ? 1 : 2
    let scored = candidates.map { ($0, editDistance(word, $0)) }.filter { $0.1 <= limit }
    if let best = scored.map(\.1).min() {
        let closest = scored.filter { $0.1 == best }.map(\.0)
        // "stat" is as close to "stage" as to "status"; the word it starts wins.
        let started = closest.filter { $0.lowercased().hasPrefix(word.lowercased()) }
        return started.isEmpty ? closest : started
    }
    return word.count >= 2 ? candidates.filter { $0.lowercased().hasPrefix(word.lowercased()) } : []
}
