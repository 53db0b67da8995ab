using System.Runtime.InteropServices;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Tests;
using NUnit.Framework;

namespace LMCacheNative.Cuda.Tests;

/// <summary>
/// The lazy driver binding and the ways a machine can lack a usable GPU: libcuda.so.1 missing, a
/// library that is no CUDA driver, cuInit failing (the toolkit or driver installed, no GPU: what CI
/// machines have once nvidia-cuda-toolkit is installed), zero devices. Each is LMC_E_NO_DEVICE with a
/// message that says which, and the CPU path of the same engine keeps working.
/// </summary>
[NonParallelizable]
public class NoGpuPathTests
{
    private static readonly bool HaveGpu = File.Exists("/dev/nvidia0");

    [SetUp]
    public void SetUp() => FakeCuda.Reset();

    private static LmcStatus Kind(Action action)
    {
        var e = Assert.Throws<LmcException>(action)!;
        TestContext.Out.WriteLine($"{e.Kind}: {e.Message}");
        return e.Kind;
    }

    [Test]
    public void MissingLibrary_IsUnavailable_WithoutThrowing()
    {
        var availability = CudaDriver.Load("/nonexistent/libcuda.so.1");
        Assert.That(availability.IsAvailable, Is.False);
        Assert.That(availability.Reason, Does.Contain("/nonexistent/libcuda.so.1").And.Contain("could not be loaded"));
    }

    [Test]
    public void LibraryWithoutCudaSymbols_IsUnavailable()
    {
        var availability = CudaDriver.Load("libc.so.6");
        Assert.That(availability.IsAvailable, Is.False);
        Assert.That(availability.Reason, Does.Contain("lacks cuInit").And.Contain("not a CUDA driver"));
    }

    [Test]
    public void EnvironmentVariable_ChoosesTheLibrary_AndMissingMeansNoDevice()
    {
        string? saved = Environment.GetEnvironmentVariable(CudaDriver.LibraryEnvironmentVariable);
        try
        {
            Environment.SetEnvironmentVariable(CudaDriver.LibraryEnvironmentVariable, "/nonexistent");
            var backend = new CudaBackend();
            var e = Assert.Throws<LmcException>(() => backend.DeviceCount())!;
            Assert.That(e.Kind, Is.EqualTo(LmcStatus.NoDevice));
            Assert.That(e.Message, Does.Contain("/nonexistent"));
        }
        finally
        {
            Environment.SetEnvironmentVariable(CudaDriver.LibraryEnvironmentVariable, saved);
        }
    }

    [Test]
    public void RealDriver_LoadsLazily_AndReportsWhyNotWithoutAGpu()
    {
        var availability = CudaDriver.Load(CudaDriver.DefaultLibrary);
        TestContext.Out.WriteLine(availability.IsAvailable ? $"{availability.DeviceCount} device(s), driver {availability.DriverVersion}" : availability.Reason);
        if (HaveGpu)
        {
            Assert.That(availability.IsAvailable, Is.True, availability.Reason);
            Assert.That(availability.DeviceCount, Is.GreaterThan(0));
        }
        else if (NativeLibrary.TryLoad(CudaDriver.DefaultLibrary, out _))
        {
            // libcuda1 without a GPU (this is what the CUDA toolkit package pulls in): cuInit fails.
            Assert.That(availability.IsAvailable, Is.False);
            Assert.That(availability.Reason, Does.Contain("cuInit failed with CUDA_ERROR_NO_DEVICE (100)"));
        }
        else
        {
            Assert.That(availability.Reason, Does.Contain("could not be loaded"));
        }
    }

    [Test]
    public void EveryBoundSymbol_IsExportedByTheInstalledDriver()
    {
        if (!NativeLibrary.TryLoad(CudaDriver.DefaultLibrary, out nint handle))
            Assert.Ignore("libcuda.so.1 is not installed here");
        var missing = CudaDriver.SymbolNames.Where(name => !NativeLibrary.TryGetExport(handle, name, out _)).ToList();
        Assert.That(missing, Is.Empty, "symbols the binding needs, absent from libcuda.so.1");
        // The versioned names are bound where cuda.h maps to them; a context of our own is never created.
        Assert.That(CudaDriver.SymbolNames, Does.Contain("cuMemAlloc_v2").And.Contain("cuCtxPushCurrent_v2").And.Contain("cuMemcpyHtoDAsync_v2")
            .And.Contain("cuDevicePrimaryCtxRetain").And.Contain("cuEventRecord").And.Contain("cuEventSynchronize"));
        Assert.That(CudaDriver.SymbolNames.Where(n => n.StartsWith("cuCtxCreate") || n.StartsWith("cuStreamSynchronize") || n.StartsWith("cuCtxSynchronize")), Is.Empty);
    }

