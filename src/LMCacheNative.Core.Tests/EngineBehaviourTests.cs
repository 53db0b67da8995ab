using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Layout;
using NUnit.Framework;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Core.Tests;

/// <summary>Lookup, store and retrieve semantics: chunk granularity, partial chunks, skips, salts, eviction, statistics, bad input.</summary>
public class EngineBehaviourTests
{
    private TestModelCache _cache = null!;
    private long[] _slots = null!;

    [SetUp]
    public void SetUp()
    {
        // 2 layers, 32 blocks of 4 tokens, 2 heads of 8, fp16-sized: 128 slots.
        _cache = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        _cache.FillRandom(42);
        _slots = RandomSlots(new Random(1), _cache.NumSlots, 128);
    }

    [TearDown]
    public void TearDown() => _cache.Dispose();

    private CacheEngine Registered(string json)
    {
        var engine = NewEngine(json);
        engine.RegisterLayers(_cache.Describe());
        return engine;
    }

    private long Store(CacheEngine engine, int[] tokens, long skip = 0, byte[]? extra = null) =>
        engine.Store(tokens, _slots.AsSpan(0, tokens.Length), skip, extra).TokensMatched;

    [Test]
    public void Lookup_IsChunkGranular_WithoutSaveUnfullChunk()
    {
        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(37, 1);
        Assert.That(Store(engine, tokens), Is.EqualTo(32), "the trailing 5 tokens are not stored");
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(32));
        Assert.That(engine.Lookup(tokens.AsSpan(0, 20), default).HitTokens, Is.EqualTo(16), "a shorter prompt hits its whole chunks");
        Assert.That(engine.Lookup(tokens.Concat(Tokens(30, 2)).ToArray(), default).HitTokens, Is.EqualTo(32), "a longer prompt hits the shared prefix");
    }

    [Test]
    public void Lookup_CountsTheTrailingPartialChunk_WithSaveUnfullChunk()
    {
        using var engine = Registered("{\"chunk_size\": 8, \"save_unfull_chunk\": true}");
        int[] tokens = Tokens(37, 1);
        Assert.That(Store(engine, tokens), Is.EqualTo(37));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(37));
        // Tokens [32, 36) hash differently from the stored partial chunk [32, 37).
        Assert.That(engine.Lookup(tokens.AsSpan(0, 36), default).HitTokens, Is.EqualTo(32));
        Assert.That(engine.Lookup(tokens.Concat(new[] { 7 }).ToArray(), default).HitTokens, Is.EqualTo(32));
    }

    [Test]
    public void Lookup_StopsAtTheFirstDifferingChunk()
    {
        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(64, 1);
        Store(engine, tokens);
        int[] changed = (int[])tokens.Clone();
        changed[20] = -5;
        Assert.That(engine.Lookup(changed, default).HitTokens, Is.EqualTo(16));
        changed[3] = -5;
        Assert.That(engine.Lookup(changed, default).HitTokens, Is.EqualTo(0));
    }

    [Test]
    public void Store_SkipLeadingTokens_RoundsDownToAChunk_AndStoresOnlyFromThere()
    {
        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(40, 1);
        long inCache = Store(engine, tokens, skip: 20);
        Assert.That(inCache, Is.EqualTo(40 - 16), "from chunk [16, 24) on");
        Assert.That(engine.GetStats().StoredTokens, Is.EqualTo(24));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(0), "the skipped prefix chunks are not in the cache");

        Store(engine, tokens.AsSpan(0, 16).ToArray());
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(40), "once the prefix is stored the later chunks hit");
        Assert.That(engine.GetStats().StoredTokens, Is.EqualTo(40));
    }

    [Test]
    public void Store_DoesNotCopyChunksAlreadyCached()
    {
        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(32, 1);
        Store(engine, tokens.AsSpan(0, 16).ToArray());
        var result = engine.Store(tokens, _slots.AsSpan(0, 32), 0, default);
        Assert.That(result.TokensMatched, Is.EqualTo(32));
        Assert.That(result.TokensCopied, Is.EqualTo(16));
        Assert.That(result.BytesCopied, Is.EqualTo(16 * engine.BytesPerToken));
    }

    [Test]
    public void Store_StopsBeforeAChunkWithAMissingSlot()
    {
        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(32, 1);
        long[] slots = _slots.AsSpan(0, 32).ToArray();
        slots[18] = -1;
        Assert.That(engine.Store(tokens, slots, 0, default).TokensMatched, Is.EqualTo(16));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(16));
    }

    [Test]
    public void ExtraKey_SeparatesCaches_AtFullWidth()
    {
        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(16, 1);
        byte[] salt = Enumerable.Repeat((byte)7, 100).ToArray();
        Store(engine, tokens, extra: salt);
        byte[] lastByteDiffers = (byte[])salt.Clone();
        lastByteDiffers[^1] ^= 1;

        Assert.That(engine.Lookup(tokens, salt).HitTokens, Is.EqualTo(16));
        Assert.That(engine.Lookup(tokens, lastByteDiffers).HitTokens, Is.EqualTo(0));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
        Assert.That(engine.Retrieve(tokens, _slots.AsSpan(0, 16), 0, lastByteDiffers).TokensMatched, Is.EqualTo(0));
    }

    [Test]
    public void Namespace_SeparatesModelsAndRanks()
    {
        int[] tokens = Tokens(16, 1);
        using var engine = Registered("{\"chunk_size\": 8}");
        Store(engine, tokens);
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(16));

        // Re-registering the same shape keeps the cache; a different model shape starts afresh.
        using var otherHeads = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 1, 16, 2);
        engine.RegisterLayers(otherHeads.Describe());
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(0));
    }

    [Test]
    public void Eviction_IsLeastRecentlyUsed_AndKeepsThePrefixOfTheLastStore()
    {
        // Slab = 8 tokens x 2 layers x 2 (K, V) x 2 heads x 8 x 2 bytes = 1 KiB; the pool holds 3.
        const double threeChunksInGb = 3 * 1024.0 / (1 << 30);
        using var engine = Registered($"{{\"chunk_size\": 8, \"max_local_cpu_size\": {threeChunksInGb:R}}}");
        Assert.That(engine.GetStats().PoolCapacityBytes, Is.EqualTo(3 * 1024));

        int[] first = Tokens(40, 1);
        var stored = engine.Store(first, _slots.AsSpan(0, 40), 0, default);
        Assert.That(stored.TokensMatched, Is.EqualTo(24), "only three chunks fit; a store never evicts its own prefix");
        Assert.That(stored.ChunksSkippedForSpace, Is.EqualTo(2));

        int[] second = Tokens(16, 2);
        Assert.That(engine.Store(second, _slots.AsSpan(40, 16), 0, default).TokensMatched, Is.EqualTo(16));

        // The first request's suffix chunks were least recently used: its prefix survives.
        Assert.That(engine.Lookup(first, default).HitTokens, Is.EqualTo(8));
        Assert.That(engine.Lookup(second, default).HitTokens, Is.EqualTo(16));
        var stats = engine.GetStats();
        Assert.That(stats.EvictedChunks, Is.EqualTo(2));
        Assert.That(stats.StoreSkippedChunks, Is.EqualTo(2));
        Assert.That(stats.CachedChunks, Is.EqualTo(3));
        Assert.That(stats.PoolUsedBytes, Is.EqualTo(3 * 1024));
    }

    /// <summary>
    /// A store that extends a cached prefix (two chunks held, two new) leaves its chunks least
    /// recently used from the last to the first, held and new alike, so the next eviction takes the
    /// new tail, not a chunk in the middle of the prompt.
    /// </summary>
    [Test]
    public void StoreExtendingACachedPrefix_LeavesItsTailLeastRecentlyUsed()
    {
        const double fourChunksInGb = 4 * 1024.0 / (1 << 30); // slabs of 1 KiB (see above)
        using var engine = Registered($"{{\"chunk_size\": 8, \"max_local_cpu_size\": {fourChunksInGb:R}}}");
        int[] prompt = Tokens(32, 1);
        Assert.That(engine.Store(prompt.AsSpan(0, 16).ToArray(), _slots.AsSpan(0, 16), 0, default).TokensMatched, Is.EqualTo(16));
        var extended = engine.Store(prompt, _slots.AsSpan(0, 32), 0, default);
        Assert.That(extended.TokensMatched, Is.EqualTo(32));
        Assert.That(extended.TokensCopied, Is.EqualTo(16), "the two cached chunks are held, not copied again");

        // One more chunk: the pool is full, so the least recently used chunk goes.
        Assert.That(engine.Store(Tokens(8, 2), _slots.AsSpan(40, 8), 0, default).TokensMatched, Is.EqualTo(8));
        Assert.That(engine.GetStats().EvictedChunks, Is.EqualTo(1));
        Assert.That(engine.Lookup(prompt, default).HitTokens, Is.EqualTo(24), "the prompt's last chunk was evicted, nothing before it");
    }

    [Test]
    public void LocalCpuFalse_StoresNothing()
    {
        using var engine = Registered("{\"chunk_size\": 8, \"local_cpu\": false}");
        int[] tokens = Tokens(16, 1);
        Assert.That(Store(engine, tokens), Is.EqualTo(0));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
    }

    [Test]
    public void Stats_CountRequestsTokensAndBytes()
    {
        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(24, 1);
        Store(engine, tokens);
        engine.Lookup(tokens, default);
        engine.Lookup(Tokens(8, 5), default);
        engine.Retrieve(tokens, _slots.AsSpan(0, 24), 10, default);
        var s = engine.GetStats();
        long perToken = 2 * 2 * 2 * 8 * 2;
        Assert.That(engine.BytesPerToken, Is.EqualTo(perToken));
        Assert.That((s.StoreRequests, s.StoredTokens, s.StoredBytes), Is.EqualTo((1L, 24L, 24 * perToken)));
        Assert.That((s.LookupRequests, s.LookupTokens, s.LookupHitTokens), Is.EqualTo((2L, 32L, 24L)));
        Assert.That((s.RetrieveRequests, s.RetrieveRequestedTokens, s.RetrievedTokens, s.RetrievedBytes),
            Is.EqualTo((1L, 24L, 24L, 14 * perToken)));
        Assert.That(s.CachedChunks, Is.EqualTo(3));

        engine.Clear();
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(0));
        Assert.That(engine.GetStats().PoolUsedBytes, Is.EqualTo(0));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
        Assert.That(engine.GetStats().StoredTokens, Is.EqualTo(24), "clear keeps the counters");
    }

    [Test]
    public void BadInput_IsRefusedWithAMessage_OnEveryMethod()
    {
        using var unregistered = NewEngine();
        Assert.That(Kind(() => unregistered.Lookup(Tokens(8, 1), default)), Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(Kind(() => unregistered.Store(Tokens(8, 1), new long[8], 0, default)), Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(Kind(() => unregistered.Retrieve(Tokens(8, 1), new long[8], 0, default)), Is.EqualTo(LmcStatus.InvalidArgument));

        using var engine = Registered("{\"chunk_size\": 8}");
        int[] tokens = Tokens(16, 1);
        Assert.That(Message(() => engine.Store(tokens, new long[15], 0, default)), Does.Contain("15 entries for 16 tokens"));
        Assert.That(Message(() => engine.Store(tokens, _slots.AsSpan(0, 16), 17, default)), Does.Contain("skip_leading_tokens"));
        Assert.That(Message(() => engine.Store(tokens, _slots.AsSpan(0, 16), -1, default)), Does.Contain("skip_leading_tokens"));
        Assert.That(Message(() => engine.Retrieve(tokens, _slots.AsSpan(0, 16), 17, default)), Does.Contain("first_token_to_write"));
        long[] negative = _slots.AsSpan(0, 16).ToArray();
        negative[3] = -2;
        Assert.That(Message(() => engine.Store(tokens, negative, 0, default)), Does.Contain("slot_mapping[3] = -2"));
        Assert.That(Kind(() => engine.RegisterLayers([])), Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(engine.GetStats().StoreRequests, Is.EqualTo(0), "failed calls change nothing");

        Assert.That(Kind(() => new CacheEngine(new EngineConfig(), "m", 0, 0)), Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(Kind(() => new CacheEngine(new EngineConfig(), "m", 2, 2)), Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(Kind(() => new CacheEngine(new EngineConfig(), "m", 2, -1)), Is.EqualTo(LmcStatus.InvalidArgument));

        var noRemoteBackend = Assert.Throws<LmcException>(() => new CacheEngine(EngineConfig.Parse("{\"remote_url\": \"lm://host:1\"}"), "m", 1, 0))!;
        Assert.That(noRemoteBackend.Kind, Is.EqualTo(LmcStatus.Unsupported));
        Assert.That(noRemoteBackend.Message, Does.Contain("remote_url"));

        var cuda = _cache.Describe().Select(l => l with { Device = DeviceKind.Cuda }).ToArray();
        Assert.That(Kind(() => engine.RegisterLayers(cuda)), Is.EqualTo(LmcStatus.Unsupported));
    }

    [Test]
    public void DisposedEngine_ReportsInvalidHandle()
    {
        var engine = Registered("{\"chunk_size\": 8}");
        engine.Dispose();
        engine.Dispose();
        Assert.That(Kind(() => engine.Lookup(Tokens(8, 1), default)), Is.EqualTo(LmcStatus.InvalidHandle));
        Assert.That(Kind(() => engine.Store(Tokens(8, 1), new long[8], 0, default)), Is.EqualTo(LmcStatus.InvalidHandle));
        Assert.That(Kind(() => engine.Retrieve(Tokens(8, 1), new long[8], 0, default)), Is.EqualTo(LmcStatus.InvalidHandle));
        Assert.That(Kind(() => engine.GetStats()), Is.EqualTo(LmcStatus.InvalidHandle));
        Assert.That(Kind(() => engine.Clear()), Is.EqualTo(LmcStatus.InvalidHandle));
        Assert.That(Kind(() => engine.RegisterLayers(_cache.Describe())), Is.EqualTo(LmcStatus.InvalidHandle));
    }

    [Test]
    public void ConcurrentStoresLookupsAndRetrieves_StayConsistent()
    {
        // A pool of 6 chunks under 4 threads storing 4-chunk requests forces evictions while other
        // threads read; every retrieve must still deliver exactly the KV of the tokens asked for.
        const double sixChunksInGb = 6 * 1024.0 / (1 << 30);
        using var engine = Registered($"{{\"chunk_size\": 8, \"max_local_cpu_size\": {sixChunksInGb:R}}}");
        using var destination = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        var failures = new System.Collections.Concurrent.ConcurrentBag<string>();

        Parallel.For(0, 4, worker =>
        {
            var random = new Random(worker);
            for (int iteration = 0; iteration < 200; iteration++)
            {
                int requestId = random.Next(8);
                int[] tokens = Tokens(32, requestId);
                var slots = _slots.AsSpan(requestId * 16 % 96, 32); // source slots differ per request
                switch (random.Next(3))
                {
                    case 0:
                        engine.Store(tokens, slots, 0, default);
                        break;
                    case 1:
                        long hit = engine.Lookup(tokens, default).HitTokens;
                        if (hit % 8 != 0 || hit > 32) failures.Add($"lookup {hit}");
                        break;
                    default:
                        // Retrieve into the source slots themselves: the bytes written must equal the bytes there.
                        var before = _cache.Snapshot();
                        engine.Retrieve(tokens, slots, 0, default);
                        var after = _cache.Snapshot();
                        for (int l = 0; l < 2; l++)
                            if (!before[l].AsSpan().SequenceEqual(after[l])) failures.Add($"layer {l} changed by request {requestId}");
                        break;
                }
            }
        });

        Assert.That(failures, Is.Empty);
        var stats = engine.GetStats();
        Assert.That(stats.CachedChunks, Is.LessThanOrEqualTo(6));
        Assert.That(stats.PoolUsedBytes, Is.EqualTo(stats.CachedChunks * 1024));
    }

    [Test]
    public void ConcurrentIdenticalStores_CopyEachChunkOnce_AndAllReportTheWholePrefix()
    {
        // A pool that fits the request exactly: a duplicate reservation would run it dry.
        const double eightChunksGb = 8 * 1024.0 / (1 << 30);
        using var engine = Registered($"{{\"chunk_size\": 8, \"max_local_cpu_size\": {eightChunksGb:R}}}");
        int[] tokens = Tokens(64, 3);
        for (int round = 0; round < 50; round++)
        {
            engine.Clear();
            long storedBefore = engine.GetStats().StoredTokens;
            using var start = new Barrier(4);
            var results = new long[4];
            Parallel.For(0, 4, new ParallelOptions { MaxDegreeOfParallelism = 4 }, i =>
            {
                start.SignalAndWait();
                results[i] = engine.Store(tokens, _slots.AsSpan(0, 64), 0, default).TokensMatched;
            });
            Assert.That(results, Is.All.EqualTo(64), $"round {round}");
            Assert.That(engine.GetStats().StoredTokens - storedBefore, Is.EqualTo(64), $"round {round}");
        }
        Assert.That(engine.GetStats().StoreSkippedChunks, Is.EqualTo(0));
    }

    private static LmcStatus Kind(Action action) => Assert.Throws<LmcException>(action)!.Kind;
    private static string Message(Action action) => Assert.Throws<LmcException>(action)!.Message;
}
