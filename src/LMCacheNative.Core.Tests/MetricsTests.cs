using System.Globalization;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Metrics;
using LMCacheNative.Core.Storage;
using NUnit.Framework;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Core.Tests;

/// <summary>
/// The engine's Prometheus metrics: a scripted sequence of lookups, hits, misses, a retrieve that
/// meets a corrupt disk record, stores that evict from a small CPU pool and a store that finds
/// nothing to evict. Every expected value is worked out from the sequence in the test (chunk
/// arithmetic), never read back from the engine; then the text format's rules and the histogram
/// type's own invariants.
/// </summary>
public class MetricsTests
{
    // 2 layers x 2 (K, V) x 2 heads x 8 x 2 bytes = 128 bytes per token; chunk of 8 = 1 KiB.
    private const int ChunkSize = 8;
    private const long BytesPerToken = 128;
    private const long SlabBytes = ChunkSize * BytesPerToken;
    private const long RecordBytes = ChunkRecord.HeaderSize + SlabBytes;

    private string _directory = null!;
    private TestModelCache _source = null!;
    private long[] _slots = null!;

    [SetUp]
    public void SetUp()
    {
        _directory = Path.Combine(Path.GetTempPath(), "lmcn-metrics-" + Guid.NewGuid().ToString("N"));
        _source = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        _source.FillRandom(23);
        _slots = RandomSlots(new Random(5), _source.NumSlots, 128);
    }

    [TearDown]
    public void TearDown()
    {
        _source.Dispose();
        if (Directory.Exists(_directory)) Directory.Delete(_directory, recursive: true);
    }

    /// <summary>A CPU pool of exactly <paramref name="slabs"/> chunks (max_local_cpu_size is in GB of 2^30 bytes).</summary>
    private CacheEngine Engine(int slabs, bool disk)
    {
        string gb = (slabs * SlabBytes / (double)(1L << 30)).ToString("R", CultureInfo.InvariantCulture);
        string diskKeys = disk ? $", \"local_disk\": \"{_directory}\", \"max_local_disk_size\": 1.0" : "";
        var engine = new CacheEngine(EngineConfig.Parse($"{{\"chunk_size\": {ChunkSize}, \"max_local_cpu_size\": {gb}{diskKeys}}}"),
            "metrics-model", 2, 1);
        engine.RegisterLayers(_source.Describe());
        return engine;
    }

    private const string Labels = "model_name=\"metrics-model\",worker_id=\"1\",role=\"worker\"";

