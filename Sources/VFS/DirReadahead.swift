import StageFSCore

/// Read-ahead of directory listings: while the kernel takes one page of a directory to the
/// lister (`ls -l` of 100,000 entries is some 260 pages), the next page is already being read
/// from the metadata engine on a thread of its own, so that the engine's round trip and the
/// kernel's work on the page before overlap instead of taking turns.
///
/// Per directory it keeps the pages last read (the page served stays: the kernel asks again
/// from inside it when not all of it fit its buffer), at most `pagesPerDir`, for at most
/// `dirs` directories. A page is served from here only while nothing this client changed
/// could have made it stale (`MetaCache.changes`, and the data clock of each inode it names)
/// and while it is younger than a fifth of the attribute cache's time; else it is read again.
final class DirReadahead: @unchecked Sendable {
    // @unchecked: `dirs` and every `Page`'s fields are read and written with `lock` held.

    /// One read of the engine: the entries after `after` (at most `limit`), with what the
    /// client cache needs to take their attributes (`stamp`, `epoch`) and to tell whether they
    /// are still good (`changes`, `born`). A page read ahead is made empty and filled when the
    /// read ends.
    final class Page: @unchecked Sendable {
        // @unchecked: a page read ahead is filled on the read-ahead thread with the owner's
        // lock held, and read only with it held.
        let after: UInt64
        let limit: Int
        var stamp: UInt64 = 0
        var epoch: UInt64 = 0
        var changes: UInt64 = 0
        var born: UInt64 = 0
        /// nil while it is being read.
        var entries: [DirEntry]?
        var failed = false

        init(after: UInt64, limit: Int) {
            self.after = after
            self.limit = limit
        }

        /// Fills the page with a read that began when this client's cache stood at `stamp`,
        /// `epoch` and `changes`.
        func fill(_ entries: [DirEntry], stamp: UInt64, epoch: UInt64, changes: UInt64) {
            self.stamp = stamp
            self.epoch = epoch
            self.changes = changes
            self.born = Sys.monotonicNanos()
            self.entries = entries
        }

        /// Whether the directory may have more entries after this page.
        var full: Bool { (entries?.count ?? 0) >= limit }
    }

    /// What a listing is served from: its entries and the oldest `stamp` and `epoch` of the
    /// pages they came from.
    struct Served {
        var entries: [DirEntry]
        var stamp: UInt64
        var epoch: UInt64
    }

    static let pagesPerDir = 3
    static let dirs = 8
    private let lock = ConditionLock()
    /// The pages of each directory, in order of position, each following the one before; the
    /// directory last served is last.
    private var pages: [(dir: Ino, list: [Page])] = []
    /// (Pages of one directory are read one after the other: more threads serve more
    /// directories listed at once.)
    private let pool = WorkerPool(name: "dir-readahead", threads: 4)
    /// How long a page may be served after it was read (nanoseconds).
    private let ttl: UInt64

    init(ttl: UInt64) { self.ttl = ttl }

    func shutdown() { pool.shutdown() }

    /// The entries of `dir` after position `after`, at most `limit`, from pages read before;
    /// nil when they are not all here or not good any more (`valid` says, of each page used).
    /// Waits for a page still being read.
    func take(_ dir: Ino, after: UInt64, limit: Int, valid: (Page) -> Bool) -> Served? {
        lock.withLock { () -> Served? in
            while true {
                guard let i = pages.firstIndex(where: { $0.dir == dir }) else { return nil }
                let list = pages[i].list
                // The page to start in: the one read from `after`, or the one holding it.
                guard
                    let start = list.firstIndex(where: { p in
                        p.after == after || (p.entries?.contains { $0.cookie == after } ?? false)
                    })
                else { return nil }
                // (A page still being read is waited for, unless what it began with is stale
                // already; the list may change meanwhile.)
                if let p = list[start...].first(where: { $0.entries == nil && !$0.failed }) {
                    guard valid(p) else {
                        pages.remove(at: i)
                        return nil
                    }
                    while p.entries == nil && !p.failed { lock.wait() }
                    continue
                }
                var out = Served(entries: [], stamp: .max, epoch: .max)
                var lastFull = true
                for p in list[start...] {
                    let now = Sys.monotonicNanos()
                    guard let e = p.entries, valid(p), now >= p.born, now - p.born <= ttl else {
                        pages.remove(at: i)
                        return nil
                    }
                    out.stamp = min(out.stamp, p.stamp)
                    out.epoch = min(out.epoch, p.epoch)
                    var from = e.startIndex
                    if out.entries.isEmpty && p.after != after, let k = e.firstIndex(where: { $0.cookie == after }) { from = k + 1 }
                    out.entries += e[from..<min(e.endIndex, from + limit - out.entries.count)]
                    lastFull = p.full
                    if out.entries.count == limit || !p.full { break }
                }
                // (Not all read yet: the caller reads the page itself. Nor is an empty page
                // served: the kernel takes it for the directory's end, and a page short of its
                // limit may only have lost entries whose inodes were gone.)
                if out.entries.isEmpty || (out.entries.count < limit && lastFull) { return nil }
                pages[i].list = Array(list[start...])
                pages.append(pages.remove(at: i))
                return out
            }
        }
    }

    /// Keeps `page` (just read, and served) as the one the next listing of `dir` continues in.
    func keep(_ dir: Ino, _ page: Page) {
        lock.withLock {
            if let i = pages.firstIndex(where: { $0.dir == dir }) { pages.remove(at: i) }
            pages.append((dir, [page]))
            if pages.count > Self.dirs { pages.removeFirst() }
        }
    }

    /// Starts reading the page of `dir` after its last one kept, when that one was full and
    /// no later one is kept or being read: `read` (run on a read-ahead thread) reads a page,
    /// or throws and the page is not used. `changes`: the client cache's count of changes now
    /// (a page waited for is given up once it moved).
    func readAhead(_ dir: Ino, changes: UInt64, _ read: @escaping @Sendable (_ after: UInt64, _ limit: Int) throws(FSError) -> Page) {
        let page: Page? = lock.withLock {
            guard let i = pages.firstIndex(where: { $0.dir == dir }), let last = pages[i].list.last else { return nil }
            guard let e = last.entries, last.full, let end = e.last?.cookie else { return nil }
            if pages[i].list.count >= Self.pagesPerDir { pages[i].list.removeFirst() }
            let p = Page(after: end, limit: last.limit)
            p.changes = changes
            pages[i].list.append(p)
            return p
        }
        guard let page else { return }
        pool.submit { [self] in
            // (A page no list holds any more is not read: given up, or pushed out by others.)
            let wanted = lock.withLock { pages.contains { $0.list.contains { $0 === page } } }
            let got = wanted ? try? read(page.after, page.limit) : nil
            lock.withLock {
                if let got, let e = got.entries {
                    page.fill(e, stamp: got.stamp, epoch: got.epoch, changes: got.changes)
                } else {
                    page.failed = true
                    for k in pages.indices { pages[k].list.removeAll { $0 === page } }
                }
                lock.broadcast()
            }
        }
    }
}
