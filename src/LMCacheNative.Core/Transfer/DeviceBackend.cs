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
    /// <see cref="LmcStatus.NoDevice"/> when there is no driver or no GPU;
    /// <see cref="LmcStatus.InvalidArgument"/> when a layer's memory is not memory of its device;
    /// <see cref="LmcStatus.Cuda"/> when the driver fails; <see cref="LmcStatus.Unsupported"/>
    /// for a shape the kernels cannot handle.
    /// </exception>
    IKvTransfer Attach(IReadOnlyList<KvLayerLayout> layers);
}
