using System.Runtime.InteropServices;
using LMCacheNative.Core;
using LMCacheNative.Cuda;

namespace LMCacheNative.Exports;

/// <summary>
/// The CUDA section of the C ABI: the device query (stores and retrieves on CUDA layers go through
/// the request exports like any other). The
/// CUDA backend is created here for the whole process; creating it loads nothing (the driver is
/// loaded on the first CUDA registration or device query), so the library keeps working without
/// libcuda.so.1.
/// </summary>
internal static unsafe class DeviceExports
{
    /// <summary>The process's CUDA backend, handed to every engine (composition root).</summary>
    internal static readonly CudaBackend Cuda = new();

    [UnmanagedCallersOnly(EntryPoint = "lmc_cuda_device_count")]
    public static int CudaDeviceCount(int* countOut)
    {
        try
        {
            Exports.RequireOut(countOut, "count_out");
            *countOut = Cuda.DeviceCount();
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }
}
