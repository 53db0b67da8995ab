using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Memory;

namespace LMCacheNative.Core.Storage;

/// <summary>A cached chunk in the CPU tier: one slab holding <c>[kv][layer][token][head][d]</c> bytes.</summary>
public sealed class CachedChunk : IChunkKeyed
{
    internal CachedChunk(LocalCpuTier owner, ChunkKey key, nint data, int tokenCount, long payloadBytes)
    {
        Owner = owner;
        Key = key;
        Data = data;
        TokenCount = tokenCount;
        PayloadBytes = payloadBytes;
    }

    /// <summary>The tier whose pool holds the slab: pins are released there, whatever registration is current.</summary>
    public LocalCpuTier Owner { get; }
    public ChunkKey Key { get; }
    /// <summary>Slab address; owned by the tier's pool.</summary>
    public nint Data { get; }
    public int TokenCount { get; }
    /// <summary>Bytes of KV in the slab (TokenCount x bytes per token).</summary>
    public long PayloadBytes { get; }
    /// <summary>Readers (and a store in progress) holding the chunk; a pinned chunk is never evicted or freed.</summary>
    public int Pins { get; internal set; }

    // Intrusive LRU list links: O(1) touch, unlink and evict with no allocation.
    internal CachedChunk? Newer;
    internal CachedChunk? Older;
    internal bool InLru;
    /// <summary>Whether the chunk is in the index (false while a store fills it, and after removal).</summary>
    internal bool Published;
    /// <summary>Removed from the index while pinned: the slab goes back to the pool at the last unpin.</summary>
    internal bool Orphaned;
    /// <summary>
    /// Event hash, parent and tokens for KV events; null unless <c>enable_kv_events</c> is on. Set by
    /// the store or promotion that reserved the chunk, before it publishes it; read-only after.
    /// </summary>
    public ChunkLineage? Lineage { get; internal set; }
}

/// <summary>
/// The CPU tier for metrics. ActiveSlabs: slabs in use (cached, being filled, or removed while still
/// read; LMCache's active_memory_objs_count). PinnedSlabs: those a request or a write holds (not
/// evictable; pinned_memory_objs_count). EvictionRounds: reservations that evicted at least one
/// chunk; EvictionFailures: reservations refused because every chunk was pinned.
/// </summary>
public readonly record struct CpuTierMetrics(int Chunks, long ActiveSlabs, long PinnedSlabs, long EvictedChunks, long EvictionRounds,
    long EvictionFailures, long UsedBytes);

/// <summary>
/// The CPU tier: an index from chunk key to slab, bounded by a <see cref="SlabPool"/>, with O(1) LRU
/// eviction. The index is a <see cref="ChunkIndex{TValue}"/> (open addressing, 16-byte slots of key
/// word and chunk handle), and the compound operations prefetch the slots of the keys a few places
/// ahead of the one they probe, so that a store or lookup of 256 chunks against a million cached
/// ones overlaps its cache misses instead of paying them one after the other. The index starts
/// sized for the whole pool when that is at most <see cref="MaxPresizedChunks"/> chunks, else for
/// that many, and doubles as it fills: a table sized for a million chunks up front (32 MiB) would be
/// memory taken before it is needed, and would spread a small cache's keys over far more cache lines
/// than they fill. Only unpinned chunks sit in the LRU list, so the least recently used one can
/// always be evicted without scanning past chunks being read. When nothing is evictable, <see cref="TryReserve"/>
/// returns null at once: callers store fewer chunks instead of waiting (LMCache's 0.1 s busy loop,
/// issue #2942).
///
/// Thread-safe: every method takes the tier's one lock for a short, bounded time (index and list
/// updates only); copies run outside it while the chunks involved are pinned. The compound
/// operations (<see cref="FindPrefix"/>, <see cref="PinPrefix"/>, <see cref="PlanStore"/>,
/// <see cref="PublishAll"/>, <see cref="Release"/>) are each one critical section, so a request sees
/// and changes a consistent index.
///
/// Staging only (<c>local_cpu: false</c> with lower tiers): chunks live here only while a request
/// or a write-behind holds them; the last <see cref="Release"/> of such a chunk removes it.
/// </summary>
public sealed class LocalCpuTier : IDisposable
{
    private readonly object _lock = new();
    private readonly bool _stagingOnly;
    private readonly ChunkIndex<CachedChunk> _index;
    // Keys reserved by a store or promotion that has not published them yet, with their count.
    private readonly Dictionary<ChunkKey, int> _pending = new();
    private readonly SlabPool _pool;
    private CachedChunk? _newest;
    private CachedChunk? _oldest;
    private long _evictedChunks;
    // KV events of this tier (medium CPU), queued under _lock so that they keep the order of the
    // index changes; null when events are off, and for a staging-only pool, whose chunks are only in
    // transit to the lower tiers and never worth routing to.
    private readonly KvEventQueue? _events;