    /// <summary>Sample lines by their series ("name{labels}"); every line of the text must be a comment or a sample.</summary>
    internal static Dictionary<string, double> Samples(string text)
    {
        var samples = new Dictionary<string, double>();
        foreach (var line in text.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.StartsWith('#')) continue;
            int space = line.LastIndexOf(' ');
            Assert.That(space, Is.GreaterThan(0), $"sample line: {line}");
            string value = line[(space + 1)..];
            double parsed = value switch
            {
                "+Inf" => double.PositiveInfinity,
                "-Inf" => double.NegativeInfinity,
                _ => double.Parse(value, NumberStyles.Float, CultureInfo.InvariantCulture),
            };
            Assert.That(samples.TryAdd(line[..space], parsed), Is.True, $"series written twice: {line[..space]}");
        }
        return samples;
    }

    private static double Value(Dictionary<string, double> samples, string name, string? backend = null) =>
        samples.TryGetValue(backend is null ? $"{name}{{{Labels}}}" : $"{name}{{{Labels},backend=\"{backend}\"}}", out var v)
            ? v
            : throw new AssertionException($"no sample {name} {backend}");

    [Test]
    public void AScriptedSequence_GivesTheCountersItImplies()
    {
        int[] cached = Tokens(32, 1), unrelated = Tokens(32, 2), stored = Tokens(32, 3);

        // A previous engine left 4 records of `cached` on disk; the last one's payload is then damaged
        // (found only when read: its header is intact, so lookups count it).
        using (var writer = Engine(64, disk: true))
            writer.Store(cached, _slots.AsSpan(0, 32), 0, default);
        var keys = new ChunkKey[4];
        new ChunkHasher(ChunkHashAlgorithm.Sha256, new KeyNamespace("metrics-model", 2, 2, 8, 2, 2, 2, 1)).ComputeKeys(cached, default, ChunkSize, keys);
        string victim = Directory.GetFiles(_directory, "*" + LocalDiskTier.RecordExtension).Single(f => f.Contains(keys[3].ToHex()));
        byte[] bytes = File.ReadAllBytes(victim);
        bytes[ChunkRecord.HeaderSize + 5] ^= 0x01;
        File.WriteAllBytes(victim, bytes);

        using var engine = Engine(4, disk: true); // a pool of 4 chunks
        long lookups = 0, lookupTokens = 0, lookupHits = 0, zeroHitLookups = 0;
        void Lookup(int[] tokens, long expectedHit)
        {
            Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(expectedHit));
            lookups++;
            lookupTokens += tokens.Length;
            lookupHits += expectedHit;
            if (expectedHit == 0) zeroHitLookups++;
        }

        Lookup(cached, 32);   // all 4 chunks on disk
        Lookup(unrelated, 0); // a miss
        // The retrieve promotes chunks 0..2 from disk; chunk 3 fails its checksum, is counted and deleted.
        _source.RetrieveAndCheck(engine, TestLayout.FlashNhd, cached, _slots, 24);
        Lookup(cached, 24);   // 3 chunks now in the CPU pool, the 4th gone
        // Four stores of one new chunk each (growing prefixes of `stored`), each written down before the
        // next: the first takes the pool's free slab, each later one evicts one of `cached`'s chunks.
        for (int n = 1; n <= 4; n++)
        {
            var result = engine.Store(stored.AsSpan(0, n * ChunkSize), _slots.AsSpan(0, n * ChunkSize), 0, default);
            Assert.That(result.TokensCopied, Is.EqualTo(ChunkSize));
            Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        }
        const int stores = 4, evictions = 3;

        var m = Samples(engine.GetPrometheusMetrics());
        Assert.Multiple(() =>
        {
            Assert.That(Value(m, "lmcache:num_lookup_requests_total"), Is.EqualTo(lookups));
            Assert.That(Value(m, "lmcache:num_lookup_tokens_total"), Is.EqualTo(lookupTokens));
            Assert.That(Value(m, "lmcache:num_lookup_hits_total"), Is.EqualTo(lookupHits));
            Assert.That(Value(m, "lmcache:lookup_0_hit_requests_total"), Is.EqualTo(zeroHitLookups));
            Assert.That(Value(m, "lmcache:lookup_hit_rate"), Is.EqualTo((double)lookupHits / lookupTokens));
            Assert.That(Value(m, "lmcache:num_retrieve_requests_total"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:num_requested_tokens_total"), Is.EqualTo(32));
            Assert.That(Value(m, "lmcache:num_hit_tokens_total"), Is.EqualTo(24));
            Assert.That(Value(m, "lmcache:retrieve_hit_rate"), Is.EqualTo(24.0 / 32));
            Assert.That(Value(m, "lmcache:num_retrieved_bytes_total"), Is.EqualTo(24 * BytesPerToken));
            Assert.That(Value(m, "lmcache:num_retrieve_hit_chunks_total", "LocalCPUBackend"), Is.EqualTo(0));
            Assert.That(Value(m, "lmcache:num_retrieve_hit_chunks_total", "LocalDiskBackend"), Is.EqualTo(3));
            Assert.That(Value(m, "lmcache:num_store_requests_total"), Is.EqualTo(stores));
            Assert.That(Value(m, "lmcache:num_stored_tokens_total"), Is.EqualTo(stores * ChunkSize));
            Assert.That(Value(m, "lmcache:num_stored_bytes_total"), Is.EqualTo(stores * SlabBytes));
            Assert.That(Value(m, "lmcache:local_cpu_evict_count_total"), Is.EqualTo(evictions), "one eviction per store after the first");
            Assert.That(Value(m, "lmcache:local_cpu_evict_keys_count_total"), Is.EqualTo(evictions));
            Assert.That(Value(m, "lmcache:local_cpu_evict_failed_count_total"), Is.EqualTo(0));
            Assert.That(Value(m, "lmcache:local_cache_usage"), Is.EqualTo(4 * SlabBytes), "the pool is full");
            Assert.That(Value(m, "lmcache:local_cpu_capacity"), Is.EqualTo(4 * SlabBytes));
            Assert.That(Value(m, "lmcache:active_memory_objs_count"), Is.EqualTo(4));
            Assert.That(Value(m, "lmcache:pinned_memory_objs_count"), Is.EqualTo(0), "nothing is being read or written");
            // Disk: 3 good reads and the corrupt one; records: 3 of `cached` and the 4 stored.
            Assert.That(Value(m, "lmcache:tier_read_hits_total", "LocalDiskBackend"), Is.EqualTo(3));
            Assert.That(Value(m, "lmcache:tier_corrupt_records_total", "LocalDiskBackend"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:tier_write_requests_total", "LocalDiskBackend"), Is.EqualTo(stores));
            Assert.That(Value(m, "lmcache:tier_write_bytes_total", "LocalDiskBackend"), Is.EqualTo(stores * SlabBytes));
            Assert.That(Value(m, "lmcache:tier_dropped_writes_total", "LocalDiskBackend"), Is.EqualTo(0));
            Assert.That(Value(m, "lmcache:local_storage_usage"), Is.EqualTo((3 + stores) * RecordBytes));
            Assert.That(Value(m, "lmcache:lmcache_is_healthy"), Is.EqualTo(0), "a corrupt record was just found");
            // No remote tier: LMCache's remote counters are present and 0.
            Assert.That(Value(m, "lmcache:num_remote_read_requests_total"), Is.EqualTo(0));
            Assert.That(Value(m, "lmcache:remote_time_to_get_count"), Is.EqualTo(0));
            // Histograms: one observation per request; the disk read was one batch, the writes one each.
            Assert.That(Value(m, "lmcache:time_to_lookup_count"), Is.EqualTo(lookups));
            Assert.That(Value(m, "lmcache:time_to_retrieve_count"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:retrieve_speed_count"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:time_to_store_count"), Is.EqualTo(stores));
            Assert.That(Value(m, "lmcache:store_speed_count"), Is.EqualTo(stores));
            Assert.That(Value(m, "lmcache:local_disk_time_to_get_count"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:local_disk_time_to_put_count"), Is.EqualTo(stores));
        });
    }

    [Test]
    public void AStoreThatFindsNothingToEvict_CountsAFailedEviction_AndALaterStoreEvictsTheOldest()
    {
        using var engine = Engine(2, disk: false);
        int[] three = Tokens(24, 4), other = Tokens(8, 5);
        // Three chunks for a pool of two: the third finds both slabs reserved by the same store.
        var result = engine.Store(three, _slots.AsSpan(0, 24), 0, default);
        Assert.That(result.TokensCopied, Is.EqualTo(16));
        // One more chunk evicts the least recently used of the two: the second (a prefix's head is released last).
        engine.Store(other, _slots.AsSpan(0, 8), 0, default);
        Assert.That(engine.Lookup(three, default).HitTokens, Is.EqualTo(8));

        var m = Samples(engine.GetPrometheusMetrics());
        Assert.Multiple(() =>
        {
            Assert.That(Value(m, "lmcache:local_cpu_evict_failed_count_total"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:local_cpu_store_skipped_chunks_total"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:local_cpu_evict_count_total"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:local_cpu_evict_keys_count_total"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:num_stored_tokens_total"), Is.EqualTo(16 + 8));
            Assert.That(Value(m, "lmcache:local_cpu_cached_chunks"), Is.EqualTo(2));
            Assert.That(Value(m, "lmcache:lmcache_is_healthy"), Is.EqualTo(1));
            Assert.That(Value(m, "lmcache:num_retrieve_hit_chunks_total", "LocalCPUBackend"), Is.EqualTo(0));
        });
    }

    [Test]
    public void TheLookupServer_CountsDroppedConnections_NotIdleOnesOrAnsweredLookups()
    {
        using var engine = Engine(4, disk: false);
        int[] tokens = Tokens(16, 6);
        engine.Store(tokens, _slots.AsSpan(0, 16), 0, default);
        string socketPath = Path.Combine(Path.GetTempPath(), $"lmcn-metrics-{Guid.NewGuid():N}.sock");
        var peers = new List<System.Net.Sockets.Socket>();
        System.Net.Sockets.Socket Connect()
        {
            var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream,
                System.Net.Sockets.ProtocolType.Unspecified);
            socket.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(socketPath));
            peers.Add(socket);
            return socket;
        }
        try
        {
            using (new LMCacheNative.Core.Lookup.LookupServer(engine, socketPath))
            {
                Connect().Send("NOPE, not a lookup"u8.ToArray()); // wrong magic: dropped (1)
                Connect().Send("LMLQ"u8.ToArray());                 // half a header, then silence: dropped at the deadline (2)
                Connect();                                           // idle: closed at the deadline, not counted
                Assert.That(LMCacheNative.Core.Lookup.LookupClient.Lookup(socketPath, tokens, [], TimeSpan.FromSeconds(5)), Is.EqualTo(16));
                Thread.Sleep(LMCacheNative.Core.Lookup.LookupServer.RequestDeadline + TimeSpan.FromMilliseconds(600));
                var m = Samples(engine.GetPrometheusMetrics());
                Assert.That(Value(m, "lmcache:lookup_server_dropped_connections_total"), Is.EqualTo(2));
                Assert.That(Value(m, "lmcache:lookup_server_refused_connections_total"), Is.EqualTo(0), "this user's peers are served");
                Assert.That(Value(m, "lmcache:num_lookup_requests_total"), Is.EqualTo(1), "the answered lookup");
            }
        }
        finally
        {
            foreach (var peer in peers) peer.Dispose();
            if (File.Exists(socketPath)) File.Delete(socketPath);
        }
    }

    [Test]
    public void TheText_FollowsTheExpositionFormat()
    {
        using var engine = new CacheEngine(EngineConfig.Parse("{\"chunk_size\": 8}"), "a \"quoted\"\\model\nname", 1, 0);
        string text = engine.GetPrometheusMetrics();
        var families = new HashSet<string>();
        string? family = null, type = null;
        foreach (var line in text.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.StartsWith("# HELP "))
            {
                family = line.Split(' ')[2];
                Assert.That(families.Add(family), Is.True, $"one HELP per family: {family}");
                Assert.That(family, Does.StartWith("lmcache:"));
                continue;
            }
            if (line.StartsWith("# TYPE "))
            {
                var parts = line.Split(' ');
                Assert.That(parts[2], Is.EqualTo(family), "TYPE follows its HELP");
                type = parts[3];
                Assert.That(type, Is.AnyOf("counter", "gauge", "histogram"));
                if (type == "counter") Assert.That(family, Does.EndWith("_total"));
                continue;
            }
            string name = line[..line.IndexOf('{')];
            if (type == "histogram") Assert.That(name, Is.AnyOf(family + "_bucket", family + "_sum", family + "_count"));
            else Assert.That(name, Is.EqualTo(family));
            Assert.That(line, Does.Contain("{model_name=\"a \\\"quoted\\\"\\\\model\\nname\",worker_id=\"0\",role=\"worker\""),
                "label values escape \\, \" and line feeds");
            Assert.That(line, Does.Not.Contain("NaN"));
        }
        // Every LMCache metric this library counts (docs/metrics.md), under LMCache's name.
        string[] lmcache =
        [
            "num_retrieve_requests_total", "num_store_requests_total", "num_lookup_requests_total", "num_requested_tokens_total",
            "num_hit_tokens_total", "num_stored_tokens_total", "num_lookup_tokens_total", "num_lookup_hits_total",
            "num_remote_read_requests_total", "num_remote_read_bytes_total", "num_remote_write_requests_total", "num_remote_write_bytes_total",
            "local_cpu_evict_count_total", "local_cpu_evict_keys_count_total", "local_cpu_evict_failed_count_total", "lookup_0_hit_requests_total",
            "retrieve_hit_rate", "lookup_hit_rate", "local_cache_usage", "remote_cache_usage", "local_storage_usage",
            "active_memory_objs_count", "pinned_memory_objs_count", "lmcache_is_healthy", "remote_put_task_num", "put_failed_count",
            "get_blocking_failed_count", "time_to_retrieve", "time_to_store", "time_to_lookup", "retrieve_speed", "store_speed",
            "remote_time_to_get", "remote_time_to_put",
            "remote_ping_latency", "remote_ping_errors_total", "remote_ping_successes_total", "remote_ping_error_code",
        ];
        Assert.That(lmcache.Select(n => "lmcache:" + n), Is.SubsetOf(families));
    }

    [Test]
    public void HistogramBuckets_AreLMCaches_AndCumulative()
    {
        Assert.That(LMCacheBuckets.LookupSeconds, Has.Length.EqualTo(20));
        Assert.That(LMCacheBuckets.LookupSeconds[0], Is.EqualTo(1e-5));
        Assert.That(LMCacheBuckets.LookupSeconds[19], Is.EqualTo(5.24288).Within(1e-12));
        Assert.That(PrometheusTextWriter.FormatBound(LMCacheBuckets.LookupSeconds[0]), Is.EqualTo("1e-05"));
        Assert.That(PrometheusTextWriter.FormatBound(10.0), Is.EqualTo("10.0"));
        Assert.That(PrometheusTextWriter.FormatBound(0.001), Is.EqualTo("0.001"));

        var histogram = new Histogram([1.0, 5.0, 10.0]);
        foreach (var v in new[] { 0.5, 1.0, 1.5, 5.0, 7.0, 11.0, 1e9, double.NaN }) histogram.Observe(v);
        var snapshot = histogram.Snapshot();
        // le=1: {0.5, 1.0}; le=5: + {1.5, 5.0}; le=10: + {7.0}; +Inf: + {11, 1e9}; NaN ignored.
        Assert.That(snapshot.CumulativeCounts, Is.EqualTo(new long[] { 2, 4, 5, 7 }));
        Assert.That(snapshot.Count, Is.EqualTo(7));
        Assert.That(snapshot.Sum, Is.EqualTo(0.5 + 1.0 + 1.5 + 5.0 + 7.0 + 11.0 + 1e9));
    }

    [Test]
    public void ConcurrentObservations_AreAllCounted()
    {
        var histogram = new Histogram(LMCacheBuckets.RequestSeconds);
        const int threads = 4, each = 50_000;
        Parallel.For(0, threads, t =>
        {
            for (int i = 0; i < each; i++) histogram.Observe((i % 7) * 0.01);
        });
        var snapshot = histogram.Snapshot();
        Assert.That(snapshot.Count, Is.EqualTo(threads * each));
        double expectedSum = threads * Enumerable.Range(0, each).Sum(i => (i % 7) * 0.01);
        Assert.That(snapshot.Sum, Is.EqualTo(expectedSum).Within(1e-6 * expectedSum));
    }
}
