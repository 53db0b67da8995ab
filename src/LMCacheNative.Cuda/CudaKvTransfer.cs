using LMCacheNative.Core;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Memory;
using LMCacheNative.Core.Transfer;

namespace LMCacheNative.Cuda;

/// <summary>How gathers reach the pinned pool (see docs/cuda.md, "Where the bytes go").</summary>
/// <param name="StagingMinBytes">
/// gathers moving at least this many bytes are written by the kernel into a device staging buffer,
/// followed by one cuMemcpyDtoHAsync per chunk; smaller ones write straight into mapped pinned
/// memory (zero-copy). long.MaxValue disables staging. Scatters always read pinned memory directly.
/// </param>
/// <param name="StagingMaxBytes">largest staging buffer (device memory) a registration may hold</param>
internal sealed record CudaTransferOptions(long StagingMinBytes, long StagingMaxBytes)
{
    public const string StagingMinEnvironmentVariable = "LMC_CUDA_STAGING_MIN_BYTES";
    public const string StagingMaxEnvironmentVariable = "LMC_CUDA_STAGING_MAX_BYTES";

    /// <summary>Not measured on a GPU yet: LMCache's choice (staging for whole chunks, zero-copy for small ones).</summary>
    public static readonly CudaTransferOptions Default = new(2L << 20, 256L << 20);

    /// <summary>Default, overridden by $LMC_CUDA_STAGING_MIN_BYTES ("off" disables staging) and $LMC_CUDA_STAGING_MAX_BYTES.</summary>
    public static CudaTransferOptions FromEnvironment()
    {
        long Read(string name, long fallback)
        {
            string? text = Environment.GetEnvironmentVariable(name);
            if (string.IsNullOrWhiteSpace(text)) return fallback;
            if (text.Trim() is "off" or "never" or "-1") return long.MaxValue;
            return long.TryParse(text, out long value) && value >= 0 ? value : fallback;
        }
        return new CudaTransferOptions(Read(StagingMinEnvironmentVariable, Default.StagingMinBytes), Read(StagingMaxEnvironmentVariable, Default.StagingMaxBytes));
    }
}

/// <summary>
/// Gather/scatter between layers in GPU memory and chunk objects in pinned host memory, one kernel
/// launch per request (every layer, K and V, every token of every chunk).
///
/// At registration: the layer pointers are checked to be memory of the device, and the layer table
/// (base address and byte strides per layer, <see cref="KLayer"/>) is uploaded to device memory once.
/// Per transfer: the chunk table and the request's slots are packed into a pinned argument buffer and
/// copied to the device on the request's stream (or the device's own one), then the kernel is launched on that stream, then an
/// event is recorded; the completion thread releases the buffers and completes the task when the
/// event has passed. Nothing synchronises the device or the stream.
/// </summary>
internal sealed unsafe class CudaKvTransfer : IKvTransfer
{
    private readonly CudaDevice _device;
    private readonly CudaDriver _driver;
    private readonly CudaTransferOptions _options;
    private readonly ulong _layerTable; // device [num_layers] of KLayer
    private readonly ulong _layoutBits; // OR of every layer address, stride and length that must be aligned
    private readonly int _numLayers, _kvCount, _blockSize, _segsPerRow;
    private readonly long _rowBytes, _segBytes;
    private readonly object _buffersLock = new();
    private readonly List<ArgumentBuffer> _freeArguments = new();
    private readonly List<ArgumentBuffer> _allArguments = new();
    private ulong _staging;
    private long _stagingBytes;
    private int _stagingBusy;
    private bool _disposed;

    private sealed class ArgumentBuffer(nint host, ulong device, long capacity)
    {
        public nint Host { get; } = host;
        public ulong Device { get; } = device;
        public long Capacity { get; } = capacity;
    }

