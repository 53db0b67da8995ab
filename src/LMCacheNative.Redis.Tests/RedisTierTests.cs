using System.Diagnostics;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Storage;
using LMCacheNative.Core.Tests;
using NUnit.Framework;
using StackExchange.Redis;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Redis.Tests;

/// <summary>
/// The Redis tier through the engine against a real redis-server: sharing between engines,
/// promotion, corrupt values, and a server that dies, hangs or restarts mid-run.
/// </summary>
public class RedisTierTests
{
    private RedisServer _server = null!;
    private TestModelCache _source = null!;
    private long[] _slots = null!;

    [SetUp]
    public void SetUp()
    {
        if (RedisServer.FindBinary() is null) Assert.Ignore("redis-server is not installed; ./build.sh installs it");
        _server = new RedisServer();
        _source = new TestModelCache(TestLayout.FlashHnd, 2, 32, 4, 2, 8, 2);
        _source.FillRandom(23);
        _slots = RandomSlots(new Random(9), _source.NumSlots, 128);
    }

    [TearDown]
    public void TearDown()
    {
        _source?.Dispose();
        _server?.Dispose();
    }

    private CacheEngine RedisEngine(double timeoutSecs = 2, string model = "redis-model")
    {
        var engine = new CacheEngine(EngineConfig.Parse(
                $"{{\"chunk_size\": 8, \"save_unfull_chunk\": true, \"max_local_cpu_size\": 0.01, \"remote_url\": \"{_server.Url}\", \"blocking_timeout_secs\": {timeoutSecs:R}}}"),
            model, 1, 0, remoteTierFactory: RedisTier.TryCreate);
        engine.RegisterLayers(_source.Describe());
        return engine;
    }

    private static StorageTierStats Remote(CacheEngine engine) => engine.GetTierStats().Single(t => t.Name == "RemoteBackend").Counters;

    private static void WaitUntil(Func<bool> condition, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (!condition())
        {
            if (DateTime.UtcNow > deadline) Assert.Fail("condition not met in time");
            Thread.Sleep(50);
        }
    }

    private void RetrieveAndCheck(CacheEngine engine, int[] tokens, long expectedTokens) =>
        _source.RetrieveAndCheck(engine, TestLayout.BlocksFirstNhd, tokens, _slots, expectedTokens);

    /// <summary>Stores through one engine and waits until the remote tier has the records.</summary>
    private void StoreAndFlush(CacheEngine engine, int[] tokens)
    {
        engine.Store(tokens, _slots.AsSpan(0, tokens.Length), 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
    }

    [Test]
    public void ASecondEngine_RetrievesBitExactWhatTheFirstStored()
    {
        int[] tokens = Tokens(29, 1);
        using (var first = RedisEngine())
        {
            WaitUntil(() => Probe(first), TimeSpan.FromSeconds(10));
            StoreAndFlush(first, tokens);
            Assert.That(Remote(first).Writes, Is.EqualTo(4));
        }
        using var second = RedisEngine();
        WaitUntil(() => second.Lookup(tokens, default).HitTokens == 29, TimeSpan.FromSeconds(10));
        RetrieveAndCheck(second, tokens, 29);
        Assert.That(Remote(second).Hits, Is.EqualTo(4));
        Assert.That(second.GetStats().CachedChunks, Is.EqualTo(4), "promoted into the CPU tier");
    }

    /// <summary>True once the tier answers (a lookup on a fresh engine counts no error).</summary>
    private static bool Probe(CacheEngine engine)
    {
        long errorsBefore = Remote(engine).Errors;
        engine.Lookup(Tokens(8, 12345), default);
        return Remote(engine).Errors == errorsBefore;
    }

    [Test]
    public void ACorruptValue_IsAMiss_CountedAndDeleted_NeverLoaded()
    {
        int[] tokens = Tokens(16, 2);
        using var engine = RedisEngine();
        WaitUntil(() => Probe(engine), TimeSpan.FromSeconds(10));
        StoreAndFlush(engine, tokens);
        engine.Clear();

        using var client = ConnectionMultiplexer.Connect($"127.0.0.1:{_server.Port}");
        var server = client.GetServer("127.0.0.1", _server.Port);
        var keys = server.Keys(pattern: "lmcn:*").ToArray();
        Assert.That(keys, Has.Length.EqualTo(2));
        var db = client.GetDatabase();
        // Corrupt the second chunk's value (its chunk key ends the Redis key): one flipped payload byte.
        var chunkKeys = new LMCacheNative.Core.Keys.ChunkKey[2];
        new LMCacheNative.Core.Keys.ChunkHasher(ChunkHashAlgorithm.Sha256, new LMCacheNative.Core.Keys.KeyNamespace("redis-model", 2, 2, 8, 2, 2, 1, 0))
            .ComputeKeys(tokens, default, 8, chunkKeys);
        var victim = keys.Single(k => k.ToString().EndsWith(chunkKeys[1].ToHex(), StringComparison.Ordinal));
        byte[] value = db.StringGet(victim)!;
        value[^3] ^= 0x10;
        db.StringSet(victim, value);

        RetrieveAndCheck(engine, tokens, 8);
        Assert.That(Remote(engine).CorruptRecords, Is.EqualTo(1));
        WaitUntil(() => !db.KeyExists(victim), TimeSpan.FromSeconds(5));
    }

    [Test]
    public void WhenRedisDies_LookupsMissWithinTheTimeout_AndHitsComeBackAfterARestart()
    {
        int[] tokens = Tokens(24, 3);
        using var engine = RedisEngine(timeoutSecs: 1);
        WaitUntil(() => Probe(engine), TimeSpan.FromSeconds(10));
        StoreAndFlush(engine, tokens);
        engine.Clear();

        _server.Stop();
        var watch = Stopwatch.StartNew();
        for (int i = 0; i < 5; i++) Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
        Assert.That(engine.Retrieve(tokens, _slots.AsSpan(0, 24), 0, default).TokensMatched, Is.EqualTo(0));
        Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(6)), "each call bounded by blocking_timeout_secs");
        // Stores still succeed into the CPU tier; their remote writes are skipped, not raised.
        Assert.That(engine.Store(Tokens(8, 4), _slots.AsSpan(0, 8), 0, default).TokensMatched, Is.EqualTo(8));

