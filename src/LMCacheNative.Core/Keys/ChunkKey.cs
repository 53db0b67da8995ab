using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.IO.Hashing;
using System.Text;
using LMCacheNative.Core.Config;

namespace LMCacheNative.Core.Keys;

/// <summary>
/// The identity of one chunk: the chained hash of every token up to the chunk's end, the engine's
/// namespace and the request's extra key. 256 bits for SHA-256; XXH3-128 fills the first 128 and
/// leaves the rest zero.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
public readonly record struct ChunkKey(ulong Word0, ulong Word1, ulong Word2, ulong Word3)
{
    public const int MaxBytes = 32;

    public static ChunkKey FromBytes(ReadOnlySpan<byte> digest)
    {
        Span<byte> padded = stackalloc byte[MaxBytes];
        padded.Clear();
        digest[..Math.Min(digest.Length, MaxBytes)].CopyTo(padded);
        return new ChunkKey(
            BinaryPrimitives.ReadUInt64LittleEndian(padded),
            BinaryPrimitives.ReadUInt64LittleEndian(padded[8..]),
            BinaryPrimitives.ReadUInt64LittleEndian(padded[16..]),
            BinaryPrimitives.ReadUInt64LittleEndian(padded[24..]));
    }

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(destination, Word0);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[8..], Word1);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[16..], Word2);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[24..], Word3);
    }

    // The words are already uniformly distributed hash output: one of them is a good hash code.
    public override int GetHashCode() => (int)(Word0 ^ (Word0 >> 32));

    public string ToHex()
    {
        Span<byte> bytes = stackalloc byte[MaxBytes];
        WriteTo(bytes);
        return Convert.ToHexStringLower(bytes);
    }
}

/// <summary>
/// What a cached KV chunk depends on besides its tokens. Two engines whose namespaces differ never
/// share a key, so a cache can never hand KV of one model, dtype, head split or TP rank to another.
/// The KV layout (NHD, HND, packed, …) is deliberately absent: chunks are stored layout-free.
/// </summary>
public sealed record KeyNamespace(
    string ModelName, int ElemSize, int NumKvHeads, int HeadSize, int NumLayers, int KvCount, int WorldSize, int WorkerId)
{
    /// <summary>Canonical bytes: a format tag, then each field little-endian, the name length-prefixed.</summary>
    public byte[] ToCanonicalBytes()
    {
        byte[] name = Encoding.UTF8.GetBytes(ModelName);
        var bytes = new byte[16 + 8 + name.Length + 7 * 4];
        var span = bytes.AsSpan();
        "lmcache-native:1"u8.CopyTo(span);
        span = span[16..];
        BinaryPrimitives.WriteInt64LittleEndian(span, name.Length);
        name.CopyTo(span[8..]);
        span = span[(8 + name.Length)..];
        foreach (int field in (int[])[ElemSize, NumKvHeads, HeadSize, NumLayers, KvCount, WorldSize, WorkerId])
        {
            BinaryPrimitives.WriteInt32LittleEndian(span, field);
            span = span[4..];
        }
        return bytes;
    }
}

/// <summary>
/// Cuts tokens into chunks and computes their chained keys:
/// <code>
///   K_-1 = H(namespace bytes ‖ len(extra) as int64 LE ‖ extra)
///   K_i  = H(K_{i-1} (32 bytes) ‖ token count of chunk i as int32 LE ‖ tokens of chunk i as int32 LE)
/// </code>
/// No seed, no process state: the same tokens give the same keys in every process and on every
/// machine. The token count keeps a partial chunk distinct from a longer one with the same start.
/// Thread-safe: instances are immutable.
/// </summary>
public sealed class ChunkHasher
{
    private readonly ChunkHashAlgorithm _algorithm;
    private readonly byte[] _namespaceBytes;

    public ChunkHasher(ChunkHashAlgorithm algorithm, KeyNamespace keyNamespace)
    {
        if (!BitConverter.IsLittleEndian) throw LmcException.Unsupported("big-endian hosts are not supported");
        _algorithm = algorithm;
        _namespaceBytes = keyNamespace.ToCanonicalBytes();
        Namespace = keyNamespace;
    }

    public KeyNamespace Namespace { get; }
    public ChunkHashAlgorithm Algorithm => _algorithm;

    /// <summary>Bytes of a key's digest: 32 for SHA-256, 16 for XXH3-128 (whose key words 2 and 3 are zero).</summary>
    public static int DigestBytes(ChunkHashAlgorithm algorithm) => algorithm == ChunkHashAlgorithm.Sha256 ? ChunkKey.MaxBytes : XxHashDigestBytes;

    private const int XxHashDigestBytes = 16;

    /// <summary>
    /// Bound on a request's extra key (cache salt, LoRA id, multimodal hashes, tags): 1 MiB holds tens
    /// of thousands of digests, and the bound keeps the key seed's length far from int overflow.
    /// </summary>
    public const int MaxExtraKeyBytes = 1 << 20;

