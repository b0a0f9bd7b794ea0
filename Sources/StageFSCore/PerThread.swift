#if canImport(Glibc)
    import Glibc
#endif

/// A value of each thread (a pthread key), for what one call leaves for the next call on the
/// same thread (what a transaction committed, for the attributes the kernel asks next; the
/// outside request an engine operation runs for). Set values are retained until replaced or
/// the thread ends.
///
/// `@unchecked Sendable`: the key never changes after `init`, and each thread sees only its own
/// value (`pthread_getspecific`).
public final class PerThread<T: AnyObject>: @unchecked Sendable {
    private let key: pthread_key_t

    public init() {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in if let p { Unmanaged<AnyObject>.fromOpaque(p).release() } }
        key = k
    }

    public var value: T? {
        get { pthread_getspecific(key).map { Unmanaged<AnyObject>.fromOpaque($0).takeUnretainedValue() as! T } }
        set {
            if let old = pthread_getspecific(key) { Unmanaged<AnyObject>.fromOpaque(old).release() }
            pthread_setspecific(key, newValue.map { Unmanaged.passRetained($0 as AnyObject).toOpaque() })
        }
    }
}
