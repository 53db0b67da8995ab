namespace LMCacheNative.Core.Layout;

/// <summary>Where a layer's KV memory lives. Values are the C ABI's LMC_DEVICE_*.</summary>
public enum DeviceKind
{
    Host = 0,
    Cuda = 1,
}

/// <summary>
/// One attention layer's paged KV cache, described as data. The element at
/// (kv, block, token-in-block, head, d) is at
/// <c>BaseAddress + ElemSize * (kv*KvStride + block*BlockStride + token*TokenStride + head*HeadStride + d)</c>;
/// d (the head dimension) is contiguous. Strides are in elements. See include/lmcache_native.h.
/// </summary>
public readonly record struct KvLayerLayout(
    DeviceKind Device,
    int DeviceIndex,
    int ElemSize,
    int KvCount,
    int NumBlocks,
    int BlockSize,
    int NumKvHeads,
    int HeadSize,
    ulong BaseAddress,
    ulong SpanBytes,
    long KvStride,
    long BlockStride,
    long TokenStride,
    long HeadStride)
{
    /// <summary>Bytes of one token's K (or V) in this layer: all heads, all of head_size.</summary>
    public long TokenRowBytes => (long)NumKvHeads * HeadSize * ElemSize;

    public long NumSlots => (long)NumBlocks * BlockSize;

    /// <summary>Whether the heads of one token follow each other without a gap (NHD, MLA), so one token's K or V is one run.</summary>
    public bool HeadsContiguous => NumKvHeads == 1 || HeadStride == HeadSize;

    /// <summary>The model shape that all layers of one engine must share (and that the key namespace is built from).</summary>
    public (DeviceKind, int, int, int, int, int, int, int) ModelShape =>
        (Device, DeviceIndex, ElemSize, KvCount, NumBlocks, BlockSize, NumKvHeads, HeadSize);
}

/// <summary>
/// The shape of a registered model's KV as the cache holds it: one token of one layer's K (or V) is a
/// row of <see cref="TokenRowBytes"/>; a token is that row for every layer, K and V. Chunk objects
/// are <c>[kv][layer][token][head][d]</c>, so a chunk of T tokens is <c>T * BytesPerToken</c> bytes.
/// </summary>
public readonly record struct KvShape(int NumLayers, int KvCount, int NumKvHeads, int HeadSize, int ElemSize)
{
    /// <summary>The shape every layer of a validated registration shares.</summary>
    public static KvShape Of(IReadOnlyList<KvLayerLayout> layers)
    {
        var first = layers[0];
        return new KvShape(layers.Count, first.KvCount, first.NumKvHeads, first.HeadSize, first.ElemSize);
    }

    /// <summary>Bytes of one token's K (or V) in one layer: all heads, all of head_size.</summary>
    public long TokenRowBytes => (long)NumKvHeads * HeadSize * ElemSize;

    /// <summary>Bytes of one token across every layer, K and V.</summary>
    public long BytesPerToken => TokenRowBytes * NumLayers * KvCount;

    /// <summary>Bytes of a chunk object of <paramref name="tokens"/> tokens.</summary>
    public long ChunkBytes(int tokens) => tokens * BytesPerToken;
}