    /// <summary>Number of chunks that <paramref name="numTokens"/> tokens form (a trailing partial one included).</summary>
    public static int ChunkCount(long numTokens, int chunkSize) => (int)((numTokens + chunkSize - 1) / chunkSize);

    /// <summary>
    /// Writes the keys of the first <c>keys.Length</c> chunks of <paramref name="tokens"/>. The last
    /// chunk may be partial when the tokens end inside it.
    /// </summary>
    public void ComputeKeys(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, int chunkSize, Span<ChunkKey> keys)
    {
        if (extraKey.Length > MaxExtraKeyBytes)
            throw LmcException.InvalidArgument($"extra_key_len {extraKey.Length} exceeds the limit of {MaxExtraKeyBytes} bytes");
        if (keys.Length == 0) return;
        if ((long)(keys.Length - 1) * chunkSize >= tokens.Length)
            throw new ArgumentException("more keys requested than the tokens have chunks");

        Span<byte> digest = stackalloc byte[ChunkKey.MaxBytes];
        int seedLength = _namespaceBytes.Length + 8 + extraKey.Length;
        var sha256 = _algorithm == ChunkHashAlgorithm.Sha256 && !t_bclOnly ? (t_openSsl ??= OpenSslSha256.TryCreate()) : null;
        // The previous key and the chunk's token count (36 bytes), hashed together with the tokens.
        Span<byte> header = stackalloc byte[ChunkKey.MaxBytes + 4];
        byte[] rented = System.Buffers.ArrayPool<byte>.Shared.Rent(Math.Max(seedLength, sha256 is null ? header.Length + chunkSize * sizeof(int) : 0));
        try
        {
            Span<byte> buffer = rented;
            _namespaceBytes.CopyTo(buffer);
            BinaryPrimitives.WriteInt64LittleEndian(buffer[_namespaceBytes.Length..], extraKey.Length);
            extraKey.CopyTo(buffer[(_namespaceBytes.Length + 8)..]);
            digest.Clear();
            if (sha256 is not null) sha256.Hash(default, buffer[..seedLength], digest);
            else Hash(buffer[..seedLength], digest);

            for (int i = 0; i < keys.Length; i++)
            {
                int start = i * chunkSize;
                int count = Math.Min(chunkSize, tokens.Length - start);
                var chunkTokens = MemoryMarshal.AsBytes(tokens.Slice(start, count));
                digest.CopyTo(header);
                BinaryPrimitives.WriteInt32LittleEndian(header[ChunkKey.MaxBytes..], count);
                if (sha256 is not null)
                {
                    // One digest per chunk straight from the caller's tokens, no copy.
                    sha256.Hash(header, chunkTokens, digest);
                }
                else
                {
                    header.CopyTo(buffer);
                    chunkTokens.CopyTo(buffer[header.Length..]);
                    Hash(buffer[..(header.Length + chunkTokens.Length)], digest);
                }
                keys[i] = ChunkKey.FromBytes(digest);
            }
        }
        finally
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(rented);
        }
    }

    /// <summary>
    /// Test hook: computes keys as <see cref="ComputeKeys"/> does but through the BCL's hashes only,
    /// so the OpenSSL path can be compared with it.
    /// </summary>
    internal void ComputeKeysWithBcl(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, int chunkSize, Span<ChunkKey> keys)
    {
        t_bclOnly = true;
        try
        {
            ComputeKeys(tokens, extraKey, chunkSize, keys);
        }
        finally
        {
            t_bclOnly = false;
        }
    }

    // This thread's OpenSSL SHA-256 context (see OpenSslSha256: the BCL's re-initialises the digest
    // by name on every chunk); freed by its finalizer once the thread has gone.
    [ThreadStatic] private static OpenSslSha256? t_openSsl;
    [ThreadStatic] private static bool t_bclOnly;

    // One SHA-256 state per thread, reset after each digest: a one-shot SHA256.HashData sets up and
    // tears down the platform's digest context on every call, which for 1 KiB chunk inputs costs
    // more than the hashing itself. Used where OpenSSL 3 is not available.
    [ThreadStatic] private static IncrementalHash? t_sha256;

    /// <summary>Hashes into the 32-byte <paramref name="digest"/>; XXH3-128 leaves bytes 16..31 zero.</summary>
    private void Hash(ReadOnlySpan<byte> input, Span<byte> digest)
    {
        if (_algorithm == ChunkHashAlgorithm.Sha256)
        {
            var sha256 = t_sha256 ??= IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            sha256.AppendData(input);
            sha256.GetHashAndReset(digest);
        }
        else
        {
            XxHash128.Hash(input, digest[..XxHashDigestBytes]);
            digest[XxHashDigestBytes..].Clear();
        }
    }
}
