using System.Collections.Concurrent;
using System.Text;
using LMCacheNative.Core;

namespace LMCacheNative.Cuda;

/// <summary>
/// One GPU as the library uses it, set up once per process (per backend) on first use: the device's
/// PRIMARY context (retained, never a context of our own: vLLM's tensors live in the primary
/// context, and memory of another context could not be addressed), the kernel module loaded from the
/// embedded fatbin with every kernel resolved up front, the pinned host allocator, an event pool and
/// the completion thread that turns recorded events into finished tasks.
///
/// Every driver call runs with the primary context pushed for its duration (<see cref="Enter"/>), so
/// the caller's current context is left as it was.
/// </summary>
internal sealed unsafe class CudaDevice
{
    private readonly Dictionary<string, nint> _kernels = new();
    private readonly ConcurrentBag<nint> _events = new();
    private readonly BlockingCollection<(nint Event, Action<int> Done)> _completions = new();
    private readonly Thread _completionThread;

    public CudaDevice(CudaDriver driver, int ordinal, byte[] fatbin)
    {
        Driver = driver;
        Ordinal = ordinal;
        int handle;
        driver.Check(driver.cuDeviceGet(&handle, ordinal), $"cuDeviceGet({ordinal})");
        int device = handle;
        Handle = handle;

        var name = stackalloc byte[256];
        Name = driver.cuDeviceGetName(name, 256, device) == CudaDriver.Success ? Encoding.UTF8.GetString(new ReadOnlySpan<byte>(name, 256)).TrimEnd('\0') : "?";
        int Attribute(int attribute)
        {
            int value = 0;
            driver.Check(driver.cuDeviceGetAttribute(&value, attribute, device), "cuDeviceGetAttribute");
            return value;
        }
        ComputeCapability = (Attribute(CudaDriver.DeviceAttributeComputeCapabilityMajor), Attribute(CudaDriver.DeviceAttributeComputeCapabilityMinor));
        MultiprocessorCount = Attribute(CudaDriver.DeviceAttributeMultiprocessorCount);
        // The kernels address chunk objects in pinned host memory by their host address.
        if (Attribute(CudaDriver.DeviceAttributeUnifiedAddressing) == 0 || Attribute(CudaDriver.DeviceAttributeCanMapHostMemory) == 0)
            throw LmcException.Unsupported($"CUDA device {ordinal} ({Name}) lacks unified addressing or mapped host memory");

        nint context;
        driver.Check(driver.cuDevicePrimaryCtxRetain(&context, device), $"cuDevicePrimaryCtxRetain({ordinal})");
        Context = context;
        try
        {
            using (Enter())
            {
                nint module;
                fixed (byte* image = fatbin)
                    driver.Check(driver.cuModuleLoadData(&module, image),
                        $"cuModuleLoadData (kernel image for sm_70..sm_90 + compute_90 PTX; device {ordinal} is sm_{ComputeCapability.Major}{ComputeCapability.Minor})");
                Module = module;
                // Every kernel is resolved now: a missing one is a registration error, not a failure mid-transfer.
                foreach (string kernel in KernelAbi.AllKernelNames())
                {
                    nint function;
                    byte[] utf8 = Encoding.ASCII.GetBytes(kernel + "\0");
                    fixed (byte* n = utf8) driver.Check(driver.cuModuleGetFunction(&function, module, n), $"cuModuleGetFunction({kernel})");
                    _kernels[kernel] = function;
                }
            }
        }
        catch
        {
            driver.cuDevicePrimaryCtxRelease_v2(device);
            throw;
        }
        PinnedAllocator = new PinnedHostAllocator(this);
        _completionThread = new Thread(CompletionLoop) { IsBackground = true, Name = $"lmc-cuda{ordinal}-completion" };
        _completionThread.Start();
    }

