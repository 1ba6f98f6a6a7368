#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import KVTierCore

/// A float16 or bfloat16 array in NumPy's `.npy` format (versions 1.0, 2.0 and 3.0, C order).
///
/// Elements stay as raw 16-bit patterns: KVTier never needs them as numbers here. NumPy has no
/// native bfloat16, so 16-bit integer arrays (`'<u2'`, `'<i2'`) are read as bit patterns too and
/// the caller says which element type they hold.
public struct NumPyArray: Equatable, Sendable {
    public var shape: [Int]
    public var elements: [UInt16]

    public init(shape: [Int], elements: [UInt16]) {
        precondition(shape.reduce(1, *) == elements.count, "shape does not match element count")
        self.shape = shape
        self.elements = elements
    }

    /// Largest header NumPy writes is a few hundred bytes; anything beyond this is not an array we made.
    static let maxHeaderBytes = 1 << 16
    static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // "\x93NUMPY"

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case notNumPy
        case unsupportedVersion(UInt8)
        case badHeader(String)
        case unsupportedDType(String)
        case fortranOrder
        case sizeMismatch(expected: Int, actual: Int)

        public var description: String {
            switch self {
            case .notNumPy: "not a NumPy .npy file (missing \\x93NUMPY magic)"
            case .unsupportedVersion(let v): "unsupported .npy format version \(v).x (1, 2 and 3 are read)"
            case .badHeader(let why): "malformed .npy header: \(why)"
            case .unsupportedDType(let d): "array dtype is '\(d)'; KVTier reads float16 ('<f2') or 16-bit ('<u2', '<i2') arrays — convert with arr.astype(np.float16)"
            case .fortranOrder: "array is in Fortran order; save it with np.ascontiguousarray(arr)"
            case .sizeMismatch(let expected, let actual): "array data holds \(actual) bytes but its shape needs \(expected)"
            }
        }
    }

    /// Parses `.npy` bytes. Accepts 16-bit element types only and returns their bit patterns.
    public init(npy bytes: [UInt8]) throws(ParseError) {
        guard bytes.count >= 10, Array(bytes[0..<6]) == Self.magic else { throw .notNumPy }
        let major = bytes[6]
        let headerLength: Int
        let headerStart: Int
        switch major {
        case 1:
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
            headerStart = 10
        case 2, 3:
            guard bytes.count >= 12 else { throw .badHeader("file ends inside the header length") }
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8 | Int(bytes[10]) << 16 | Int(bytes[11]) << 24
            headerStart = 12
        default:
            throw .unsupportedVersion(major)
        }
        guard headerLength <= Self.maxHeaderBytes else { throw .badHeader("header of \(headerLength) bytes is too long") }
        guard bytes.count >= headerStart + headerLength else { throw .badHeader("file ends inside the header") }
        guard let header = String(validating: bytes[headerStart..<headerStart + headerLength], as: UTF8.self) else {
            throw .badHeader("header is not UTF-8 text")
        }
        let dict = try HeaderDictionary(header)
        guard let descr = dict.values["descr"] else { throw .badHeader("no 'descr' key") }
        let dtype = descr.trimmingCharacters(quotes: true)
        guard ["<f2", "<u2", "<i2", "|u2", "=f2", "=u2"].contains(dtype) else { throw .unsupportedDType(dtype) }
        guard let fortran = dict.values["fortran_order"] else { throw .badHeader("no 'fortran_order' key") }
        switch fortran {
        case "False": break
        case "True": throw .fortranOrder
        default: throw .badHeader("fortran_order is '\(fortran)'")
        }
        guard let shapeText = dict.values["shape"] else { throw .badHeader("no 'shape' key") }
        let shape = try Self.parseShape(shapeText)
        var count = 1
        for dimension in shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: dimension)
            guard !overflow, product <= Int(Int32.max) else { throw .badHeader("shape \(shapeText) is too large") }
            count = product
        }
        let dataStart = headerStart + headerLength
        let dataBytes = bytes.count - dataStart
        guard dataBytes == count * 2 else { throw .sizeMismatch(expected: count * 2, actual: dataBytes) }
        var elements = [UInt16](repeating: 0, count: count)
        elements.withUnsafeMutableBytes { out in
            bytes.withUnsafeBytes { all in
                out.copyMemory(from: UnsafeRawBufferPointer(rebasing: all[dataStart...]))
            }
        }
        if UInt16(littleEndian: 1) != 1 { elements = elements.map { UInt16(littleEndian: $0) } }
        self.shape = shape
        self.elements = elements
    }

    private static func parseShape(_ text: String) throws(ParseError) -> [Int] {
        guard text.first == "(", text.last == ")" else { throw .badHeader("shape '\(text)' is not a tuple") }
        let inner = text.dropFirst().dropLast()
        var shape: [Int] = []
        for part in inner.split(separator: ",") {
            let item = String(part).trimmingCharacters(quotes: false)
            if item.isEmpty { continue }
            guard let dimension = Int(item), dimension >= 0 else { throw .badHeader("shape entry '\(item)' is not a size") }
            shape.append(dimension)
        }
        return shape
    }

    /// The `.npy` 1.0 encoding of this array as float16 (`'<f2'`).
    public func npyBytes() -> [UInt8] {
        let dims = shape.map(String.init)
        let shapeText = dims.count == 1 ? "(\(dims[0]),)" : "(" + dims.joined(separator: ", ") + ")"
        var header = "{'descr': '<f2', 'fortran_order': False, 'shape': \(shapeText), }"
        // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
        let unpadded = 10 + header.utf8.count + 1
        header += String(repeating: " ", count: (64 - unpadded % 64) % 64) + "\n"
        var bytes = Self.magic + [1, 0, UInt8(header.utf8.count & 0xFF), UInt8(header.utf8.count >> 8)]
        bytes += Array(header.utf8)
        let dataStart = bytes.count
        bytes += [UInt8](repeating: 0, count: elements.count * 2)
        bytes.withUnsafeMutableBytes { all in
            elements.withUnsafeBytes { source in
                UnsafeMutableRawBufferPointer(rebasing: all[dataStart...]).copyMemory(from: source)
            }
        }
        return bytes
    }

    public static func read(path: String) throws -> NumPyArray {
        var isDirectory = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw ToolError("'\(path)' does not exist; give the path of a .npy file")
        }
        guard !isDirectory else { throw ToolError("'\(path)' is a directory; give the path of a .npy file") }
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw ToolError("cannot read '\(path)': \(error)")
        }
        do {
            return try NumPyArray(npy: [UInt8](data))
        } catch {
            throw ToolError("'\(path)': \(error)")
        }
    }

    public func write(path: String) throws {
        do {
            try Data(npyBytes()).write(to: URL(fileURLWithPath: path))
        } catch {
            throw ToolError("cannot write '\(path)': \(error)")
        }
    }
}

