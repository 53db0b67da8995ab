using LMCacheNative.Core;
using LMCacheNative.Core.Memory;

namespace LMCacheNative.Cuda;

/// <summary>
/// The pool's memory when the layers live on a GPU: page-locked host memory from cuMemHostAlloc,
/// PORTABLE (usable from every context) and DEVICEMAP (mapped into the device address space), so the
/// kernels read and write chunk objects directly and DMA copies run at full PCIe speed. Under unified
/// addressing (every 64-bit Linux GPU) the device address equals the host address, which is checked
/// once per allocation. Bounded like any pool by max_local_cpu_size.
/// </summary>
internal sealed unsafe class PinnedHostAllocator(CudaDevice device) : IHostMemoryAllocator
{
    public nint Allocate(long bytes)
    {
        var driver = device.Driver;
        using var scope = device.Enter();
        void* host;
        if (driver.cuMemHostAlloc(&host, (nuint)bytes, CudaDriver.MemHostAllocPortable | CudaDriver.MemHostAllocDeviceMap) != CudaDriver.Success)
            return 0; // out of pinnable memory: the pool treats it like a full pool
        ulong mapped;
        int result = driver.cuMemHostGetDevicePointer_v2(&mapped, host, 0);
        if (result != CudaDriver.Success || mapped != (ulong)host)
        {
            driver.cuMemFreeHost(host);
            throw result != CudaDriver.Success
                ? driver.Error(result, "cuMemHostGetDevicePointer")
                : LmcException.Unsupported($"pinned memory at 0x{(ulong)host:x} is mapped at device address 0x{mapped:x}: the kernels need unified addressing");
        }
        return (nint)host;
    }

    public void Free(nint address, long bytes)
    {
        using var scope = device.Enter();
        device.Driver.cuMemFreeHost((void*)address);
    }
}
