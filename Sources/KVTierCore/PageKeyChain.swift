import CKVTierKernels

/// Page keys as a hash chain: `key(n) = BLAKE2b-128(key(n-1) ‖ modelID ‖ tokens of page n)`, with
/// 16 zero bytes standing for the key before the first page, the model id as 8 little-endian
/// bytes and each token id as 4 little-endian bytes. Equal prefixes give equal keys in every
/// process; Python derives the same keys with `hashlib.blake2b(data, digest_size=16)`.
public enum PageKeyChain {
    /// The key of the page after `parent` (nil for the first page) holding `tokens`.
    public static func key(parent: PageKey?, modelID: UInt64, tokens: some Collection<UInt32>) -> PageKey {
        var state = hashState(parent: parent, modelID: modelID)
        var words = ContiguousArray<UInt32>()
        words.reserveCapacity(tokens.count)
        for token in tokens { words.append(token.littleEndian) }
        words.withUnsafeBytes { kvt_blake2b_update(&state, $0.baseAddress, $0.count) }
        var digest = [UInt8](repeating: 0, count: 16)
        digest.withUnsafeMutableBufferPointer { kvt_blake2b_final(&state, $0.baseAddress) }
        return PageKey(digestBytes: digest)
    }

    /// `key` for a slice of an array, what the store and the daemon pass: the same bytes hashed
    /// straight from the array's memory, without the generic path's copies and allocations
    /// (measured at a third of the daemon's time per cached `GET` before this existed).
    public static func key(parent: PageKey?, modelID: UInt64, tokens: ArraySlice<UInt32>) -> PageKey {
        #if _endian(little)
        var state = kvt_blake2b_state()
        kvt_blake2b_init(&state, 16)
        // The parent's digest bytes are its words most significant byte first.
        var prefix: (UInt64, UInt64, UInt64) = (parent?.high.bigEndian ?? 0, parent?.low.bigEndian ?? 0, modelID.littleEndian)
        withUnsafeBytes(of: &prefix) { kvt_blake2b_update(&state, $0.baseAddress, $0.count) }
        tokens.withUnsafeBytes { kvt_blake2b_update(&state, $0.baseAddress, $0.count) }
        return finish(&state)
        #else
        return key(parent: parent, modelID: modelID, tokens: tokens.lazy.map { $0 })
        #endif
    }

    /// The key a hash state stands for: its 16 digest bytes, most significant first, without an
    /// allocation.
    static func finish(_ state: inout kvt_blake2b_state) -> PageKey {
        var digest: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &digest) { kvt_blake2b_final(&state, $0.baseAddress!.assumingMemoryBound(to: UInt8.self)) }
        return PageKey(high: UInt64(bigEndian: digest.0), low: UInt64(bigEndian: digest.1))
    }

    /// The partial-page keys `key(parent, modelID, tokens[..<k])` for every `k` in
    /// `1...tokens.count`, in that order: the hash state after each token is copied and
    /// finalized, so this costs one compression per candidate length (the store looks up the
    /// longest stored partial page among them).
    public static func partialKeys(parent: PageKey?, modelID: UInt64, tokens: ArraySlice<UInt32>) -> [PageKey] {
        var state = hashState(parent: parent, modelID: modelID)
        var keys: [PageKey] = []
        keys.reserveCapacity(tokens.count)
        for token in tokens {
            var word = token.littleEndian
            withUnsafeBytes(of: &word) { kvt_blake2b_update(&state, $0.baseAddress, 4) }
            var snapshot = state
            keys.append(finish(&snapshot))
        }
        return keys
    }

    /// A BLAKE2b-128 state that has absorbed what precedes a page's tokens: the parent's key (16
    /// zero bytes for the first page) and the model id.
    public static func hashState(parent: PageKey?, modelID: UInt64) -> kvt_blake2b_state {
        var state = kvt_blake2b_state()
        kvt_blake2b_init(&state, 16)
        var prefix = ByteWriter(capacity: 24)
        if let parent { prefix.raw(parent.digestBytes) } else { prefix.zeros(16) }
        prefix.u64(modelID)
        prefix.bytes.withUnsafeBytes { kvt_blake2b_update(&state, $0.baseAddress, $0.count) }
        return state
    }

    /// The keys of every page of `tokens` cut into pages of `pageTokens` (the last may be short).
    /// With `wholePagesOnly`, a short last page has no key; `limit` caps how many keys there are
    /// (what a GET with `maxTokens` serves).
    public static func keys(modelID: UInt64, tokens: [UInt32], pageTokens: Int, wholePagesOnly: Bool = false,
                            limit: Int = .max) -> [PageKey] {
        precondition(pageTokens > 0)
        let pages = wholePagesOnly ? tokens.count / pageTokens : (tokens.count + pageTokens - 1) / pageTokens
        let count = min(max(0, limit), pages)
        var keys: [PageKey] = []
        keys.reserveCapacity(count)
        var parent: PageKey? = nil
        for index in 0..<count {
            let start = index * pageTokens
            let key = key(parent: parent, modelID: modelID, tokens: tokens[start..<min(start + pageTokens, tokens.count)])
            keys.append(key)
            parent = key
        }
        return keys
    }
}

extension PageKey {
    /// The key from 16 digest bytes: `high` holds bytes 0-7 and `low` bytes 8-15, most
    /// significant first, so `description` is the digest's hex.
    public init(digestBytes bytes: [UInt8]) {
        precondition(bytes.count == 16)
        var high: UInt64 = 0, low: UInt64 = 0
        for i in 0..<8 {
            high = high << 8 | UInt64(bytes[i])
            low = low << 8 | UInt64(bytes[8 + i])
        }
        self.init(high: high, low: low)
    }

    /// The 16 digest bytes of this key.
    public var digestBytes: [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: high >> (56 - 8 * $0)) } + (0..<8).map { UInt8(truncatingIfNeeded: low >> (56 - 8 * $0)) }
    }
}
