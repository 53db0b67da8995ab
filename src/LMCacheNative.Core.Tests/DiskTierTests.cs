using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Storage;
using NUnit.Framework;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Core.Tests;

/// <summary>
/// The local disk tier through the engine: write-behind, promotion, prefixes split across tiers,
/// warm restart, corruption and torn writes, LRU at capacity, a full disk, a shared directory.
/// Every hit is checked bit-exact against the source cache.
/// </summary>
public class DiskTierTests
{
    private string _directory = null!;
    private TestModelCache _source = null!;
    private long[] _slots = null!;

    // 2 layers x 2 (K, V) x 2 heads x 8 x 2 bytes = 128 bytes per token; chunk of 8 = 1 KiB payload.
    private const int ChunkSize = 8;
    private const long PayloadBytes = 8 * 128;
    private const long RecordBytes = ChunkRecord.HeaderSize + PayloadBytes;

    [SetUp]
    public void SetUp()
    {
        _directory = Path.Combine(Path.GetTempPath(), "lmcn-disk-" + Guid.NewGuid().ToString("N"));
        _source = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        _source.FillRandom(17);
        _slots = RandomSlots(new Random(4), _source.NumSlots, 128);
    }

    [TearDown]
    public void TearDown()
    {
        _source.Dispose();
        if (Directory.Exists(_directory)) Directory.Delete(_directory, recursive: true);
    }

    private CacheEngine DiskEngine(double diskGb = 1.0, double cpuGb = 0.01, string extra = "")
    {
        var engine = new CacheEngine(EngineConfig.Parse(
            $"{{\"chunk_size\": {ChunkSize}, \"save_unfull_chunk\": true, \"max_local_cpu_size\": {cpuGb:R}, " +
            $"\"local_disk\": \"{_directory}\", \"max_local_disk_size\": {diskGb:R}{extra}}}"), "disk-model", 1, 0);
        engine.RegisterLayers(_source.Describe());
        return engine;
    }

    private static StorageTierStats Disk(CacheEngine engine) => engine.GetTierStats().Single(t => t.Name == "LocalDiskBackend").Counters;

    private long RetrieveAndCheck(CacheEngine engine, int[] tokens, long expectedTokens) =>
        _source.RetrieveAndCheck(engine, TestLayout.FlashNhd, tokens, _slots, expectedTokens);

    private string[] RecordFiles() => Directory.GetFiles(_directory, "*" + LocalDiskTier.RecordExtension).Order().ToArray();

    [Test]
    public void StoredChunks_AreWrittenBehind_AndPromotedBackAfterTheCpuTierDropsThem()
    {
        using var engine = DiskEngine();
        int[] tokens = Tokens(36, 1); // 4 full chunks and a partial one
        engine.Store(tokens, _slots.AsSpan(0, 36), 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(RecordFiles(), Has.Length.EqualTo(5));
        Assert.That(Disk(engine).Writes, Is.EqualTo(5));

        engine.Clear();
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(0));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(36), "found on disk");

