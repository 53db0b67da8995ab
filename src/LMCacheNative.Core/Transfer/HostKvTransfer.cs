using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Memory;

namespace LMCacheNative.Core.Transfer;

/// <summary>
/// One chunk's part of a transfer. Tokens <c>[FirstToken, FirstToken + TokenCount)</c> of the request
/// live in the chunk object at <see cref="ChunkData"/>; only tokens at or after
/// <see cref="FirstTokenToCopy"/> (absolute token index) are copied, and tokens whose slot is -1 are
/// skipped.
/// </summary>
public readonly record struct ChunkTransfer(nint ChunkData, int FirstToken, int TokenCount, int FirstTokenToCopy);

public enum TransferDirection
{
    /// <summary>Paged KV layers → chunk objects (store).</summary>
    Gather,
    /// <summary>Chunk objects → paged KV layers (retrieve).</summary>
    Scatter,
}

/// <summary>
/// Moves KV between the registered paged layers and chunk objects: the one seam between the engine
/// and where the KV lives. The host implementation copies with the CPU; the CUDA path implements it
/// with one kernel launch per request. Either way the engine plans, starts the copy and completes
/// the request when the returned task does.
/// </summary>
public interface IKvTransfer : IDisposable
{
    /// <summary>The registered model's KV shape (bytes per token, per chunk).</summary>
    KvShape Shape { get; }

    /// <summary>
    /// Where the engine's pool must allocate chunk objects for this transfer to reach them (pinned,
    /// device-mapped memory for a GPU); null for plain host memory.
    /// </summary>
    IHostMemoryAllocator? PoolAllocator { get; }

    /// <summary>
    /// Copies every layer, K and V, of every listed chunk; the task completes with the bytes moved.
    /// Host layers copy on the calling thread and return a completed task. Device layers enqueue the
    /// copy on <paramref name="stream"/> (0 = the transfer's own stream) and complete when the device
    /// has finished, or fault with an <see cref="LmcException"/>. The chunk objects must stay
    /// allocated until completion; the slot mapping is read (or copied) before this returns.
    /// </summary>
    Task<long> CopyAsync(TransferDirection direction, ReadOnlySpan<ChunkTransfer> chunks, ReadOnlySpan<long> slotMapping, nint stream);
}

/// <summary>
/// CPU gather/scatter between paged layers in host memory and chunk objects.
///
/// Chunk object format (layout-free, LMCache's KV_2LTD): <c>[kv_count][num_layers][T][num_kv_heads][head_size]</c>
/// elements, T = the chunk's token count, so one token's K (or V) of one layer is one row of
/// <c>num_kv_heads * head_size * elem_size</c> bytes.
///
/// Copies go in the largest runs the strides allow: a whole token row when the heads of a token are
/// adjacent (NHD, MLA), merged across consecutive tokens whose slots are adjacent in the same block;
/// one head (head_size elements) at a time otherwise (HND, packed). Work is split over
/// (chunk, layer, kv) items ((chunk, layer) when K and V interleave, as in packed) and spread over
/// cores when the request is large enough to pay for it.
/// </summary>
public sealed unsafe class HostKvTransfer : IKvTransfer
{
    /// <summary>Below this many bytes a transfer runs on the calling thread: waking workers costs more than it saves.</summary>
    public const long ParallelThresholdBytes = 4L << 20;

    // Host transfers copying right now, in every engine of the process (see Copy).
    private static int s_transfersInFlight;

    private readonly LayerPlan[] _layers;
    private readonly int _kvCount;
    private readonly long _rowBytes;
    private readonly long _headBytes;
    private readonly int _numHeads;
    private readonly int _blockSize;
    private readonly bool _headsContiguous;
    // K and V in one item (one pass over the block) instead of one item each: true when a head's K
    // and V vectors sit side by side (the packed layout), so that a K-only pass would read every
    // other head vector and leave the rest of each line pair to another pass.
    private readonly bool _kvTogether;
    // Items per (chunk, layer): kv count, or 1 when K and V go together.
    private readonly int _itemsPerLayer;

    private readonly struct LayerPlan(byte* baseAddress, long kvStrideBytes, long blockStrideBytes, long tokenStrideBytes, long headStrideBytes)
    {
        public readonly byte* Base = baseAddress;
        public readonly long KvStrideBytes = kvStrideBytes;
        public readonly long BlockStrideBytes = blockStrideBytes;
        public readonly long TokenStrideBytes = tokenStrideBytes;
        public readonly long HeadStrideBytes = headStrideBytes;
    }

