namespace LMCacheNative.Core.Layout;

/// <summary>
/// Checks layer descriptions before the engine ever dereferences them: sizes, strides that address
/// every element exactly once, alignment, bounds within the declared span, and overlap between
/// layers. Every refusal names the layer and the field, because the caller usually built the
/// description from a tensor's strides and needs to know which one is off.
/// </summary>
public static class LayoutValidator
{
    public static readonly int[] SupportedElemSizes = [1, 2, 4];

    /// <summary>Validates all layers; throws <see cref="LmcException"/> (invalid argument) on the first problem.</summary>
    public static void Validate(IReadOnlyList<KvLayerLayout> layers)
    {
        if (layers.Count == 0) throw LmcException.InvalidArgument("register_layers: at least one layer is required");
        for (int i = 0; i < layers.Count; i++) ValidateLayer(i, layers[i]);

        var first = layers[0];
        for (int i = 1; i < layers.Count; i++)
        {
            var layer = layers[i];
            if (layer.ModelShape != first.ModelShape)
                throw LmcException.InvalidArgument(
                    $"layer {i}: {ShapeMismatch(first, layer)} differs from layer 0; all layers of one engine must share device, " +
                    "elem_size, kv_count, num_blocks, block_size, num_kv_heads and head_size");
        }
        CheckOverlap(layers);
    }

    private static string ShapeMismatch(KvLayerLayout a, KvLayerLayout b) =>
        a.Device != b.Device ? "device_kind" :
        a.DeviceIndex != b.DeviceIndex ? "device_index" :
        a.ElemSize != b.ElemSize ? "elem_size" :
        a.KvCount != b.KvCount ? "kv_count" :
        a.NumBlocks != b.NumBlocks ? "num_blocks" :
        a.BlockSize != b.BlockSize ? "block_size" :
        a.NumKvHeads != b.NumKvHeads ? "num_kv_heads" : "head_size";

    private static void ValidateLayer(int index, KvLayerLayout l)
    {
        string where = $"layer {index}";
        if (l.Device is not (DeviceKind.Host or DeviceKind.Cuda))
            throw LmcException.InvalidArgument($"{where}: device_kind {(int)l.Device} is not LMC_DEVICE_HOST (0) or LMC_DEVICE_CUDA (1)");
        if (l.Device == DeviceKind.Host && l.DeviceIndex != 0)
            throw LmcException.InvalidArgument($"{where}: device_index must be 0 for host memory, got {l.DeviceIndex}");
        if (l.DeviceIndex < 0) throw LmcException.InvalidArgument($"{where}: device_index must be >= 0, got {l.DeviceIndex}");
        if (Array.IndexOf(SupportedElemSizes, l.ElemSize) < 0)
            throw LmcException.InvalidArgument($"{where}: elem_size must be 1, 2 or 4 bytes, got {l.ElemSize}");
        if (l.KvCount is not (1 or 2)) throw LmcException.InvalidArgument($"{where}: kv_count must be 2 (K and V) or 1 (MLA), got {l.KvCount}");
        Positive(where, "num_blocks", l.NumBlocks);
        Positive(where, "block_size", l.BlockSize);
        Positive(where, "num_kv_heads", l.NumKvHeads);
        Positive(where, "head_size", l.HeadSize);
        if (l.BaseAddress == 0) throw LmcException.InvalidArgument($"{where}: base_address is NULL");
        if (l.BaseAddress % (ulong)l.ElemSize != 0)
            throw LmcException.InvalidArgument($"{where}: base_address 0x{l.BaseAddress:x} is not aligned to elem_size {l.ElemSize}");

        // Dimensions whose extent is 1 are never stepped along, so their stride is irrelevant (torch
        // reports arbitrary strides for them).
        var dims = new List<(string Name, long Extent, long Stride)>(4);
        AddDim(dims, where, "kv_stride", l.KvCount, l.KvStride);
        AddDim(dims, where, "block_stride", l.NumBlocks, l.BlockStride);
        AddDim(dims, where, "token_stride", l.BlockSize, l.TokenStride);
        AddDim(dims, where, "head_stride", l.NumKvHeads, l.HeadStride);

        // Sorted by stride, each dimension must step over everything the smaller ones cover: then
        // every (kv, block, token, head, d) has its own element and no two alias. The head
        // dimension d is the innermost run of head_size elements.
        dims.Sort((a, b) => a.Stride.CompareTo(b.Stride));
        Int128 covered = l.HeadSize;
        string coveredBy = "head_size";
        foreach (var (name, extent, stride) in dims)
        {
            if (stride < covered)
                throw LmcException.InvalidArgument(
                    $"{where}: {name} ({stride}) and {coveredBy} make elements overlap: a stride must be at least the {covered} elements " +
                    "spanned by all smaller-strided dimensions together; check the strides of the tensor");
            covered = stride * (Int128)(extent - 1) + covered;
            coveredBy = coveredBy == "head_size" ? $"{name} (x {extent})" : $"{coveredBy}, {name} (x {extent})";
        }

        Int128 extentBytes = covered * l.ElemSize;
        if (extentBytes > l.SpanBytes)
            throw LmcException.InvalidArgument(
                $"{where}: the layout addresses {extentBytes} bytes from base_address but span_bytes is {l.SpanBytes}");
        if ((Int128)l.BaseAddress + extentBytes > ulong.MaxValue)
            throw LmcException.InvalidArgument($"{where}: base_address + extent overflows the address space");
    }

