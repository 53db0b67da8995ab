using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using System.Text;
using NUnit.Framework;

namespace LMCacheNative.Cuda.Tests;

/// <summary>
/// A fake libcuda for machines without a GPU: the same entry points the binding resolves from
/// libcuda.so.1, implemented as [UnmanagedCallersOnly] methods and handed to
/// <see cref="CudaDriver.Resolve"/> as function pointers, so every line of the C# CUDA path runs
/// unchanged. "Device memory" is host memory the fake tracks; copies happen at once (every stream is
/// trivially in order); cuLaunchKernel runs the real kernels' block body on the host through
/// kernels/test/kernel_emu.cu (build/kernels/liblmc_kernel_emu.so, built by build.sh with nvcc).
/// Process-global: the tests using it are not run in parallel.
/// </summary>
internal static unsafe class FakeCuda
{
    // ---- knobs ----
    public static int InitResult;
    public static int DeviceCountValue = 1;
    public static int LaunchResult;
    public static int EventSyncResult;
    /// <summary>When set, cuEventSynchronize blocks until it is signalled (a slow GPU).</summary>
    public static ManualResetEventSlim? EventGate;

    // ---- observations ----
    public static int HtoDSyncCalls, HtoDAsyncCalls, DtoHAsyncCalls, LaunchCalls, EventRecords, HostAllocCalls, PrimaryRetains, ModuleLoads;
    public static readonly ConcurrentQueue<(string Call, nint Stream)> StreamLog = new();
    public static readonly ConcurrentQueue<string> LaunchLog = new();
    [ThreadStatic] private static int t_contextDepth;
    public static int ContextDepthOfThisThread => t_contextDepth;

    private static readonly object Lock = new();
    private static readonly List<(ulong Start, ulong End, bool Device)> Allocations = new();
    private static readonly Dictionary<nint, string> Functions = new();
    private static readonly Dictionary<int, nint> ErrorNames = new();
    private static long s_nextHandle = 0x1000;
    private static delegate* unmanaged<byte*, uint, uint, uint, uint, void*, int> s_emuLaunch;
    private static string? s_emuProblem;

    public const int ErrorInvalidImage = 200;
    public const int ErrorIllegalAddress = 700;
    public const int ErrorMisalignedAddress = 716;
    public const int ErrorLaunchFailed = 719;

    public static void Reset()
    {
        InitResult = 0;
        DeviceCountValue = 1;
        LaunchResult = 0;
        EventSyncResult = 0;
        EventGate = null;
        HtoDSyncCalls = HtoDAsyncCalls = DtoHAsyncCalls = LaunchCalls = EventRecords = HostAllocCalls = PrimaryRetains = ModuleLoads = 0;
        StreamLog.Clear();
        LaunchLog.Clear();
    }

    /// <summary>The fake as a resolved driver.</summary>
    public static CudaDriver Driver() => CudaDriver.Resolve(Export, out _) ?? throw new InvalidOperationException("fake driver incomplete");

    /// <summary>A backend on the fake driver (cuInit and the device count as set in the knobs).</summary>
    public static CudaBackend Backend(CudaTransferOptions? options = null) =>
        new(() => CudaDriver.Initialise(Driver(), "fake libcuda"), KernelAbi.LoadFatbin, options ?? CudaTransferOptions.Default);

    /// <summary>Whether kernel launches can run (the emulation library is built); otherwise the test is ignored, or failed under build.sh.</summary>
    public static void RequireEmulator()
    {
        LoadEmulator();
        if (s_emuLaunch != null) return;
        string message = $"kernel emulation library not available: {s_emuProblem}";
        if (Environment.GetEnvironmentVariable("LMC_REQUIRE_KERNEL_EMU") == "1") Assert.Fail(message);
        Assert.Ignore(message + " (build it with ./build.sh)");
    }

    private static void LoadEmulator()
    {
        lock (Lock)
        {
            if (s_emuLaunch != null || s_emuProblem != null) return;
            string path = Environment.GetEnvironmentVariable("LMC_KERNEL_EMU_LIB") is { Length: > 0 } env
                ? env
                : Path.Combine(TestPaths.RepoRoot(), "build", "kernels", "liblmc_kernel_emu.so");
            if (!NativeLibrary.TryLoad(path, out nint handle)) { s_emuProblem = $"{path} cannot be loaded"; return; }
            if (!NativeLibrary.TryGetExport(handle, "lmc_emu_launch", out nint launch)) { s_emuProblem = $"{path} lacks lmc_emu_launch"; return; }
            var size = (delegate* unmanaged<int>)NativeLibrary.GetExport(handle, "lmc_emu_params_size");
            if (size() != KParams.Size) { s_emuProblem = $"{path} has sizeof(lmc_k_params) = {size()}, C# has {KParams.Size}"; return; }
            s_emuLaunch = (delegate* unmanaged<byte*, uint, uint, uint, uint, void*, int>)launch;
        }
    }

