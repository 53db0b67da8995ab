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

/// <summary>Mirror of lmc_request (88 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct NativeRequest
{
    public uint StructSize;
    public int DestinationKind;
    public int* Tokens;
    public long NumTokens;
    public byte* ExtraKey;
    public long ExtraKeyLen;
    public long FirstToken;
    public long* SlotMapping;
    public int* BlockIds;
    public long NumBlockIds;
    public int TableBlockSize;
    public int Reserved;
    public nint Stream;

    public const int SizeV1 = 88;
    public const int DestinationSlots = 0, DestinationBlockTable = 1;
}

/// <summary>Mirror of lmc_transfer_result (80 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct NativeTransferResult
{
    public uint StructSize;
    public uint Reserved;
    public long TokensMatched;
    public long TokensCopied;
    public long BytesCopied;
    public long ChunksSkippedForSpace;
    public fixed long ChunksByTier[4];
    public long ElapsedNs;

    public const int SizeV1 = 80;
}

/// <summary>Mirror of lmc_lookup_result (56 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct NativeLookupResult
{
    public uint StructSize;
    public uint Reserved;
    public long HitTokens;
    public fixed long TokensByTier[4];
    public long ElapsedNs;

    public const int SizeV1 = 56;
}
