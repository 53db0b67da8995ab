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

    // SSE2 is part of the x86-64 baseline that NativeAOT compiles for, so these paths exist in the
    // shipped library (an Avx.IsSupported check is compiled as false there). 16-byte streaming
    // stores fill the write-combining buffers as well as wider ones for a memory-bound copy.
    public static bool StreamingSupported => Sse2.IsSupported;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Copy(byte* source, byte* destination, long bytes, bool streaming)
    {
        if (streaming && bytes >= MinStreamingRunBytes && Sse2.IsSupported) CopyStreaming(source, destination, bytes);
        else Buffer.MemoryCopy(source, destination, bytes, bytes);
    }

    /// <summary>
    /// One head vector (tens to hundreds of bytes): inlined 16-byte vector moves when the length
    /// allows, so the per-copy cost stays small next to the bytes moved; streaming stores when asked
    /// and the destination is 16-byte aligned.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void CopySmall(byte* source, byte* destination, long bytes, bool streaming)
    {
        if (!Sse2.IsSupported || (bytes & 15) != 0 || bytes > 4096)
        {
            Copy(source, destination, bytes, streaming);
            return;
        }
        if (streaming && ((long)destination & 15) == 0)
        {
            for (long i = 0; i < bytes; i += 16)
                Sse2.StoreAlignedNonTemporal(destination + i, Sse2.LoadVector128(source + i));
        }
        else
        {
            for (long i = 0; i < bytes; i += 16)
                Sse2.Store(destination + i, Sse2.LoadVector128(source + i));
        }
    }

    /// <summary>Makes the streaming stores of this thread globally visible; call once when a streaming transfer is done.</summary>
    public static void Fence()
    {
        if (Sse.IsSupported) Sse.StoreFence();
    }

    private static void CopyStreaming(byte* source, byte* destination, long bytes)
    {
        // Ordinary stores up to the first 16-byte boundary of the destination, 16-byte streaming
        // stores (8 per iteration, two cache lines) after it, ordinary stores for the tail. Loads
        // may be unaligned.
        long head = (16 - ((long)destination & 15)) & 15;
        if (head > 0)
        {
            Buffer.MemoryCopy(source, destination, head, head);
            source += head;
            destination += head;
            bytes -= head;
        }
        while (bytes >= 128)
        {
            var a = Sse2.LoadVector128(source);
            var b = Sse2.LoadVector128(source + 16);
            var c = Sse2.LoadVector128(source + 32);
            var d = Sse2.LoadVector128(source + 48);
            var e = Sse2.LoadVector128(source + 64);
            var f = Sse2.LoadVector128(source + 80);
            var g = Sse2.LoadVector128(source + 96);
            var h = Sse2.LoadVector128(source + 112);
            Sse2.StoreAlignedNonTemporal(destination, a);
            Sse2.StoreAlignedNonTemporal(destination + 16, b);
            Sse2.StoreAlignedNonTemporal(destination + 32, c);
            Sse2.StoreAlignedNonTemporal(destination + 48, d);
            Sse2.StoreAlignedNonTemporal(destination + 64, e);
            Sse2.StoreAlignedNonTemporal(destination + 80, f);
            Sse2.StoreAlignedNonTemporal(destination + 96, g);
            Sse2.StoreAlignedNonTemporal(destination + 112, h);
            source += 128;
            destination += 128;
            bytes -= 128;
        }
        while (bytes >= 16)
        {
            Sse2.StoreAlignedNonTemporal(destination, Sse2.LoadVector128(source));
            source += 16;
            destination += 16;
            bytes -= 16;
        }
        if (bytes > 0) Buffer.MemoryCopy(source, destination, bytes, bytes);
    }
}
