import CKVTierKernels
import KVTierCore

extension PageKeyChain {
    /// The longest `k` in `1...tokens.count` whose partial-page key `key(parent, modelID,
    /// tokens[..<k])` satisfies `exists`, with that key. One pass: the hash state after each
    /// token is copied and finalized, so this costs one compression per candidate length.
    public static func longestStoredPrefix(
        parent: PageKey?, modelID: UInt64, tokens: ArraySlice<UInt32>, exists: (PageKey) -> Bool
    ) -> (key: PageKey, count: Int)? {
        var state = hashState(parent: parent, modelID: modelID)
        var best: (PageKey, Int)?
        var digest = [UInt8](repeating: 0, count: 16)
        for (i, token) in tokens.enumerated() {
            var word = token.littleEndian
            withUnsafeBytes(of: &word) { kvt_blake2b_update(&state, $0.baseAddress, 4) }
            var snapshot = state
            digest.withUnsafeMutableBufferPointer { kvt_blake2b_final(&snapshot, $0.baseAddress) }
            let key = PageKey(digestBytes: digest)
            if exists(key) { best = (key, i + 1) }
        }
        return best
    }

    /// The partial-page keys `key(parent, modelID, tokens[..<k])` for every `k` in
    /// `1...tokens.count`, in that order: one compression per token, as `longestStoredPrefix`.
    public static func partialKeys(parent: PageKey?, modelID: UInt64, tokens: ArraySlice<UInt32>) -> [PageKey] {
        var keys: [PageKey] = []
        keys.reserveCapacity(tokens.count)
        _ = longestStoredPrefix(parent: parent, modelID: modelID, tokens: tokens) { key in
            keys.append(key)
            return false
        }
        return keys
    }
}
