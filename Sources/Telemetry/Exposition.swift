import StageFSCore

/// One sample of an exposition: `name{label="value",...} 1.5`.
package struct Sample: Sendable, Equatable {
    package var name: String
    package var labels: [String: String]
    package var value: Double

    package init(name: String, labels: [String: String], value: Double) {
        self.name = name
        self.labels = labels
        self.value = value
    }
}

/// A scrape read back (`stagefs stats`): the samples of Prometheus' text format. Lines that are
/// not samples (comments, blank) are skipped, and so is a malformed one.
package struct Scrape: Sendable {
    package var samples: [Sample] = []
    private var byName: [String: [Int]] = [:]

    package init(_ text: [UInt8]) {
        for line in text.split(separator: 10) {
            guard let s = Self.sample(line) else { continue }
            byName[s.name, default: []].append(samples.count)
            samples.append(s)
        }
    }

    /// The sum of `name`'s samples whose labels include `matching`.
    package func sum(_ name: String, _ matching: [String: String] = [:]) -> Double {
        (byName[name] ?? []).reduce(0) { acc, i in
            matching.allSatisfy { samples[i].labels[$0.key] == $0.value } ? acc + samples[i].value : acc
        }
    }

    /// `name`'s samples summed by the value of `label`.
    package func by(_ name: String, _ label: String) -> [String: Double] {
        var out: [String: Double] = [:]
        for i in byName[name] ?? [] { out[samples[i].labels[label] ?? "", default: 0] += samples[i].value }
        return out
    }

    package func has(_ name: String) -> Bool { byName[name] != nil }

    static func sample(_ line: ArraySlice<UInt8>) -> Sample? {
        guard let first = line.first, first != UInt8(ascii: "#") else { return nil }
        var i = line.startIndex
        while i < line.endIndex && line[i] != UInt8(ascii: "{") && line[i] != 32 { i += 1 }
        let name = String(decoding: line[line.startIndex..<i], as: UTF8.self)
        guard !name.isEmpty, i < line.endIndex else { return nil }
        var labels: [String: String] = [:]
        if line[i] == UInt8(ascii: "{") {
            i += 1
            while i < line.endIndex && line[i] != UInt8(ascii: "}") {
                let k0 = i
                while i < line.endIndex && line[i] != UInt8(ascii: "=") { i += 1 }
                guard i + 1 < line.endIndex, line[i + 1] == UInt8(ascii: "\"") else { return nil }
                let key = String(decoding: line[k0..<i], as: UTF8.self).trimmingCharacters(in: ",")
                i += 2
                var value: [UInt8] = []
                while i < line.endIndex && line[i] != UInt8(ascii: "\"") {
                    if line[i] == UInt8(ascii: "\\"), i + 1 < line.endIndex {
                        i += 1
                        value.append(line[i] == UInt8(ascii: "n") ? 10 : line[i])
                    } else {
                        value.append(line[i])
                    }
                    i += 1
                }
                guard i < line.endIndex else { return nil }
                i += 1
                if i < line.endIndex && line[i] == UInt8(ascii: ",") { i += 1 }
                labels[key] = String(decoding: value, as: UTF8.self)
            }
            guard i < line.endIndex else { return nil }
            i += 1
        }
        let rest = line[i...].split(separator: 32)
        guard let v = rest.first else { return nil }
        let text = String(decoding: v, as: UTF8.self)
        let value: Double?
        switch text {
        case "+Inf": value = .infinity
        case "-Inf": value = -.infinity
        case "NaN": value = .nan
        default: value = Double(text)
        }
        guard let value else { return nil }
        return Sample(name: name, labels: labels, value: value)
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set || s.first == " " { s = s.dropFirst() }
        return String(s)
    }
}
