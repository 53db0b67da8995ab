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
///
/// Why the widest vector: a streaming store that covers a whole 64-byte line (AVX-512) leaves the
/// write-combining buffer full at once; narrower ones need 2 (AVX) or 4 (SSE2) stores per line,
/// and when a layout interleaves many short runs (HND: one 256-byte head per run, eight heads 4 KiB
/// apart) partly filled buffers can be flushed as partial writes. In a C model of the HND scatter
/// (scripts/copy_reference.c) on the development VM (AMD EPYC, 2 cores, quiet) 64-byte streaming
/// stores ran at 37 GB/s, 16-byte ones at 31 GB/s, ordinary stores at 19 GB/s.
///
/// Why a prefetch stream: a gather reads one run (a block's rows, or one head vector) at a random
/// address, then jumps. The hardware prefetchers learn a stream only after a few misses and stop at
/// every 4 KiB page, so each run starts with the core waiting on memory; the stores, streaming, never
/// wait. Each streaming copy therefore takes a second address, where the caller's NEXT run starts,
/// and touches it one cache line per line copied (prefetcht0, SSE: in the baseline instruction set),
/// so the next run is in cache when its copy begins. In the C model on the development VM (2 cores,
/// 128-256 MiB; scripts/copy_reference.c, table in docs/performance.md) that made the SSE2 gathers
/// 30-80 % faster, bf16 and fp8, NHD and HND (in one run: NHD bf16 0.78 -> 1.06x a memcpy, fp8
/// 0.88 -> 1.39x; HND bf16 0.72 -> 0.93x, fp8 0.72 -> 1.21x).
/// </summary>
internal static unsafe class BulkCopy
{
    /// <summary>Transfers at least this large use non-temporal stores.</summary>
    public const long StreamingThresholdBytes = 8L << 20;

    /// <summary>
    /// Runs shorter than this are copied with ordinary stores even when streaming: a run must cover
    /// at least one whole cache line after aligning the destination, or the partial line costs a
    /// read-for-ownership anyway. 128 bytes admits an fp8 head (128 x 1 byte) at 64-byte alignment.
    /// </summary>
    private const long MinStreamingRunBytes = 128;

    // SSE2 is part of the x86-64 baseline that NativeAOT compiles for by default; there the AVX and
    // AVX-512 checks below are constants (false) and the library copies with SSE2. A library built
    // for a newer CPU (LMC_ILC_INSTRUCTION_SET=x86-64-v4 ./build.sh) takes the wider paths, and so
    // does code run by the JIT (the unit tests), which answers the checks from the CPU it runs on.
    public static bool StreamingSupported => Sse2.IsSupported;

    /// <summary>The vector width the streaming path uses on this CPU, in bytes (for the benchmark's description).</summary>
    public static int StreamingVectorBytes => Avx512F.IsSupported ? 64 : Avx.IsSupported ? 32 : Sse2.IsSupported ? 16 : 0;

    /// <param name="prefetch">where the caller's next run starts (streaming only): the line at the same
    /// offset from it as each line copied is prefetched; null prefetches nothing</param>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Copy(byte* source, byte* destination, long bytes, bool streaming, byte* prefetch = null)
    {
        if (streaming && bytes >= MinStreamingRunBytes && Sse2.IsSupported) CopyStreaming(source, destination, bytes, prefetch);
        else Buffer.MemoryCopy(source, destination, bytes, bytes);
    }

    /// <summary>
    /// One head vector (tens to hundreds of bytes), inlined so that the per-copy cost stays small next
    /// to the bytes moved: streaming stores of whole lines when streaming and the vector is whole
    /// lines at a line-aligned destination (with the prefetch stream); else 16-byte vector moves when
    /// the length allows; else <see cref="Copy"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void CopySmall(byte* source, byte* destination, long bytes, bool streaming, byte* prefetch = null)
    {
        if (streaming && Sse2.IsSupported && (bytes & 63) == 0 && bytes <= 4096 && ((nint)destination & 63) == 0)
        {
            // The common head vector (128 or 256 bytes, whole lines at line-aligned addresses): inline,
            // with no call and no alignment prologue, which cost as much as the copy itself for an
            // fp8 head.
            byte* ahead = PrefetchStart(source, prefetch);
            for (long i = 0; i < bytes; i += 64)
            {
                Sse.Prefetch0(ahead + i);
                var a = Sse2.LoadVector128(source + i);
                var b = Sse2.LoadVector128(source + i + 16);
                var c = Sse2.LoadVector128(source + i + 32);
                var d = Sse2.LoadVector128(source + i + 48);
                Sse2.StoreAlignedNonTemporal(destination + i, a);
                Sse2.StoreAlignedNonTemporal(destination + i + 16, b);
                Sse2.StoreAlignedNonTemporal(destination + i + 32, c);
                Sse2.StoreAlignedNonTemporal(destination + i + 48, d);
            }
            return;
        }
        if (!Sse2.IsSupported || (bytes & 15) != 0 || bytes > 4096 || (streaming && bytes >= MinStreamingRunBytes))
        {
            Copy(source, destination, bytes, streaming, prefetch);
            return;
        }
        for (long i = 0; i < bytes; i += 16)
            Sse2.Store(destination + i, Sse2.LoadVector128(source + i));
    }

