using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Memory;

namespace LMCacheNative.Core.Transfer;

/// <summary>
/// The GPU path as the engine sees it: something that can move KV between layers in device memory
/// and chunk objects in host memory. LMCacheNative.Cuda implements it over the CUDA driver; the
/// engine itself knows nothing about CUDA. Without a backend, device layers are refused as
/// unsupported.
/// </summary>
public interface IDeviceBackend
{
    /// <summary>
    /// Prepares transfers for validated device layers (all on one device, one model shape; see
    /// <see cref="LayoutValidator"/>). Expensive work (driver and context set-up, kernel loading,
    /// uploading the layer table) happens here, once per registration.
    /// </summary>
    /// <exception cref="LmcException">
    /// <see cref="LmcErrorKind.NoDevice"/> when there is no driver or no GPU;
    /// <see cref="LmcErrorKind.InvalidArgument"/> when a layer's memory is not memory of its device;
    /// <see cref="LmcErrorKind.Cuda"/> when the driver fails; <see cref="LmcErrorKind.Unsupported"/>
    /// for a shape the kernels cannot handle.
    /// </exception>
    IDeviceKvTransfer Attach(IReadOnlyList<KvLayerLayout> layers);
}

/// <summary>
/// Transfers between registered device layers and chunk objects. The synchronous
/// <see cref="IKvTransfer.Transfer"/> runs on the device's default stream and returns when the copy
/// is complete; <see cref="TransferAsync"/> only enqueues work on the caller's stream.
/// </summary>
public interface IDeviceKvTransfer : IKvTransfer, IDisposable
{
    /// <summary>
    /// Where the engine's pool must allocate chunk objects: pinned, device-mapped host memory the
    /// kernels can read and write directly.
    /// </summary>
    IHostMemoryAllocator HostAllocator { get; }

    /// <summary>
    /// Enqueues one transfer of every listed chunk (one kernel launch) on <paramref name="stream"/>
    /// (0 = the default stream) and returns at once. The task completes with the bytes moved when the
    /// device has finished, or faults with an <see cref="LmcException"/> (<see cref="LmcErrorKind.Cuda"/>).
    /// The chunk objects must stay allocated until then; the slot mapping is copied before this returns.
    /// </summary>
    Task<long> TransferAsync(TransferDirection direction, ReadOnlySpan<ChunkTransfer> chunks, ReadOnlySpan<long> slotMapping, nint stream);
}
