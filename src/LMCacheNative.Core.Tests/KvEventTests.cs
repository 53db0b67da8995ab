using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Storage;
using NUnit.Framework;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Core.Tests;

/// <summary>
/// KV events (enable_kv_events): the bounded queue, and the events each tier produces, checked
/// against keys, parents and token ids computed here independently of the engine.
/// </summary>
public class KvEventTests
{
    // 2 layers x 2 (K, V) x 2 heads x 8 x 2 bytes = 128 bytes per token; a chunk of 8 tokens = 1 KiB.
    private const int ChunkSize = 8;
    private const long ChunkBytes = ChunkSize * 128;
    private const string Model = "events-model";

    private TestModelCache _source = null!;
    private long[] _slots = null!;
    private string _directory = null!;

    [SetUp]
    public void SetUp()
    {
        _source = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        _source.FillRandom(23);
        _slots = RandomSlots(new Random(8), _source.NumSlots, 128);
        _directory = Path.Combine(Path.GetTempPath(), "lmcn-events-" + Guid.NewGuid().ToString("N"));
    }

    [TearDown]
    public void TearDown()
    {
        _source.Dispose();
        if (Directory.Exists(_directory)) Directory.Delete(_directory, recursive: true);
    }

    private CacheEngine Engine(string extra = "", double cpuChunks = 64, bool events = true, int worldSize = 1, int workerId = 0)
    {
        double cpuGb = cpuChunks * ChunkBytes / (double)(1L << 30);
        var engine = new CacheEngine(EngineConfig.Parse(
            $"{{\"chunk_size\": {ChunkSize}, \"save_unfull_chunk\": true, \"max_local_cpu_size\": {cpuGb:R}, " +
            $"\"enable_kv_events\": {(events ? "true" : "false")}{extra}}}"), Model, worldSize, workerId);
        engine.RegisterLayers(_source.Describe());
        return engine;
    }

    private string DiskConfig(double records) =>
        $", \"local_disk\": \"{_directory}\", \"max_local_disk_size\": {records * (ChunkRecord.HeaderSize + ChunkBytes) / (1L << 30):R}";

    /// <summary>The keys a single-rank engine of this model computes: what events name chunks by.</summary>
    private static ChunkKey[] Keys(int[] tokens, int worldSize = 1, int workerId = 0)
    {
        var keys = new ChunkKey[ChunkHasher.ChunkCount(tokens.Length, ChunkSize)];
        new ChunkHasher(ChunkHashAlgorithm.Sha256, new KeyNamespace(Model, 2, 2, 8, 2, 2, worldSize, workerId)).ComputeKeys(tokens, default, ChunkSize, keys);
        return keys;
    }

    private static List<KvEvent> Drain(CacheEngine engine, out long dropped)
    {
        var all = new List<KvEvent>();
        dropped = 0;
        var buffer = new KvEvent[3]; // small on purpose: several polls must continue where the last stopped
        while (true)
        {
            var (count, _, lost) = engine.PollEvents(buffer, 1 << 20);
            dropped += lost;
            if (count == 0) return all;
            all.AddRange(buffer.Take(count));
        }
    }

    private static List<KvEvent> Drain(CacheEngine engine) => Drain(engine, out _);

    private static void AssertStored(KvEvent e, KvEventMedium medium, ChunkKey[] keys, int[] tokens, int index)
    {
        int start = index * ChunkSize, count = Math.Min(ChunkSize, tokens.Length - start);
        Assert.That(e.Kind, Is.EqualTo(KvEventKind.BlockStored));
        Assert.That(e.Medium, Is.EqualTo(medium));
        Assert.That(e.BlockHash, Is.EqualTo(keys[index]), $"hash of chunk {index}");
        Assert.That(e.ParentHash, Is.EqualTo(index == 0 ? null : keys[index - 1]), $"parent of chunk {index}");
        Assert.That(e.TokenCount, Is.EqualTo(count));
        Assert.That(e.TokenIds, Is.EqualTo(tokens[start..(start + count)]));
    }

    // ---- the queue ----

