import DataPath
import Metadata
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// An open file description.
final class FileHandle: Sendable {
    let ino: Ino
    let flags: Int32
    let writer: FileWriter?
    let readAhead = ReadAhead()
    /// What changes while it is open.
    let state: Locked<State>

    struct State {
        /// Lock owners that took POSIX locks through this handle (released on flush).
        var posixOwners: Set<UInt64> = []
        var flockOwner: UInt64?
        /// File size as of `stamp` (the data store's change stamp of the inode).
        var size: UInt64
        var stamp: UInt64
        /// The file's mode as this client last saw it: a write by a non-root caller clears
        /// set-user-ID and set-group-ID bits when it has some.
        var mode: UInt16
    }

    init(ino: Ino, flags: Int32, writer: FileWriter?, size: UInt64, stamp: UInt64, mode: UInt16) {
        self.ino = ino
        self.flags = flags
        self.writer = writer
        state = Locked(State(size: size, stamp: stamp, mode: mode))
    }

    var writable: Bool { flags & O_ACCMODE != O_RDONLY }
}

/// The open files of one client: its handles by number, and what each file was like when this
/// client last opened it (unchanged since, the kernel may keep its pages).
final class OpenFiles: Sendable {
    private let table = Locked<(handles: [UInt64: FileHandle], next: UInt64)>(([:], 1))
    /// (mtime, size, data change stamp) of a file at this client's last open of it.
    private let lastOpened = Locked<[Ino: (Timespec, UInt64, UInt64)]>([:])

    func add(_ h: FileHandle) -> UInt64 {
        table.withLock { t in
            let fh = t.next
            t.next += 1
            t.handles[fh] = h
            return fh
        }
    }

    func get(_ fh: UInt64) -> FileHandle? { table.withLock { $0.handles[fh] } }

    func remove(_ fh: UInt64) -> FileHandle? { table.withLock { $0.handles.removeValue(forKey: fh) } }

    var all: [FileHandle] { table.withLock { Array($0.handles.values) } }

    /// Whether this client holds `ino` open.
    func holds(_ ino: Ino) -> Bool { table.withLock { t in t.handles.values.contains { $0.ino == ino } } }

    /// Records the mode `a` in the open handles of `ino`.
    func noteMode(_ ino: Ino, _ a: Attr) {
        for h in table.withLock({ t in t.handles.values.filter { $0.ino == ino } }) { h.state.withLock { $0.mode = a.mode } }
    }

    /// Whether `ino` is as this client last opened it: the same mtime and size (`a`), and no
    /// data changed here since (`stamp`, the data store's change stamp before this open).
    func unchanged(_ ino: Ino, _ a: Attr, stamp: UInt64) -> Bool {
        lastOpened.withLock { last in
            let same = last[ino].map { $0.0 == a.mtime && $0.1 == a.size && $0.2 == stamp } ?? false
            if last.count > 100_000 { last.removeAll() }
            return same
        }
    }

    /// Notes what `ino` was like at this open.
    func opened(_ ino: Ino, _ a: Attr, stamp: UInt64) { lastOpened.withLock { $0[ino] = (a.mtime, a.size, stamp) } }
}