    private static void Positive(string where, string field, int value)
    {
        if (value < 1) throw LmcException.InvalidArgument($"{where}: {field} must be >= 1, got {value}");
    }

    private static void AddDim(List<(string, long, long)> dims, string where, string name, long extent, long stride)
    {
        if (extent <= 1) return;
        if (stride <= 0) throw LmcException.InvalidArgument($"{where}: {name} must be > 0, got {stride}");
        dims.Add((name, extent, stride));
    }

    /// <summary>
    /// Two layers may share memory only by describing exactly the same elements (vLLM's KV sharing
    /// hands several layer names one tensor); any other common element is refused, since a store
    /// into one would silently corrupt the other.
    /// </summary>
    private static void CheckOverlap(IReadOnlyList<KvLayerLayout> layers)
    {
        var ranges = new (ulong Start, ulong End, int Index)[layers.Count];
        for (int i = 0; i < layers.Count; i++)
            ranges[i] = (layers[i].BaseAddress, layers[i].BaseAddress + (ulong)ExtentBytes(layers[i]), i);
        Array.Sort(ranges, (a, b) => a.Start.CompareTo(b.Start));
        for (int i = 0; i < ranges.Length; i++)
        {
            for (int j = i + 1; j < ranges.Length && ranges[j].Start < ranges[i].End; j++)
            {
                var a = layers[ranges[i].Index];
                var b = layers[ranges[j].Index];
                if (!SameElements(a, b) && ShareAnElement(a, b))
                    throw LmcException.InvalidArgument(
                        $"layer {Math.Max(ranges[i].Index, ranges[j].Index)}: overlaps layer {Math.Min(ranges[i].Index, ranges[j].Index)} " +
                        "without describing the same memory (layers may share a tensor only as identical descriptions)");
            }
        }
    }

    /// <summary>Bytes from the base address to one past the last addressed element.</summary>
    public static long ExtentBytes(KvLayerLayout l)
    {
        long last = (l.KvCount > 1 ? (l.KvCount - 1) * l.KvStride : 0)
                    + (l.NumBlocks > 1 ? (l.NumBlocks - 1) * l.BlockStride : 0)
                    + (l.BlockSize > 1 ? (l.BlockSize - 1) * l.TokenStride : 0)
                    + (l.NumKvHeads > 1 ? (l.NumKvHeads - 1) * l.HeadStride : 0)
                    + l.HeadSize;
        return last * l.ElemSize;
    }

    /// <summary>
    /// Whether two layers address a common byte. Layers interleaved in one tensor (vLLM's
    /// cross-layer <c>[B, L, 2, N, H, D]</c>, registered as per-layer views) have intersecting
    /// address ranges but disjoint elements. For layers with the same shape and strides this is
    /// decided exactly: the base distance must be a difference of two addresses within the layout.
    /// Because every valid layout nests (each stride exceeds everything the smaller strides span),
    /// such a difference decomposes stride by stride with at most two choices per dimension.
    /// Layers with different strides are refused on intersecting ranges alone.
    /// </summary>
    private static bool ShareAnElement(KvLayerLayout a, KvLayerLayout b)
    {
        if (!SameStrides(a, b)) return true;
        var dims = new List<(long Stride, long Extent)>(4);
        foreach (var (extent, stride) in new[] { ((long)a.KvCount, a.KvStride), (a.NumBlocks, a.BlockStride), (a.BlockSize, a.TokenStride), (a.NumKvHeads, a.HeadStride) })
            if (extent > 1) dims.Add((stride * a.ElemSize, extent));
        dims.Sort((x, y) => y.Stride.CompareTo(x.Stride));
        long distance = (long)(b.BaseAddress - a.BaseAddress);
        return Reachable(distance, dims, 0, (long)a.HeadSize * a.ElemSize);
    }

    /// <summary>Whether <paramref name="distance"/> = sum(delta_k * stride_k) + e with |delta_k| &lt; extent_k and |e| &lt; innerBytes.</summary>
    private static bool Reachable(long distance, List<(long Stride, long Extent)> dims, int level, long innerBytes)
    {
        if (level == dims.Count) return Math.Abs(distance) < innerBytes;
        var (stride, extent) = dims[level];
        long floor = Math.DivRem(distance, stride, out long remainder);
        if (remainder < 0) floor--;
        for (long delta = floor; delta <= floor + 1; delta++)
            if (Math.Abs(delta) <= extent - 1 && Reachable(distance - delta * stride, dims, level + 1, innerBytes))
                return true;
        return false;
    }

    private static bool SameStrides(KvLayerLayout a, KvLayerLayout b) =>
        a.ModelShape == b.ModelShape
        && (a.KvCount == 1 || a.KvStride == b.KvStride)
        && (a.NumBlocks == 1 || a.BlockStride == b.BlockStride)
        && (a.BlockSize == 1 || a.TokenStride == b.TokenStride)
        && (a.NumKvHeads == 1 || a.HeadStride == b.HeadStride);

    private static bool SameElements(KvLayerLayout a, KvLayerLayout b) => a.BaseAddress == b.BaseAddress && SameStrides(a, b);
}
