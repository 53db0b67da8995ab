using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Storage;
using NUnit.Framework;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Core.Tests;

/// <summary>Write-behind against a tier whose writes block until the test lets them through.</summary>
public class WriteBehindTests
{
    /// <summary>A remote tier stand-in: records in a dictionary, writes held at a gate.</summary>
    private sealed class GatedTier : IStorageTier
    {
        public readonly ManualResetEventSlim Gate = new(false);
        public readonly System.Collections.Concurrent.ConcurrentDictionary<ChunkKey, byte[]> Records = new();
        private readonly StorageTierStats _stats = new();
        public string Name => "RemoteBackend";
        public void Bind(TierBinding binding) { }
        public int CountPrefix(ReadOnlySpan<ChunkKey> keys)
        {
            int n = 0;
            while (n < keys.Length && Records.ContainsKey(keys[n])) n++;
            return n;
        }
        public bool TryRead(in ChunkKey key, int tokenCount, Span<byte> payload)
        {
            if (!Records.TryGetValue(key, out var bytes) || bytes.Length != payload.Length) return false;
            bytes.CopyTo(payload);
            return true;
        }
        public bool Contains(in ChunkKey key) => Records.ContainsKey(key);
        public bool Write(in ChunkKey key, int tokenCount, ReadOnlySpan<byte> payload)
        {
            Gate.Wait();
            Records[key] = payload.ToArray();
            return true;
        }
        public void Clear() => Records.Clear();
        public StorageTierStats GetStats() => _stats.Snapshot();
        public void Dispose() => Gate.Set();
    }

    [Test]
    public void AFullWriteQueue_DropsAndCountsWrites_WithoutBlockingTheStore()
    {
        var tier = new GatedTier();
        // Pool of 8 slabs (1 KiB each): the queue may hold 8 / 4 = 2 chunks while a write is stuck.
        const double eightChunksGb = 8 * 1024.0 / (1 << 30);
        using var engine = new CacheEngine(EngineConfig.Parse($"{{\"chunk_size\": 8, \"max_local_cpu_size\": {eightChunksGb:R}, \"remote_url\": \"gated://\"}}"),
            "m", 1, 0, remoteTierFactory: (_, _) => tier);
        using var cache = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        cache.FillRandom(1);
        engine.RegisterLayers(cache.Describe());
        long[] slots = RandomSlots(new Random(2), cache.NumSlots, 48);

        int[] tokens = Tokens(48, 1); // 6 chunks
        var watch = System.Diagnostics.Stopwatch.StartNew();
        Assert.That(engine.Store(tokens, slots, 0, default).TokensMatched, Is.EqualTo(48));
        Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(5)), "the store does not wait for the tier");
        Assert.That(engine.Flush(TimeSpan.FromMilliseconds(100)), Is.False, "the tier's writes are still held");

        tier.Gate.Set();
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        var stats = engine.GetTierStats().Single().Counters;
        // One write in progress plus two queued went through; the other three were dropped.
        Assert.That(tier.Records.Count + stats.WriteQueueDrops, Is.EqualTo(6));
        Assert.That(stats.WriteQueueDrops, Is.GreaterThanOrEqualTo(3));
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(6), "every chunk is in the CPU tier, unpinned again");

        // Pins were released: the whole pool can be reused by another request.
        engine.Clear();
        Assert.That(engine.Store(Tokens(64, 2), RandomSlots(new Random(3), cache.NumSlots, 64), 0, default).TokensMatched, Is.EqualTo(64));
    }

    [Test]
    public void WithoutLocalCpu_ThePoolOnlyStages_AndChunksAreServedFromTheLowerTier()
    {
        var tier = new GatedTier();
        tier.Gate.Set();
        using var engine = new CacheEngine(EngineConfig.Parse("{\"chunk_size\": 8, \"local_cpu\": false, \"max_local_cpu_size\": 0.01, \"remote_url\": \"gated://\"}"),
            "m", 1, 0, remoteTierFactory: (_, _) => tier);
        using var cache = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        cache.FillRandom(4);
        engine.RegisterLayers(cache.Describe());
        long[] slots = RandomSlots(new Random(5), cache.NumSlots, 16);
        int[] tokens = Tokens(16, 3);

        engine.Store(tokens, slots, 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(tier.Records.Count, Is.EqualTo(2));
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(0), "written down, then dropped from the staging pool");
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(16));

        var before = cache.Snapshot();
        using var destination = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        destination.Fill(0);
        engine.RegisterLayers(destination.Describe());
        var expected = destination.Snapshot();
        for (int t = 0; t < 16; t++) destination.ExpectCopied(expected, cache, slots[t], slots[t]);
        Assert.That(engine.Retrieve(tokens, slots, 0, default).TokensMatched, Is.EqualTo(16));
        var actual = destination.Snapshot();
        for (int l = 0; l < 2; l++) Assert.That(actual[l], Is.EqualTo(expected[l]));
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(0));
    }
}
