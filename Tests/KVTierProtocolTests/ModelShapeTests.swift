import KVTierCore
import KVTierProtocol
import Testing

@Suite struct ModelShapeTests {
    @Test func theWireConversionKeepsTheShapeAndRefusesWhatDoesNotFit() throws {
        let shape = ModelShape(layers: 32, kvHeads: 8, headDim: 128, elementType: .bfloat16)
        let request = try RegisterModel(name: "m", shape: shape, pageTokens: 256, ropeTheta: 1e4, diskCodec: nil)
        #expect(request.layers == 32 && request.kvHeads == 8 && request.headDim == 128 && request.elementType == .bfloat16)
        #expect(request.shape == shape)
        #expect(shape.bytesPerToken == 32 * 2 * 8 * 128 * 2)
        #expect(shape.pageBytes(tokens: 16) == 16 * shape.bytesPerToken)
        #expect(throws: ProtocolError.self) {
            try RegisterModel(name: "m", shape: ModelShape(layers: 70_000, kvHeads: 8, headDim: 128), pageTokens: 0, ropeTheta: 0, diskCodec: nil)
        }
    }

    @Test func limitsAreCheckedInOnePlace() {
        #expect(ModelShape(layers: 32, kvHeads: 8, headDim: 128).limitViolation == nil)
        #expect(ModelShape(layers: 0, kvHeads: 8, headDim: 128).limitViolation == "layers is 0; use 1...\(Limits.maxLayers)")
        #expect(ModelShape(layers: 1, kvHeads: Limits.maxKVHeads + 1, headDim: 128).limitViolation?.hasPrefix("kvHeads") == true)
        #expect(ModelShape(layers: 1, kvHeads: 1, headDim: Limits.maxHeadDim + 1).limitViolation?.hasPrefix("headDim") == true)
    }
}
