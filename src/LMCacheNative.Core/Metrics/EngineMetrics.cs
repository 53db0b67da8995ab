using LMCacheNative.Core.Engine;

namespace LMCacheNative.Core.Metrics;

/// <summary>
/// LMCache's histogram bucket boundaries (lmcache/observability.py, PrometheusLogger), so dashboards
/// built for LMCache read this library's histograms unchanged.
/// </summary>
public static class LMCacheBuckets
{
    /// <summary>time_to_retrieve, time_to_store: seconds, 1 ms to 10 s.</summary>
    public static readonly double[] RequestSeconds = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

    /// <summary>time_to_lookup: seconds, 10 µs · 2^k for k in 0..19 (10 µs to 5.2 s), computed as LMCache does.</summary>
    public static readonly double[] LookupSeconds = Enumerable.Range(0, 20).Select(k => 0.00001 * (double)(1L << k)).ToArray();

    /// <summary>retrieve_speed, store_speed: tokens per second.</summary>
    public static readonly double[] TokensPerSecond = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];

    /// <summary>remote_time_to_get, remote_time_to_put: milliseconds, 1 ms to 10 s.</summary>
    public static readonly double[] RemoteMilliseconds = [1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000];
}

/// <summary>
/// What the engine counts for Prometheus beyond <see cref="EngineCounters"/>: the request-time
/// histograms, per-tier retrieve hits, zero-hit lookups and the lookup server's refused and
/// dropped connections. Everything is an atomic add or a per-bucket atomic increment, done once
/// per request (never per chunk) after the copy, outside every lock.
/// </summary>
internal sealed class EngineMetrics
{
    public readonly Histogram TimeToLookup = new(LMCacheBuckets.LookupSeconds);
    public readonly Histogram TimeToStore = new(LMCacheBuckets.RequestSeconds);
    public readonly Histogram TimeToRetrieve = new(LMCacheBuckets.RequestSeconds);
    public readonly Histogram StoreSpeed = new(LMCacheBuckets.TokensPerSecond);
    public readonly Histogram RetrieveSpeed = new(LMCacheBuckets.TokensPerSecond);

    private long _lookupZeroHitRequests;
    private readonly long[] _retrieveHitChunksByTier = new long[TierCounts.MaxTiers];
    private long _lookupPeersRefused, _lookupConnectionsDropped;
    // CPU-tier eviction counts of tiers a re-registration replaced (the current tier counts its own).
    private long _replacedEvictionRounds, _replacedEvictionFailures;

    // Health: when the lower tiers' failure total last changed, as seen by a scrape.
    private readonly object _healthLock = new();
    private long _lastFailureTotal;
    private long _lastFailureChangeMs = long.MinValue;
    /// <summary>How long after a new lower-tier failure the engine reports itself unhealthy.</summary>
    public static readonly TimeSpan UnhealthyAfterFailure = TimeSpan.FromSeconds(30);

    public long LookupZeroHitRequests => Interlocked.Read(ref _lookupZeroHitRequests);
    public long LookupPeersRefused => Interlocked.Read(ref _lookupPeersRefused);
    public long LookupConnectionsDropped => Interlocked.Read(ref _lookupConnectionsDropped);
    public long ReplacedEvictionRounds => Interlocked.Read(ref _replacedEvictionRounds);
    public long ReplacedEvictionFailures => Interlocked.Read(ref _replacedEvictionFailures);

    public long RetrieveHitChunks(int tier) => Interlocked.Read(ref _retrieveHitChunksByTier[tier]);

    public void Lookup(long hitTokens, long elapsedNanoseconds)
    {
        if (hitTokens == 0) Interlocked.Increment(ref _lookupZeroHitRequests);
        TimeToLookup.Observe(elapsedNanoseconds / 1e9);
    }

    /// <summary>LMCache observes a speed only when it is not 0 (its filter_out_zeros): a store that copied nothing has none.</summary>
    public void Store(long tokensCopied, long elapsedNanoseconds)
    {
        double seconds = elapsedNanoseconds / 1e9;
        TimeToStore.Observe(seconds);
        if (tokensCopied > 0 && seconds > 0) StoreSpeed.Observe(tokensCopied / seconds);
    }

    public void Retrieve(long hitTokens, in TierCounts chunksByTier, long elapsedNanoseconds)
    {
        double seconds = elapsedNanoseconds / 1e9;
        TimeToRetrieve.Observe(seconds);
        if (hitTokens > 0 && seconds > 0) RetrieveSpeed.Observe(hitTokens / seconds);
        for (int t = 0; t < TierCounts.MaxTiers; t++)
            if (chunksByTier[t] != 0) Interlocked.Add(ref _retrieveHitChunksByTier[t], chunksByTier[t]);
    }

    public void LookupPeerRefused() => Interlocked.Increment(ref _lookupPeersRefused);
    public void LookupConnectionDropped() => Interlocked.Increment(ref _lookupConnectionsDropped);

    public void CpuTierReplaced(long evictionRounds, long evictionFailures)
    {
        Interlocked.Add(ref _replacedEvictionRounds, evictionRounds);
        Interlocked.Add(ref _replacedEvictionFailures, evictionFailures);
    }

    /// <summary>
    /// False for <see cref="UnhealthyAfterFailure"/> after the lower tiers' failure count
    /// (<paramref name="failureTotal"/>: I/O or network errors and corrupt records) was last seen to grow.
    /// </summary>
    public bool HealthyGiven(long failureTotal)
    {
        long now = Environment.TickCount64;
        lock (_healthLock)
        {
            if (failureTotal != _lastFailureTotal)
            {
                _lastFailureTotal = failureTotal;
                _lastFailureChangeMs = now;
            }
            return _lastFailureChangeMs == long.MinValue || now - _lastFailureChangeMs >= UnhealthyAfterFailure.TotalMilliseconds;
        }
    }
}
