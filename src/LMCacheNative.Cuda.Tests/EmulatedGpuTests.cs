using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Tests;
using NUnit.Framework;

namespace LMCacheNative.Cuda.Tests;

/// <summary>
/// The whole C# CUDA path on the fake driver, with the kernels' own block body doing the copies on
/// the host (<see cref="FakeCuda"/>): an engine with "CUDA" layers must store and retrieve exactly the
/// bytes an engine with the same layers as host memory does (C# HostKvTransfer), in every layout and
/// element size, across layouts, with -1 slots and first_token_to_write; and the driver must be used
/// as designed: one launch per request, the layer table uploaded once, the caller's stream for every
/// enqueued operation, completion through events, primary context pushed and popped, pinned pool,
/// errors mapped to LMC_E_CUDA with the driver's error name.
/// </summary>
[NonParallelizable]
public class EmulatedGpuTests
{
    private const string Config = "{\"chunk_size\": 8, \"max_local_cpu_size\": 0.05, \"save_unfull_chunk\": true}";
    private readonly List<TestModelCache> _caches = new();

    [SetUp]
    public void SetUp()
    {
        FakeCuda.Reset();
        FakeCuda.RequireEmulator();
    }

    [TearDown]
    public void TearDown()
    {
        FakeCuda.EventGate?.Set();
        foreach (var cache in _caches)
        {
            foreach (var layer in cache.Layers) unsafe { FakeCuda.Forget((nint)layer.Base); }
            cache.Dispose();
        }
        _caches.Clear();
    }

    /// <summary>A model cache whose memory the fake driver treats as memory of device 0.</summary>
    private TestModelCache DeviceCache(TestLayout layout, int numBlocks, int headSize, int elemSize, bool mla = false, int seed = 1)
    {
        var cache = new TestModelCache(layout, 3, numBlocks, 4, 2, headSize, elemSize, mla);
        cache.FillRandom(seed);
        foreach (var layer in cache.Layers) unsafe { FakeCuda.AdoptAsDevice((nint)layer.Base, layer.Bytes); }
        _caches.Add(cache);
        return cache;
    }

    private TestModelCache HostCache(TestLayout layout, int numBlocks, int headSize, int elemSize, bool mla = false, int seed = 1)
    {
        var cache = new TestModelCache(layout, 3, numBlocks, 4, 2, headSize, elemSize, mla);
        cache.FillRandom(seed);
        _caches.Add(cache);
        return cache;
    }

    private static KvLayerLayout[] Cuda(TestModelCache cache) => cache.Describe().Select(l => l with { Device = DeviceKind.Cuda }).ToArray();

    private static long[] RandomSlots(Random random, long numSlots, int count, double minusOne)
    {
        var all = Enumerable.Range(0, (int)numSlots).Select(i => (long)i).OrderBy(_ => random.Next()).Take(count).ToArray();
        for (int i = 0; i < all.Length; i++)
            if (random.NextDouble() < minusOne) all[i] = -1;
        return all;
    }

    public static IEnumerable<TestCaseData> Layouts()
    {
        foreach (TestLayout layout in Enum.GetValues<TestLayout>())
            foreach (int elemSize in new[] { 1, 2, 4 })
                foreach (int headSize in new[] { 16, 6 })
                    yield return new TestCaseData(layout, elemSize, headSize, false).SetName($"{layout} e{elemSize} d{headSize}");
        foreach (int elemSize in new[] { 1, 2, 4 })
            yield return new TestCaseData(TestLayout.FlashNhd, elemSize, 72, true).SetName($"MLA e{elemSize} d72");
    }

