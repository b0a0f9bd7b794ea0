import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// A pthread mutex with a condition variable: the one blocking primitive of StageFS.
///
/// Used on the threads StageFS owns (FUSE workers, upload and download pools), never on the
/// Swift concurrency pool.
public final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    /// Runs `body` holding the lock.
    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits for a signal; the lock must be held.
    public func wait() { pthread_cond_wait(cond, mutex) }

    /// Waits for a signal or `seconds`; returns false on timeout. The lock must be held.
    @discardableResult
    public func wait(seconds: Double) -> Bool {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let total = Int64(ts.tv_nsec) + Int64(seconds * 1e9)
        ts.tv_sec += Int(total / 1_000_000_000)
        ts.tv_nsec = Int(total % 1_000_000_000)
        return pthread_cond_timedwait(cond, mutex, &ts) == 0
    }

    public func signal() { pthread_cond_signal(cond) }
    public func broadcast() { pthread_cond_broadcast(cond) }
}

/// A value guarded by the standard library's `Mutex`, in a class so closures running on several
/// threads can share it.
///
/// Never a function (or an optional one) as `Value`: keep it in a `Hook`. `withLock` hands the
/// value over `inout`, and a function kept in generic storage is re-wrapped on each such
/// access in a new reabstraction thunk around the previous one, so every call went through
/// all the wrappers before it: a mount's commit hook made each commit slower than the last and
/// overflowed an upload thread's stack after some 20,000 files.
public final class Locked<Value>: Sendable {
    private let mutex: Mutex<Value>

    public init(_ value: consuming sending Value) { mutex = Mutex(value) }

    @inline(__always)
    public func withLock<T, E: Error>(_ body: (inout sending Value) throws(E) -> sending T) throws(E) -> sending T {
        try mutex.withLock(body)
    }
}

extension Locked where Value: Sendable {
    public var current: Value { withLock { $0 } }
}

/// A function set after its holder is made (a callback a later layer installs) and called from
/// any thread. It is kept in a class, never re-wrapped: each call goes through the same one
/// or two thunks however often it is called (see `Locked`).
public final class Hook<F: Sendable>: Sendable {
    private final class Box: Sendable {
        let f: F
        init(_ f: F) { self.f = f }
    }

    private let slot = Locked<Box?>(nil)

    public init() {}

    /// Installs `f` in place of what was there.
    public func set(_ f: F) {
        let box = Box(f)
        slot.withLock { $0 = box }
    }

    /// The function installed, if any.
    public var current: F? { slot.withLock { $0 }?.f }
}

/// A fixed set of threads running submitted jobs in order of submission.
///
/// Blocking work (object-store requests, disk IO) runs here rather than on the Swift
/// concurrency pool. Each thread is a pthread whose context is passed as an `Unmanaged`
/// pointer: `start` retains the pool once per thread, the thread releases it when it exits.
public final class WorkerPool: @unchecked Sendable {
    public typealias Job = @Sendable () -> Void

    private let lock = ConditionLock()
    private var queue: [Job?] = []
    private var head = 0
    private var stopping = false
    private var running = 0
    private var busy = 0
    public let name: String

    /// Starts `threads` worker threads.
    public init(name: String, threads: Int) {
        self.name = name
        for _ in 0..<max(1, threads) { start() }
    }

    private func start() {
        var tid = pthread_t()
        let ctx = Unmanaged.passRetained(self).toOpaque()
        running += 1
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, 1 << 20)
        let rc = pthread_create(&tid, &attr, workerPoolMain, ctx)
        pthread_attr_destroy(&attr)
        if rc != 0 {
            Unmanaged<WorkerPool>.fromOpaque(ctx).release()
            running -= 1
        } else {
            pthread_detach(tid)
        }
    }

    /// Queues `job`; it runs on one of the pool's threads.
    public func submit(_ job: @escaping Job) {
        lock.withLock {
            queue.append(job)
            lock.signal()
        }
    }

    /// Jobs waiting or running.
    public var pending: Int { lock.withLock { queue.count - head + busy } }

    /// Lets queued jobs finish, then ends the threads.
    public func shutdown() {
        lock.withLock {
            stopping = true
            lock.broadcast()
        }
    }

    fileprivate func run() {
        while true {
            lock.lock()
            while head == queue.count && !stopping { lock.wait() }
            if head == queue.count {
                running -= 1
                lock.unlock()
                return
            }
            let job = queue[head]!
            // Drop the queue's reference now: a finished job must not keep what it captured alive.
            queue[head] = nil
            head += 1
            if head >= 64 && head * 2 >= queue.count {
                queue.removeFirst(head)
                head = 0
            }
            busy += 1
            lock.unlock()
            job()
            lock.withLock { busy -= 1 }
        }
    }
}

