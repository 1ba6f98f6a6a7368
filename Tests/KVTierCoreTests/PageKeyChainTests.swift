import KVTierCore
import Testing

@Suite struct PageKeyChainTests {
    /// Reference digests from Python: hashlib.blake2b(data, digest_size=16).hexdigest().
    @Test func matchesPythonHashlib() {
        // First page: 16 zero bytes, model id 7 (LE), tokens 1, 2, 3 (u32 LE).
        let first = PageKeyChain.key(parent: nil, modelID: 7, tokens: [1, 2, 3] as [UInt32])
        #expect(first.description == "ab5ae5c5304a47e1c3ee926b0d7cdcdd")
        let second = PageKeyChain.key(parent: first, modelID: 7, tokens: [4] as [UInt32])
        #expect(second.description == "25c2e1258911a39fc2dfea8ca4baafdd")
    }

    @Test func equalPrefixesGiveEqualKeysAndAnyDifferenceChangesThem() {
        let tokens = (0..<1000).map { UInt32($0 * 31 % 256) }
        let a = PageKeyChain.keys(modelID: 1, tokens: tokens, pageTokens: 256)
        let b = PageKeyChain.keys(modelID: 1, tokens: Array(tokens.prefix(600)), pageTokens: 256)
        #expect(a.count == 4 && b.count == 3)
        #expect(Array(a.prefix(2)) == Array(b.prefix(2)))
        #expect(a[2] != b[2], "a partial page has its own key")
        var changed = tokens
        changed[10] ^= 1
        let c = PageKeyChain.keys(modelID: 1, tokens: changed, pageTokens: 256)
        #expect(Set(c).isDisjoint(with: a), "a change in page 0 must change every later key")
        #expect(PageKeyChain.keys(modelID: 2, tokens: tokens, pageTokens: 256)[0] != a[0], "the model is part of the key")
    }

    /// The array-slice overload hashes the same bytes as the generic one, whatever the slice's
    /// bounds inside its array.
    @Test func theSliceKeyMatchesTheGenericKey() {
        var random = SplitMix64(seed: 0x51CE)
        var parent: PageKey? = nil
        for length in [0, 1, 3, 16, 31, 32, 33, 64, 256, 1000] {
            let tokens = (0..<length + 10).map { _ in UInt32(truncatingIfNeeded: random.next()) }
            let slice = tokens[5..<5 + length]
            let fast = PageKeyChain.key(parent: parent, modelID: 0x1234_5678_9ABC, tokens: slice)
            #expect(fast == PageKeyChain.key(parent: parent, modelID: 0x1234_5678_9ABC, tokens: Array(slice)), "length \(length)")
            parent = fast
        }
    }

    @Test func digestBytesRoundTrip() {
        let key = PageKey(high: 0x0102_0304_0506_0708, low: 0x090A_0B0C_0D0E_0F10)
        #expect(PageKey(digestBytes: key.digestBytes) == key)
        #expect(key.digestBytes.first == 1 && key.digestBytes.last == 0x10)
    }

    /// Each partial-page key is the key of that many tokens, whatever the parent.
    @Test func partialKeysAreTheKeysOfEachPrefix() {
        let tokens: [UInt32] = (0..<40).map { $0 &* 2_654_435_761 }
        for parent in [nil, PageKeyChain.key(parent: nil, modelID: 3, tokens: [9, 9] as [UInt32])] {
            let partial = PageKeyChain.partialKeys(parent: parent, modelID: 3, tokens: tokens[5..<37])
            #expect(partial.count == 32)
            for (k, key) in partial.enumerated() {
                #expect(key == PageKeyChain.key(parent: parent, modelID: 3, tokens: tokens[5..<6 + k]), "\(k + 1) tokens")
            }
        }
        #expect(PageKeyChain.partialKeys(parent: nil, modelID: 3, tokens: tokens[0..<0]).isEmpty)
    }

    /// Whole pages only, and a limit: the same keys as the full chain's, cut.
    @Test func keysOfWholePagesAndUpToALimitArePrefixesOfTheChain() {
        let tokens: [UInt32] = Array(0..<70)
        let all = PageKeyChain.keys(modelID: 4, tokens: tokens, pageTokens: 16)
        #expect(all.count == 5)
        #expect(PageKeyChain.keys(modelID: 4, tokens: tokens, pageTokens: 16, wholePagesOnly: true) == Array(all.prefix(4)))
        #expect(PageKeyChain.keys(modelID: 4, tokens: tokens, pageTokens: 16, wholePagesOnly: true, limit: 2) == Array(all.prefix(2)))
        #expect(PageKeyChain.keys(modelID: 4, tokens: tokens, pageTokens: 16, limit: 0).isEmpty)
        #expect(PageKeyChain.keys(modelID: 4, tokens: Array(tokens.prefix(15)), pageTokens: 16, wholePagesOnly: true).isEmpty)
    }
}