    [Test]
    public void Queue_KeepsOrder_IsBounded_DropsTheNewest_AndCountsDropsPerDrain()
    {
        var queue = new KvEventQueue(3);
        var hashes = Enumerable.Range(1, 5).Select(i => new ChunkKey((ulong)i, 0, 0, 0)).ToArray();
        bool[] accepted = hashes.Select(h => queue.TryEnqueue(KvEvent.Removed(KvEventMedium.Cpu, h, 8))).ToArray();
        Assert.That(accepted, Is.EqualTo(new[] { true, true, true, false, false }));
        Assert.That(queue.DroppedTotal, Is.EqualTo(2));

        var into = new KvEvent[2];
        var (events, tokens, dropped) = queue.Drain(into, 0);
        Assert.That((events, tokens, dropped), Is.EqualTo((2, 0L, 2L)));
        Assert.That(into.Select(e => e.BlockHash), Is.EqualTo(hashes[..2]), "oldest first");
        // Room again: the next event goes in behind the one still queued (the ring wraps).
        Assert.That(queue.TryEnqueue(KvEvent.AllCleared(KvEventMedium.Cpu)), Is.True);
        (events, _, dropped) = queue.Drain(into, 0);
        Assert.That((events, dropped), Is.EqualTo((2, 0L)), "drops are reported once");
        Assert.That(into[0].BlockHash, Is.EqualTo(hashes[2]));
        Assert.That(into[1].Kind, Is.EqualTo(KvEventKind.AllBlocksCleared));
        Assert.That(queue.Drain(into, 0).Events, Is.EqualTo(0));
        Assert.That(queue.DroppedTotal, Is.EqualTo(2));
    }

    [Test]
    public void Queue_StopsBeforeAnEventWhoseTokensDoNotFit_AndKeepsIt()
    {
        var queue = new KvEventQueue(8);
        var lineage = new ChunkLineage(new ChunkKey(7, 0, 0, 0), null, [1, 2, 3, 4]);
        queue.TryEnqueue(KvEvent.Stored(KvEventMedium.Cpu, lineage));
        queue.TryEnqueue(KvEvent.Stored(KvEventMedium.Disk, lineage));
        var into = new KvEvent[4];
        Assert.That(queue.Drain(into, 6), Is.EqualTo((1, 4L, 0L)));
        Assert.That(queue.PeekTokenCount(), Is.EqualTo(4));
        Assert.That(queue.Drain(into, 3).Events, Is.EqualTo(0), "the next one needs 4 token slots");
        Assert.That(queue.Drain(into, 4), Is.EqualTo((1, 4L, 0L)));
        Assert.That(into[0].Medium, Is.EqualTo(KvEventMedium.Disk));
    }

    [Test]
    public void Disabled_ProducesNothing()
    {
        using var engine = Engine(cpuChunks: 2, events: false);
        for (int p = 0; p < 4; p++) engine.Store(Tokens(ChunkSize, p), _slots.AsSpan(0, ChunkSize), 0, default);
        engine.Clear();
        Assert.That(engine.KvEventsEnabled, Is.False);
        Assert.That(engine.PollEvents(new KvEvent[8], 1 << 20), Is.EqualTo((0, 0L, 0L)));
        Assert.That(EngineConfig.Parse(null).EnableKvEvents, Is.False, "off by default, as in LMCache");
    }

    // ---- the CPU tier ----

    [Test]
    public void AStore_YieldsBlockStoredCpu_PerNewChunk_WithHashParentAndTokens()
    {
        using var engine = Engine();
        int[] tokens = Tokens(28, 3); // 3 full chunks and a partial one of 4 tokens
        engine.Store(tokens, _slots.AsSpan(0, 28), 0, default);
        var keys = Keys(tokens);
        var events = Drain(engine);
        Assert.That(events, Has.Count.EqualTo(4));
        for (int i = 0; i < 4; i++) AssertStored(events[i], KvEventMedium.Cpu, keys, tokens, i);

        // Storing the same prefix again adds nothing, so it announces nothing.
        engine.Store(tokens, _slots.AsSpan(0, 28), 0, default);
        Assert.That(Drain(engine), Is.Empty);
    }