private func workerPoolMain(_ ctx: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let pool = Unmanaged<WorkerPool>.fromOpaque(ctx!).takeRetainedValue()
    pool.run()
    return nil
}

/// Waits for a set of jobs: `add` before submitting, `done` when each ends, `wait` for all.
public final class WaitGroup: @unchecked Sendable {
    private let lock = ConditionLock()
    private var count = 0
    private var firstError: FSError?

    public init() {}

    public func add(_ n: Int = 1) { lock.withLock { count += n } }

    /// Marks one job finished, remembering the first error.
    public func done(_ error: FSError? = nil) {
        lock.withLock {
            count -= 1
            if let error, firstError == nil { firstError = error }
            if count == 0 { lock.broadcast() }
        }
    }

    /// Blocks until every job is done; throws the first error any of them reported.
    public func wait() throws(FSError) {
        let err: FSError? = lock.withLock {
            while count > 0 { lock.wait() }
            return firstError
        }
        if let err { throw err }
    }
}

/// A counting semaphore over bytes: bounds memory held by write buffers (back-pressure).
public final class ByteBudget: @unchecked Sendable {
    private let lock = ConditionLock()
    public let limit: Int
    private var used = 0

    public init(limit: Int) { self.limit = limit }

    /// Takes `n` bytes, waiting while the budget is exhausted (one request may always proceed alone).
    public func acquire(_ n: Int) {
        lock.withLock {
            while used > 0 && used + n > limit { lock.wait() }
            used += n
        }
    }

    /// Takes `n` more bytes without waiting (memory already allocated beyond an estimate).
    public func add(_ n: Int) {
        lock.withLock { used += n }
    }

    /// Gives back `n` bytes.
    public func release(_ n: Int) {
        lock.withLock {
            used -= n
            lock.broadcast()
        }
    }

    public var inUse: Int { lock.withLock { used } }
}

/// A detached thread of its own (not the Swift concurrency pool) for work that blocks, such as
/// serving one connection.
public enum DetachedThread {
    /// The closure a thread runs, passed to it retained; the thread releases it.
    private final class Body: Sendable {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    /// Starts `body` on a new thread with a `stackSize`-byte stack; false when no thread could be made.
    @discardableResult
    public static func start(stackSize: Int = 1 << 20, _ body: @escaping @Sendable () -> Void) -> Bool {
        var tid = pthread_t()
        let ctx = Unmanaged.passRetained(Body(body)).toOpaque()
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setstacksize(&attr, stackSize)
        let rc = pthread_create(&tid, &attr, detachedThreadMain, ctx)
        pthread_attr_destroy(&attr)
        if rc != 0 {
            Unmanaged<Body>.fromOpaque(ctx).release()
            return false
        }
        pthread_detach(tid)
        return true
    }

    fileprivate static func run(_ ctx: UnsafeMutableRawPointer) {
        Unmanaged<Body>.fromOpaque(ctx).takeRetainedValue().run()
    }
}

private func detachedThreadMain(_ ctx: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    if let ctx { DetachedThread.run(ctx) }
    return nil
}

/// The life of a background thread (a mount's deleter, compactor or backup runner): started
/// once, asked to stop, waited for. Its lock also guards what the owner keeps beside it (work
/// queued, flags), so that the thread waits on it for work or for its time.
public final class ThreadLife: @unchecked Sendable {
    // @unchecked: `stopping` and `running` are only read or written with `lock` held.
    public let lock = ConditionLock()
    private var _stopping = false
    private var running = false

    public init() {}

    /// Whether `stop` was asked (read with `lock` held).
    public var stopping: Bool { _stopping }

    /// Runs `body` on a thread of its own; `stop` waits for it to return.
    public func start(_ body: @escaping @Sendable () -> Void) {
        lock.withLock { running = true }
        let started = DetachedThread.start { [self] in
            body()
            lock.withLock {
                running = false
                lock.broadcast()
            }
        }
        if !started { lock.withLock { running = false } }
    }

    /// Asks the thread to stop (`also` runs first, with the lock held: work queued dropped)
    /// and waits until it has.
    public func stop(_ also: () -> Void = {}) {
        lock.withLock {
            _stopping = true
            also()
            lock.broadcast()
            while running { lock.wait(seconds: 1) }
        }
    }

    /// Waits up to `seconds` unless stopping; returns whether stopping (with `lock` held).
    public func pause(seconds: Double) -> Bool {
        if !_stopping { lock.wait(seconds: seconds) }
        return _stopping
    }
}