    /// <param name="layers">validated host layers (see <see cref="LayoutValidator"/>); all share one model shape</param>
    public HostKvTransfer(IReadOnlyList<KvLayerLayout> layers)
    {
        if (layers.Count == 0) throw new ArgumentException("no layers");
        var first = layers[0];
        Shape = KvShape.Of(layers);
        _kvCount = first.KvCount;
        _rowBytes = first.TokenRowBytes;
        _headBytes = (long)first.HeadSize * first.ElemSize;
        _numHeads = first.NumKvHeads;
        _blockSize = first.BlockSize;
        _headsContiguous = layers.All(l => l.HeadsContiguous);
        _kvTogether = !_headsContiguous && _kvCount == 2 && layers.All(l => l.KvStride * l.ElemSize == _headBytes);
        _itemsPerLayer = _kvTogether ? 1 : _kvCount;
        _layers = layers.Select(l => new LayerPlan(
            (byte*)l.BaseAddress,
            l.KvStride * l.ElemSize,
            l.BlockStride * l.ElemSize,
            l.TokenStride * l.ElemSize,
            l.HeadStride * l.ElemSize)).ToArray();
    }

    public KvShape Shape { get; }

    public IHostMemoryAllocator? PoolAllocator => null;

    private long BytesPerToken => Shape.BytesPerToken;

    public Task<long> CopyAsync(TransferDirection direction, ReadOnlySpan<ChunkTransfer> chunks, ReadOnlySpan<long> slotMapping, nint stream) =>
        Task.FromResult(Copy(direction, chunks, slotMapping));

    /// <summary>Copies on the calling thread (spread over cores when large); returns the bytes moved.</summary>
    public long Copy(TransferDirection direction, ReadOnlySpan<ChunkTransfer> chunks, ReadOnlySpan<long> slotMapping)
    {
        if (chunks.Length == 0) return 0;
        int itemsPerChunk = _layers.Length * _itemsPerLayer;
        int items = chunks.Length * itemsPerChunk;

        long tokensToCopy = 0;
        foreach (var c in chunks)
            tokensToCopy += Math.Max(0, c.FirstToken + c.TokenCount - Math.Max(c.FirstToken, c.FirstTokenToCopy));

        long transferBytes = tokensToCopy * BytesPerToken;
        bool streaming = transferBytes >= BulkCopy.StreamingThresholdBytes && BulkCopy.StreamingSupported;

        // Cores are shared by every transfer in flight in the process: with N at once each takes
        // ProcessorCount / N workers (its own thread included), so that concurrent callers do not
        // oversubscribe the cores with N full-width Parallel.For loops that evict each other's
        // streams and wait on each other's workers.
        int inFlight = Interlocked.Increment(ref s_transfersInFlight);
        try
        {
            int workers = Math.Max(1, Environment.ProcessorCount / inFlight);
            fixed (long* slots = slotMapping)
            fixed (ChunkTransfer* chunkArray = chunks)
            {
                if (transferBytes < ParallelThresholdBytes || workers == 1)
                {
                    long copied = 0;
                    for (int item = 0; item < items; item++)
                        copied += CopyItem(direction, chunkArray, chunks.Length, slots, item, itemsPerChunk, streaming);
                    if (streaming) BulkCopy.Fence();
                    return copied;
                }

                // The pointers stay valid: the fixed scope outlives Parallel.For, which returns only when
                // every item is done. Each worker fences its own streaming stores before it reports.
                nint chunkPtr = (nint)chunkArray, slotPtr = (nint)slots;
                int chunkCount = chunks.Length;
                long total = 0;
                Parallel.For(0, items, new ParallelOptions { MaxDegreeOfParallelism = workers },
                    () => 0L,
                    (item, _, local) => local + CopyItem(direction, (ChunkTransfer*)chunkPtr, chunkCount, (long*)slotPtr, item, itemsPerChunk, streaming),
                    local =>
                    {
                        if (streaming) BulkCopy.Fence();
                        Interlocked.Add(ref total, local);
                    });
                return total;
            }
        }
        finally
        {
            Interlocked.Decrement(ref s_transfersInFlight);
        }
    }

