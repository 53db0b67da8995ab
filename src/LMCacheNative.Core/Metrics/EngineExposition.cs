using System.Globalization;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Storage;

namespace LMCacheNative.Core.Metrics;

/// <summary>
/// The engine's metrics as Prometheus text: LMCache's metrics under their names, help texts, types
/// and buckets (lmcache/observability.py), then what the engine knows that LMCache lacks, under the
/// same "lmcache:" prefix. docs/metrics.md lists every family; keep the two in step.
///
/// Labels on every sample: model_name, worker_id (the engine's tensor-parallel rank) and role,
/// which is "worker" (the engine runs where the KV cache is; LMCache's scheduler-side metrics are
/// the vLLM connector's). Per-tier families add "backend" with LMCache's backend names.
/// </summary>
internal static class EngineExposition
{
    public const string CpuBackend = "LocalCPUBackend", DiskBackend = "LocalDiskBackend", RemoteBackend = "RemoteBackend";

    public static string Render(CacheEngine engine, EngineStats s, CpuTierMetrics cpu, EngineMetrics m, IReadOnlyList<TierStats> tiers,
        IReadOnlyList<TierTimings> timings, bool registered)
    {
        var w = new PrometheusTextWriter([
            new("model_name", engine.ModelName),
            new("worker_id", engine.WorkerId.ToString(CultureInfo.InvariantCulture)),
            new("role", "worker"),
        ]);
        StorageTierStats? remote = tiers.FirstOrDefault(t => t.Name == RemoteBackend).Counters;
        StorageTierStats? disk = tiers.FirstOrDefault(t => t.Name == DiskBackend).Counters;
        TierTimings? remoteTimings = timings.Where(t => t.Name == RemoteBackend).Select(t => (TierTimings?)t).FirstOrDefault();
        TierTimings? diskTimings = timings.Where(t => t.Name == DiskBackend).Select(t => (TierTimings?)t).FirstOrDefault();

        // ---- LMCache's counters ----
        w.Counter("lmcache:num_retrieve_requests", "Total number of retrieve requests sent to lmcache", s.RetrieveRequests);
        w.Counter("lmcache:num_store_requests", "Total number of store requests sent to lmcache", s.StoreRequests);
        w.Counter("lmcache:num_lookup_requests", "Total number of lookup requests sent to lmcache", s.LookupRequests);
        w.Counter("lmcache:num_requested_tokens", "Total number of tokens requested from lmcache", s.RetrieveRequestedTokens);
        w.Counter("lmcache:num_hit_tokens", "Total number of tokens hit in lmcache", s.RetrievedTokens);
        w.Counter("lmcache:num_stored_tokens", "Total number of tokens stored in lmcache including evicted ones", s.StoredTokens);
        w.Counter("lmcache:num_lookup_tokens", "Total number of tokens requested in lookup from lmcache", s.LookupTokens);
        w.Counter("lmcache:num_lookup_hits", "Total number of tokens hit in lookup from lmcache", s.LookupHitTokens);
        w.Counter("lmcache:num_remote_read_requests", "Total number of requests read from remote backends in lmcache", remote?.Hits ?? 0);
        w.Counter("lmcache:num_remote_read_bytes", "Total number of bytes read from remote backends in lmcache", remote?.BytesRead ?? 0);
        w.Counter("lmcache:num_remote_write_requests", "Total number of requests write to remote backends in lmcache", remote?.Writes ?? 0);
        w.Counter("lmcache:num_remote_write_bytes", "Total number of bytes write to remote backends in lmcache", remote?.BytesWritten ?? 0);
        w.Counter("lmcache:local_cpu_evict_count", "Total number of evict in local cpu backend", cpu.EvictionRounds + m.ReplacedEvictionRounds);
        w.Counter("lmcache:local_cpu_evict_keys_count", "Total number of evict keys in local cpu backend", s.EvictedChunks);
        w.Counter("lmcache:local_cpu_evict_failed_count", "Total number of failed eviction in local cpu backend",
            cpu.EvictionFailures + m.ReplacedEvictionFailures);
        w.Counter("lmcache:lookup_0_hit_requests", "Total number of 0 hit lookup requests", m.LookupZeroHitRequests);

        // ---- LMCache's gauges ----
        // LMCache's rates cover its last logging interval; a scrape has no interval, so these cover
        // the engine's life (0 before the first request). Windowed rates: divide rate()s of the counters.
        w.Gauge("lmcache:retrieve_hit_rate", "Hit rate of lmcache retrieve requests since the engine started (0 before any)",
            Ratio(s.RetrievedTokens, s.RetrieveRequestedTokens));
        w.Gauge("lmcache:lookup_hit_rate", "Hit rate of lmcache lookup requests since the engine started (0 before any)",
            Ratio(s.LookupHitTokens, s.LookupTokens));
        w.Gauge("lmcache:local_cache_usage", "Local cache usage (bytes) of lmcache", cpu.UsedBytes);
        w.Gauge("lmcache:remote_cache_usage", "Remote cache usage (bytes) of lmcache", remote?.UsedBytes ?? 0);
        w.Gauge("lmcache:local_storage_usage", "Local storage usage (bytes) of lmcache", disk?.UsedBytes ?? 0);
        w.Gauge("lmcache:active_memory_objs_count", "The number of active memory objects", cpu.ActiveSlabs);
        w.Gauge("lmcache:pinned_memory_objs_count", "The number of pinned memory objects", cpu.PinnedSlabs);
        long failures = tiers.Sum(t => t.Counters.Errors + t.Counters.CorruptRecords + t.Counters.PingErrors);
        bool pingsOk = tiers.All(t => t.Counters.LastPingErrorCode == 0);
        w.Gauge("lmcache:lmcache_is_healthy",
            $"The health status of LMCache (1=healthy, 0=unhealthy: layers not registered, the newest remote ping failed, or a lower tier failed, failed a ping or found a corrupt record in the last {EngineMetrics.UnhealthyAfterFailure.TotalSeconds:0} s)",
            m.HealthyGiven(failures) && pingsOk && registered ? 1 : 0);
        w.Gauge("lmcache:remote_put_task_num", "The number of remote put tasks", remoteTimings?.PendingWrites ?? 0);
        w.Gauge("lmcache:put_failed_count", "The number of put failed (remote writes dropped because the write-behind queue was full)",
            remote?.WriteQueueDrops ?? 0);
        w.Gauge("lmcache:get_blocking_failed_count", "The number of get blocking failed (remote operations that failed or timed out)",
            remote?.Errors ?? 0);

        // ---- LMCache's histograms ----
        w.Histogram("lmcache:time_to_retrieve", "Time to retrieve from lmcache (seconds)", m.TimeToRetrieve.Snapshot());
        w.Histogram("lmcache:time_to_store", "Time to store to lmcache (seconds)", m.TimeToStore.Snapshot());
        w.Histogram("lmcache:time_to_lookup", "Time to lookup in lmcache (seconds)", m.TimeToLookup.Snapshot());
        w.Histogram("lmcache:retrieve_speed", "Retrieve speed of lmcache (tokens per second)", m.RetrieveSpeed.Snapshot());
        w.Histogram("lmcache:store_speed", "Store speed of lmcache (tokens per second)", m.StoreSpeed.Snapshot());
        var emptyMs = new Histogram(LMCacheBuckets.RemoteMilliseconds).Snapshot();
        w.Histogram("lmcache:remote_time_to_get", "Time to get from remote backends (ms)", remoteTimings?.ReadMilliseconds ?? emptyMs);
        w.Histogram("lmcache:remote_time_to_put", "Time to put to remote backends (ms)", remoteTimings?.WriteMilliseconds ?? emptyMs);

        // ---- LMCache's remote health pings (its RemoteBackendHealthCheck) ----
        w.Gauge("lmcache:remote_ping_latency", "Latest ping latency to remote backends (ms)", remote?.LastPingLatencyMs ?? 0);
        w.Counter("lmcache:remote_ping_errors", "Number of ping errors to remote backends", remote?.PingErrors ?? 0);
        w.Counter("lmcache:remote_ping_successes", "Number of ping successes to remote backends", remote?.PingSuccesses ?? 0);
        w.Gauge("lmcache:remote_ping_error_code", "Latest ping error code to remote backends (0: ok, -1: timed out, -2: other failure)",
            remote?.LastPingErrorCode ?? 0);

        // ---- what the engine knows beyond LMCache ----
        w.Counter("lmcache:num_stored_bytes", "Total number of KV bytes copied into lmcache by stores", s.StoredBytes);
        w.Counter("lmcache:num_retrieved_bytes", "Total number of KV bytes written into the KV layers by retrieves", s.RetrievedBytes);
        w.Counter("lmcache:local_cpu_store_skipped_chunks", "Total number of chunks not stored because the local cpu pool had nothing to evict",
            s.StoreSkippedChunks);
        w.Gauge("lmcache:local_cpu_capacity", "Local cache capacity (bytes) of lmcache", s.PoolCapacityBytes);
        w.Gauge("lmcache:local_cpu_cached_chunks", "The number of chunks in the local cpu backend", cpu.Chunks);

        var backends = new List<string> { CpuBackend };
        backends.AddRange(tiers.Select(t => t.Name));
        w.Counter("lmcache:num_retrieve_hit_chunks", "Total number of chunks retrieves found, by the backend that served them",
            backends.Take(TierCounts.MaxTiers).Select((b, i) => (Backend(b), (double)m.RetrieveHitChunks(i))));

        if (tiers.Count > 0)
        {
            TierCounter(w, tiers, "lmcache:tier_read_hits", "Total number of chunks read from a lower backend", c => c.Hits);
            TierCounter(w, tiers, "lmcache:tier_read_misses", "Total number of chunks asked of a lower backend and not found or not readable", c => c.Misses);
            TierCounter(w, tiers, "lmcache:tier_read_bytes", "Total number of payload bytes read from a lower backend", c => c.BytesRead);
            TierCounter(w, tiers, "lmcache:tier_write_requests", "Total number of records written to a lower backend", c => c.Writes);
            TierCounter(w, tiers, "lmcache:tier_write_bytes", "Total number of payload bytes written to a lower backend", c => c.BytesWritten);
            TierCounter(w, tiers, "lmcache:tier_evict_keys_count", "Total number of records a lower backend removed to make room", c => c.Evictions);
            TierCounter(w, tiers, "lmcache:tier_dropped_writes", "Total number of writes dropped because a lower backend's write-behind queue was full",
                c => c.WriteQueueDrops);
            TierCounter(w, tiers, "lmcache:tier_corrupt_records", "Total number of records refused for a bad header, length or checksum",
                c => c.CorruptRecords);
            TierCounter(w, tiers, "lmcache:tier_errors", "Total number of I/O or network failures of a lower backend (each a miss or a skipped write)",
                c => c.Errors);
            TierCounter(w, tiers, "lmcache:tier_reconnects", "Total number of connections a remote backend restored", c => c.Reconnects);
            w.Gauge("lmcache:tier_usage", "Bytes a lower backend holds now", tiers.Select(t => (Backend(t.Name), (double)t.Counters.UsedBytes)));
            w.Gauge("lmcache:tier_capacity", "Bound on the bytes a lower backend holds (0: unbounded or unknown)",
                tiers.Select(t => (Backend(t.Name), (double)t.Counters.CapacityBytes)));
            w.Gauge("lmcache:tier_pending_writes", "Writes queued for a lower backend or being written now",
                timings.Select(t => (Backend(t.Name), (double)t.PendingWrites)));
        }
        var nodes = tiers.SelectMany(t => t.Counters.Nodes.Select(n => (Tier: t.Name, Node: n))).ToArray();
        if (nodes.Length > 0)
        {
            // Per remote node (a Redis server: standalone, cluster master or replica, Sentinel-found
            // primary; "(tier)" holds failures not tied to one node), labelled backend, node
            // ("host:port") and node_role (master, replica, sentinel, unknown).
            NodeCounter(w, nodes, "lmcache:remote_node_read_bytes", "Total number of payload bytes read from a remote node", n => n.BytesRead);
            NodeCounter(w, nodes, "lmcache:remote_node_written_bytes", "Total number of payload bytes written to a remote node", n => n.BytesWritten);
            NodeCounter(w, nodes, "lmcache:remote_node_errors", "Total number of failed or timed-out operations of a remote node", n => n.Errors);
            NodeCounter(w, nodes, "lmcache:remote_node_reconnects", "Total number of connections to a remote node restored", n => n.Reconnects);
            NodeCounter(w, nodes, "lmcache:remote_node_redirects", "Total number of slot moves (MOVED) a remote node answered with", n => n.Redirects);
            w.Gauge("lmcache:remote_node_connected", "Whether the client is connected to a remote node now (1) or not (0)",
                nodes.Select(n => (NodeLabels(n.Tier, n.Node), n.Node.Connected ? 1.0 : 0.0)));
        }
        if (diskTimings is { } d)
        {
            w.Histogram("lmcache:local_disk_time_to_get", "Time to read a batch of records from the local disk backend (ms)", d.ReadMilliseconds);
            w.Histogram("lmcache:local_disk_time_to_put", "Time to write a record to the local disk backend (ms)", d.WriteMilliseconds);
        }

        w.Counter("lmcache:lookup_server_refused_connections",
            "Total number of connections to the cross-process lookup server refused because the peer runs as another user", m.LookupPeersRefused);
        w.Counter("lmcache:lookup_server_dropped_connections",
            "Total number of lookup server connections closed for a malformed or oversized request, a missed deadline or to make room",
            m.LookupConnectionsDropped);
        return w.ToString();
    }

    private static double Ratio(long numerator, long denominator) => denominator == 0 ? 0 : (double)numerator / denominator;

    private static KeyValuePair<string, string>[] Backend(string name) => [new("backend", name)];

    private static KeyValuePair<string, string>[] NodeLabels(string tier, NodeStats node) =>
        [new("backend", tier), new("node", node.Endpoint), new("node_role", node.Role)];

    private static void NodeCounter(PrometheusTextWriter w, (string Tier, NodeStats Node)[] nodes, string name, string help, Func<NodeStats, long> value) =>
        w.Counter(name, help, nodes.Select(n => (NodeLabels(n.Tier, n.Node), (double)value(n.Node))));

    private static void TierCounter(PrometheusTextWriter w, IReadOnlyList<TierStats> tiers, string name, string help, Func<StorageTierStats, long> value) =>
        w.Counter(name, help, tiers.Select(t => (Backend(t.Name), (double)value(t.Counters))));
}