    /// <summary>Makes the streaming stores of this thread globally visible; call once when a streaming transfer is done.</summary>
    public static void Fence()
    {
        if (Sse.IsSupported) Sse.StoreFence();
    }

    private static void CopyStreaming(byte* source, byte* destination, long bytes, byte* prefetch)
    {
        if (Avx512F.IsSupported) CopyStreaming512(source, destination, bytes, prefetch);
        else if (Avx.IsSupported) CopyStreaming256(source, destination, bytes, prefetch);
        else CopyStreaming128(source, destination, bytes, prefetch);
    }

    /// <summary>
    /// Ordinary stores up to the destination's next <paramref name="alignment"/> boundary; advances the
    /// pointers (the prefetch stream by as much, so that it keeps its offset to the source).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AlignDestination(ref byte* source, ref byte* destination, ref long bytes, ref byte* prefetch, long alignment)
    {
        long head = (alignment - ((long)destination & (alignment - 1))) & (alignment - 1);
        if (head == 0) return;
        head = Math.Min(head, bytes);
        Buffer.MemoryCopy(source, destination, head, head);
        source += head;
        destination += head;
        prefetch += head;
        bytes -= head;
    }

    /// <summary>
    /// The prefetch stream's start: <paramref name="prefetch"/>, or the source itself when there is none
    /// (a line about to be loaded anyway: one wasted instruction per line instead of a branch).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static byte* PrefetchStart(byte* source, byte* prefetch) => prefetch != null ? prefetch : source;

    // Each variant: ordinary stores up to the first aligned destination address, aligned streaming
    // stores of whole vectors after it (loads may be unaligned), ordinary stores for the tail; one
    // prefetch per 64-byte line copied (prefetches never fault, so the stream may run past the
    // caller's next run).

    internal static void CopyStreaming512(byte* source, byte* destination, long bytes, byte* prefetch = null)
    {
        prefetch = PrefetchStart(source, prefetch);
        AlignDestination(ref source, ref destination, ref bytes, ref prefetch, 64);
        while (bytes >= 256)
        {
            Sse.Prefetch0(prefetch);
            Sse.Prefetch0(prefetch + 64);
            Sse.Prefetch0(prefetch + 128);
            Sse.Prefetch0(prefetch + 192);
            var a = Avx512F.LoadVector512(source);
            var b = Avx512F.LoadVector512(source + 64);
            var c = Avx512F.LoadVector512(source + 128);
            var d = Avx512F.LoadVector512(source + 192);
            Avx512F.StoreAlignedNonTemporal(destination, a);
            Avx512F.StoreAlignedNonTemporal(destination + 64, b);
            Avx512F.StoreAlignedNonTemporal(destination + 128, c);
            Avx512F.StoreAlignedNonTemporal(destination + 192, d);
            source += 256;
            destination += 256;
            prefetch += 256;
            bytes -= 256;
        }
        while (bytes >= 64)
        {
            Sse.Prefetch0(prefetch);
            Avx512F.StoreAlignedNonTemporal(destination, Avx512F.LoadVector512(source));
            prefetch += 64;
            source += 64;
            destination += 64;
            bytes -= 64;
        }
        if (bytes > 0) Buffer.MemoryCopy(source, destination, bytes, bytes);
    }

    internal static void CopyStreaming256(byte* source, byte* destination, long bytes, byte* prefetch = null)
    {
        prefetch = PrefetchStart(source, prefetch);
        AlignDestination(ref source, ref destination, ref bytes, ref prefetch, 32);
        while (bytes >= 128)
        {
            Sse.Prefetch0(prefetch);
            Sse.Prefetch0(prefetch + 64);
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
            prefetch += 128;
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

    internal static void CopyStreaming128(byte* source, byte* destination, long bytes, byte* prefetch = null)
    {
        prefetch = PrefetchStart(source, prefetch);
        AlignDestination(ref source, ref destination, ref bytes, ref prefetch, 16);
        while (bytes >= 128)
        {
            Sse.Prefetch0(prefetch);
            Sse.Prefetch0(prefetch + 64);
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
            prefetch += 128;
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
