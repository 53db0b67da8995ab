namespace LMCacheNative.Core.Engine;

/// <summary>Counters since creation and pool gauges; mirrors the C ABI's lmc_stats.</summary>
public readonly record struct EngineStats(
    long LookupRequests, long LookupTokens, long LookupHitTokens,
    long StoreRequests, long StoredTokens, long StoredBytes,
    long RetrieveRequests, long RetrieveRequestedTokens, long RetrievedTokens, long RetrievedBytes,
    long EvictedChunks, long StoreSkippedChunks, long CachedChunks, long PoolUsedBytes, long PoolCapacityBytes);

/// <summary>
/// The engine's cumulative request counters. Each is updated with one atomic add, so counting
/// takes no lock and never waits behind a copy; a snapshot read while requests complete may be a
/// few increments apart between counters, never torn within one.
/// </summary>
internal sealed class EngineCounters
{
    private long _lookupRequests, _lookupTokens, _lookupHitTokens;
    private long _storeRequests, _storedTokens, _storedBytes, _storeSkippedChunks;
    private long _retrieveRequests, _retrieveRequestedTokens, _retrievedTokens, _retrievedBytes;
    /// <summary>Evictions of CPU tiers replaced by a re-registration (the current tier counts its own).</summary>
    private long _evictedByEarlierTiers;

    public void Lookup(long tokens, long hitTokens)
    {
        Interlocked.Increment(ref _lookupRequests);
        Interlocked.Add(ref _lookupTokens, tokens);
        Interlocked.Add(ref _lookupHitTokens, hitTokens);
    }

    public void Store(long tokensCopied, long bytesCopied, long chunksSkippedForSpace)
    {
        Interlocked.Increment(ref _storeRequests);
        Interlocked.Add(ref _storedTokens, tokensCopied);
        Interlocked.Add(ref _storedBytes, bytesCopied);
        Interlocked.Add(ref _storeSkippedChunks, chunksSkippedForSpace);
    }

    public void Retrieve(long requestedTokens, long retrievedTokens, long bytesWritten)
    {
        Interlocked.Increment(ref _retrieveRequests);
        Interlocked.Add(ref _retrieveRequestedTokens, requestedTokens);
        Interlocked.Add(ref _retrievedTokens, retrievedTokens);
        Interlocked.Add(ref _retrievedBytes, bytesWritten);
    }

    public void TierReplaced(long evictedChunks) => Interlocked.Add(ref _evictedByEarlierTiers, evictedChunks);

    public EngineStats Snapshot(int cachedChunks, long tierEvictedChunks, long poolUsedBytes, long poolCapacityBytes) => new(
        Interlocked.Read(ref _lookupRequests), Interlocked.Read(ref _lookupTokens), Interlocked.Read(ref _lookupHitTokens),
        Interlocked.Read(ref _storeRequests), Interlocked.Read(ref _storedTokens), Interlocked.Read(ref _storedBytes),
        Interlocked.Read(ref _retrieveRequests), Interlocked.Read(ref _retrieveRequestedTokens), Interlocked.Read(ref _retrievedTokens),
        Interlocked.Read(ref _retrievedBytes),
        Interlocked.Read(ref _evictedByEarlierTiers) + tierEvictedChunks, Interlocked.Read(ref _storeSkippedChunks),
        cachedChunks, poolUsedBytes, poolCapacityBytes);
}