    public CudaDriver Driver { get; }
    public int Ordinal { get; }
    public int Handle { get; }
    public string Name { get; }
    public (int Major, int Minor) ComputeCapability { get; }
    public int MultiprocessorCount { get; }
    public nint Context { get; }
    public nint Module { get; }
    public PinnedHostAllocator PinnedAllocator { get; }

    public nint Kernel(bool gather, int vectorWidth) => _kernels[KernelAbi.KernelName(gather, vectorWidth)];

    /// <summary>Pushes the primary context for a scope; the previous current context is restored on dispose.</summary>
    public ContextScope Enter()
    {
        Driver.Check(Driver.cuCtxPushCurrent_v2(Context), "cuCtxPushCurrent");
        return new ContextScope(Driver);
    }

    public readonly struct ContextScope(CudaDriver driver) : IDisposable
    {
        public void Dispose()
        {
            nint popped;
            driver.cuCtxPopCurrent_v2(&popped);
        }
    }

    private nint _ownStream;
    private readonly object _ownStreamLock = new();

    /// <summary>
    /// The library's own stream on this device (non-blocking: it does not wait for the legacy default
    /// stream), for requests that name none. Created on first use; lives as long as the process.
    /// </summary>
    public nint OwnStream
    {
        get
        {
            lock (_ownStreamLock)
            {
                if (_ownStream != 0) return _ownStream;
                using var scope = Enter();
                nint stream;
                Driver.Check(Driver.cuStreamCreate(&stream, CudaDriver.StreamNonBlocking), "cuStreamCreate");
                return _ownStream = stream;
            }
        }
    }

    /// <summary>An event for one transfer's completion (blocking sync: waiting on it sleeps instead of spinning). Context must be current.</summary>
    public nint RentEvent()
    {
        if (_events.TryTake(out nint ev)) return ev;
        Driver.Check(Driver.cuEventCreate(&ev, CudaDriver.EventBlockingSync | CudaDriver.EventDisableTiming), "cuEventCreate");
        return ev;
    }

    /// <summary>
    /// Calls <paramref name="done"/> with the event's result once the device has passed it, on the
    /// completion thread. The event goes back to the pool afterwards. The caller's context must be
    /// current when the event was recorded; the callback must be short and must not throw.
    /// </summary>
    public void WhenComplete(nint ev, Action<int> done) => _completions.Add((ev, done));

    private void CompletionLoop()
    {
        // The thread keeps the primary context current for its whole life.
        Driver.cuCtxPushCurrent_v2(Context);
        var pending = new List<(nint Event, Action<int> Done)>();
        var spinner = new SpinWait();
        while (true)
        {
            if (pending.Count == 0) pending.Add(_completions.Take());
            while (_completions.TryTake(out var more)) pending.Add(more);
            if (pending.Count == 1)
            {
                // One transfer in flight: sleep in the driver until the device has passed its event
                // (blocking-sync event: no spinning). A transfer submitted meanwhile is noticed after.
                var only = pending[0];
                pending.Clear();
                Finish(only, Driver.cuEventSynchronize(only.Event));
                continue;
            }
            // Several in flight, possibly on different streams: whichever the device finishes first
            // completes first, so one slow stream does not hold back the others.
            bool progressed = false;
            for (int i = 0; i < pending.Count;)
            {
                int result = Driver.cuEventQuery(pending[i].Event);
                if (result == CudaDriver.ErrorNotReady)
                {
                    i++;
                    continue;
                }
                var done = pending[i];
                pending.RemoveAt(i);
                Finish(done, result);
                progressed = true;
            }
            if (progressed) spinner.Reset();
            else spinner.SpinOnce(sleep1Threshold: -1);
        }
    }

    private void Finish((nint Event, Action<int> Done) item, int result)
    {
        try
        {
            item.Done(result);
        }
        catch
        {
            // A completion callback must never take the thread down; the callbacks catch their own.
        }
        if (result == CudaDriver.Success) _events.Add(item.Event);
        else Driver.cuEventDestroy_v2(item.Event);
    }
}
