using System.Runtime.InteropServices;
using LMCacheNative.Core;

namespace LMCacheNative.Cuda;

/// <summary>
/// The CUDA driver API entry points this library uses, resolved once from libcuda.so.1 with
/// <see cref="NativeLibrary.TryLoad(string, out nint)"/> and called through unmanaged function pointers.
///
/// Nothing links against libcuda: the shared library loads and runs its CPU paths on machines
/// without it. Where cuda.h maps a name to a versioned symbol (cuMemAlloc → cuMemAlloc_v2, …), the
/// versioned symbol is bound: the unversioned exports still exist with the old ABI. Tests substitute
/// a fake driver through <see cref="Resolve"/>.
/// </summary>
internal sealed unsafe class CudaDriver
{
    public const string DefaultLibrary = "libcuda.so.1";

    /// <summary>Environment variable naming another driver library (tests: "/nonexistent" simulates a machine without libcuda).</summary>
    public const string LibraryEnvironmentVariable = "LMC_CUDA_LIBRARY";

    // ---- CUresult values and flags used here (cuda.h) ----
    public const int Success = 0;
    public const int ErrorInvalidValue = 1;
    public const int ErrorOutOfMemory = 2;
    public const int ErrorNoDevice = 100;
    public const int ErrorNotReady = 600;
    public const uint MemHostAllocPortable = 0x01;
    public const uint MemHostAllocDeviceMap = 0x02;
    public const uint StreamNonBlocking = 0x1;
    public const uint EventBlockingSync = 0x1;
    public const uint EventDisableTiming = 0x2;
    public const int PointerAttributeMemoryType = 2;
    public const int PointerAttributeDeviceOrdinal = 9;
    public const int MemoryTypeDevice = 2;
    public const int DeviceAttributeMultiprocessorCount = 16;
    public const int DeviceAttributeCanMapHostMemory = 19;
    public const int DeviceAttributeUnifiedAddressing = 41;
    public const int DeviceAttributeComputeCapabilityMajor = 75;
    public const int DeviceAttributeComputeCapabilityMinor = 76;

    // ---- entry points (CUresult is int; handles are pointers; CUdeviceptr is ulong) ----
    public delegate* unmanaged<uint, int> cuInit;
    public delegate* unmanaged<int*, int> cuDriverGetVersion;
    public delegate* unmanaged<int, byte**, int> cuGetErrorName;
    public delegate* unmanaged<int, byte**, int> cuGetErrorString;
    public delegate* unmanaged<int*, int> cuDeviceGetCount;
    public delegate* unmanaged<int*, int, int> cuDeviceGet;
    public delegate* unmanaged<byte*, int, int, int> cuDeviceGetName;
    public delegate* unmanaged<int*, int, int, int> cuDeviceGetAttribute;
    public delegate* unmanaged<nint*, int, int> cuDevicePrimaryCtxRetain;
    public delegate* unmanaged<int, int> cuDevicePrimaryCtxRelease_v2;
    public delegate* unmanaged<nint, int> cuCtxPushCurrent_v2;
    public delegate* unmanaged<nint*, int> cuCtxPopCurrent_v2;
    public delegate* unmanaged<nint*, void*, int> cuModuleLoadData;
    public delegate* unmanaged<nint, int> cuModuleUnload;
    public delegate* unmanaged<nint*, nint, byte*, int> cuModuleGetFunction;
    public delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int> cuLaunchKernel;
    public delegate* unmanaged<ulong*, nuint, int> cuMemAlloc_v2;
    public delegate* unmanaged<ulong, int> cuMemFree_v2;
    public delegate* unmanaged<void**, nuint, uint, int> cuMemHostAlloc;
    public delegate* unmanaged<void*, int> cuMemFreeHost;
    public delegate* unmanaged<ulong*, void*, uint, int> cuMemHostGetDevicePointer_v2;
    public delegate* unmanaged<ulong, void*, nuint, int> cuMemcpyHtoD_v2;
    public delegate* unmanaged<ulong, void*, nuint, nint, int> cuMemcpyHtoDAsync_v2;
    public delegate* unmanaged<void*, ulong, nuint, nint, int> cuMemcpyDtoHAsync_v2;
    public delegate* unmanaged<nint*, uint, int> cuStreamCreate;
    public delegate* unmanaged<nint, int> cuStreamDestroy_v2;
    public delegate* unmanaged<nint*, uint, int> cuEventCreate;
    public delegate* unmanaged<nint, nint, int> cuEventRecord;
    public delegate* unmanaged<nint, int> cuEventQuery;
    public delegate* unmanaged<nint, int> cuEventSynchronize;
    public delegate* unmanaged<nint, int> cuEventDestroy_v2;
    public delegate* unmanaged<void*, int, ulong, int> cuPointerGetAttribute;