    // For metrics, counted under the tier's lock where the events happen: reservations that evicted
    // (LMCache's local_cpu_evict_count), reservations that found nothing to evict
    // (local_cpu_evict_failed_count), and chunks in the LRU list (the unpinned ones).
    private long _evictionRounds, _evictionFailures;
    private long _lruChunks;

    /// <param name="stagingOnly">chunks leave the tier when their last holder releases them</param>
    /// <param name="events">where BlockStored / BlockRemoved (CPU) and AllBlocksCleared go; null: no events</param>
    public LocalCpuTier(SlabPool pool, bool stagingOnly = false, KvEventQueue? events = null)
    {
        _pool = pool;
        _stagingOnly = stagingOnly;
        _index = new ChunkIndex<CachedChunk>((int)Math.Min(pool.CapacitySlabs, MaxPresizedChunks));
        _events = stagingOnly ? null : events;
    }

    /// <summary>
    /// Chunks the index is sized for up front at most: 2^16, a table of 2^17 16-byte slots (2 MiB).
    /// A pool of more slabs grows the table as it fills (doubling; at a million chunks one store
    /// pays for copying it, as it did for the Dictionary before).
    /// </summary>
    public const long MaxPresizedChunks = 1 << 16;

    public int Count
    {
        get { lock (_lock) return _index.Count; }
    }

    public long EvictedChunks
    {
        get { lock (_lock) return _evictedChunks; }
    }

    public long UsedBytes
    {
        get { lock (_lock) return _pool.UsedBytes; }
    }

    public long CapacityBytes => _pool.CapacityBytes;
    public long SlabBytes => _pool.SlabBytes;
    public long CapacitySlabs => _pool.CapacitySlabs;

    public CachedChunk? Find(in ChunkKey key)
    {
        lock (_lock) return _index.Find(key);
    }

    public bool Contains(in ChunkKey key)
    {
        lock (_lock) return _index.ContainsKey(key);
    }

    /// <summary>Marks a chunk most recently used.</summary>
    public void Touch(CachedChunk chunk)
    {
        lock (_lock) TouchLocked(chunk);
    }

    private void TouchLocked(CachedChunk chunk)
    {
        if (!chunk.InLru) return;
        Unlink(chunk);
        LinkNewest(chunk);
    }

    public void Pin(CachedChunk chunk)
    {
        lock (_lock) PinLocked(chunk);
    }

    private void PinLocked(CachedChunk chunk)
    {
        if (chunk.Pins++ == 0 && chunk.InLru) Unlink(chunk);
    }

    /// <summary>Drops one pin; the last unpin makes the chunk most recently used (or frees it if it was removed meanwhile).</summary>
    public void Unpin(CachedChunk chunk)
    {
        lock (_lock) UnpinLocked(chunk);
    }

    private void UnpinLocked(CachedChunk chunk)
    {
        if (chunk.Pins <= 0) throw new InvalidOperationException("unpin without pin");
        if (--chunk.Pins > 0) return;
        if (chunk.Orphaned)
        {
            chunk.Orphaned = false;
            _pool.Return(chunk.Data);
        }
        else if (chunk.Published)
        {
            LinkNewest(chunk);
        }
    }

