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
}