    /// <summary>Every symbol bound, by its exported name (the binding list in one place).</summary>
    public static readonly string[] SymbolNames =
    [
        "cuInit", "cuDriverGetVersion", "cuGetErrorName", "cuGetErrorString", "cuDeviceGetCount", "cuDeviceGet",
        "cuDeviceGetName", "cuDeviceGetAttribute", "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease_v2",
        "cuCtxPushCurrent_v2", "cuCtxPopCurrent_v2", "cuModuleLoadData", "cuModuleUnload", "cuModuleGetFunction",
        "cuLaunchKernel", "cuMemAlloc_v2", "cuMemFree_v2", "cuMemHostAlloc", "cuMemFreeHost",
        "cuMemHostGetDevicePointer_v2", "cuMemcpyHtoD_v2", "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2",
        "cuStreamCreate", "cuStreamDestroy_v2", "cuEventCreate", "cuEventRecord", "cuEventQuery", "cuEventSynchronize", "cuEventDestroy_v2", "cuPointerGetAttribute",
    ];

    private CudaDriver() { }

    /// <summary>Binds every entry point through <paramref name="export"/> (name → address, 0 when missing).</summary>
    /// <returns>the driver, or null with the missing names</returns>
    public static CudaDriver? Resolve(Func<string, nint> export, out List<string> missing)
    {
        var absent = new List<string>();
        nint Get(string name)
        {
            nint address = export(name);
            if (address == 0) absent.Add(name);
            return address;
        }
        var d = new CudaDriver
        {
            cuInit = (delegate* unmanaged<uint, int>)Get("cuInit"),
            cuDriverGetVersion = (delegate* unmanaged<int*, int>)Get("cuDriverGetVersion"),
            cuGetErrorName = (delegate* unmanaged<int, byte**, int>)Get("cuGetErrorName"),
            cuGetErrorString = (delegate* unmanaged<int, byte**, int>)Get("cuGetErrorString"),
            cuDeviceGetCount = (delegate* unmanaged<int*, int>)Get("cuDeviceGetCount"),
            cuDeviceGet = (delegate* unmanaged<int*, int, int>)Get("cuDeviceGet"),
            cuDeviceGetName = (delegate* unmanaged<byte*, int, int, int>)Get("cuDeviceGetName"),
            cuDeviceGetAttribute = (delegate* unmanaged<int*, int, int, int>)Get("cuDeviceGetAttribute"),
            cuDevicePrimaryCtxRetain = (delegate* unmanaged<nint*, int, int>)Get("cuDevicePrimaryCtxRetain"),
            cuDevicePrimaryCtxRelease_v2 = (delegate* unmanaged<int, int>)Get("cuDevicePrimaryCtxRelease_v2"),
            cuCtxPushCurrent_v2 = (delegate* unmanaged<nint, int>)Get("cuCtxPushCurrent_v2"),
            cuCtxPopCurrent_v2 = (delegate* unmanaged<nint*, int>)Get("cuCtxPopCurrent_v2"),
            cuModuleLoadData = (delegate* unmanaged<nint*, void*, int>)Get("cuModuleLoadData"),
            cuModuleUnload = (delegate* unmanaged<nint, int>)Get("cuModuleUnload"),
            cuModuleGetFunction = (delegate* unmanaged<nint*, nint, byte*, int>)Get("cuModuleGetFunction"),
            cuLaunchKernel = (delegate* unmanaged<nint, uint, uint, uint, uint, uint, uint, uint, nint, void**, void**, int>)Get("cuLaunchKernel"),
            cuMemAlloc_v2 = (delegate* unmanaged<ulong*, nuint, int>)Get("cuMemAlloc_v2"),
            cuMemFree_v2 = (delegate* unmanaged<ulong, int>)Get("cuMemFree_v2"),
            cuMemHostAlloc = (delegate* unmanaged<void**, nuint, uint, int>)Get("cuMemHostAlloc"),
            cuMemFreeHost = (delegate* unmanaged<void*, int>)Get("cuMemFreeHost"),
            cuMemHostGetDevicePointer_v2 = (delegate* unmanaged<ulong*, void*, uint, int>)Get("cuMemHostGetDevicePointer_v2"),
            cuMemcpyHtoD_v2 = (delegate* unmanaged<ulong, void*, nuint, int>)Get("cuMemcpyHtoD_v2"),
            cuMemcpyHtoDAsync_v2 = (delegate* unmanaged<ulong, void*, nuint, nint, int>)Get("cuMemcpyHtoDAsync_v2"),
            cuMemcpyDtoHAsync_v2 = (delegate* unmanaged<void*, ulong, nuint, nint, int>)Get("cuMemcpyDtoHAsync_v2"),
            cuStreamCreate = (delegate* unmanaged<nint*, uint, int>)Get("cuStreamCreate"),
            cuStreamDestroy_v2 = (delegate* unmanaged<nint, int>)Get("cuStreamDestroy_v2"),
            cuEventCreate = (delegate* unmanaged<nint*, uint, int>)Get("cuEventCreate"),
            cuEventRecord = (delegate* unmanaged<nint, nint, int>)Get("cuEventRecord"),
            cuEventQuery = (delegate* unmanaged<nint, int>)Get("cuEventQuery"),
            cuEventSynchronize = (delegate* unmanaged<nint, int>)Get("cuEventSynchronize"),
            cuEventDestroy_v2 = (delegate* unmanaged<nint, int>)Get("cuEventDestroy_v2"),
            cuPointerGetAttribute = (delegate* unmanaged<void*, int, ulong, int>)Get("cuPointerGetAttribute"),
        };
        missing = absent;
        return absent.Count == 0 ? d : null;
    }