    // ---- fake device memory ----

    public static nint DeviceAlloc(long bytes)
    {
        var p = (nint)NativeMemory.AlignedAlloc((nuint)bytes, 256);
        Track((ulong)p, (ulong)bytes, device: true);
        return p;
    }

    /// <summary>Treats host memory the test allocated as device memory of device 0 (for layer buffers).</summary>
    public static void AdoptAsDevice(nint address, long bytes) => Track((ulong)address, (ulong)bytes, device: true);

    public static void Forget(nint address)
    {
        lock (Lock) Allocations.RemoveAll(a => a.Start == (ulong)address);
    }

    private static void Track(ulong start, ulong bytes, bool device)
    {
        lock (Lock) Allocations.Add((start, start + bytes, device));
    }

    private static (bool Found, bool Device) Find(ulong address)
    {
        lock (Lock)
        {
            foreach (var a in Allocations)
                if (address >= a.Start && address < a.End) return (true, a.Device);
        }
        return (false, false);
    }

    private static nint NextHandle() => (nint)Interlocked.Add(ref s_nextHandle, 16);

    // ---- the entry points ----

    private static nint Export(string name) => name switch
    {
        "cuInit" => (nint)(delegate* unmanaged<uint, int>)&CuInit,
        "cuDriverGetVersion" => (nint)(delegate* unmanaged<int*, int>)&CuDriverGetVersion,
        "cuGetErrorName" => (nint)(delegate* unmanaged<int, byte**, int>)&CuGetErrorName,
        "cuGetErrorString" => (nint)(delegate* unmanaged<int, byte**, int>)&CuGetErrorString,
        "cuDeviceGetCount" => (nint)(delegate* unmanaged<int*, int>)&CuDeviceGetCount,
        "cuDeviceGet" => (nint)(delegate* unmanaged<int*, int, int>)&CuDeviceGet,
        "cuDeviceGetName" => (nint)(delegate* unmanaged<byte*, int, int, int>)&CuDeviceGetName,
        "cuDeviceGetAttribute" => (nint)(delegate* unmanaged<int*, int, int, int>)&CuDeviceGetAttribute,
        "cuDevicePrimaryCtxRetain" => (nint)(delegate* unmanaged<nint*, int, int>)&CuDevicePrimaryCtxRetain,
        "cuDevicePrimaryCtxRelease_v2" => (nint)(delegate* unmanaged<int, int>)&CuDevicePrimaryCtxRelease,
        "cuCtxPushCurrent_v2" => (nint)(delegate* unmanaged<nint, int>)&CuCtxPushCurrent,
        "cuCtxPopCurrent_v2" => (nint)(delegate* unmanaged<nint*, int>)&CuCtxPopCurrent,
        "cuModuleLoadData" => (nint)(delegate* unmanaged<nint*, void*, int>)&CuModuleLoadData,
        "cuModuleUnload" => (nint)(delegate* unmanaged<nint, int>)&CuModuleUnload,
        "cuModuleGetFunction" => (nint)(delegate* unmanaged<nint*, nint, byte*, int>)&CuModuleGetFunction,
        "cuLaunchKernel" => (nint)(delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int>)&CuLaunchKernel,
        "cuMemAlloc_v2" => (nint)(delegate* unmanaged<ulong*, nuint, int>)&CuMemAlloc,
        "cuMemFree_v2" => (nint)(delegate* unmanaged<ulong, int>)&CuMemFree,
        "cuMemHostAlloc" => (nint)(delegate* unmanaged<void**, nuint, uint, int>)&CuMemHostAlloc,
        "cuMemFreeHost" => (nint)(delegate* unmanaged<void*, int>)&CuMemFreeHost,
        "cuMemHostGetDevicePointer_v2" => (nint)(delegate* unmanaged<ulong*, void*, uint, int>)&CuMemHostGetDevicePointer,
        "cuMemcpyHtoD_v2" => (nint)(delegate* unmanaged<ulong, void*, nuint, int>)&CuMemcpyHtoD,
        "cuMemcpyHtoDAsync_v2" => (nint)(delegate* unmanaged<ulong, void*, nuint, nint, int>)&CuMemcpyHtoDAsync,
        "cuMemcpyDtoHAsync_v2" => (nint)(delegate* unmanaged<void*, ulong, nuint, nint, int>)&CuMemcpyDtoHAsync,
        "cuStreamCreate" => (nint)(delegate* unmanaged<nint*, uint, int>)&CuStreamCreate,
        "cuStreamDestroy_v2" => (nint)(delegate* unmanaged<nint, int>)&CuStreamDestroy,
        "cuEventCreate" => (nint)(delegate* unmanaged<nint*, uint, int>)&CuEventCreate,
        "cuEventRecord" => (nint)(delegate* unmanaged<nint, nint, int>)&CuEventRecord,
        "cuEventQuery" => (nint)(delegate* unmanaged<nint, int>)&CuEventQuery,
        "cuEventSynchronize" => (nint)(delegate* unmanaged<nint, int>)&CuEventSynchronize,
        "cuEventDestroy_v2" => (nint)(delegate* unmanaged<nint, int>)&CuEventDestroy,
        "cuPointerGetAttribute" => (nint)(delegate* unmanaged<void*, int, ulong, int>)&CuPointerGetAttribute,
        _ => 0,
    };

