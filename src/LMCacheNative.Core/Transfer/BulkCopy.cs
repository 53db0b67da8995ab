using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LMCacheNative.Core.Transfer;

/// <summary>
/// Memory copies for the gather/scatter hot path.
///
/// Why streaming stores: a transfer of a long request (hundreds of MiB) is far larger than the
/// caches, and ordinary stores first read every destination line (read-for-ownership), moving 3
/// bytes over the memory bus for each byte copied. glibc's memcpy switches to non-temporal stores
/// for copies this large, so without them the gather runs at about 2/3 of memcpy's speed. Small
/// transfers use ordinary stores: their data is read again soon and should stay in cache.
/// </summary>
internal static unsafe class BulkCopy
{
    /// <summary>Transfers at least this large use non-temporal stores.</summary>
    public const long StreamingThresholdBytes = 8L << 20;

    /// <summary>Runs shorter than this are copied with ordinary stores even when streaming: the alignment prologue would dominate.</summary>
    private const long MinStreamingRunBytes = 256;

    public static bool StreamingSupported => Avx.IsSupported;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Copy(byte* source, byte* destination, long bytes, bool streaming)
    {
        if (streaming && bytes >= MinStreamingRunBytes && Avx.IsSupported) CopyStreaming(source, destination, bytes);
        else Buffer.MemoryCopy(source, destination, bytes, bytes);
    }

    /// <summary>
    /// One head vector (tens to hundreds of bytes): inlined 32-byte vector moves when the length
    /// allows, so the per-copy cost stays small next to the bytes moved; streaming stores when asked
    /// and the destination is 32-byte aligned.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void CopySmall(byte* source, byte* destination, long bytes, bool streaming)
    {
        if (!Avx.IsSupported || (bytes & 31) != 0 || bytes > 4096)
        {
            Copy(source, destination, bytes, streaming);
            return;
        }
        if (streaming && ((long)destination & 31) == 0)
        {
            for (long i = 0; i < bytes; i += 32)
                Avx.StoreAlignedNonTemporal(destination + i, Avx.LoadVector256(source + i));
        }
        else
        {
            for (long i = 0; i < bytes; i += 32)
                Avx.Store(destination + i, Avx.LoadVector256(source + i));
        }
    }

    /// <summary>Makes the streaming stores of this thread globally visible; call once when a streaming transfer is done.</summary>
    public static void Fence()
    {
        if (Sse.IsSupported) Sse.StoreFence();
    }

    private static void CopyStreaming(byte* source, byte* destination, long bytes)
    {
        // Ordinary stores up to the first 32-byte boundary of the destination, 32-byte streaming
        // stores (4 per iteration) after it, ordinary stores for the tail. Loads may be unaligned.
        long head = (32 - ((long)destination & 31)) & 31;
        if (head > 0)
        {
            Buffer.MemoryCopy(source, destination, head, head);
            source += head;
            destination += head;
            bytes -= head;
        }
        while (bytes >= 128)
        {
            var a = Avx.LoadVector256(source);
            var b = Avx.LoadVector256(source + 32);
            var c = Avx.LoadVector256(source + 64);
            var d = Avx.LoadVector256(source + 96);
            Avx.StoreAlignedNonTemporal(destination, a);
            Avx.StoreAlignedNonTemporal(destination + 32, b);
            Avx.StoreAlignedNonTemporal(destination + 64, c);
            Avx.StoreAlignedNonTemporal(destination + 96, d);
            source += 128;
            destination += 128;
            bytes -= 128;
        }
        while (bytes >= 32)
        {
            Avx.StoreAlignedNonTemporal(destination, Avx.LoadVector256(source));
            source += 32;
            destination += 32;
            bytes -= 32;
        }
        if (bytes > 0) Buffer.MemoryCopy(source, destination, bytes, bytes);
    }
}
