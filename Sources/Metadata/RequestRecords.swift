import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// A request id given from outside the engine: a gateway's client names its requests so that
/// one sent again after a lost reply (the gateway was killed while carrying it out, the
/// connection broke) is found carried out instead of being done twice. `session` is the
/// client's session, whose record it is (a gateway checks that it is the caller's, so one user
/// cannot touch another's records), `slot` one of the client's requests in flight (a slot is
/// reused only once its request has its answer) and `number` the request in that slot.
package struct RequestID: Sendable, Equatable, CustomStringConvertible {
    package var session: UInt64
    package var slot: UInt32
    package var number: UInt64

    package init(session: UInt64, slot: UInt32, number: UInt64) {
        self.session = session
        self.slot = slot
        self.number = number
    }

    package var description: String { "request \(slot):\(number) of session \(session)" }
}

extension FSError {
    /// A change sent again whose first sending was committed already: its saved result answers it.
    package static let carriedOut = FSError(EALREADY, "the change was carried out already (its request id is recorded)")
}

/// An engine that records outside request ids with the changes they made (`MetadataEngine`s
/// whose store keeps such records: Redis).
package protocol RequestRecords {
    /// What request `r` left when it was carried out: its saved result (empty when it saved
    /// none), or nil when it was not carried out (or its slot has moved on to a later request).
    func carriedOut(_ r: RequestID) throws(FSError) -> [UInt8]?
    /// Runs `body` (one engine operation) so that the commit that is its change records `r`.
    /// `save` is given the result of each write transaction of the operation before it commits
    /// and says whether it is the change: nil, not (e.g. a step of a long truncation, which a
    /// later one finishes); bytes, it is, and they are saved with it (empty or over 64 KiB:
    /// nothing saved). A commit that finds `r` recorded already throws `FSError.carriedOut`:
    /// an earlier sending of it, or another attempt of the request, was committed, and the
    /// result saved then (`carriedOut`) is the answer.
    func recording<T>(_ r: RequestID, save: @escaping (Any) -> [UInt8]?, _ body: () throws(FSError) -> T) throws(FSError) -> T
}

/// A `TxnStore` that keeps outside request ids (see `RequestRecords`).
package protocol RequestRecordStore: TxnStore {
    func carriedOut(_ r: RequestID) throws(FSError) -> [UInt8]?
}

extension TxnMetadata: RequestRecords where S: RequestRecordStore {
    package func carriedOut(_ r: RequestID) throws(FSError) -> [UInt8]? { try store.carriedOut(r) }

    package func recording<T>(_ r: RequestID, save: @escaping (Any) -> [UInt8]?, _ body: () throws(FSError) -> T) throws(FSError) -> T {
        let previous = ActiveRequest.current
        ActiveRequest.current = ActiveRequest(id: r, save: save)
        defer { ActiveRequest.current = previous }
        return try body()
    }
}

/// The outside request an engine operation on this thread runs for (`RequestRecords.recording`).
/// Kept per thread, for the length of one operation, because the operation's methods take no
/// request parameter: the operation runs on the calling thread from start to end, and the
/// commit that is its change takes the request (so one request records one commit). A
/// transaction itself still keeps nothing in the thread (it is a value).
final class ActiveRequest {
    let id: RequestID
    let save: (Any) -> [UInt8]?
    /// Recorded by a commit of the operation.
    var taken = false

    init(id: RequestID, save: @escaping (Any) -> [UInt8]?) {
        self.id = id
        self.save = save
    }

    static var current: ActiveRequest? {
        get { activeRequestOfThread.value }
        set { activeRequestOfThread.value = newValue }
    }

    /// The request of the operation on this thread, while no commit has recorded it.
    static var pending: ActiveRequest? {
        guard let a = current, !a.taken else { return nil }
        return a
    }
}

private let activeRequestOfThread = PerThread<ActiveRequest>()