        _server.Start();
        WaitUntil(() => engine.Lookup(tokens, default).HitTokens == 24, TimeSpan.FromSeconds(20));
        RetrieveAndCheck(engine, tokens, 24);
        Assert.That(Remote(engine).Reconnects, Is.GreaterThanOrEqualTo(1));
    }

    [Test]
    public void AHungRedis_TurnsLookupsIntoMisses_WithinTheTimeout()
    {
        int[] tokens = Tokens(16, 5);
        using var engine = RedisEngine(timeoutSecs: 0.5);
        WaitUntil(() => Probe(engine), TimeSpan.FromSeconds(10));
        StoreAndFlush(engine, tokens);
        engine.Clear();

        _server.Pause(true);
        try
        {
            var watch = Stopwatch.StartNew();
            Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
            Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)));
        }
        finally
        {
            _server.Pause(false);
        }
        WaitUntil(() => engine.Lookup(tokens, default).HitTokens == 16, TimeSpan.FromSeconds(20));
    }

    [Test]
    public void DifferentModels_NeverShareRecords()
    {
        int[] tokens = Tokens(16, 6);
        using var a = RedisEngine(model: "model-a");
        WaitUntil(() => Probe(a), TimeSpan.FromSeconds(10));
        StoreAndFlush(a, tokens);
        using var b = RedisEngine(model: "model-b");
        WaitUntil(() => Probe(b), TimeSpan.FromSeconds(10));
        Assert.That(b.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
    }

    /// <summary>
    /// Records of 32 and 128 MiB (a 256-token chunk of an 8B and of a 70B model) go through Redis's
    /// defaults (proto-max-bulk-len 512 MB) unchanged: written in one pipelined batch over the pool,
    /// read back byte for byte; a payload buffer of the wrong size is refused, not overrun.
    /// </summary>
    [Test]
    public unsafe void LargeRecords_32And128MiB_RoundTripBitExact()
    {
        using var tier = new RedisTier(_server.Url, EngineConfig.Parse("""{"blocking_timeout_secs": 60}"""));
        tier.Bind(new TierBinding(new LMCacheNative.Core.Keys.KeyNamespace("big", 2, 8, 128, 32, 2, 1, 0), ChunkHashAlgorithm.Sha256, 256, 128 * 1024));
        int[] sizes = [32 << 20, 128 << 20];
        var keys = sizes.Select((_, i) => LMCacheNative.Core.Keys.ChunkKey.FromBytes(System.Security.Cryptography.SHA256.HashData(new[] { (byte)i }))).ToArray();
        var payloads = sizes.Select((size, i) =>
        {
            var bytes = GC.AllocateUninitializedArray<byte>(size, pinned: true);
            new Random(100 + i).NextBytes(bytes);
            return bytes;
        }).ToArray();
        var writes = new List<TierWrite>();
        for (int i = 0; i < sizes.Length; i++)
            writes.Add(new TierWrite(keys[i], 256, (nint)System.Runtime.CompilerServices.Unsafe.AsPointer(ref payloads[i][0]), sizes[i]));
        Assert.That(tier.WriteBatch(writes), Is.EqualTo(2)); // the first call waits for the pool's connects
        Assert.That(tier.GetStats().Writes, Is.EqualTo(2));
        Assert.That(tier.WriteBatch(writes), Is.EqualTo(0), "records already held are not sent again");

        var copies = sizes.Select(size => GC.AllocateArray<byte>(size, pinned: true)).ToArray();
        var reads = new List<TierRead>();
        for (int i = 0; i < sizes.Length; i++)
            reads.Add(new TierRead(keys[i], 256, (nint)System.Runtime.CompilerServices.Unsafe.AsPointer(ref copies[i][0]), sizes[i]));
        Assert.That(tier.ReadPrefix(reads), Is.EqualTo(2));
        for (int i = 0; i < sizes.Length; i++) Assert.That(copies[i].AsSpan().SequenceEqual(payloads[i]), Is.True, $"record {i}");
        var stats = tier.GetStats();
        Assert.That(stats.BytesRead, Is.EqualTo(sizes.Sum(s => (long)s)));
        Assert.That(stats.Nodes.Single(n => n.Endpoint == $"127.0.0.1:{_server.Port}").BytesRead, Is.EqualTo(stats.BytesRead));

        var wrongSize = GC.AllocateArray<byte>(sizes[0] - 1, pinned: true);
        Assert.That(tier.ReadPrefix([new TierRead(keys[0], 256, (nint)System.Runtime.CompilerServices.Unsafe.AsPointer(ref wrongSize[0]), wrongSize.Length)]), Is.EqualTo(0));
    }

    [Test]
    public void BadUrls_AreRefusedWithTheKeyName()
    {
        foreach (string url in new[] { "redis://", "redis://host:1/notanumber" })
        {
            var error = Assert.Throws<LmcException>(() => RedisTier.TryCreate(url, new EngineConfig()))!;
            Assert.That(error.Message, Does.Contain("remote_url"));
        }
        Assert.That(RedisTier.TryCreate("lm://host:1", new EngineConfig()), Is.Null);
    }
}
