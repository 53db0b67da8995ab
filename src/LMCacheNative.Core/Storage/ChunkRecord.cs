using System.Buffers.Binary;
using System.IO.Hashing;
using System.Security.Cryptography;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;

namespace LMCacheNative.Core.Storage;

/// <summary>
/// The self-describing form of a chunk in the lower tiers (a disk file, a Redis value): a 128-byte
/// header followed by the payload, the chunk object's bytes exactly as the CPU tier holds them.
/// A record is loaded only if every header field and both checksums match, so a flipped byte, a
/// truncated file or a record of another model reads as a miss, never as wrong KV.
///
/// <code>
/// offset size field
///      0    8 magic "LMCNREC1"
///      8    4 format version (1), little-endian like every integer here
///     12    4 header size (128)
///     16   32 chunk key
///     48   32 namespace fingerprint (SHA-256 of the key namespace and the hash algorithm)
///     80    4 token count
///     84    4 reserved (0)
///     88    8 payload length in bytes
///     96    8 XXH3-64 of the payload
///    104    8 XXH3-64 of header bytes [0, 104)
///    112   16 reserved (0)
/// </code>
/// </summary>
public static class ChunkRecord
{
    public const int HeaderSize = 128;
    public const int FormatVersion = 1;
    private static ReadOnlySpan<byte> Magic => "LMCNREC1"u8;

    /// <summary>32 bytes that differ between any two namespaces or hash algorithms.</summary>
    public static byte[] NamespaceFingerprint(KeyNamespace keyNamespace, ChunkHashAlgorithm algorithm)
    {
        byte[] ns = keyNamespace.ToCanonicalBytes();
        byte[] input = new byte[ns.Length + 1];
        ns.CopyTo(input, 0);
        input[^1] = (byte)algorithm;
        return SHA256.HashData(input);
    }

    public static void WriteHeader(Span<byte> header, in ChunkKey key, ReadOnlySpan<byte> fingerprint, int tokenCount, ReadOnlySpan<byte> payload)
    {
        header[..HeaderSize].Clear();
        Magic.CopyTo(header);
        BinaryPrimitives.WriteInt32LittleEndian(header[8..], FormatVersion);
        BinaryPrimitives.WriteInt32LittleEndian(header[12..], HeaderSize);
        key.WriteTo(header[16..]);
        fingerprint[..32].CopyTo(header[48..]);
        BinaryPrimitives.WriteInt32LittleEndian(header[80..], tokenCount);
        BinaryPrimitives.WriteInt64LittleEndian(header[88..], payload.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(header[96..], XxHash3.HashToUInt64(payload));
        BinaryPrimitives.WriteUInt64LittleEndian(header[104..], XxHash3.HashToUInt64(header[..104]));
    }

    /// <summary>Header fields of a record whose header is intact.</summary>
    public readonly record struct Header(ChunkKey Key, int TokenCount, long PayloadLength, ulong PayloadChecksum, bool SameNamespace);

    /// <summary>Parses and checks a header; null when it is not an intact record header of this format.</summary>
    public static Header? ReadHeader(ReadOnlySpan<byte> header, ReadOnlySpan<byte> fingerprint)
    {
        if (header.Length < HeaderSize || !header[..8].SequenceEqual(Magic)) return null;
        if (BinaryPrimitives.ReadUInt64LittleEndian(header[104..]) != XxHash3.HashToUInt64(header[..104])) return null;
        if (BinaryPrimitives.ReadInt32LittleEndian(header[8..]) != FormatVersion || BinaryPrimitives.ReadInt32LittleEndian(header[12..]) != HeaderSize) return null;
        long length = BinaryPrimitives.ReadInt64LittleEndian(header[88..]);
        int tokens = BinaryPrimitives.ReadInt32LittleEndian(header[80..]);
        if (length < 0 || tokens < 0) return null;
        return new Header(ChunkKey.FromBytes(header.Slice(16, 32)), tokens, length,
            BinaryPrimitives.ReadUInt64LittleEndian(header[96..]), header.Slice(48, 32).SequenceEqual(fingerprint[..32]));
    }

    /// <summary>
    /// Checks a whole record (header then payload) against what the caller expects and copies the
    /// payload out. False on any mismatch: wrong key or namespace, token count, length or checksum.
    /// </summary>
    public static bool TryOpen(ReadOnlySpan<byte> record, in ChunkKey expectedKey, ReadOnlySpan<byte> fingerprint, int expectedTokens, Span<byte> payloadOut)
    {
        if (ReadHeader(record, fingerprint) is not { } h) return false;
        if (!h.SameNamespace || h.Key != expectedKey || h.TokenCount != expectedTokens || h.PayloadLength != payloadOut.Length) return false;
        if (record.Length != HeaderSize + h.PayloadLength) return false;
        var payload = record.Slice(HeaderSize, (int)h.PayloadLength);
        if (XxHash3.HashToUInt64(payload) != h.PayloadChecksum) return false;
        payload.CopyTo(payloadOut);
        return true;
    }

    /// <summary>Header and payload in one array (for stores that take one value, such as Redis).</summary>
    public static byte[] Build(in ChunkKey key, ReadOnlySpan<byte> fingerprint, int tokenCount, ReadOnlySpan<byte> payload)
    {
        byte[] record = new byte[HeaderSize + payload.Length];
        WriteHeader(record, key, fingerprint, tokenCount, payload);
        payload.CopyTo(record.AsSpan(HeaderSize));
        return record;
    }
}
