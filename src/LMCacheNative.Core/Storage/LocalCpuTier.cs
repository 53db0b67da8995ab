using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Memory;

namespace LMCacheNative.Core.Storage;

/// <summary>A cached chunk in the CPU tier: one slab holding <c>[kv][layer][token][head][d]</c> bytes.</summary>
public sealed class CachedChunk
{
    internal CachedChunk(ChunkKey key, nint data, int tokenCount, long payloadBytes)
    {
        Key = key;
        Data = data;
        TokenCount = tokenCount;
        PayloadBytes = payloadBytes;
    }

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
}

/// <summary>
/// The CPU tier: an index from chunk key to slab, bounded by a <see cref="SlabPool"/>, with O(1) LRU
/// eviction. Only unpinned chunks sit in the LRU list, so the least recently used one can always be
/// evicted without scanning past chunks being read. When nothing is evictable, <see cref="TryReserve"/>
/// returns null at once: callers store fewer chunks instead of waiting (LMCache's 0.1 s busy loop,
/// issue #2942).
///
/// Not thread-safe on its own: <see cref="Engine.CacheEngine"/> serialises calls under one lock and
/// does the copies outside it, holding pins.
/// </summary>
public sealed class LocalCpuTier : IDisposable
{
    private readonly Dictionary<ChunkKey, CachedChunk> _index = new();
    // Keys reserved by a store or promotion that has not published them yet, with their count.
    private readonly Dictionary<ChunkKey, int> _pending = new();
    private readonly SlabPool _pool;
    private CachedChunk? _newest;
    private CachedChunk? _oldest;

    public LocalCpuTier(SlabPool pool) => _pool = pool;

    public int Count => _index.Count;
    public long EvictedChunks { get; private set; }
    public long UsedBytes => _pool.UsedBytes;
    public long CapacityBytes => _pool.CapacityBytes;
    public long SlabBytes => _pool.SlabBytes;
    public long CapacitySlabs => _pool.CapacitySlabs;

    public CachedChunk? Find(in ChunkKey key) => _index.GetValueOrDefault(key);

    public bool Contains(in ChunkKey key) => _index.ContainsKey(key);

    /// <summary>Whether another caller has reserved the key and is filling it right now.</summary>
    public bool IsPending(in ChunkKey key) => _pending.ContainsKey(key);

    /// <summary>Marks a chunk most recently used.</summary>
    public void Touch(CachedChunk chunk)
    {
        if (!chunk.InLru) return;
        Unlink(chunk);
        LinkNewest(chunk);
    }

    public void Pin(CachedChunk chunk)
    {
        if (chunk.Pins++ == 0 && chunk.InLru) Unlink(chunk);
    }

    /// <summary>Drops one pin; the last unpin makes the chunk most recently used (or frees it if it was removed meanwhile).</summary>
    public void Unpin(CachedChunk chunk)
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
    /// chunk is pinned and not yet visible; fill it, then <see cref="Publish"/> or <see cref="Abandon"/> it.
    /// Returns null when every cached chunk is pinned and the pool is full.
    /// </summary>
    public CachedChunk? TryReserve(in ChunkKey key, int tokenCount, long payloadBytes)
    {
        if (payloadBytes > _pool.SlabBytes) throw new ArgumentException("chunk larger than a slab");
        nint slab;
        while ((slab = _pool.TryRent()) == 0)
        {
            if (_oldest is not { } victim) return null;
            Remove(victim);
            EvictedChunks++;
        }
        _pending[key] = _pending.GetValueOrDefault(key) + 1;
        return new CachedChunk(key, slab, tokenCount, payloadBytes) { Pins = 1 };
    }

    /// <summary>
    /// Makes a reserved chunk visible. The reservation's pin stays with the caller (unpin when done).
    /// If another store published the same key meanwhile, that chunk wins: this one's slab goes back
    /// to the pool and the winner is returned, pinned for the caller instead.
    /// </summary>
    public CachedChunk PublishPinned(CachedChunk chunk)
    {
        if (chunk.Published) throw new InvalidOperationException("chunk already published");
        if (_index.TryGetValue(chunk.Key, out var existing))
        {
            Abandon(chunk);
            Pin(existing);
            return existing;
        }
        EndPending(chunk.Key);
        _index.Add(chunk.Key, chunk);
        chunk.Published = true;
        return chunk;
    }

    /// <summary>Makes a reserved chunk visible and drops the reservation's pin.</summary>
    public void Publish(CachedChunk chunk) => Unpin(PublishPinned(chunk));

    /// <summary>Removes a published chunk now if nobody holds it (used when the CPU tier is only a staging area).</summary>
    public void RemoveIfUnpinned(CachedChunk chunk)
    {
        if (chunk.Published && chunk.Pins == 0) Remove(chunk);
    }

    /// <summary>Returns a reserved, unpublished chunk's slab to the pool.</summary>
    public void Abandon(CachedChunk chunk)
    {
        if (chunk.Published) throw new InvalidOperationException("chunk already published");
        EndPending(chunk.Key);
        chunk.Pins = 0;
        _pool.Return(chunk.Data);
    }

    /// <summary>Removes every chunk; pinned ones are freed when their last reader unpins them.</summary>
    public void Clear()
    {
        foreach (var chunk in _index.Values.ToArray()) Remove(chunk);
    }

    private void EndPending(in ChunkKey key)
    {
        int count = _pending.GetValueOrDefault(key);
        if (count <= 1) _pending.Remove(key);
        else _pending[key] = count - 1;
    }

    private void Remove(CachedChunk chunk)
    {
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
    }

    private void Unlink(CachedChunk chunk)
    {
        if (chunk.Newer is not null) chunk.Newer.Older = chunk.Older; else _newest = chunk.Older;
        if (chunk.Older is not null) chunk.Older.Newer = chunk.Newer; else _oldest = chunk.Newer;
        chunk.Newer = chunk.Older = null;
        chunk.InLru = false;
    }

    /// <summary>Keys from least to most recently used (for tests and diagnostics; O(n)).</summary>
    public IEnumerable<ChunkKey> KeysOldestFirst()
    {
        for (var c = _oldest; c is not null; c = c.Newer) yield return c.Key;
    }

    public void Dispose()
    {
        _index.Clear();
        _newest = _oldest = null;
        _pool.Dispose();
    }
}
