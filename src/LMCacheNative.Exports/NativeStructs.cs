using System.Runtime.InteropServices;

namespace LMCacheNative.Exports;

/// <summary>Mirror of lmc_kv_layer_desc (88 bytes). Field order and sizes must match the header exactly.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NativeKvLayerDesc
{
    public uint StructSize;
    public int DeviceKind;
    public int DeviceIndex;
    public int ElemSize;
    public int KvCount;
    public int NumBlocks;
    public int BlockSize;
    public int NumKvHeads;
    public int HeadSize;
    public int Reserved;
    public ulong BaseAddress;
    public ulong SpanBytes;
    public long KvStride;
    public long BlockStride;
    public long TokenStride;
    public long HeadStride;

    public const int SizeV1 = 88;
}

/// <summary>Mirror of lmc_stats (128 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NativeStats
{
    public uint StructSize;
    public uint Reserved;
    public ulong LookupRequests;
    public ulong LookupTokens;
    public ulong LookupHitTokens;
    public ulong StoreRequests;
    public ulong StoredTokens;
    public ulong StoredBytes;
    public ulong RetrieveRequests;
    public ulong RetrieveRequestedTokens;
    public ulong RetrievedTokens;
    public ulong RetrievedBytes;
    public ulong EvictedChunks;
    public ulong StoreSkippedChunks;
    public ulong CachedChunks;
    public ulong PoolUsedBytes;
    public ulong PoolCapacityBytes;

    public const int SizeV1 = 128;
}

/// <summary>Mirror of lmc_tier_stats (136 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct NativeTierStats
{
    public uint StructSize;
    public uint Reserved;
    public fixed byte Name[32];
    public ulong Hits;
    public ulong Misses;
    public ulong BytesRead;
    public ulong BytesWritten;
    public ulong Writes;
    public ulong Evictions;
    public ulong WriteQueueDrops;
    public ulong CorruptRecords;
    public ulong Errors;
    public ulong Reconnects;
    public ulong UsedBytes;
    public ulong CapacityBytes;

    public const int SizeV1 = 136;
}
