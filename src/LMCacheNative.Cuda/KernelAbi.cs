using System.Runtime.InteropServices;

namespace LMCacheNative.Cuda;

// C# mirrors of kernels/lmc_kernel_abi.h. Field order, types and sizes must match the C structs
// exactly: the layer table and the chunk table are copied to the device byte for byte, and KParams is
// the kernels' by-value parameter. Pinned by KernelAbiTests (sizes and offsets against the header).

/// <summary>lmc_k_layer (40 bytes): one registered layer, byte strides.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct KLayer
{
    public ulong Base;
    public long KvStride;
    public long BlockStride;
    public long TokenStride;
    public long HeadStride;

    public const int Size = 40;
}

/// <summary>lmc_k_chunk (16 bytes): one chunk object of a transfer.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct KChunk
{
    public ulong Data;
    public int FirstToken;
    public int TokenCount;

    public const int Size = 16;
}

/// <summary>lmc_k_params (80 bytes): the kernels' single by-value parameter.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct KParams
{
    public ulong Layers;
    public ulong Chunks;
    public ulong Slots;
    public long SlotBase;
    public long FirstTokenToWrite;
    public long RowBytes;
    public long SegBytes;
    public int NumLayers;
    public int KvCount;
    public int BlockSize;
    public int ChunkTokens;
    public int SegsPerRow;
    public int UnitsPerSeg;

    public const int Size = 80;
}

/// <summary>The launch rules of lmc_kernel_abi.h and the kernel names of kv_transfer.cuh.</summary>
internal static class KernelAbi
{
    /// <summary>Vector widths the fatbin has kernels for, widest first.</summary>
    public static readonly int[] VectorWidths = [16, 8, 4, 2, 1];

    /// <summary>lmc_k_vector_width: the largest power of two &lt;= 16 dividing every value OR-ed into <paramref name="bits"/>.</summary>
    public static int VectorWidth(ulong bits) =>
        (bits & 15) == 0 ? 16 : (bits & 7) == 0 ? 8 : (bits & 3) == 0 ? 4 : (bits & 1) == 0 ? 2 : 1;

    /// <summary>lmc_k_block_threads: whole warps, 32..128.</summary>
    public static int BlockThreads(long units) => (int)(Math.Clamp((units + 31) / 32, 1, 4) * 32);

    /// <summary>extern "C" name of the kernel for a direction and vector width (LMC_KV_TRANSFER_KERNELS).</summary>
    public static string KernelName(bool gather, int vectorWidth) => $"lmc_kv_{(gather ? "gather" : "scatter")}_v{vectorWidth}";

    /// <summary>Every kernel name the fatbin must hold.</summary>
    public static IEnumerable<string> AllKernelNames() =>
        new[] { true, false }.SelectMany(g => VectorWidths.Select(v => KernelName(g, v)));

    /// <summary>Logical name of the embedded fatbin (kernels/prebuilt/lmc_kernels.fatbin).</summary>
    public const string FatbinResourceName = "lmc_kernels.fatbin";

    /// <summary>The embedded kernel image, or null when this build has none.</summary>
    public static byte[]? LoadFatbin()
    {
        using var stream = typeof(KernelAbi).Assembly.GetManifestResourceStream(FatbinResourceName);
        if (stream is null) return null;
        var image = new byte[stream.Length];
        stream.ReadExactly(image);
        return image;
    }
}