    [Test]
    public void Eviction_YieldsBlockRemovedCpu_ForExactlyTheEvictedChunks()
    {
        const int poolChunks = 4, prompts = 7;
        using var engine = Engine(cpuChunks: poolChunks);
        var promptKeys = new List<ChunkKey>();
        for (int p = 0; p < prompts; p++)
        {
            int[] tokens = Tokens(ChunkSize, 40 + p); // one chunk each
            engine.Store(tokens, _slots.AsSpan(0, ChunkSize), 0, default);
            promptKeys.Add(Keys(tokens)[0]);
        }
        // LRU over one-chunk prompts stored in order: the first (prompts - poolChunks) are evicted.
        var expectedRemoved = promptKeys.Take(prompts - poolChunks).ToList();
        var events = Drain(engine);
        Assert.That(events.Where(e => e.Kind == KvEventKind.BlockStored).Select(e => e.BlockHash), Is.EqualTo(promptKeys));
        var removed = events.Where(e => e.Kind == KvEventKind.BlockRemoved).ToList();
        Assert.That(removed.Select(e => e.BlockHash), Is.EqualTo(expectedRemoved));
        Assert.That(removed.All(e => e.Medium == KvEventMedium.Cpu && e.TokenCount == ChunkSize && e.TokenIds is null), Is.True);
        Assert.That(engine.GetStats().EvictedChunks, Is.EqualTo(prompts - poolChunks));
        // Each removal comes after its chunk's store and before the store that needed the room.
        for (int p = 0; p < prompts - poolChunks; p++)
        {
            int removedAt = events.FindIndex(e => e.Kind == KvEventKind.BlockRemoved && e.BlockHash == promptKeys[p]);
            int storedAt = events.FindIndex(e => e.Kind == KvEventKind.BlockStored && e.BlockHash == promptKeys[p + poolChunks]);
            Assert.That(removedAt, Is.LessThan(storedAt));
        }
    }

    [Test]
    public void Clear_YieldsOneAllBlocksCleared_AndNoRemovals()
    {
        using var engine = Engine();
        engine.Store(Tokens(24, 5), _slots.AsSpan(0, 24), 0, default);
        Drain(engine);
        engine.Clear();
        var events = Drain(engine);
        Assert.That(events, Has.Count.EqualTo(1));
        Assert.That(events[0].Kind, Is.EqualTo(KvEventKind.AllBlocksCleared));
        Assert.That(events[0].Medium, Is.EqualTo(KvEventMedium.Cpu));
    }

    [Test]
    public void Overflow_IsCountedAndReported_AndTheQueueKeepsTheOldest()
    {
        using var engine = Engine(extra: ", \"kv_events_queue_size\": 2");
        int[] tokens = Tokens(40, 6); // 5 chunks
        engine.Store(tokens, _slots.AsSpan(0, 40), 0, default);
        var events = Drain(engine, out long dropped);
        Assert.That(events.Select(e => e.BlockHash), Is.EqualTo(Keys(tokens)[..2]));
        Assert.That(dropped, Is.EqualTo(3));
        Assert.That(engine.KvEventsDropped, Is.EqualTo(3));
        Drain(engine, out dropped);
        Assert.That(dropped, Is.EqualTo(0));
    }

    [Test]
    public void WithTensorParallelRanks_EveryRankNamesAChunkAlike()
    {
        int[] tokens = Tokens(20, 9);
        var rankEvents = new List<List<KvEvent>>();
        for (int rank = 0; rank < 2; rank++)
        {
            using var engine = Engine(worldSize: 2, workerId: rank);
            engine.Store(tokens, _slots.AsSpan(0, 20), 0, default);
            rankEvents.Add(Drain(engine));
        }
        var keys = Keys(tokens); // a single-rank engine's keys
        for (int rank = 0; rank < 2; rank++)
        {
            Assert.That(rankEvents[rank], Has.Count.EqualTo(3));
            for (int i = 0; i < 3; i++) AssertStored(rankEvents[rank][i], KvEventMedium.Cpu, keys, tokens, i);
        }
        Assert.That(keys, Is.Not.EqualTo(Keys(tokens, 2, 0)), "the ranks' own storage keys differ from the event hashes");
    }