/// Writes `bytes` to `path` (replacing it), as `NumPyArray.write` does for arrays.
public func writeBytes(_ bytes: [UInt8], path: String) throws {
    do {
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    } catch {
        throw ToolError("cannot write '\(path)': \(error)")
    }
}

/// The Python dict literal of a `.npy` header, split into top-level `key: value` texts.
private struct HeaderDictionary {
    var values: [String: String] = [:]

    init(_ text: String) throws(NumPyArray.ParseError) {
        let body = text.trimmingCharacters(quotes: false)
        guard body.first == "{", body.last == "}" else { throw .badHeader("not a dictionary") }
        var depth = 0
        var current = ""
        var items: [String] = []
        for character in body.dropFirst().dropLast() {
            switch character {
            case "(", "[", "{": depth += 1
            case ")", "]", "}": depth -= 1
            default: break
            }
            guard depth >= 0 else { throw .badHeader("unbalanced brackets") }
            if character == "," && depth == 0 {
                items.append(current)
                current = ""
            } else {
                current.append(character)
            }
        }
        guard depth == 0 else { throw .badHeader("unbalanced brackets") }
        items.append(current)
        for item in items {
            let trimmed = item.trimmingCharacters(quotes: false)
            if trimmed.isEmpty { continue }
            guard let colon = trimmed.firstIndex(of: ":") else { throw .badHeader("entry '\(trimmed)' has no ':'") }
            let key = String(trimmed[..<colon]).trimmingCharacters(quotes: true)
            values[key] = String(trimmed[trimmed.index(after: colon)...]).trimmingCharacters(quotes: false)
        }
    }
}

extension String {
    /// Trims spaces and newlines, and with `quotes` one pair of surrounding single or double quotes.
    fileprivate func trimmingCharacters(quotes: Bool) -> String {
        var s = Substring(self)
        while let first = s.first, first.isWhitespace { s.removeFirst() }
        while let last = s.last, last.isWhitespace { s.removeLast() }
        if quotes, s.count >= 2, let first = s.first, first == "'" || first == "\"", s.last == first {
            s = s.dropFirst().dropLast()
        }
        return String(s)
    }
}

/// An error of a command-line tool: one message for the user, nothing else.
public struct ToolError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
