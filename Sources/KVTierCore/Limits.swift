/// Every size limit of KVTier in one place. Inputs beyond them are rejected with an error that
/// names the limit; nothing larger is ever allocated on behalf of a caller.
public enum Limits {
    /// Largest head dimension any codec accepts.
    public static let maxHeadDim = 1024
    /// Largest number of KV heads per layer.
    public static let maxKVHeads = 256
    /// Largest number of tokens in one page.
    public static let maxPageTokens = 16384
    /// Default tokens per page.
    public static let defaultPageTokens = 256
    /// Largest number of layers a model may have.
    public static let maxLayers = 1024
    /// Largest fp16 size of one section (one layer of one page, keys plus values).
    public static let maxSectionBytes = 1 << 30
}