    [UnmanagedCallersOnly] private static int CuInit(uint flags) => InitResult;

    [UnmanagedCallersOnly]
    private static int CuDriverGetVersion(int* version)
    {
        *version = 12020;
        return 0;
    }

    private static byte* Utf8(int code, string text)
    {
        lock (Lock)
        {
            if (!ErrorNames.TryGetValue(code, out nint p)) ErrorNames[code] = p = Marshal.StringToCoTaskMemUTF8(text);
            return (byte*)p;
        }
    }

    private static string ErrorName(int code) => code switch
    {
        0 => "CUDA_SUCCESS",
        1 => "CUDA_ERROR_INVALID_VALUE",
        2 => "CUDA_ERROR_OUT_OF_MEMORY",
        100 => "CUDA_ERROR_NO_DEVICE",
        200 => "CUDA_ERROR_INVALID_IMAGE",
        600 => "CUDA_ERROR_NOT_READY",
        700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
        716 => "CUDA_ERROR_MISALIGNED_ADDRESS",
        719 => "CUDA_ERROR_LAUNCH_FAILED",
        _ => "",
    };

    [UnmanagedCallersOnly]
    private static int CuGetErrorName(int code, byte** text)
    {
        string name = ErrorName(code);
        if (name.Length == 0)
        {
            *text = null;
            return 1;
        }
        *text = Utf8(code, name);
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuGetErrorString(int code, byte** text)
    {
        string name = ErrorName(code);
        *text = name.Length == 0 ? null : Utf8(100000 + code, "fake driver: " + name.ToLowerInvariant().Replace('_', ' '));
        return name.Length == 0 ? 1 : 0;
    }

    [UnmanagedCallersOnly]
    private static int CuDeviceGetCount(int* count)
    {
        *count = DeviceCountValue;
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuDeviceGet(int* device, int ordinal)
    {
        if (ordinal < 0 || ordinal >= DeviceCountValue) return 101; // CUDA_ERROR_INVALID_DEVICE
        *device = ordinal;
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuDeviceGetName(byte* name, int length, int device)
    {
        var bytes = Encoding.ASCII.GetBytes("Fake GPU (host emulation)\0");
        new ReadOnlySpan<byte>(bytes, 0, Math.Min(bytes.Length, length)).CopyTo(new Span<byte>(name, length));
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuDeviceGetAttribute(int* value, int attribute, int device)
    {
        *value = attribute switch
        {
            CudaDriver.DeviceAttributeComputeCapabilityMajor => 9,
            CudaDriver.DeviceAttributeComputeCapabilityMinor => 0,
            CudaDriver.DeviceAttributeMultiprocessorCount => 132,
            _ => 1,
        };
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuDevicePrimaryCtxRetain(nint* context, int device)
    {
        Interlocked.Increment(ref PrimaryRetains);
        *context = 0xC0 + device;
        return 0;
    }

    [UnmanagedCallersOnly] private static int CuDevicePrimaryCtxRelease(int device) => 0;

    [UnmanagedCallersOnly]
    private static int CuCtxPushCurrent(nint context)
    {
        t_contextDepth++;
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuCtxPopCurrent(nint* context)
    {
        t_contextDepth--;
        *context = 0xC0;
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuModuleLoadData(nint* module, void* image)
    {
        // A fatbin starts with the magic 0xBA55ED50 (little endian).
        if (*(uint*)image != 0xBA55ED50u) return ErrorInvalidImage;
        Interlocked.Increment(ref ModuleLoads);
        *module = NextHandle();
        return 0;
    }

    [UnmanagedCallersOnly] private static int CuModuleUnload(nint module) => 0;

    [UnmanagedCallersOnly]
    private static int CuModuleGetFunction(nint* function, nint module, byte* name)
    {
        string kernel = Marshal.PtrToStringUTF8((nint)name) ?? "";
        if (!KernelAbi.AllKernelNames().Contains(kernel)) return 500; // CUDA_ERROR_NOT_FOUND
        nint handle = NextHandle();
        lock (Lock) Functions[handle] = kernel;
        *function = handle;
        return 0;
    }


    [UnmanagedCallersOnly]
    private static int CuLaunchKernel(nint function, uint gx, uint gy, uint gz, uint bx, uint by, uint bz, uint shared, nint stream, void** parameters, void** extra)
    {
        StreamLog.Enqueue(("cuLaunchKernel", stream));
        Interlocked.Increment(ref LaunchCalls);
        if (LaunchResult != 0) return LaunchResult;
        string name;
        lock (Lock)
        {
            if (!Functions.TryGetValue(function, out name!)) return 400; // CUDA_ERROR_INVALID_HANDLE
        }
        if (by != 1 || bz != 1 || shared != 0 || extra != null || parameters == null || bx == 0 || bx > 1024) return 1;
        LaunchLog.Enqueue($"{name} grid {gx}x{gy}x{gz} block {bx}");
        if (s_emuLaunch == null) return 1;
        byte[] utf8 = Encoding.ASCII.GetBytes(name + "\0");
        int result;
        fixed (byte* n = utf8) result = s_emuLaunch(n, gx, gy, gz, bx, parameters[0]);
        return result switch { 0 => 0, -3 => ErrorMisalignedAddress, _ => 1 };
    }

    [UnmanagedCallersOnly]
    private static int CuMemAlloc(ulong* pointer, nuint bytes)
    {
        var p = NativeMemory.AlignedAlloc(bytes, 256);
        Track((ulong)p, bytes, device: true);
        *pointer = (ulong)p;
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuMemFree(ulong pointer)
    {
        Forget((nint)pointer);
        NativeMemory.AlignedFree((void*)pointer);
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuMemHostAlloc(void** pointer, nuint bytes, uint flags)
    {
        Interlocked.Increment(ref HostAllocCalls);
        var p = NativeMemory.AlignedAlloc(bytes, 4096);
        Track((ulong)p, bytes, device: false);
        *pointer = p;
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuMemFreeHost(void* pointer)
    {
        Forget((nint)pointer);
        NativeMemory.AlignedFree(pointer);
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuMemHostGetDevicePointer(ulong* device, void* host, uint flags)
    {
        *device = (ulong)host;
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuMemcpyHtoD(ulong destination, void* source, nuint bytes)
    {
        Interlocked.Increment(ref HtoDSyncCalls);
        Buffer.MemoryCopy(source, (void*)destination, bytes, bytes);
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuMemcpyHtoDAsync(ulong destination, void* source, nuint bytes, nint stream)
    {
        Interlocked.Increment(ref HtoDAsyncCalls);
        StreamLog.Enqueue(("cuMemcpyHtoDAsync", stream));
        Buffer.MemoryCopy(source, (void*)destination, bytes, bytes);
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuMemcpyDtoHAsync(void* destination, ulong source, nuint bytes, nint stream)
    {
        Interlocked.Increment(ref DtoHAsyncCalls);
        StreamLog.Enqueue(("cuMemcpyDtoHAsync", stream));
        Buffer.MemoryCopy((void*)source, destination, bytes, bytes);
        return 0;
    }

    /// <summary>Streams the library created for itself (its own stream per device).</summary>
    public static readonly ConcurrentQueue<nint> CreatedStreams = new();

    [UnmanagedCallersOnly]
    private static int CuStreamCreate(nint* stream, uint flags)
    {
        *stream = NextHandle();
        CreatedStreams.Enqueue(*stream);
        return 0;
    }

    [UnmanagedCallersOnly] private static int CuStreamDestroy(nint stream) => 0;

    [UnmanagedCallersOnly]
    private static int CuEventCreate(nint* ev, uint flags)
    {
        *ev = NextHandle();
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuEventRecord(nint ev, nint stream)
    {
        Interlocked.Increment(ref EventRecords);
        StreamLog.Enqueue(("cuEventRecord", stream));
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int CuEventQuery(nint ev) => EventGate is { IsSet: false } ? CudaDriver.ErrorNotReady : EventSyncResult;

    [UnmanagedCallersOnly]
    private static int CuEventSynchronize(nint ev)
    {
        EventGate?.Wait();
        return EventSyncResult;
    }

    [UnmanagedCallersOnly] private static int CuEventDestroy(nint ev) => 0;

    [UnmanagedCallersOnly]
    private static int CuPointerGetAttribute(void* data, int attribute, ulong pointer)
    {
        var (found, device) = Find(pointer);
        if (!found) return 1; // CUDA_ERROR_INVALID_VALUE, as the driver says for memory it does not know
        if (attribute == CudaDriver.PointerAttributeDeviceOrdinal) *(int*)data = 0;
        else if (attribute == CudaDriver.PointerAttributeMemoryType) *(int*)data = device ? 2 : 1;
        else return 1;
        return 0;
    }
}

internal static class TestPaths
{
    public static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "LMCacheNative.sln"))) return dir.FullName;
        throw new InvalidOperationException("repository root not found");
    }
}