    /// <summary>
    /// Loads the driver library and initialises it. Never throws: every way of not having a usable
    /// GPU (library absent, not a CUDA driver, cuInit failing as it does with the toolkit installed
    /// and no GPU, zero devices) is a <see cref="CudaAvailability"/> that says why.
    /// </summary>
    /// <param name="libraryPath">the library to load; null = $LMC_CUDA_LIBRARY, else libcuda.so.1</param>
    public static CudaAvailability Load(string? libraryPath = null)
    {
        string path = libraryPath ?? NonEmpty(Environment.GetEnvironmentVariable(LibraryEnvironmentVariable)) ?? DefaultLibrary;
        if (!NativeLibrary.TryLoad(path, out nint handle))
            return CudaAvailability.Unavailable($"the CUDA driver library {path} could not be loaded (no NVIDIA driver installed)");
        var driver = Resolve(name => NativeLibrary.TryGetExport(handle, name, out nint address) ? address : 0, out var missing);
        if (driver is null)
            return CudaAvailability.Unavailable(
                $"{path} lacks {string.Join(", ", missing.Take(4))}{(missing.Count > 4 ? $" and {missing.Count - 4} more" : "")}: not a CUDA driver, or one older than CUDA 11");
        return Initialise(driver, path);
    }

    /// <summary>cuInit, device count and driver version of a resolved driver.</summary>
    public static CudaAvailability Initialise(CudaDriver driver, string source)
    {
        int result = driver.cuInit(0);
        if (result != Success)
            return CudaAvailability.Unavailable($"cuInit failed with {driver.Describe(result)}: no usable GPU ({source})");
        int count = 0, version = 0;
        result = driver.cuDeviceGetCount(&count);
        if (result != Success)
            return CudaAvailability.Unavailable($"cuDeviceGetCount failed with {driver.Describe(result)} ({source})");
        if (count < 1) return CudaAvailability.Unavailable($"the CUDA driver reports no device ({source})");
        driver.cuDriverGetVersion(&version);
        return new CudaAvailability(driver, count, version, "");
    }

    private static string? NonEmpty(string? s) => string.IsNullOrEmpty(s) ? null : s;

    /// <summary>"CUDA_ERROR_NO_DEVICE (100): no CUDA-capable device is detected".</summary>
    public string Describe(int result)
    {
        byte* name = null, text = null;
        string n = cuGetErrorName(result, &name) == Success && name != null ? Marshal.PtrToStringUTF8((nint)name) ?? "" : "CUDA_ERROR_UNKNOWN";
        string t = cuGetErrorString(result, &text) == Success && text != null ? Marshal.PtrToStringUTF8((nint)text) ?? "" : "";
        return t.Length > 0 ? $"{n} ({result}): {t}" : $"{n} ({result})";
    }

    /// <summary>Throws <see cref="LmcStatus.Cuda"/> naming the call and the driver's error unless <paramref name="result"/> is success.</summary>
    public void Check(int result, string call)
    {
        if (result != Success) throw Error(result, call);
    }

    public LmcException Error(int result, string call) => new(LmcStatus.Cuda, $"{call} failed: {Describe(result)}");
}

/// <summary>Whether the CUDA path can run here, and why not.</summary>
internal sealed class CudaAvailability(CudaDriver? driver, int deviceCount, int driverVersion, string reason)
{
    public static CudaAvailability Unavailable(string reason) => new(null, 0, 0, reason);

    public bool IsAvailable => Driver is not null;
    public CudaDriver? Driver { get; } = driver;
    public int DeviceCount { get; } = deviceCount;
    /// <summary>cuDriverGetVersion: 1000 * major + 10 * minor (12020 = CUDA 12.2).</summary>
    public int DriverVersion { get; } = driverVersion;
    /// <summary>Why the CUDA path is not available ("" when it is).</summary>
    public string Reason { get; } = reason;
}