    /// <summary>
    /// Takes a slab for a new chunk, evicting least recently used chunks as needed. The returned
    /// chunk is pinned and not yet visible; fill it, then publish it (<see cref="Publish"/>, <see cref="PublishAll"/>) or give it back (<see cref="AbandonAndRelease"/>).
    /// Returns null when every cached chunk is pinned and the pool is full.
    /// </summary>
    public CachedChunk? TryReserve(in ChunkKey key, int tokenCount, long payloadBytes)
    {
        lock (_lock) return TryReserveLocked(key, tokenCount, payloadBytes);
    }

    private CachedChunk? TryReserveLocked(in ChunkKey key, int tokenCount, long payloadBytes)
    {
        if (payloadBytes > _pool.SlabBytes) throw new ArgumentException("chunk larger than a slab");
        nint slab;
        bool evicted = false;
        while ((slab = _pool.TryRent()) == 0)
        {
            if (_oldest is not { } victim)
            {
                _evictionFailures++;
                return null;
            }
            Remove(victim);
            _evictedChunks++;
            evicted = true;
        }
        if (evicted) _evictionRounds++;
        _pending[key] = _pending.GetValueOrDefault(key) + 1;
        return new CachedChunk(this, key, slab, tokenCount, payloadBytes) { Pins = 1 };
    }

    /// <summary>
    /// Makes a reserved chunk visible. The reservation's pin stays with the caller (unpin when done).
    /// If another store published the same key meanwhile, that chunk wins: this one's slab goes back
    /// to the pool and the winner is returned, pinned for the caller instead.
    /// </summary>
    private CachedChunk PublishPinnedLocked(CachedChunk chunk)
    {
        if (chunk.Published) throw new InvalidOperationException("chunk already published");
        if (_index.Find(chunk.Key) is { } existing)
        {
            AbandonLocked(chunk);
            PinLocked(existing);
            return existing;
        }
        EndPending(chunk.Key);
        _index.TryAdd(chunk);
        chunk.Published = true;
        if (_events is not null && chunk.Lineage is { } lineage) _events.TryEnqueue(KvEvent.Stored(KvEventMedium.Cpu, lineage));
        return chunk;
    }

    /// <summary>Makes a reserved chunk visible and drops the reservation's pin.</summary>
    public void Publish(CachedChunk chunk)
    {
        lock (_lock) UnpinLocked(PublishPinnedLocked(chunk));
    }

    /// <summary>Returns a reserved, unpublished chunk's slab to the pool.</summary>
    private void AbandonLocked(CachedChunk chunk)
    {
        if (chunk.Published) throw new InvalidOperationException("chunk already published");
        EndPending(chunk.Key);
        chunk.Pins = 0;
        _pool.Return(chunk.Data);
    }

    /// <summary>Removes every chunk; pinned ones are freed when their last reader unpins them. One AllBlocksCleared event, no BlockRemoved.</summary>
    public void Clear()
    {
        lock (_lock)
        {
            foreach (var chunk in _index.ValuesToArray()) Remove(chunk, announce: false);
            _events?.TryEnqueue(KvEvent.AllCleared(KvEventMedium.Cpu));
        }
    }

    // ---- compound operations: one critical section each ----

    /// <summary>
    /// Number of leading <paramref name="keys"/> cached here. The found chunks are marked used from
    /// the last to the first, so the head of a prompt, which every extension of it needs, stays
    /// away from eviction the longest.
    /// </summary>
    public int FindPrefix(ReadOnlySpan<ChunkKey> keys)
    {
        lock (_lock)
        {
            _index.PrefetchFirst(keys);
            int found = 0;
            for (; found < keys.Length; found++)
            {
                _index.PrefetchAhead(keys, found);
                if (!_index.ContainsKey(keys[found])) break;
            }
            for (int i = found - 1; i >= 0; i--) TouchLocked(_index.Find(keys[i])!);
            return found;
        }
    }