    public CudaKvTransfer(CudaDevice device, IReadOnlyList<KvLayerLayout> layers, CudaTransferOptions options)
    {
        _device = device;
        _driver = device.Driver;
        _options = options;
        var first = layers[0];
        if (layers.Count > 65535)
            throw LmcException.Unsupported($"register_layers: {layers.Count} layers; the CUDA kernels handle at most 65535 (grid.y)");
        if (first.NumSlots > int.MaxValue)
            throw LmcException.Unsupported($"register_layers: {first.NumSlots} slots (num_blocks x block_size); the CUDA kernels handle at most 2^31 - 1");
        _numLayers = layers.Count;
        _kvCount = first.KvCount;
        _blockSize = first.BlockSize;
        _rowBytes = first.TokenRowBytes;
        bool headsAdjacent = layers.All(l => l.HeadsContiguous);
        _segsPerRow = headsAdjacent ? 1 : first.NumKvHeads;
        _segBytes = headsAdjacent ? _rowBytes : (long)first.HeadSize * first.ElemSize;

        var table = new KLayer[layers.Count];
        ulong bits = (ulong)_rowBytes | (ulong)_segBytes;
        for (int i = 0; i < layers.Count; i++)
        {
            var l = layers[i];
            table[i] = new KLayer
            {
                Base = l.BaseAddress,
                KvStride = l.KvStride * l.ElemSize,
                BlockStride = l.BlockStride * l.ElemSize,
                TokenStride = l.TokenStride * l.ElemSize,
                HeadStride = l.HeadStride * l.ElemSize,
            };
            // Strides of dimensions with one entry are never stepped along (torch reports anything for them).
            bits |= table[i].Base;
            if (l.KvCount > 1) bits |= (ulong)table[i].KvStride;
            if (l.NumBlocks > 1) bits |= (ulong)table[i].BlockStride;
            if (l.BlockSize > 1) bits |= (ulong)table[i].TokenStride;
            if (!headsAdjacent) bits |= (ulong)table[i].HeadStride;
        }
        _layoutBits = bits;

        using var scope = device.Enter();
        for (int i = 0; i < layers.Count; i++) CheckDeviceMemory(i, layers[i]);
        ulong deviceTable;
        _driver.Check(_driver.cuMemAlloc_v2(&deviceTable, (nuint)(KLayer.Size * table.Length)), "cuMemAlloc (layer table)");
        fixed (KLayer* source = table)
        {
            int result = _driver.cuMemcpyHtoD_v2(deviceTable, source, (nuint)(KLayer.Size * table.Length));
            if (result != CudaDriver.Success)
            {
                _driver.cuMemFree_v2(deviceTable);
                throw _driver.Error(result, "cuMemcpyHtoD (layer table)");
            }
        }
        _layerTable = deviceTable;
        Shape = KvShape.Of(layers);
    }

    public KvShape Shape { get; }

    private long BytesPerToken => Shape.BytesPerToken;

    /// <summary>Chunk objects live in pinned, device-mapped host memory that the kernels read and write directly.</summary>
    public IHostMemoryAllocator? PoolAllocator => _device.PinnedAllocator;

    /// <summary>Both ends of each layer must be memory of this device (cuPointerGetAttribute), so a host pointer or another GPU's is refused here and never faults a kernel.</summary>
    private void CheckDeviceMemory(int index, KvLayerLayout layer)
    {
        ulong last = layer.BaseAddress + (ulong)LayoutValidator.ExtentBytes(layer) - 1;
        foreach (ulong address in new[] { layer.BaseAddress, last })
        {
            int ordinal = -1, memoryType = 0;
            int result = _driver.cuPointerGetAttribute(&ordinal, CudaDriver.PointerAttributeDeviceOrdinal, address);
            if (result == CudaDriver.Success)
                result = _driver.cuPointerGetAttribute(&memoryType, CudaDriver.PointerAttributeMemoryType, address);
            if (result != CudaDriver.Success)
                throw LmcException.InvalidArgument(
                    $"layer {index}: address 0x{address:x} is not CUDA memory (cuPointerGetAttribute: {_driver.Describe(result)}); LMC_DEVICE_CUDA layers must be device tensors");
            if (ordinal != _device.Ordinal || memoryType != CudaDriver.MemoryTypeDevice)
                throw LmcException.InvalidArgument(
                    $"layer {index}: address 0x{address:x} is {(memoryType == CudaDriver.MemoryTypeDevice ? "" : "not device memory, or is ")}memory of CUDA device {ordinal}, but device_index is {_device.Ordinal}");
        }
    }

    public Task<long> CopyAsync(TransferDirection direction, ReadOnlySpan<ChunkTransfer> chunks, ReadOnlySpan<long> slotMapping, nint stream)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (chunks.Length == 0) return Task.FromResult(0L);
        if (stream == 0) stream = _device.OwnStream;
        bool gather = direction == TransferDirection.Gather;