    /// <summary>Item number → (chunk, layer, first kv) it copies; items run chunk-major, then layer, then kv.</summary>
    private (int Chunk, int Layer, int Kv) ItemCoordinates(int item, int itemsPerChunk)
    {
        int chunkIndex = item / itemsPerChunk;
        int rest = item - chunkIndex * itemsPerChunk;
        int layerIndex = rest / _itemsPerLayer;
        return (chunkIndex, layerIndex, rest - layerIndex * _itemsPerLayer);
    }

    /// <summary>Where <paramref name="slot"/>'s token row starts in a paged layer whose K (or V) part starts at <paramref name="pagedKvBase"/>.</summary>
    private byte* SlotAddress(byte* pagedKvBase, in LayerPlan layer, long slot)
    {
        long block = slot / _blockSize;
        return pagedKvBase + block * layer.BlockStrideBytes + (slot - block * _blockSize) * layer.TokenStrideBytes;
    }

    /// <summary>
    /// Where item <paramref name="item"/>'s first copied token lives on the side a copy reads
    /// (the paged layer for a gather, the chunk object for a scatter); null when there is no such
    /// item or it copies nothing. The previous item prefetches from here while it finishes, because
    /// Parallel.For hands each worker consecutive items.
    /// </summary>
    private byte* FirstSourceAddress(TransferDirection direction, ChunkTransfer* chunks, int chunkCount, long* slots, int item, int itemsPerChunk)
    {
        var (chunkIndex, layerIndex, kv) = ItemCoordinates(item, itemsPerChunk);
        if (chunkIndex >= chunkCount) return null;
        ChunkTransfer chunk = chunks[chunkIndex];
        for (int t = Math.Max(0, chunk.FirstTokenToCopy - chunk.FirstToken); t < chunk.TokenCount; t++)
        {
            long slot = slots[chunk.FirstToken + t];
            if (slot < 0) continue;
            if (direction == TransferDirection.Scatter)
                return (byte*)chunk.ChunkData + ((long)(kv * _layers.Length + layerIndex) * chunk.TokenCount + t) * _rowBytes;
            ref readonly LayerPlan layer = ref _layers[layerIndex];
            return SlotAddress(layer.Base + kv * layer.KvStrideBytes, layer, slot);
        }
        return null;
    }

