using System.Runtime.CompilerServices;

namespace LMCacheNative.Core.Engine;

/// <summary>
/// One request as the engine takes it: the tokens, their extra key, one slot per token (-1 = no
/// slot), the request's first token (store: tokens before it, rounded down to a chunk boundary,
/// are not stored; retrieve: slots before it are never written) and, for device layers, the stream
/// to copy on (0 = the transfer's own stream). Borrowed spans: valid for the call only.
/// </summary>
public readonly ref struct KvRequest(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, ReadOnlySpan<long> slots, long firstToken = 0, nint stream = 0)
{
    public ReadOnlySpan<int> Tokens { get; } = tokens;
    public ReadOnlySpan<byte> ExtraKey { get; } = extraKey;
    public ReadOnlySpan<long> Slots { get; } = slots;
    public long FirstToken { get; } = firstToken;
    public nint Stream { get; } = stream;

    /// <summary>A copy that outlives the caller's buffers, for work that runs in the background.</summary>
    public OwnedKvRequest ToOwned() => new(Tokens.ToArray(), ExtraKey.ToArray(), Slots.ToArray(), FirstToken, Stream);
}

/// <summary><see cref="KvRequest"/> with its own arrays: what a background job holds.</summary>
public sealed record OwnedKvRequest(int[] Tokens, byte[] ExtraKey, long[] Slots, long FirstToken, nint Stream)
{
    public KvRequest AsRequest() => new(Tokens, ExtraKey, Slots, FirstToken, Stream);
}

/// <summary>
/// Per-tier counts: [0] is the CPU tier, [i] for i >= 1 the lower tier i - 1 in lookup order.
/// Fixed size, the C ABI's LMC_MAX_TIERS.
/// </summary>
[InlineArray(MaxTiers)]
public struct TierCounts : IEquatable<TierCounts>
{
    public const int MaxTiers = 4;
    private long _first;

    // An inline array has no built-in equality; results that hold one compare by value.
    public readonly bool Equals(TierCounts other) => ((ReadOnlySpan<long>)this).SequenceEqual(other);
    public override readonly bool Equals(object? obj) => obj is TierCounts other && Equals(other);
    public override readonly int GetHashCode() => HashCode.Combine(this[0], this[1], this[2], this[3]);
    public override readonly string ToString() => $"[{this[0]}, {this[1]}, {this[2]}, {this[3]}]";
}

/// <summary>What a store, retrieve or prefetch did (the C ABI's lmc_transfer_result).</summary>
/// <param name="TokensMatched">store: tokens from the rounded-down first token whose chunks are cached
/// afterwards; retrieve: the cached prefix's length; prefetch: leading tokens now in the CPU tier</param>
/// <param name="TokensCopied">tokens whose KV was copied into the cache (store) or into the layers (retrieve)</param>
/// <param name="BytesCopied">bytes of KV copied between layers and cache</param>
/// <param name="ChunksSkippedForSpace">store: chunks not stored because nothing could be evicted</param>
/// <param name="ChunksByTier">retrieve, prefetch: chunks of the prefix each tier served; store: chunks already cached</param>
/// <param name="ElapsedNanoseconds">from the request's start to its completion</param>
public readonly record struct TransferResult(long TokensMatched, long TokensCopied, long BytesCopied, long ChunksSkippedForSpace,
    TierCounts ChunksByTier, long ElapsedNanoseconds);

/// <summary>What a lookup found (the C ABI's lmc_lookup_result): the hit and how much of it each tier holds.</summary>
public readonly record struct LookupResult(long HitTokens, TierCounts TokensByTier, long ElapsedNanoseconds);

/// <summary>Turns a request's block table into the one-slot-per-token mapping the copies use.</summary>
public static class BlockTable
{
    /// <summary>
    /// Slot of token t = blockIds[t / blockSize] * blockSize + t % blockSize; -1 for a block id of -1
    /// and for tokens past the last block. Throws for other negative ids and for slots past int64.
    /// </summary>
    public static void ExpandToSlots(ReadOnlySpan<int> blockIds, int blockSize, Span<long> slots)
    {
        if (blockSize < 1) throw LmcException.InvalidArgument($"table_block_size must be >= 1, got {blockSize}");
        // Every id is checked, also those past the tokens: a bad table fails the call whatever its length.
        for (int b = 0; b < blockIds.Length; b++)
            if (blockIds[b] < -1) throw LmcException.InvalidArgument($"block_ids[{b}] = {blockIds[b]} is negative (only -1, \"no block\", is allowed)");
        int token = 0;
        for (int b = 0; b < blockIds.Length && token < slots.Length; b++)
        {
            int id = blockIds[b];
            int count = Math.Min(blockSize, slots.Length - token);
            var run = slots.Slice(token, count);
            if (id == -1)
            {
                run.Fill(-1);
            }
            else
            {
                long first = (long)id * blockSize;
                for (int i = 0; i < run.Length; i++) run[i] = first + i;
            }
            token += count;
        }
        slots[token..].Fill(-1);
    }
}