        // ---- plan: slot range, tokens per chunk, the first token to write, bytes moved ----
        long slotBase = long.MaxValue, slotEnd = 0, objectBytes = 0;
        int chunkTokens = 1;
        long firstToWrite = 0;
        foreach (var c in chunks)
        {
            slotBase = Math.Min(slotBase, c.FirstToken);
            slotEnd = Math.Max(slotEnd, (long)c.FirstToken + c.TokenCount);
            chunkTokens = Math.Max(chunkTokens, c.TokenCount);
            if (c.FirstTokenToCopy > c.FirstToken) firstToWrite = Math.Max(firstToWrite, c.FirstTokenToCopy);
            objectBytes += ObjectBytes(c.TokenCount);
        }
        // One launch has one first_token_to_write: every chunk must agree with it (the engine's
        // transfers always do: a store copies whole chunks, a retrieve has one first token).
        foreach (var c in chunks)
        {
            bool consistent = c.FirstTokenToCopy > c.FirstToken ? c.FirstTokenToCopy == firstToWrite : firstToWrite <= c.FirstToken;
            if (!consistent)
                throw new LmcException(LmcStatus.Internal, "CUDA transfer: chunks with different first tokens to copy cannot share a launch");
        }
        long gridX = (long)chunks.Length * chunkTokens;
        if (gridX > int.MaxValue) throw LmcException.Unsupported($"CUDA transfer: {gridX} token blocks exceed one launch");
        long slotCount = slotEnd - slotBase;
        long tokensCopied = 0;
        foreach (var c in chunks)
        {
            long from = Math.Max(c.FirstToken, firstToWrite);
            for (long t = from; t < (long)c.FirstToken + c.TokenCount; t++)
                if (slotMapping[(int)t] >= 0) tokensCopied++;
        }
        long bytesMoved = tokensCopied * BytesPerToken;

        // ---- buffers: arguments always; staging for large gathers when free ----
        long argumentBytes = (long)KChunk.Size * chunks.Length + 8 * slotCount;
        var arguments = RentArguments(argumentBytes);
        long stagingBytes = gather ? StagingLayoutBytes(chunks) : 0;
        bool staged = gather && stagingBytes >= _options.StagingMinBytes && TryRentStaging(stagingBytes);

        var chunkTable = (KChunk*)arguments.Host;
        ulong bits = _layoutBits;
        long stagingOffset = 0;
        for (int i = 0; i < chunks.Length; i++)
        {
            ulong data = staged ? _staging + (ulong)stagingOffset : (ulong)chunks[i].ChunkData;
            if (staged) stagingOffset += AlignStaging(ObjectBytes(chunks[i].TokenCount));
            chunkTable[i] = new KChunk { Data = data, FirstToken = chunks[i].FirstToken, TokenCount = chunks[i].TokenCount };
            bits |= data;
        }
        slotMapping.Slice((int)slotBase, (int)slotCount).CopyTo(new Span<long>((byte*)arguments.Host + (long)KChunk.Size * chunks.Length, (int)slotCount));

        int vectorWidth = KernelAbi.VectorWidth(bits);
        var parameters = new KParams
        {
            Layers = _layerTable,
            Chunks = arguments.Device,
            Slots = arguments.Device + (ulong)(KChunk.Size * chunks.Length),
            SlotBase = slotBase,
            FirstTokenToWrite = firstToWrite,
            RowBytes = _rowBytes,
            SegBytes = _segBytes,
            NumLayers = _numLayers,
            KvCount = _kvCount,
            BlockSize = _blockSize,
            ChunkTokens = chunkTokens,
            SegsPerRow = _segsPerRow,
            UnitsPerSeg = (int)(_segBytes / vectorWidth),
        };
        int threads = KernelAbi.BlockThreads((long)parameters.SegsPerRow * parameters.UnitsPerSeg);
        var completion = new TaskCompletionSource<long>();