    /// <summary>Pins the chunks of the leading <paramref name="keys"/> cached here, in order; <see cref="Release"/> them.</summary>
    public List<CachedChunk> PinPrefix(ReadOnlySpan<ChunkKey> keys)
    {
        var held = new List<CachedChunk>(keys.Length);
        lock (_lock)
        {
            _index.PrefetchFirst(keys);
            for (int i = 0; i < keys.Length; i++)
            {
                _index.PrefetchAhead(keys, i);
                if (_index.Find(keys[i]) is not { } chunk) break;
                PinLocked(chunk);
                held.Add(chunk);
            }
        }
        return held;
    }

    /// <summary>What a store found and reserved: see <see cref="PlanStore"/>.</summary>
    public sealed class StorePlan(int expectedChunks = 0)
    {
        /// <summary>(chunk index, chunk) of chunks already cached, pinned for the store, in chunk order.</summary>
        public List<(int Index, CachedChunk Chunk)> Held { get; } = [];
        /// <summary>(chunk index, chunk) reserved for the store to fill and then publish, in chunk order.</summary>
        public List<(int Index, CachedChunk Chunk)> Fresh { get; } = new(expectedChunks);
        /// <summary>Index after the last chunk the store covers (cached, filled by it, or being filled by another store).</summary>
        public int ReachedChunk { get; set; }
        public int SkippedForSpace { get; set; }
    }

    /// <summary>
    /// For chunks <paramref name="firstChunk"/> to <c>keys.Length</c>: pins those already cached,
    /// leaves those another store is filling right now, and reserves a slab for each other one, until
    /// room runs out. Everything the store touches is pinned first, so making room for a later chunk
    /// can never evict an earlier chunk of the same prefix.
    /// </summary>
    /// <param name="tokenCount">tokens of chunk i (the last may be partial)</param>
    public StorePlan PlanStore(ReadOnlySpan<ChunkKey> keys, int firstChunk, Func<int, int> tokenCount, long bytesPerToken)
    {
        // Sized for a store whose chunks are all new, the common case: no list growth per store.
        var plan = new StorePlan(Math.Max(0, keys.Length - firstChunk)) { ReachedChunk = firstChunk };
        lock (_lock)
        {
            _index.PrefetchFirst(keys[firstChunk..]);
            for (int c = firstChunk; c < keys.Length; c++)
            {
                _index.PrefetchAhead(keys, c);
                if (_index.Find(keys[c]) is { } existing)
                {
                    PinLocked(existing);
                    plan.Held.Add((c, existing));
                }
                else if (!_pending.ContainsKey(keys[c]))
                {
                    int count = tokenCount(c);
                    if (TryReserveLocked(keys[c], count, count * bytesPerToken) is not { } reserved)
                    {
                        plan.SkippedForSpace = keys.Length - c;
                        break;
                    }
                    plan.Fresh.Add((c, reserved));
                }
                // else: another store is copying this very chunk right now; copying it twice would
                // only waste the pool and count the tokens twice.
                plan.ReachedChunk = c + 1;
            }
        }
        return plan;
    }

    /// <summary>
    /// Publishes filled chunks (each keeps its pin for the caller). Returns them in order, with the
    /// chunk that won where another store published the same key first (then pinned instead), and
    /// whether it is this caller's own (new to the cache, to be written down to the lower tiers).
    /// </summary>
    public List<(CachedChunk Chunk, bool New)> PublishAll(IEnumerable<CachedChunk> filled)
    {
        var chunks = filled as IReadOnlyList<CachedChunk> ?? filled.ToList();
        var published = new List<(CachedChunk, bool)>(chunks.Count);
        lock (_lock)
        {
            const int distance = ChunkIndex<CachedChunk>.PrefetchDistance;
            for (int i = 0; i < Math.Min(distance, chunks.Count); i++) _index.Prefetch(chunks[i].Key);
            for (int i = 0; i < chunks.Count; i++)
            {
                if (i + distance < chunks.Count) _index.Prefetch(chunks[i + distance].Key);
                var chunk = chunks[i];
                var winner = PublishPinnedLocked(chunk);
                published.Add((winner, winner == chunk));
            }
        }
        return published;
    }

