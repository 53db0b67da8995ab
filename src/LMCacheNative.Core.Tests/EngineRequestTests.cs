using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using NUnit.Framework;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Core.Tests;

/// <summary>
/// The one request path: block tables, results per tier, and jobs that give what the synchronous
/// call gives. KV is checked bit-exact against the source cache.
/// </summary>
public class EngineRequestTests
{
    private TestModelCache _source = null!;
    private string _directory = null!;

    [SetUp]
    public void SetUp()
    {
        // 2 layers, 32 blocks of 4 tokens, 2 heads of 8, fp16: 128 bytes per token.
        _source = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        _source.FillRandom(5);
        _directory = Path.Combine(Path.GetTempPath(), "lmcn-req-" + Guid.NewGuid().ToString("N"));
    }

    [TearDown]
    public void TearDown()
    {
        _source.Dispose();
        if (Directory.Exists(_directory)) Directory.Delete(_directory, recursive: true);
    }

    [Test]
    public void ABlockTable_ExpandsToOneSlotPerToken()
    {
        var slots = new long[11];
        BlockTable.ExpandToSlots([5, -1, 2], 4, slots);
        Assert.That(slots, Is.EqualTo(new long[] { 20, 21, 22, 23, -1, -1, -1, -1, 8, 9, 10 }));
        var longer = new long[14];
        BlockTable.ExpandToSlots([1, 0], 4, longer);
        Assert.That(longer[8..], Is.All.EqualTo(-1), "tokens past the last block have no slot");
        Assert.That(Assert.Throws<LmcException>(() => BlockTable.ExpandToSlots([3, -2], 4, new long[8]))!.Message, Does.Contain("block_ids[1] = -2"));
        Assert.That(Assert.Throws<LmcException>(() => BlockTable.ExpandToSlots([3, 1, -7], 4, new long[4]))!.Message, Does.Contain("block_ids[2] = -7"), "also past the tokens");
        Assert.That(Assert.Throws<LmcException>(() => BlockTable.ExpandToSlots([3], 0, new long[8]))!.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
    }

    private CacheEngine Engine(string extra = "")
    {
        var engine = new CacheEngine(EngineConfig.Parse($"{{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01{extra}}}"), "req-model", 1, 0);
        engine.RegisterLayers(_source.Describe());
        return engine;
    }

    [Test]
    public void AStoreJob_GivesWhatTheSynchronousStoreGives_AndPublishesOnlyWhenDone()
    {
        int[] tokens = Tokens(40, 1);
        long[] slots = RandomSlots(new Random(1), _source.NumSlots, 40);
        using var sync = Engine();
        using var async = Engine();
        var expected = sync.Store(new KvRequest(tokens, [], slots, 8));
        var job = async.StoreAsync(new OwnedKvRequest(tokens, [], slots, 8, 0));
        Assert.That(job.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(job.Result with { ElapsedNanoseconds = 0 }, Is.EqualTo(expected with { ElapsedNanoseconds = 0 }));
        Assert.That((expected.TokensMatched, expected.TokensCopied, expected.BytesCopied), Is.EqualTo((32L, 32L, 32L * 128)));
        Assert.That(job.Result.ElapsedNanoseconds, Is.GreaterThan(0));
        // The skipped head was never stored, so no prefix of these tokens is a hit.
        Assert.That(async.Lookup(tokens, default).HitTokens, Is.Zero);
        Assert.That(async.GetStats().CachedChunks, Is.EqualTo(4));
    }

    [Test]
    public void ARetrieveJob_WritesTheSameBytes_AsTheSynchronousRetrieve()
    {
        int[] tokens = Tokens(24, 2);
        long[] slots = RandomSlots(new Random(2), _source.NumSlots, 24);
        using var engine = Engine();
        Assert.That(engine.Store(tokens, slots, 0, default).TokensMatched, Is.EqualTo(24));
        using var destination = new TestModelCache(TestLayout.FlashHnd, 2, 32, 4, 2, 8, 2);
        destination.Fill(0x5A);
        engine.RegisterLayers(destination.Describe());
        var expected = destination.Snapshot();
        for (int t = 8; t < 24; t++) destination.ExpectCopied(expected, _source, slots[t], slots[t]);
        var job = engine.RetrieveAsync(new OwnedKvRequest(tokens, [], slots, 8, 0));
        Assert.That(job.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That((job.Result.TokensMatched, job.Result.TokensCopied, job.Result.BytesCopied), Is.EqualTo((24L, 16L, 16L * 128)));
        Assert.That(job.Result.ChunksByTier[0], Is.EqualTo(3), "the whole prefix came from the CPU tier");
        var actual = destination.Snapshot();
        for (int l = 0; l < actual.Length; l++) Assert.That(actual[l].AsSpan().SequenceEqual(expected[l]), Is.True, $"layer {l}");
    }

    [Test]
    public void Results_SayWhichTierServedEachChunk()
    {
        int[] tokens = Tokens(32, 3);
        long[] slots = RandomSlots(new Random(3), _source.NumSlots, 32);
        using var engine = Engine($", \"local_disk\": \"{_directory}\", \"max_local_disk_size\": 0.01");
        engine.Store(tokens, slots, 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        engine.Clear();
        // The first two chunks back in memory, the other two only on disk.
        Assert.That(engine.Prefetch(tokens[..16], default).ChunksByTier[1], Is.EqualTo(2));
        var lookup = engine.Lookup(tokens, default);
        Assert.That((lookup.HitTokens, lookup.TokensByTier[0], lookup.TokensByTier[1]), Is.EqualTo((32L, 16L, 16L)));
        var retrieved = engine.Retrieve(tokens, slots, 0, default);
        Assert.That((retrieved.TokensMatched, retrieved.ChunksByTier[0], retrieved.ChunksByTier[1]), Is.EqualTo((32L, 2L, 2L)));
        Assert.That(engine.Lookup(tokens, default).TokensByTier[0], Is.EqualTo(32), "promoted");
    }

    [Test]
    public void AJobsBadArguments_AreRefusedByTheCall_NotByTheJob()
    {
        using var engine = Engine();
        int[] tokens = Tokens(8, 4);
        Assert.That(Assert.Throws<LmcException>(() => engine.StoreAsync(new OwnedKvRequest(tokens, [], new long[7], 0, 0)))!.Kind,
            Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(Assert.Throws<LmcException>(() => engine.RetrieveAsync(new OwnedKvRequest(tokens, [], Enumerable.Repeat(1L << 40, 8).ToArray(), 0, 0)))!.Kind,
            Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(Assert.Throws<LmcException>(() => engine.PrefetchAsync(new OwnedKvRequest(tokens, [], [], 3, 0)))!.Kind,
            Is.EqualTo(LmcStatus.InvalidArgument));
    }

    [Test]
    public void Destroy_WaitsForJobsInFlight()
    {
        int[] tokens = Tokens(64, 5);
        long[] slots = RandomSlots(new Random(5), _source.NumSlots, 64);
        var engine = Engine();
        var jobs = Enumerable.Range(0, 16).Select(i => engine.StoreAsync(new OwnedKvRequest(tokens, BitConverter.GetBytes(i), slots, 0, 0))).ToArray();
        engine.Dispose();
        Assert.That(jobs.All(j => j.IsCompleted), Is.True, "destroy returned only after every job had finished");
        Assert.That(jobs.Where(j => j.IsCompletedSuccessfully).Select(j => j.Result.TokensMatched), Is.All.GreaterThan(0));
    }
}