        // ---- enqueue on the stream: arguments, kernel, staging copies, event ----
        bool enqueued = false;
        try
        {
            using var scope = _device.Enter();
            _driver.Check(_driver.cuMemcpyHtoDAsync_v2(arguments.Device, (void*)arguments.Host, (nuint)argumentBytes, stream), "cuMemcpyHtoDAsync (transfer arguments)");
            enqueued = true;
            void* parameterPointer = &parameters;
            nint kernel = _device.Kernel(gather, vectorWidth);
            _driver.Check(_driver.cuLaunchKernel(kernel, (uint)gridX, (uint)_numLayers, (uint)_kvCount, (uint)threads, 1, 1, 0, stream, &parameterPointer, null),
                $"cuLaunchKernel({KernelAbi.KernelName(gather, vectorWidth)}, grid {gridX}x{_numLayers}x{_kvCount}, block {threads})");
            if (staged)
            {
                stagingOffset = 0;
                foreach (var c in chunks)
                {
                    long bytes = ObjectBytes(c.TokenCount);
                    _driver.Check(_driver.cuMemcpyDtoHAsync_v2((void*)c.ChunkData, _staging + (ulong)stagingOffset, (nuint)bytes, stream), "cuMemcpyDtoHAsync (staging -> pinned chunk)");
                    stagingOffset += AlignStaging(bytes);
                }
            }
            nint ev = _device.RentEvent();
            int recorded = _driver.cuEventRecord(ev, stream);
            if (recorded != CudaDriver.Success)
            {
                _driver.cuEventDestroy_v2(ev);
                _driver.Check(recorded, "cuEventRecord");
            }
            _device.WhenComplete(ev, result =>
            {
                ReturnArguments(arguments);
                if (staged) Volatile.Write(ref _stagingBusy, 0);
                if (result == CudaDriver.Success) completion.SetResult(bytesMoved);
                else completion.SetException(_driver.Error(result, $"{KernelAbi.KernelName(gather, vectorWidth)} (reported by cuEventSynchronize)"));
            });
        }
        catch
        {
            // Work already enqueued may still read the argument buffer or write the staging buffer:
            // they are then abandoned (leaked) rather than reused.
            if (!enqueued)
            {
                ReturnArguments(arguments);
                if (staged) Volatile.Write(ref _stagingBusy, 0);
            }
            throw;
        }
        return completion.Task;
    }

    private long ObjectBytes(int tokenCount) => (long)tokenCount * BytesPerToken;

    /// <summary>Chunk objects in the staging buffer start 256-byte aligned (full 16-byte vectors and DMA-friendly).</summary>
    private static long AlignStaging(long bytes) => (bytes + 255) & ~255L;

    private long StagingLayoutBytes(ReadOnlySpan<ChunkTransfer> chunks)
    {
        long total = 0;
        foreach (var c in chunks) total += AlignStaging(ObjectBytes(c.TokenCount));
        return total;
    }

    /// <summary>Takes the staging buffer (growing it up to the maximum) unless another transfer holds it.</summary>
    private bool TryRentStaging(long bytes)
    {
        if (bytes > _options.StagingMaxBytes) return false;
        if (Interlocked.CompareExchange(ref _stagingBusy, 1, 0) != 0) return false;
        if (_stagingBytes >= bytes) return true;
        using var scope = _device.Enter();
        if (_staging != 0) _driver.cuMemFree_v2(_staging);
        _staging = 0;
        _stagingBytes = 0;
        ulong buffer;
        if (_driver.cuMemAlloc_v2(&buffer, (nuint)bytes) != CudaDriver.Success)
        {
            Volatile.Write(ref _stagingBusy, 0);
            return false; // no device memory to spare: write straight into pinned memory
        }
        _staging = buffer;
        _stagingBytes = bytes;
        return true;
    }

    private ArgumentBuffer RentArguments(long bytes)
    {
        lock (_buffersLock)
        {
            for (int i = 0; i < _freeArguments.Count; i++)
            {
                if (_freeArguments[i].Capacity < bytes) continue;
                var found = _freeArguments[i];
                _freeArguments.RemoveAt(i);
                return found;
            }
        }
        long capacity = Math.Max(4096, (long)System.Numerics.BitOperations.RoundUpToPowerOf2((ulong)bytes));
        using var scope = _device.Enter();
        void* host;
        _driver.Check(_driver.cuMemHostAlloc(&host, (nuint)capacity, CudaDriver.MemHostAllocPortable), "cuMemHostAlloc (transfer arguments)");
        ulong device;
        int result = _driver.cuMemAlloc_v2(&device, (nuint)capacity);
        if (result != CudaDriver.Success)
        {
            _driver.cuMemFreeHost(host);
            throw _driver.Error(result, "cuMemAlloc (transfer arguments)");
        }
        var buffer = new ArgumentBuffer((nint)host, device, capacity);
        lock (_buffersLock) _allArguments.Add(buffer);
        return buffer;
    }

    private void ReturnArguments(ArgumentBuffer buffer)
    {
        lock (_buffersLock) _freeArguments.Add(buffer);
    }

    /// <summary>Frees the layer table and buffers. The engine calls it only when no transfer is in flight.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        try
        {
            using var scope = _device.Enter();
            _driver.cuMemFree_v2(_layerTable);
            if (_staging != 0) _driver.cuMemFree_v2(_staging);
            lock (_buffersLock)
            {
                // Buffers still rented belong to abandoned work (see CopyAsync) and are left alone.
                foreach (var buffer in _freeArguments)
                {
                    _driver.cuMemFreeHost((void*)buffer.Host);
                    _driver.cuMemFree_v2(buffer.Device);
                }
                _freeArguments.Clear();
                _allArguments.Clear();
            }
        }
        catch (LmcException)
        {
            // Disposal never throws (a context that cannot be pushed has nothing left to free).
        }
    }
}