    [Test]
    public void FailingCuInit_IsNoDevice_NamingTheDriversError()
    {
        FakeCuda.InitResult = CudaDriver.ErrorNoDevice;
        var backend = FakeCuda.Backend();
        var e = Assert.Throws<LmcException>(() => backend.DeviceCount())!;
        Assert.That(e.Kind, Is.EqualTo(LmcStatus.NoDevice));
        Assert.That(e.Message, Does.Contain("cuInit failed with CUDA_ERROR_NO_DEVICE (100)"));
    }

    [Test]
    public void ZeroDevices_IsNoDevice()
    {
        FakeCuda.DeviceCountValue = 0;
        Assert.That(Kind(() => FakeCuda.Backend().DeviceCount()), Is.EqualTo(LmcStatus.NoDevice));
    }

    [Test]
    public void CudaLayers_WithoutAGpu_AreNoDevice_AndTheCpuPathOfTheSameEngineWorks()
    {
        using var cache = new TestModelCache(TestLayout.FlashNhd, 2, 8, 4, 2, 8, 2);
        cache.FillRandom(3);
        foreach (var backend in new[] { new CudaBackend(() => CudaDriver.Load("/nonexistent"), KernelAbi.LoadFatbin, CudaTransferOptions.Default), NoDeviceFake() })
        {
            using var engine = new CacheEngine(EngineConfig.Parse("{\"chunk_size\": 4}"), "m", 1, 0, deviceBackend: backend);
            var cuda = cache.Describe().Select(l => l with { Device = DeviceKind.Cuda }).ToArray();
            Assert.That(Kind(() => engine.RegisterLayers(cuda)), Is.EqualTo(LmcStatus.NoDevice));
            Assert.That(engine.IsRegistered, Is.False);

            engine.RegisterLayers(cache.Describe());
            int[] tokens = Enumerable.Range(100, 12).ToArray();
            long[] slots = Enumerable.Range(3, 12).Select(i => (long)i).ToArray();
            Assert.That(engine.Store(tokens, slots, 0, default).TokensMatched, Is.EqualTo(12));
            var stored = cache.Snapshot();
            cache.Fill(0);
            Assert.That(engine.Retrieve(tokens, slots, 0, default).TokensMatched, Is.EqualTo(12));
            // Every retrieved slot holds the stored bytes again.
            var after = cache.Snapshot();
            for (int l = 0; l < 2; l++)
                for (long s = 3; s < 15; s++)
                    for (int kv = 0; kv < 2; kv++)
                        for (int h = 0; h < 2; h++)
                        {
                            var view = cache.Layers[l].HeadVector(kv, s, h);
                            unsafe
                            {
                                fixed (byte* p = view)
                                {
                                    long offset = (long)(p - cache.Layers[l].Base);
                                    Assert.That(after[l].AsSpan((int)offset, view.Length).ToArray(), Is.EqualTo(stored[l].AsSpan((int)offset, view.Length).ToArray()));
                                }
                            }
                        }
        }
    }

    private static CudaBackend NoDeviceFake()
    {
        FakeCuda.InitResult = CudaDriver.ErrorNoDevice;
        return FakeCuda.Backend();
    }

    [Test]
    public void EngineWithoutABackend_StillRefusesCudaLayersAsUnsupported()
    {
        using var cache = new TestModelCache(TestLayout.FlashNhd, 1, 4, 4, 1, 8, 2);
        using var engine = new CacheEngine(EngineConfig.Parse(null), "m", 1, 0);
        Assert.That(Kind(() => engine.RegisterLayers(cache.Describe().Select(l => l with { Device = DeviceKind.Cuda }).ToArray())),
            Is.EqualTo(LmcStatus.Unsupported));
    }
}