        RetrieveAndCheck(engine, tokens, 36);
        Assert.That(Disk(engine).Hits, Is.EqualTo(5));
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(5), "promoted into the CPU tier");
        RetrieveAndCheck(engine, tokens, 36);
        Assert.That(Disk(engine).Hits, Is.EqualTo(5), "the second retrieve is served from memory");
    }

    [Test]
    public void APrefixSplitAcrossTiers_IsFoundAndRetrievedWhole()
    {
        using var engine = DiskEngine();
        int[] tokens = Tokens(32, 2);
        engine.Store(tokens, _slots.AsSpan(0, 32), 0, default);
        engine.Flush(TimeSpan.FromSeconds(10));
        engine.Clear();
        // Bring the first two chunks back into memory only: CPU holds [0, 16), disk holds all.
        Assert.That(engine.Prefetch(tokens.AsSpan(0, 16), default).TokensMatched, Is.EqualTo(16));
        Assert.That(engine.GetStats().CachedChunks, Is.EqualTo(2));

        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(32));
        RetrieveAndCheck(engine, tokens, 32);
        Assert.That(Disk(engine).Hits, Is.EqualTo(4), "2 by the prefetch, 2 by the retrieve");
    }

    [Test]
    public void ANewEngineOnTheSameDirectory_FindsWhatTheLastOneStored()
    {
        int[] tokens = Tokens(24, 3);
        using (var first = DiskEngine())
        {
            first.Store(tokens, _slots.AsSpan(0, 24), 0, default);
        } // dispose finishes the queued writes

        using var second = DiskEngine();
        Assert.That(second.Lookup(tokens, default).HitTokens, Is.EqualTo(24));
        RetrieveAndCheck(second, tokens, 24);
    }

    [Test]
    public void DamagedRecords_AreMisses_RemovedAndCounted_NeverLoaded([Values("flip-payload", "flip-header", "truncate", "empty")] string damage)
    {
        int[] tokens = Tokens(32, 4);
        using (var writer = DiskEngine())
            writer.Store(tokens, _slots.AsSpan(0, 32), 0, default);
        var files = RecordFiles();
        Assert.That(files, Has.Length.EqualTo(4));

        // Damage the record of the third chunk.
        var keys = new ChunkKey[4];
        new ChunkHasher(ChunkHashAlgorithm.Sha256, new KeyNamespace("disk-model", 2, 2, 8, 2, 2, 1, 0)).ComputeKeys(tokens, default, ChunkSize, keys);
        string victim = files.Single(f => f.Contains(keys[2].ToHex()));
        byte[] bytes = File.ReadAllBytes(victim);
        switch (damage)
        {
            case "flip-payload": bytes[ChunkRecord.HeaderSize + 100] ^= 0x01; break;
            case "flip-header": bytes[84] ^= 0x80; break;
            case "truncate": bytes = bytes[..^1]; break;
            case "empty": bytes = []; break;
        }
        File.WriteAllBytes(victim, bytes);

        using var reader = DiskEngine();
        // A damaged header is caught by the scan at start; a damaged payload by its checksum at read.
        long expected = 16;
        RetrieveAndCheck(reader, tokens, expected);
        Assert.That(File.Exists(victim), Is.False, "the damaged record is deleted");
        Assert.That(Disk(reader).CorruptRecords, Is.EqualTo(1));
        Assert.That(reader.Lookup(tokens, default).HitTokens, Is.EqualTo(16));
    }

    [Test]
    public void AWriteTornByAKilledProcess_IsNeverLoaded_AndIsCleanedUp()
    {
        int[] tokens = Tokens(16, 5);
        using (var writer = DiskEngine())
            writer.Store(tokens, _slots.AsSpan(0, 16), 0, default);
        // What a process killed between create and rename leaves behind: a temporary file, here a
        // complete-looking copy of a record under the temporary name, and half of another.
        string record = RecordFiles()[0];
        File.Copy(record, Path.Combine(_directory, "." + Path.GetFileName(record) + ".tmp-" + Guid.NewGuid().ToString("N")));
        File.WriteAllBytes(Path.Combine(_directory, "." + Path.GetFileName(RecordFiles()[1]) + ".tmp-" + Guid.NewGuid().ToString("N")), new byte[100]);

        using var reader = DiskEngine();
        Assert.That(Directory.GetFiles(_directory, "*.tmp-*"), Is.Empty);
        Assert.That(RecordFiles(), Has.Length.EqualTo(2));
        RetrieveAndCheck(reader, tokens, 16);
    }

    [Test]
    public void AtCapacity_TheLeastRecentlyUsedRecordsAreEvicted()
    {
        double threeRecordsGb = 3.0 * RecordBytes / (1L << 30);
        using var engine = DiskEngine(diskGb: threeRecordsGb);
        var requests = Enumerable.Range(10, 5).Select(seed => Tokens(8, seed)).ToArray();
        foreach (var tokens in requests)
        {
            engine.Store(tokens, _slots.AsSpan(0, 8), 0, default);
            engine.Flush(TimeSpan.FromSeconds(10));
        }
        engine.Clear();

        Assert.That(RecordFiles(), Has.Length.EqualTo(3));
        Assert.That(Disk(engine).Evictions, Is.EqualTo(2));
        Assert.That(Disk(engine).UsedBytes, Is.EqualTo(3 * RecordBytes));
        Assert.That(requests.Select(t => engine.Lookup(t, default).HitTokens), Is.EqualTo(new long[] { 0, 0, 8, 8, 8 }));
    }

    [Test]
    public void ADiskTooSmallForARecord_SkipsWrites_AndKeepsServingFromMemory()
    {
        using var engine = DiskEngine(diskGb: 100.0 / (1L << 30));
        int[] tokens = Tokens(16, 6);
        Assert.That(engine.Store(tokens, _slots.AsSpan(0, 16), 0, default).TokensMatched, Is.EqualTo(16));
        engine.Flush(TimeSpan.FromSeconds(10));
        Assert.That(RecordFiles(), Is.Empty);
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(16));
        RetrieveAndCheck(engine, tokens, 16);
    }

    /// <summary>A real full file system: a 64 KiB tmpfs, where root may mount one (CI runs as root).</summary>
    [Test]
    public void AFullFileSystem_SkipsAndCountsWrites_AndCrashesNothing()
    {
        Directory.CreateDirectory(_directory);
        var mount = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo("mount", $"-t tmpfs -o size=64k tmpfs {_directory}")
            { RedirectStandardError = true, RedirectStandardOutput = true })!;
        mount.WaitForExit();
        if (mount.ExitCode != 0) Assert.Ignore("cannot mount a tmpfs here (needs root): " + mount.StandardError.ReadToEnd().Trim());
        try
        {
            using var engine = DiskEngine(diskGb: 1.0, cpuGb: 1.0);
            int[] tokens = Tokens(8 * 100, 7); // 100 records of 1.1 KiB: more than 64 KiB
            long[] slots = Enumerable.Range(0, 800).Select(i => (long)(i % 128)).ToArray();
            Assert.That(engine.Store(tokens, slots, 0, default).TokensMatched, Is.EqualTo(800));
            engine.Flush(TimeSpan.FromSeconds(30));
            var disk = Disk(engine);
            Assert.That(disk.Errors, Is.GreaterThan(0), "writes failed with ENOSPC");
            Assert.That(disk.Writes, Is.GreaterThan(0).And.LessThan(100));
            Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(800), "the CPU tier still has everything");
        }
        finally
        {
            System.Diagnostics.Process.Start("umount", _directory)!.WaitForExit();
        }
    }

    [Test]
    public void ASecondEngineOnTheSameDirectory_ReadsButNeverWrites()
    {
        int[] stored = Tokens(16, 8);
        using var owner = DiskEngine();
        owner.Store(stored, _slots.AsSpan(0, 16), 0, default);
        owner.Flush(TimeSpan.FromSeconds(10));

        using var reader = DiskEngine();
        RetrieveAndCheck(reader, stored, 16);
        int[] other = Tokens(16, 9);
        reader.Store(other, _slots.AsSpan(0, 16), 0, default);
        reader.Flush(TimeSpan.FromSeconds(10));
        Assert.That(RecordFiles(), Has.Length.EqualTo(2), "only the owner's two records");
        Assert.That(Disk(reader).Writes, Is.EqualTo(0));
    }

    [Test]
    public void RecordsOfAnotherModel_AreIgnored()
    {
        int[] tokens = Tokens(16, 10);
        using (var writer = DiskEngine())
            writer.Store(tokens, _slots.AsSpan(0, 16), 0, default);
        using var other = new CacheEngine(EngineConfig.Parse(
            $"{{\"chunk_size\": 8, \"local_disk\": \"{_directory}\", \"max_local_disk_size\": 1}}"), "another-model", 1, 0);
        other.RegisterLayers(_source.Describe());
        Assert.That(other.Lookup(tokens, default).HitTokens, Is.EqualTo(0));
        Assert.That(RecordFiles(), Has.Length.EqualTo(2), "not deleted either");
    }

    // ---- files the tier does not own, and objects that are not files ----

    private static void MakeFifo(string path)
    {
        var mkfifo = System.Diagnostics.Process.Start("mkfifo", path)!;
        mkfifo.WaitForExit();
        Assert.That(mkfifo.ExitCode, Is.EqualTo(0), "mkfifo " + path);
    }

    /// <summary>Runs <paramref name="action"/> on another thread and fails (instead of hanging) if it takes more than 10 s.</summary>
    private static T WithinSeconds<T>(Func<T> action, string what)
    {
        var task = Task.Factory.StartNew(action, TaskCreationOptions.LongRunning);
        Assert.That(task.Wait(TimeSpan.FromSeconds(10)), Is.True, what + " hung");
        return task.Result;
    }

    [Test]
    public void AFifoInTheDirectory_NeitherHangsStartUp_NorIsDeleted()
    {
        int[] tokens = Tokens(16, 11);
        using (var writer = DiskEngine())
            writer.Store(tokens, _slots.AsSpan(0, 16), 0, default);
        // One FIFO under a record's exact name pattern, one under a temporary name, one under any name.
        string records0 = RecordFiles()[0];
        string fifoRecord = Path.Combine(_directory, Path.GetFileName(records0)[..17] + new string('a', 64) + LocalDiskTier.RecordExtension);
        string fifoTemporary = Path.Combine(_directory, "." + Path.GetFileName(records0) + ".tmp-" + new string('b', 32));
        string fifoOther = Path.Combine(_directory, "pipe");
        foreach (var fifo in new[] { fifoRecord, fifoTemporary, fifoOther }) MakeFifo(fifo);

        using var engine = WithinSeconds(() => DiskEngine(), "registering layers over a directory holding FIFOs");
        Assert.That(Disk(engine).CorruptRecords, Is.EqualTo(1), "the FIFO under a record name is skipped and counted");
        Assert.That(File.Exists(fifoRecord) && File.Exists(fifoTemporary) && File.Exists(fifoOther), Is.True, "FIFOs are not the tier's to delete");
        engine.Clear();
        RetrieveAndCheck(engine, tokens, 16);
    }

    [Test]
    public void AFifoOrLinkPutInPlaceOfAnIndexedRecord_IsAMiss_NotAHang()
    {
        int[] tokens = Tokens(24, 12);
        using (var writer = DiskEngine())
            writer.Store(tokens, _slots.AsSpan(0, 24), 0, default);
        using var engine = DiskEngine(); // indexes the three records
        engine.Clear();
        var records = RecordFiles();
        Assert.That(records, Has.Length.EqualTo(3));
        // The record of the second chunk becomes a FIFO; the third a link to a copy of itself.
        File.Delete(records[1]);
        MakeFifo(records[1]);
        string target = Path.Combine(_directory, "target-of-link");
        File.Move(records[2], target);
        File.CreateSymbolicLink(records[2], target);

        // The engine still indexes all three (no rescan): reading them must not block on the FIFO.
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(24));
        long inMemory = WithinSeconds(() => engine.Prefetch(tokens, default).TokensMatched, "reading a record that became a FIFO");
        Assert.That(inMemory, Is.EqualTo(8), "only the first chunk is a regular file");
        Assert.That(Disk(engine).CorruptRecords, Is.InRange(1, 2), "the FIFO is counted (and the link, if the parallel read reached it)");
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(8), "the FIFO's chunk left the index");
        Assert.That(File.Exists(target) && File.Exists(records[1]), Is.True, "neither the FIFO nor the link's target is deleted");
        WithinSeconds(() => { engine.Dispose(); return true; }, "destroying the engine");
        using var restarted = DiskEngine();
        RetrieveAndCheck(restarted, tokens, 8);
    }

    [Test]
    public void FilesThatOnlyLookLikeTemporaries_AreNotDeleted()
    {
        Directory.CreateDirectory(_directory);
        string[] usersFiles = ["notes.tmp-1", "report.tmp-final.docx", ".x.lmcc.tmp-0123", "." + new string('a', 16) + "-" + new string('b', 64) + ".lmcc.tmp-short"];
        foreach (var name in usersFiles) File.WriteAllText(Path.Combine(_directory, name), "the user's");
        using (var engine = DiskEngine())
            engine.Store(Tokens(16, 13), _slots.AsSpan(0, 16), 0, default);
        using var again = DiskEngine();
        foreach (var name in usersFiles)
            Assert.That(File.ReadAllText(Path.Combine(_directory, name)), Is.EqualTo("the user's"), name);
    }

    [Test]
    public void TheCapacity_BoundsTheWholeDirectory_AcrossModels()
    {
        // Three models, one after another, each storing five records into a directory of four.
        double fourRecordsGb = 4.0 * RecordBytes / (1L << 30);
        string json = $"{{\"chunk_size\": {ChunkSize}, \"max_local_cpu_size\": 0.01, \"local_disk\": \"{_directory}\", \"max_local_disk_size\": {fourRecordsGb:R}}}";
        var lastTokens = new List<int[]>();
        foreach (var model in new[] { "model-a", "model-b", "model-c" })
        {
            using var engine = new CacheEngine(EngineConfig.Parse(json), model, 1, 0);
            engine.RegisterLayers(_source.Describe());
            for (int request = 0; request < 5; request++)
            {
                int[] tokens = Tokens(8, 100 + request);
                engine.Store(tokens, _slots.AsSpan(0, 8), 0, default);
                engine.Flush(TimeSpan.FromSeconds(10));
                if (request == 4) lastTokens.Add(tokens);
            }
            long onDisk = RecordFiles().Sum(f => new FileInfo(f).Length);
            Assert.That(onDisk, Is.LessThanOrEqualTo(4 * RecordBytes), $"after {model}: the directory holds {onDisk} bytes");
            Assert.That(Disk(engine).UsedBytes, Is.EqualTo(onDisk), "the owner accounts for every model's records");
        }
        Assert.That(RecordFiles(), Has.Length.EqualTo(4));
        // The newest records survive, whatever their model: model-c's last chunk is there.
        using var reader = new CacheEngine(EngineConfig.Parse(json), "model-c", 1, 0);
        reader.RegisterLayers(_source.Describe());
        reader.Clear();
        Assert.That(reader.Lookup(lastTokens[2], default).HitTokens, Is.EqualTo(8));
    }

    [Test]
    public void ANewDirectory_IsPrivateToItsUser()
    {
        using var engine = DiskEngine();
        Assert.That(File.GetUnixFileMode(_directory), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute));
    }
}