    /// <summary>
    /// Drops one pin of each chunk, in the order given (the last released becomes the most recently
    /// used); staging only, a chunk nobody holds any more leaves the tier.
    /// </summary>
    public void Release(IEnumerable<CachedChunk> chunks)
    {
        lock (_lock)
            foreach (var chunk in chunks) ReleaseLocked(chunk);
    }

    public void Release(CachedChunk chunk)
    {
        lock (_lock) ReleaseLocked(chunk);
    }

    private void ReleaseLocked(CachedChunk chunk)
    {
        UnpinLocked(chunk);
        if (_stagingOnly && chunk.Published && chunk.Pins == 0) Remove(chunk);
    }

    /// <summary>Returns reserved chunks' slabs and releases held ones (a request that failed).</summary>
    public void AbandonAndRelease(IEnumerable<CachedChunk> reserved, IEnumerable<CachedChunk> held)
    {
        lock (_lock)
        {
            foreach (var chunk in reserved) AbandonLocked(chunk);
            foreach (var chunk in held) ReleaseLocked(chunk);
        }
    }

    /// <summary>The tier's gauges and eviction counters for metrics, read together.</summary>
    public CpuTierMetrics MetricsSnapshot()
    {
        lock (_lock)
        {
            long slabs = _pool.RentedSlabs;
            return new CpuTierMetrics(_index.Count, slabs, slabs - _lruChunks, _evictedChunks, _evictionRounds, _evictionFailures, _pool.UsedBytes);
        }
    }

    /// <summary>Chunks, evictions and pool bytes, read together.</summary>
    public (int Chunks, long EvictedChunks, long UsedBytes) Snapshot()
    {
        lock (_lock) return (_index.Count, _evictedChunks, _pool.UsedBytes);
    }

    private void EndPending(in ChunkKey key)
    {
        int count = _pending.GetValueOrDefault(key);
        if (count <= 1) _pending.Remove(key);
        else _pending[key] = count - 1;
    }

    private void Remove(CachedChunk chunk, bool announce = true)
    {
        if (announce && _events is not null && chunk.Lineage is { } lineage)
            _events.TryEnqueue(KvEvent.Removed(KvEventMedium.Cpu, lineage.EventHash, chunk.TokenCount));
        _index.Remove(chunk.Key);
        chunk.Published = false;
        if (chunk.InLru) Unlink(chunk);
        if (chunk.Pins > 0) chunk.Orphaned = true;
        else _pool.Return(chunk.Data);
    }

    private void LinkNewest(CachedChunk chunk)
    {
        chunk.Older = _newest;
        chunk.Newer = null;
        if (_newest is not null) _newest.Newer = chunk;
        _newest = chunk;
        _oldest ??= chunk;
        chunk.InLru = true;
        _lruChunks++;
    }

    private void Unlink(CachedChunk chunk)
    {
        if (chunk.Newer is not null) chunk.Newer.Older = chunk.Older; else _newest = chunk.Older;
        if (chunk.Older is not null) chunk.Older.Newer = chunk.Newer; else _oldest = chunk.Newer;
        chunk.Newer = chunk.Older = null;
        chunk.InLru = false;
        _lruChunks--;
    }

    /// <summary>Keys from least to most recently used (for tests and diagnostics; O(n)).</summary>
    public IReadOnlyList<ChunkKey> KeysOldestFirst()
    {
        var keys = new List<ChunkKey>();
        lock (_lock)
            for (var c = _oldest; c is not null; c = c.Newer) keys.Add(c.Key);
        return keys;
    }

    public void Dispose()
    {
        lock (_lock)
        {
            _index.Clear();
            _newest = _oldest = null;
            _lruChunks = 0;
            _pool.Dispose();
        }
    }
}