    /// <summary>
    /// Store from layout A, retrieve into another layout B (random slots with -1, first_token_to_write),
    /// through a host engine and a CUDA engine over byte-identical memory: results must be identical.
    /// </summary>
    [TestCaseSource(nameof(Layouts))]
    public void CudaEngine_MovesTheSameBytesAsTheHostEngine(TestLayout layout, int elemSize, int headSize, bool mla)
    {
        var random = new Random(layout.GetHashCode() * 31 + elemSize * 7 + headSize);
        var srcHost = HostCache(layout, 10, headSize, elemSize, mla, seed: 5);
        var srcDevice = DeviceCache(layout, 10, headSize, elemSize, mla, seed: 5);
        var otherLayout = (TestLayout)(((int)layout + 3) % Enum.GetValues<TestLayout>().Length);
        var dstHost = HostCache(otherLayout, 9, headSize, elemSize, mla, seed: 9);
        var dstDevice = DeviceCache(otherLayout, 9, headSize, elemSize, mla, seed: 9);

        using var host = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0);
        using var cuda = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        host.RegisterLayers(srcHost.Describe());
        cuda.RegisterLayers(Cuda(srcDevice));

        int n = 31; // 3 full chunks and a partial one
        int[] tokens = Enumerable.Range(0, n).Select(_ => random.Next(50000)).ToArray();
        long[] slots = RandomSlots(random, srcHost.NumSlots, n, 0);
        slots[29] = -1; // the partial chunk is not stored
        int launches = FakeCuda.LaunchCalls;
        var hostStore = host.Store(tokens, slots, 0, "k"u8);
        var cudaStore = cuda.Store(tokens, slots, 0, "k"u8);
        Assert.That(cudaStore with { ElapsedNanoseconds = 0 }, Is.EqualTo(hostStore with { ElapsedNanoseconds = 0 }));
        Assert.That(hostStore.TokensMatched, Is.EqualTo(24));
        Assert.That(FakeCuda.LaunchCalls - launches, Is.EqualTo(1), "one launch moves the whole request");

