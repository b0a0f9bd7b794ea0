import DataPath
import Metadata
import ObjectStorage
import StageFSCore

#if canImport(Glibc)
    import Glibc
#endif

/// The object store of a client behind a gateway: blocks go through the gateway, which holds the
/// bucket's keys. A block is fetched with the tag its slice came with (so only blocks of files
/// the user may read) and stored only under a slice id the gateway allocated to the user, once
/// (blocks are never overwritten). Listing and deleting are the gateway's.
package final class GatewayObjectStore: ObjectStore {
    let meta: GatewayMetadata
    /// Reads pre-signed URLs of an S3 bucket (holding no key).
    let urls: S3ObjectStore?

    /// `bucket`: the volume's bucket URL (from its format record, which the caller has read).
    package init(meta: GatewayMetadata, bucket: String) throws(FSError) {
        self.meta = meta
        urls = meta.client.blockURLs ? try S3ObjectStore(StoreConfig(storage: "s3", bucket: bucket)) : nil
    }

    package var description: String { "the bucket behind the \(meta.client.description)" }

    package var isProxy: Bool { true }

    package func put(_ key: String, _ data: UnsafeRawBufferPointer) throws(FSError) {
        guard let id = Self.sliceID(key), let range = meta.tags.range(of: id) else {
            throw FSError(EACCES, "\(key): not a block of a slice this client was given")
        }
        // (A small block the writer could hold for its slice's commit never comes here:
        // `holdForCommit` took it.)
        _ = try meta.client.call(.putBlock, tail: data) {
            $0.string(key)
            $0.u64(range.first)
            $0.u64(range.count)
            $0.u64(range.tag)
            $0.u32(UInt32(data.count))
        }
    }

    /// A small block goes with its slice's commit: one request for a small file's data and its
    /// record.
    package func holdForCommit(_ key: String, _ data: UnsafeRawBufferPointer) -> Bool {
        guard let id = Self.sliceID(key), meta.tags.range(of: id) != nil else { return false }
        return meta.tags.holdForCommit(id, key, data)
    }

    package func get(_ key: String, offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FSError) -> Int {
        guard let id = Self.sliceID(key), let tag = meta.tags.blockTag(id) else {
            throw FSError(EACCES, "\(key): this client holds no right to read it (its chunk was not read through the gateway)")
        }
        if let fd = meta.tags.takeStashed(key) {
            // It came with the file's open.
            defer { Sys.close(fd) }
            guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
            return try Sys.pread(fd, base, buffer.count, Int64(offset), path: key)
        }
        if let urls {
            // Straight from the bucket, with a URL the gateway signed for this block.
            var r = try meta.client.call(.presignBlock) {
                $0.string(key)
                $0.u64(tag)
            }
            let url = try r.string(max: 8192)
            return try urls.get(presigned: url, key: key, offset: offset, into: buffer)
        }
        if meta.client.blockDescriptors {
            // The block's file itself: read here, nothing copied through the gateway.
            let (_, fd) = try meta.client.callForDescriptor(.openBlock) {
                $0.string(key)
                $0.u64(tag)
            }
            defer { Sys.close(fd) }
            guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
            return try Sys.pread(fd, base, buffer.count, Int64(offset), path: key)
        }
        var r = try meta.client.call(.getBlock) {
            $0.string(key)
            $0.u32(UInt32(offset))
            $0.u32(UInt32(min(buffer.count, Int(UInt32.max))))
            $0.u64(tag)
        }
        let n = min(r.remaining, buffer.count)
        let bytes = try r.raw(n)
        bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: n) }
        return n
    }

    package func delete(_ key: String) throws(FSError) {
        throw FSError(EPERM, "objects are deleted by the gateway")
    }

    package func head(_ key: String) throws(FSError) -> Int? {
        throw FSError(EPERM, "the gateway does not answer for objects by name")
    }

    package func list(prefix: String, after: String?, limit: Int) throws(FSError) -> [ObjectInfo] {
        throw FSError(EPERM, "the gateway does not list the bucket")
    }

    package func create() throws(FSError) {}

    /// The slice id of a block key (`Layout.sliceID`).
    package static func sliceID(_ key: String) -> UInt64? { Layout.sliceID(ofKey: key) }
}
