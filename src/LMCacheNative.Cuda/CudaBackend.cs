using System.Collections.Concurrent;
using LMCacheNative.Core;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Transfer;

namespace LMCacheNative.Cuda;

/// <summary>
/// The CUDA implementation of the engine's <see cref="IDeviceBackend"/>. Creating it costs nothing:
/// the driver is loaded and initialised on first use (a registration of CUDA layers or a device
/// query), once per backend, and devices are set up on first use each. Without a driver or a GPU
/// every device operation reports <see cref="LmcStatus.NoDevice"/> and the CPU path is untouched.
/// </summary>
public sealed class CudaBackend : IDeviceBackend
{
    private readonly Lazy<CudaAvailability> _availability;
    private readonly ConcurrentDictionary<int, Lazy<CudaDevice>> _devices = new();
    private readonly Lazy<byte[]?> _fatbin;
    private readonly CudaTransferOptions _options;

    /// <summary>The real driver: $LMC_CUDA_LIBRARY, else libcuda.so.1; staging options from the environment.</summary>
    public CudaBackend() : this(() => CudaDriver.Load(), KernelAbi.LoadFatbin, CudaTransferOptions.FromEnvironment()) { }

    internal CudaBackend(Func<CudaAvailability> probe, Func<byte[]?> fatbin, CudaTransferOptions options)
    {
        _availability = new Lazy<CudaAvailability>(probe, LazyThreadSafetyMode.ExecutionAndPublication);
        _fatbin = new Lazy<byte[]?>(fatbin, LazyThreadSafetyMode.ExecutionAndPublication);
        _options = options;
    }

    internal CudaAvailability Availability => _availability.Value;

    /// <summary>Number of CUDA devices, or <see cref="LmcStatus.NoDevice"/> saying why there is none usable.</summary>
    public int DeviceCount()
    {
        var availability = Availability;
        if (!availability.IsAvailable) throw NoDevice(availability);
        return availability.DeviceCount;
    }

    public IKvTransfer Attach(IReadOnlyList<KvLayerLayout> layers)
    {
        var availability = Availability;
        if (!availability.IsAvailable) throw NoDevice(availability);
        int ordinal = layers[0].DeviceIndex;
        if (ordinal >= availability.DeviceCount)
            throw LmcException.InvalidArgument($"layer 0: device_index {ordinal} does not exist: this machine has {availability.DeviceCount} CUDA device(s)");
        return new CudaKvTransfer(Device(ordinal), layers, _options);
    }

    /// <summary>The device, set up on first use (primary context, module, kernels, completion thread).</summary>
    internal CudaDevice Device(int ordinal)
    {
        var availability = Availability;
        if (!availability.IsAvailable) throw NoDevice(availability);
        var lazy = _devices.GetOrAdd(ordinal, o => new Lazy<CudaDevice>(() =>
        {
            byte[] image = _fatbin.Value ?? throw LmcException.Unsupported("this build of the library embeds no CUDA kernel image (lmc_kernels.fatbin)");
            return new CudaDevice(availability.Driver!, o, image);
        }, LazyThreadSafetyMode.ExecutionAndPublication));
        try
        {
            return lazy.Value;
        }
        catch
        {
            // A failed set-up (say, an out-of-memory context) may succeed later: do not cache it.
            _devices.TryRemove(new KeyValuePair<int, Lazy<CudaDevice>>(ordinal, lazy));
            throw;
        }
    }

    private static LmcException NoDevice(CudaAvailability availability) =>
        new(LmcStatus.NoDevice, $"the CUDA path is not available on this machine: {availability.Reason}");
}