        host.RegisterLayers(dstHost.Describe());
        cuda.RegisterLayers(Cuda(dstDevice));
        long[] slots2 = RandomSlots(random, dstHost.NumSlots, n, 0.15);
        foreach (long first in new long[] { 0, 5, 8, 20 })
        {
            var hostRetrieve = host.Retrieve(tokens, slots2, first, "k"u8);
            var cudaRetrieve = cuda.Retrieve(tokens, slots2, first, "k"u8);
            Assert.That(cudaRetrieve with { ElapsedNanoseconds = 0 }, Is.EqualTo(hostRetrieve with { ElapsedNanoseconds = 0 }), $"first {first}");
            Assert.That(hostRetrieve.TokensMatched, Is.EqualTo(24));
            var expected = dstHost.Snapshot();
            var actual = dstDevice.Snapshot();
            for (int l = 0; l < expected.Length; l++) Assert.That(actual[l], Is.EqualTo(expected[l]), $"layer {l}, first {first}");
            dstHost.FillRandom(first.GetHashCode() + 11);
            dstDevice.FillRandom(first.GetHashCode() + 11);
        }
        Assert.That(cuda.GetStats() with { PoolCapacityBytes = 0 }, Is.EqualTo(host.GetStats() with { PoolCapacityBytes = 0 }));
        Assert.That(FakeCuda.ContextDepthOfThisThread, Is.Zero, "every pushed context was popped");
    }

    [Test]
    public void StagedGathers_MatchZeroCopyGathers()
    {
        var src = DeviceCache(TestLayout.FlashHnd, 10, 16, 2, seed: 3);
        var dstA = DeviceCache(TestLayout.FlashNhd, 10, 16, 2, seed: 4);
        var dstB = DeviceCache(TestLayout.FlashNhd, 10, 16, 2, seed: 4);
        int[] tokens = Enumerable.Range(1, 24).ToArray();
        long[] slots = Enumerable.Range(7, 24).Select(i => (long)i).ToArray();
        foreach (var (options, dst) in new[] { (new CudaTransferOptions(0, 1 << 30), dstA), (new CudaTransferOptions(long.MaxValue, 0), dstB) })
        {
            var backend = FakeCuda.Backend(options);
            using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: backend);
            engine.RegisterLayers(Cuda(src));
            int dtoh = FakeCuda.DtoHAsyncCalls;
            Assert.That(engine.Store(tokens, slots, 0, default).TokensMatched, Is.EqualTo(24));
            Assert.That(FakeCuda.DtoHAsyncCalls - dtoh, Is.EqualTo(options.StagingMinBytes == 0 ? 3 : 0), "one cuMemcpyDtoHAsync per staged chunk");
            engine.RegisterLayers(Cuda(dst));
            Assert.That(engine.Retrieve(tokens, slots, 0, default).TokensMatched, Is.EqualTo(24));
        }
        var a = dstA.Snapshot();
        var b = dstB.Snapshot();
        for (int l = 0; l < a.Length; l++) Assert.That(a[l], Is.EqualTo(b[l]));
    }

    [Test]
    public void LayerTable_IsUploadedOnceAtRegistration_AndEachRequestIsOneUploadOneLaunchOneEvent()
    {
        var src = DeviceCache(TestLayout.BlocksFirstNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        engine.RegisterLayers(Cuda(src));
        Assert.That(FakeCuda.HtoDSyncCalls, Is.EqualTo(1), "the layer table");
        Assert.That(FakeCuda.PrimaryRetains, Is.EqualTo(1));
        Assert.That(FakeCuda.ModuleLoads, Is.EqualTo(1));
        int[] tokens = Enumerable.Range(1, 32).ToArray();
        long[] slots = Enumerable.Range(0, 32).Select(i => (long)i).ToArray();
        for (int i = 0; i < 3; i++)
        {
            engine.Store(tokens, slots, 0, BitConverter.GetBytes(i));
            engine.Retrieve(tokens, slots, 0, BitConverter.GetBytes(i));
        }
        Assert.That(FakeCuda.HtoDSyncCalls, Is.EqualTo(1), "no per-call table upload");
        Assert.That(FakeCuda.HtoDAsyncCalls, Is.EqualTo(6));
        Assert.That(FakeCuda.LaunchCalls, Is.EqualTo(6));
        Assert.That(FakeCuda.EventRecords, Is.EqualTo(6));
        Assert.That(FakeCuda.LaunchLog.First(), Does.StartWith("lmc_kv_gather_v16 grid 32x3x2 block 32"));
        // A second registration on the same device reuses the context and the module.
        engine.RegisterLayers(Cuda(src));
        Assert.That(FakeCuda.PrimaryRetains, Is.EqualTo(1));
        Assert.That(FakeCuda.ModuleLoads, Is.EqualTo(1));
        Assert.That(FakeCuda.HtoDSyncCalls, Is.EqualTo(2));
    }

    [Test]
    public void AsyncStore_RunsOnTheCallersStream_AndPublishesWhenTheEventHasPassed()
    {
        var src = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        engine.RegisterLayers(Cuda(src));
        int[] tokens = Enumerable.Range(1, 16).ToArray();
        long[] slots = Enumerable.Range(0, 16).Select(i => (long)i).ToArray();
        FakeCuda.EventGate = new ManualResetEventSlim(false);
        const nint stream = 0x5EA;
        var store = engine.StoreAsync(new OwnedKvRequest(tokens, [], slots, 0, stream));
        Thread.Sleep(50);
        Assert.That(store.IsCompleted, Is.False, "the device has not passed the event");
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.Zero, "chunks are published only when the copy is done");
        FakeCuda.EventGate.Set();
        Assert.That(store.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(store.Result.TokensMatched, Is.EqualTo(16));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(16));
        Assert.That(FakeCuda.StreamLog.Select(e => e.Stream).Distinct(), Is.EqualTo(new[] { stream }), "everything enqueued on the caller's stream");
        Assert.That(FakeCuda.StreamLog.Select(e => e.Call), Is.EqualTo(new[] { "cuMemcpyHtoDAsync", "cuLaunchKernel", "cuEventRecord" }));

        var retrieve = engine.RetrieveAsync(new OwnedKvRequest(tokens, [], slots, 0, stream));
        Assert.That(retrieve.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(retrieve.Result.TokensMatched, Is.EqualTo(16));
        Assert.That(retrieve.Result.ChunksByTier[0], Is.EqualTo(2), "both chunks of 8 tokens from the CPU tier");
    }

    [Test]
    public void RequestsWithoutAStream_RunOnTheLibrarysOwnStream()
    {
        var src = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        engine.RegisterLayers(Cuda(src));
        int[] tokens = Enumerable.Range(1, 16).ToArray();
        long[] slots = Enumerable.Range(0, 16).Select(i => (long)i).ToArray();
        Assert.That(engine.Store(new KvRequest(tokens, [], slots)).TokensMatched, Is.EqualTo(16));
        Assert.That(engine.RetrieveAsync(new OwnedKvRequest(tokens, [], slots, 0, 0)).Wait(TimeSpan.FromSeconds(10)), Is.True);
        var launches = FakeCuda.StreamLog.Where(e => e.Call == "cuLaunchKernel").Select(e => e.Stream).ToList();
        Assert.That(launches, Has.Count.EqualTo(2));
        Assert.That(launches, Is.All.Not.EqualTo((nint)0), "never the legacy default stream");
        Assert.That(FakeCuda.CreatedStreams, Does.Contain(launches[0]));
        Assert.That(launches.Distinct().Count(), Is.EqualTo(1), "one own stream per device");
    }

    [Test]
    public void SeveralTransfersInFlight_OnDifferentStreams_AllComplete()
    {
        var src = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        engine.RegisterLayers(Cuda(src));
        int[] tokens = Enumerable.Range(1, 16).ToArray();
        long[] slots = Enumerable.Range(0, 16).Select(i => (long)i).ToArray();
        FakeCuda.EventGate = new ManualResetEventSlim(false);
        var stores = Enumerable.Range(0, 4)
            .Select(i => engine.StoreAsync(new OwnedKvRequest(tokens, BitConverter.GetBytes(i), slots, 0, 0x100 + i))).ToArray();
        Thread.Sleep(50);
        Assert.That(stores.Any(t => t.IsCompleted), Is.False);
        FakeCuda.EventGate.Set();
        Assert.That(Task.WaitAll(stores, TimeSpan.FromSeconds(10)), Is.True);
        for (int i = 0; i < 4; i++) Assert.That(engine.Lookup(tokens, BitConverter.GetBytes(i)).HitTokens, Is.EqualTo(16));
        Assert.That(FakeCuda.StreamLog.Where(e => e.Call == "cuLaunchKernel").Select(e => (long)e.Stream), Is.EqualTo(new long[] { 0x100, 0x101, 0x102, 0x103 }));
    }

    [Test]
    public void Dispose_WaitsForTransfersInFlight()
    {
        var src = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        engine.RegisterLayers(Cuda(src));
        FakeCuda.EventGate = new ManualResetEventSlim(false);
        var store = engine.StoreAsync(new OwnedKvRequest(Enumerable.Range(1, 16).ToArray(), [], Enumerable.Range(0, 16).Select(i => (long)i).ToArray(), 0, 0));
        var dispose = Task.Run(engine.Dispose);
        Assert.That(dispose.Wait(200), Is.False, "destroy waits while the device still writes the pool");
        FakeCuda.EventGate.Set();
        Assert.That(dispose.Wait(TimeSpan.FromSeconds(10)), Is.True);
        Assert.That(store.IsCompletedSuccessfully, Is.True);
    }

    [Test]
    public void LaunchFailure_IsLmcCuda_NamingTheError_AndCachesNothing()
    {
        var src = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        engine.RegisterLayers(Cuda(src));
        int[] tokens = Enumerable.Range(1, 16).ToArray();
        long[] slots = Enumerable.Range(0, 16).Select(i => (long)i).ToArray();
        FakeCuda.LaunchResult = FakeCuda.ErrorLaunchFailed;
        var e = Assert.Throws<LmcException>(() => engine.Store(tokens, slots, 0, default))!;
        Assert.That(e.Kind, Is.EqualTo(LmcStatus.Cuda));
        Assert.That(e.Message, Does.Contain("cuLaunchKernel").And.Contain("CUDA_ERROR_LAUNCH_FAILED (719)"));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.Zero);
        Assert.That(engine.GetStats().PoolUsedBytes, Is.Zero, "reserved chunks were returned");
        Assert.That(FakeCuda.ContextDepthOfThisThread, Is.Zero);

        FakeCuda.LaunchResult = 0;
        Assert.That(engine.Store(tokens, slots, 0, default).TokensMatched, Is.EqualTo(16), "the engine works again");
    }

    [Test]
    public void DeviceFaultReportedByTheEvent_FailsTheJob_AndCachesNothing()
    {
        var src = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        engine.RegisterLayers(Cuda(src));
        int[] tokens = Enumerable.Range(1, 16).ToArray();
        long[] slots = Enumerable.Range(0, 16).Select(i => (long)i).ToArray();
        FakeCuda.EventSyncResult = FakeCuda.ErrorIllegalAddress;
        var store = engine.StoreAsync(new OwnedKvRequest(tokens, [], slots, 0, 0x10));
        var e = Assert.Throws<AggregateException>(() => store.Wait(TimeSpan.FromSeconds(10)))!.InnerException as LmcException;
        Assert.That(e?.Kind, Is.EqualTo(LmcStatus.Cuda));
        Assert.That(e!.Message, Does.Contain("CUDA_ERROR_ILLEGAL_ADDRESS"));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.Zero);
        Assert.That(engine.GetStats().PoolUsedBytes, Is.Zero);
    }

    [Test]
    public void Pool_IsPinnedForCudaLayers_AndChangingTheMemoryKindClearsTheCache()
    {
        var device = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        var host = HostCache(TestLayout.FlashNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        int[] tokens = Enumerable.Range(1, 16).ToArray();
        long[] slots = Enumerable.Range(0, 16).Select(i => (long)i).ToArray();

        engine.RegisterLayers(host.Describe());
        engine.Store(tokens, slots, 0, default);
        Assert.That(FakeCuda.HostAllocCalls, Is.Zero, "host layers: plain host memory");
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(16));

        engine.RegisterLayers(Cuda(device));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.Zero, "host -> CUDA layers: a new (pinned) pool");
        engine.Store(tokens, slots, 0, default);
        Assert.That(FakeCuda.HostAllocCalls, Is.GreaterThanOrEqualTo(2), "chunk slabs (and argument buffers) from cuMemHostAlloc");

        engine.RegisterLayers(Cuda(device));
        Assert.That(engine.Lookup(tokens, default).HitTokens, Is.EqualTo(16), "CUDA -> CUDA on the same device keeps the cache");
    }

    [Test]
    public void LayersThatAreNotMemoryOfTheDevice_AreRefusedAtRegistration()
    {
        var host = HostCache(TestLayout.FlashNhd, 10, 16, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(Config), "m", 1, 0, deviceBackend: FakeCuda.Backend());
        var e = Assert.Throws<LmcException>(() => engine.RegisterLayers(Cuda(host)))!;
        Assert.That(e.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(e.Message, Does.Contain("layer 0").And.Contain("is not CUDA memory"));

        var device = DeviceCache(TestLayout.FlashNhd, 10, 16, 2);
        var wrongOrdinal = Cuda(device).Select(l => l with { DeviceIndex = 1 }).ToArray();
        e = Assert.Throws<LmcException>(() => engine.RegisterLayers(wrongOrdinal))!;
        Assert.That(e.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(e.Message, Does.Contain("device_index 1 does not exist"));
        Assert.That(engine.IsRegistered, Is.False);
    }
}
