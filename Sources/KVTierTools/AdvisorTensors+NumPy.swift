import KVTierCodec
import KVTierCore

/// `kvtier codec advise`'s inputs: tensors read from `.npy` files.
extension AdvisorTensors {
    /// One input file: the name errors quote, and its array.
    public struct Source: Sendable {
        public var name: String
        public var array: NumPyArray
        public init(name: String, array: NumPyArray) {
            self.name = name
            self.array = array
        }

        /// Reads a `.npy` file; errors name the path.
        public static func read(_ path: String) throws -> Source {
            Source(name: path, array: try NumPyArray.read(path: path))
        }
    }

    /// Splits and checks the inputs. Each source is one layer `[T, H, D]` or several
    /// `[layers, T, H, D]`; sources are concatenated in order. Every layer must have the same
    /// shape, values the keys' shape, and queries (when given) the same layers, tokens and head
    /// dim, with query heads a multiple of the KV heads.
    public init(keys: [Source], values: [Source], queries: [Source]?, elementType: ElementType = .float16) throws {
        let k = try Self.layers(keys, role: "keys")
        let v = try Self.layers(values, role: "values")
        guard k.shape == v.shape else {
            throw ToolError("values \(v.origin) have layers of shape \(v.shape) but keys \(k.origin) have \(k.shape); they must match")
        }
        guard k.layers.count == v.layers.count else {
            throw ToolError("keys hold \(k.layers.count) layers (\(k.origin)) but values hold \(v.layers.count) (\(v.origin)); give each layer's keys and values")
        }
        let (t, h, d) = (k.shape[0], k.shape[1], k.shape[2])
        guard t >= 1, h >= 1, d >= 1 else { throw ToolError("keys \(k.origin) have an empty shape \(k.shape)") }
        var queryHeads = h
        var queryLayers: [[UInt16]]?
        if let queries {
            let q = try Self.layers(queries, role: "queries")
            guard q.layers.count == k.layers.count else {
                throw ToolError("queries hold \(q.layers.count) layers (\(q.origin)) but keys hold \(k.layers.count); give one query array per key layer")
            }
            guard q.shape[0] == t else {
                throw ToolError("queries \(q.origin) have \(q.shape[0]) tokens but keys have \(t); capture them from the same forward pass")
            }
            guard q.shape[2] == d else {
                throw ToolError("queries \(q.origin) have head dim \(q.shape[2]) but keys have \(d)")
            }
            guard q.shape[1] >= 1, q.shape[1] % h == 0 else {
                throw ToolError("queries \(q.origin) have \(q.shape[1]) heads, not a multiple of the keys' \(h) KV heads (grouped-query attention needs qHeads = n × kvHeads)")
            }
            queryHeads = q.shape[1]
            queryLayers = q.layers
        }
        do {
            try self.init(tokens: t, kvHeads: h, headDim: d, keys: k.layers, values: v.layers, queries: queryLayers,
                          queryHeads: queryHeads, elementType: elementType)
        } catch { throw ToolError(error.description) }
    }

    private static func layers(_ sources: [Source], role: String) throws -> (shape: [Int], layers: [[UInt16]], origin: String) {
        guard let first = sources.first else { throw ToolError("no \(role) given") }
        var shape: [Int]?
        var layers: [[UInt16]] = []
        for source in sources {
            let dims = source.array.shape
            let layerShape: [Int]
            switch dims.count {
            case 3: layerShape = dims
            case 4: layerShape = Array(dims.dropFirst())
            default:
                throw ToolError("\(role) '\(source.name)' has shape \(dims); expected [tokens, heads, headDim] or [layers, tokens, heads, headDim]")
            }
            if let shape, shape != layerShape {
                throw ToolError("\(role) '\(source.name)' has layers of shape \(layerShape) but '\(first.name)' has \(shape); every layer must have the same shape")
            }
            shape = layerShape
            let perLayer = layerShape.reduce(1, *)
            let count = dims.count == 4 ? dims[0] : 1
            guard count >= 1, perLayer >= 1 else { throw ToolError("\(role) '\(source.name)' is empty (shape \(dims))") }
            for l in 0..<count {
                layers.append(Array(source.array.elements[l * perLayer..<(l + 1) * perLayer]))
            }
        }
        let origin = sources.count == 1 ? "'\(first.name)'" : "'\(first.name)' and \(sources.count - 1) more"
        return (shape!, layers, origin)
    }
}