    [Test]
    public void WithTensorParallelRanks_DiskWritesPromotionsAndEvictions_UseTheSharedHashes()
    {
        // 12 chunks: the write-behind queue (a quarter of the pool) takes the store's 3 at once.
        using var engine = Engine(extra: DiskConfig(100), cpuChunks: 12, worldSize: 2, workerId: 1);
        int[] tokens = Tokens(24, 19);
        var keys = Keys(tokens);
        engine.Store(tokens, _slots.AsSpan(0, 24), 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        var events = Drain(engine);
        Assert.That(events.Where(e => e.Medium == KvEventMedium.Disk).Select(e => e.BlockHash), Is.EqualTo(keys));
        engine.Clear();
        _source.RetrieveAndCheck(engine, TestLayout.FlashNhd, tokens, _slots, 24);
        events = Drain(engine);
        for (int i = 0; i < 3; i++) AssertStored(events[1 + i], KvEventMedium.Cpu, keys, tokens, i);
        // 10 new chunks into a pool of 12 holding the 3 promoted ones evict the least recently used of
        // them: the prefix's last (a retrieve releases its chunks last to first).
        engine.Store(Tokens(80, 20), _slots.AsSpan(0, 80), 0, default);
        var removed = Drain(engine).Where(e => e.Kind == KvEventKind.BlockRemoved && e.Medium == KvEventMedium.Cpu).ToList();
        Assert.That(removed.Select(e => e.BlockHash), Is.EqualTo(new[] { keys[2] }));
    }

    // ---- the disk tier ----

    [Test]
    public void WriteBehind_YieldsBlockStoredDisk_OnceTheRecordIsWritten_AndPromotionYieldsBlockStoredCpu()
    {
        using var engine = Engine(extra: DiskConfig(100));
        int[] tokens = Tokens(20, 11);
        var keys = Keys(tokens);
        engine.Store(tokens, _slots.AsSpan(0, 20), 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        var events = Drain(engine);
        var disk = events.Where(e => e.Medium == KvEventMedium.Disk).ToList();
        Assert.That(disk, Has.Count.EqualTo(3));
        for (int i = 0; i < 3; i++) AssertStored(disk[i], KvEventMedium.Disk, keys, tokens, i);
        Assert.That(events.Count(e => e.Medium == KvEventMedium.Cpu), Is.EqualTo(3));

        engine.Clear();
        _source.RetrieveAndCheck(engine, TestLayout.FlashNhd, tokens, _slots, 20);
        events = Drain(engine);
        Assert.That(events[0].Kind, Is.EqualTo(KvEventKind.AllBlocksCleared));
        Assert.That(events, Has.Count.EqualTo(4));
        for (int i = 0; i < 3; i++) AssertStored(events[1 + i], KvEventMedium.Cpu, keys, tokens, i);
    }

    [Test]
    public void DiskEviction_YieldsBlockRemovedDisk_ForExactlyTheEvictedRecords()
    {
        const int diskRecords = 3, prompts = 5;
        using var engine = Engine(extra: DiskConfig(diskRecords));
        var promptKeys = new List<ChunkKey>();
        for (int p = 0; p < prompts; p++)
        {
            int[] tokens = Tokens(ChunkSize, 60 + p);
            engine.Store(tokens, _slots.AsSpan(0, ChunkSize), 0, default);
            promptKeys.Add(Keys(tokens)[0]);
            Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        }
        var disk = Drain(engine).Where(e => e.Medium == KvEventMedium.Disk).ToList();
        Assert.That(disk.Where(e => e.Kind == KvEventKind.BlockStored).Select(e => e.BlockHash), Is.EqualTo(promptKeys));
        // Records are evicted least recently written first, as many as exceed the capacity.
        Assert.That(disk.Where(e => e.Kind == KvEventKind.BlockRemoved).Select(e => e.BlockHash), Is.EqualTo(promptKeys.Take(prompts - diskRecords)));
        Assert.That(engine.GetTierStats()[0].Counters.Evictions, Is.EqualTo(prompts - diskRecords));
    }

    [Test]
    public void ACorruptRecordFound_YieldsBlockRemovedDisk_ForThatChunk()
    {
        using var engine = Engine(extra: DiskConfig(100));
        int[] tokens = Tokens(32, 13);
        var keys = Keys(tokens);
        engine.Store(tokens, _slots.AsSpan(0, 32), 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        engine.Clear();
        Drain(engine);

        string victim = Directory.GetFiles(_directory, "*" + LocalDiskTier.RecordExtension).Single(f => f.Contains(keys[2].ToHex()));
        byte[] bytes = File.ReadAllBytes(victim);
        bytes[ChunkRecord.HeaderSize + 5] ^= 0x01;
        File.WriteAllBytes(victim, bytes);

        _source.RetrieveAndCheck(engine, TestLayout.FlashNhd, tokens, _slots, 16);
        var events = Drain(engine);
        var removed = events.Where(e => e.Kind == KvEventKind.BlockRemoved).ToList();
        Assert.That(removed, Has.Count.EqualTo(1));
        Assert.That((removed[0].Medium, removed[0].BlockHash, removed[0].TokenCount), Is.EqualTo((KvEventMedium.Disk, keys[2], ChunkSize)));
        Assert.That(events.Where(e => e.Kind == KvEventKind.BlockStored).Select(e => (e.Medium, e.BlockHash)),
            Is.EqualTo(new[] { (KvEventMedium.Cpu, keys[0]), (KvEventMedium.Cpu, keys[1]) }), "the two chunks before it are promoted");
    }
}
