using LMCacheNative.Core.Transfer;
using NUnit.Framework;

namespace LMCacheNative.Core.Tests;

public class BulkCopyTests
{
    /// <summary>Streaming copies handle any source/destination misalignment and any length, and write nothing outside the range.</summary>
    [Test]
    public unsafe void Copy_IsExact_ForEveryAlignmentAndLength([Values] bool streaming, [Values] bool small)
    {
        var random = new Random(3);
        byte[] source = new byte[4096];
        random.NextBytes(source);
        foreach (int length in new[] { 0, 1, 31, 32, 64, 127, 128, 255, 256, 257, 512, 1000, 2048, 3000 })
            for (int sourceOffset = 0; sourceOffset < 40; sourceOffset += 13)
                for (int destinationOffset = 0; destinationOffset < 40; destinationOffset += 7)
                {
                    byte[] destination = Enumerable.Repeat((byte)0xEE, 4096).ToArray();
                    fixed (byte* s = source)
                    fixed (byte* d = destination)
                    {
                        if (small) BulkCopy.CopySmall(s + sourceOffset, d + destinationOffset, length, streaming);
                        else BulkCopy.Copy(s + sourceOffset, d + destinationOffset, length, streaming);
                        BulkCopy.Fence();
                    }
                    byte[] expected = Enumerable.Repeat((byte)0xEE, 4096).ToArray();
                    Array.Copy(source, sourceOffset, expected, destinationOffset, length);
                    Assert.That(destination, Is.EqualTo(expected), $"length {length}, offsets {sourceOffset}/{destinationOffset}");
                }
    }

    /// <summary>
    /// Each streaming width on its own (the shipped NativeAOT library takes the 16-byte one, a JIT
    /// host or a build for a newer instruction set the wider ones): exact for every alignment and
    /// length, with and without a prefetch stream, guard bytes on both sides of the destination untouched.
    /// </summary>
    [Test]
    public unsafe void StreamingVariant_IsExact_AndWritesOnlyItsRange([Values(16, 32, 64)] int vectorBytes, [Values] bool withPrefetch)
    {
        bool supported = vectorBytes switch
        {
            64 => System.Runtime.Intrinsics.X86.Avx512F.IsSupported,
            32 => System.Runtime.Intrinsics.X86.Avx.IsSupported,
            _ => System.Runtime.Intrinsics.X86.Sse2.IsSupported,
        };
        if (!supported) Assert.Ignore($"this CPU has no {vectorBytes * 8}-bit vector stores");
        var random = new Random(vectorBytes);
        byte[] source = new byte[8192];
        random.NextBytes(source);
        // A short "next run" for the prefetch stream: copies of up to 4 KiB prefetch past its end.
        byte[] nextRun = new byte[256];
        random.NextBytes(nextRun);
        byte[] nextRunBefore = (byte[])nextRun.Clone();
        foreach (int length in new[] { 0, 1, 15, 16, 63, 64, 65, 128, 144, 255, 256, 300, 1024, 4095, 4096 })
            for (int sourceOffset = 0; sourceOffset < 70; sourceOffset += 23)
                for (int destinationOffset = 0; destinationOffset < 130; destinationOffset += 17)
                {
                    byte[] destination = Enumerable.Repeat((byte)0x5A, 8192).ToArray();
                    fixed (byte* s = source)
                    fixed (byte* d = destination)
                    fixed (byte* n = nextRun)
                    {
                        byte* from = s + sourceOffset, to = d + 64 + destinationOffset;
                        // The prefetch stream may run past the next run's end: prefetches never fault.
                        byte* prefetch = withPrefetch ? n + sourceOffset : null;
                        if (vectorBytes == 64) BulkCopy.CopyStreaming512(from, to, length, prefetch);
                        else if (vectorBytes == 32) BulkCopy.CopyStreaming256(from, to, length, prefetch);
                        else BulkCopy.CopyStreaming128(from, to, length, prefetch);
                        BulkCopy.Fence();
                    }
                    byte[] expected = Enumerable.Repeat((byte)0x5A, 8192).ToArray();
                    Array.Copy(source, sourceOffset, expected, 64 + destinationOffset, length);
                    Assert.That(destination, Is.EqualTo(expected), $"length {length}, offsets {sourceOffset}/{destinationOffset}");
                    Assert.That(nextRun, Is.EqualTo(nextRunBefore), "the prefetched run is only read");
                }
    }
}