    /// <summary>
    /// Copies one (chunk, layer, kv) item (both kv when K and V go together); returns the bytes moved.
    /// Streaming copies prefetch the next run's source (see <see cref="BulkCopy"/>): the next run of
    /// this item, or the first run of item + 1.
    /// </summary>
    private long CopyItem(TransferDirection direction, ChunkTransfer* chunks, int chunkCount, long* slots, int item, int itemsPerChunk, bool streaming)
    {
        var (chunkIndex, layerIndex, kv) = ItemCoordinates(item, itemsPerChunk); // kv: the item's first (0 when K and V go together)
        int kvInItem = _kvTogether ? _kvCount : 1;
        ChunkTransfer chunk = chunks[chunkIndex];
        ref readonly LayerPlan layer = ref _layers[layerIndex];
        // From K's rows to V's rows in the chunk object ([kv][layer][T][row]).
        long chunkKvStride = (long)_layers.Length * chunk.TokenCount * _rowBytes;

        byte* pagedKvBase = layer.Base + kv * layer.KvStrideBytes;
        // [kv][layer][T][row]: this item's rows start here.
        byte* chunkRows = (byte*)chunk.ChunkData + ((long)(kv * _layers.Length + layerIndex) * chunk.TokenCount) * _rowBytes;
        int firstLocal = Math.Max(0, chunk.FirstTokenToCopy - chunk.FirstToken);
        bool gather = direction == TransferDirection.Gather;
        byte* nextItemSource = streaming ? FirstSourceAddress(direction, chunks, chunkCount, slots, item + 1, itemsPerChunk) : null;
        long copied = 0;

        if (_headsContiguous)
        {
            // A token's row is contiguous on both sides; consecutive tokens in consecutive slots of a
            // block are contiguous too, so they are merged into one run. A run is copied when the
            // token that ends it is seen, so the next run's start is known and prefetched.
            byte* runPaged = null, runChunk = null;
            long runBytes = 0;
            for (int t = firstLocal; t < chunk.TokenCount; t++)
            {
                long slot = slots[chunk.FirstToken + t];
                if (slot < 0) continue;
                byte* paged = SlotAddress(pagedKvBase, layer, slot);
                byte* row = chunkRows + t * _rowBytes;
                if (runBytes > 0 && paged == runPaged + runBytes && row == runChunk + runBytes)
                {
                    runBytes += _rowBytes;
                    continue;
                }
                if (runBytes > 0) copied += Copy(gather, runPaged, runChunk, runBytes, streaming, gather ? paged : row);
                runPaged = paged;
                runChunk = row;
                runBytes = _rowBytes;
            }
            if (runBytes > 0) copied += Copy(gather, runPaged, runChunk, runBytes, streaming, nextItemSource);
            return copied;
        }

        // Heads apart (HND, packed): one head vector per copy. Tokens are taken in runs that sit in
        // consecutive slots of one block; each run is walked in the order its source side is laid
        // out, so reads stream front to back and only the (streaming) stores jump: head by head for a
        // gather from HND (the paged side keeps a head's tokens together), token by token for a
        // scatter (the chunk side keeps a token's heads together) and for layouts whose heads sit
        // closer than their tokens. Each head copy prefetches the same place in the next run. When K
        // and V go together (packed), each head vector's K and V are copied one after the other.
        bool headMajor = gather && layer.HeadStrideBytes > layer.TokenStrideBytes;
        int t0 = NextCopiedToken(chunk, slots, firstLocal);
        while (t0 < chunk.TokenCount)
        {
            long slot = slots[chunk.FirstToken + t0];
            long offset = slot % _blockSize;
            int run = 1;
            while (t0 + run < chunk.TokenCount && offset + run < _blockSize && slots[chunk.FirstToken + t0 + run] == slot + run) run++;
            int t1 = NextCopiedToken(chunk, slots, t0 + run);

            byte* pagedRun = SlotAddress(pagedKvBase, layer, slot);
            byte* rowRun = chunkRows + t0 * _rowBytes;
            // The next run's source start, for the prefetches (null: none).
            byte* nextRun = nextItemSource;
            if (t1 < chunk.TokenCount)
                nextRun = gather ? SlotAddress(pagedKvBase, layer, slots[chunk.FirstToken + t1]) : chunkRows + t1 * _rowBytes;
            if (!streaming) nextRun = null;

            if (headMajor)
            {
                for (int h = 0; h < _numHeads; h++)
                {
                    for (int i = 0; i < run; i++)
                    {
                        for (int k = 0; k < kvInItem; k++)
                        {
                            long sourceOffset = h * layer.HeadStrideBytes + i * layer.TokenStrideBytes + k * layer.KvStrideBytes;
                            BulkCopy.CopySmall(pagedRun + sourceOffset, rowRun + k * chunkKvStride + i * _rowBytes + h * _headBytes, _headBytes,
                                streaming, nextRun == null ? null : nextRun + sourceOffset);
                        }
                    }
                }
            }
            else
            {
                for (int i = 0; i < run; i++)
                {
                    for (int h = 0; h < _numHeads; h++)
                    {
                        for (int k = 0; k < kvInItem; k++)
                        {
                            long pagedOffset = i * layer.TokenStrideBytes + h * layer.HeadStrideBytes + k * layer.KvStrideBytes;
                            long rowOffset = k * chunkKvStride + i * _rowBytes + h * _headBytes;
                            if (gather)
                                BulkCopy.CopySmall(pagedRun + pagedOffset, rowRun + rowOffset, _headBytes, streaming,
                                    nextRun == null ? null : nextRun + pagedOffset);
                            else
                                BulkCopy.CopySmall(rowRun + rowOffset, pagedRun + pagedOffset, _headBytes, streaming,
                                    nextRun == null ? null : nextRun + rowOffset);
                        }
                    }
                }
            }
            copied += (long)run * _numHeads * _headBytes * kvInItem;
            t0 = t1;
        }
        return copied;
    }

    /// <summary>The first local token at or after <paramref name="t"/> that has a slot (not -1); the chunk's token count when none.</summary>
    private static int NextCopiedToken(in ChunkTransfer chunk, long* slots, int t)
    {
        while (t < chunk.TokenCount && slots[chunk.FirstToken + t] < 0) t++;
        return t;
    }

    private static long Copy(bool gather, byte* paged, byte* chunk, long bytes, bool streaming, byte* prefetch)
    {
        if (gather) BulkCopy.Copy(paged, chunk, bytes, streaming, prefetch);
        else BulkCopy.Copy(chunk, paged, bytes, streaming, prefetch);
        return bytes;
    }

    /// <summary>Nothing to release: the layers belong to the caller.</summary>
    public void Dispose()
    {
    }
}
