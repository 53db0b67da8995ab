using LMCacheNative.Core.Keys;

namespace LMCacheNative.Core.Storage;

/// <summary>What happened to a chunk; values are pinned by the C ABI (LMC_KV_EVENT_*).</summary>
public enum KvEventKind
{
    /// <summary>The chunk became available in <see cref="KvEvent.Medium"/>.</summary>
    BlockStored = 1,
    /// <summary>The last copy of the chunk left <see cref="KvEvent.Medium"/>.</summary>
    BlockRemoved = 2,
    /// <summary>Every chunk of the CPU tier was dropped at once (lmc_engine_clear, a new key namespace).</summary>
    AllBlocksCleared = 3,
}

/// <summary>The tier an event is about; values are pinned by the C ABI (LMC_KV_MEDIUM_*). Names are vLLM's medium strings.</summary>
public enum KvEventMedium
{
    Cpu = 1,
    Disk = 2,
    Remote = 3,
}

/// <summary>
/// Who a chunk is for routers, fixed when the chunk enters the CPU tier: its event hash (the chunk
/// key a single-rank engine would compute, so that every tensor-parallel rank names the chunk alike),
/// its parent's (the previous chunk of the prefix; none for the first) and its tokens. Only made
/// when <c>enable_kv_events</c> is on. Immutable.
/// </summary>
public sealed class ChunkLineage(ChunkKey eventHash, ChunkKey? parentEventHash, int[] tokenIds)
{
    public ChunkKey EventHash { get; } = eventHash;
    public ChunkKey? ParentEventHash { get; } = parentEventHash;
    /// <summary>The chunk's token ids (chunk_size of them, fewer for a trailing partial chunk).</summary>
    public int[] TokenIds { get; } = tokenIds;
}

/// <summary>One KV event. <see cref="TokenIds"/> is set for <see cref="KvEventKind.BlockStored"/> only; the array is shared, never modified.</summary>
public readonly record struct KvEvent(KvEventKind Kind, KvEventMedium Medium, ChunkKey BlockHash, ChunkKey? ParentHash, int TokenCount, int[]? TokenIds)
{
    public static KvEvent Stored(KvEventMedium medium, ChunkLineage lineage) =>
        new(KvEventKind.BlockStored, medium, lineage.EventHash, lineage.ParentEventHash, lineage.TokenIds.Length, lineage.TokenIds);

    public static KvEvent Removed(KvEventMedium medium, ChunkKey hash, int tokenCount) =>
        new(KvEventKind.BlockRemoved, medium, hash, null, tokenCount, null);

    public static KvEvent AllCleared(KvEventMedium medium) => new(KvEventKind.AllBlocksCleared, medium, default, null, 0, null);
}

/// <summary>
/// The engine's bounded KV event queue. Producers are the tiers, each while holding its own lock (so
/// that a chunk's stored and removed events enter the queue in the order they happened); the queue
/// takes one lock of its own for a few instructions (a ring-buffer slot), never waits and never
/// allocates. When it is full the NEW event is dropped and counted: the consumer learns from the
/// count (returned by <see cref="Drain"/>) that its view is incomplete and should resynchronise
/// (the vLLM connector tells routers to forget everything with AllBlocksCleared).
///
/// Dropping the newest rather than the oldest keeps what was queued a faithful history up to the
/// drop; either way the consumer must resynchronise, and this way costs no overwrite bookkeeping.
/// </summary>
public sealed class KvEventQueue
{
    private readonly object _lock = new();
    private readonly KvEvent[] _ring;
    private int _head;  // index of the oldest queued event
    private int _count;
    private long _droppedSinceDrain;
    private long _droppedTotal;

    /// <param name="capacity">most events held until drained (kv_events_queue_size)</param>
    public KvEventQueue(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        _ring = new KvEvent[capacity];
    }

    /// <summary>Events dropped because the queue was full, since the engine started.</summary>
    public long DroppedTotal
    {
        get { lock (_lock) return _droppedTotal; }
    }

    /// <summary>Queues an event; false (counted as dropped) when the queue is full. Never blocks.</summary>
    public bool TryEnqueue(in KvEvent kvEvent)
    {
        lock (_lock)
        {
            if (_count == _ring.Length)
            {
                _droppedSinceDrain++;
                _droppedTotal++;
                return false;
            }
            _ring[(_head + _count) % _ring.Length] = kvEvent;
            _count++;
            return true;
        }
    }

    /// <summary>
    /// Moves the oldest events, in order, into <paramref name="destination"/>: as many as fit, and
    /// only while the token ids of the BlockStored ones fit in <paramref name="tokenCapacity"/> in
    /// all (an event that does not fit stays queued, first in line). Returns how many it moved and
    /// the events dropped since the previous drain (reset to 0 by this call).
    /// </summary>
    public (int Events, long TokenIds, long Dropped) Drain(Span<KvEvent> destination, long tokenCapacity)
    {
        lock (_lock)
        {
            int moved = 0;
            long tokens = 0;
            while (moved < destination.Length && _count > 0)
            {
                ref var next = ref _ring[_head];
                long needed = next.TokenIds?.Length ?? 0;
                if (tokens + needed > tokenCapacity) break;
                destination[moved++] = next;
                tokens += needed;
                next = default; // the queue no longer keeps the token array alive
                _head = (_head + 1) % _ring.Length;
                _count--;
            }
            long dropped = _droppedSinceDrain;
            _droppedSinceDrain = 0;
            return (moved, tokens, dropped);
        }
    }

    /// <summary>Token ids of the oldest queued event (0 when none or not a BlockStored): what a drain needs room for to make progress.</summary>
    public int PeekTokenCount()
    {
        lock (_lock) return _count == 0 ? 0 : _ring[_head].TokenIds?.Length ?? 0;
    }
}
