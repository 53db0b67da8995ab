using System.Runtime.InteropServices;
using LMCacheNative.Core.Layout;

namespace LMCacheNative.Core.Tests;

/// <summary>The vLLM KV layouts the tests cover, by physical dimension order.</summary>
public enum TestLayout
{
    /// <summary>FlashAttention NHD [2, B, N, H, D].</summary>
    FlashNhd,
    /// <summary>FlashAttention HND: logical [2, B, N, H, D], physical [2, B, H, N, D] (also CPU SDPA's order).</summary>
    FlashHnd,
    /// <summary>Blocks-first NHD [B, 2, N, H, D] (FlashInfer, Triton).</summary>
    BlocksFirstNhd,
    /// <summary>Blocks-first HND, physical [B, 2, H, N, D].</summary>
    BlocksFirstHnd,
    /// <summary>Packed [B, H, N, 2D]: K = [..., :D], V = [..., D:].</summary>
    Packed,
    /// <summary>CPU SDPA [2, B, H, N, D].</summary>
    CpuSdpa,
    /// <summary>FlashAttention NHD with every block padded by 24 extra elements (a non-contiguous view).</summary>
    FlashNhdPadded,
}

internal enum Axis { Kv, Block, Token, Head, Dim }

/// <summary>
/// A paged KV cache for one layer in native memory, laid out as a vLLM backend would, with its own
/// address arithmetic (row-major over the physical dimension order) so tests can check the engine
/// against an independent model of where each element lives.
/// </summary>
public sealed unsafe class TestKvCache : IDisposable
{
    private readonly long[] _strideByAxis = new long[5];

    public TestKvCache(TestLayout layout, int numBlocks, int blockSize, int heads, int headSize, int elemSize, bool mla = false)
    {
        Layout = layout;
        NumBlocks = numBlocks;
        BlockSize = blockSize;
        Heads = mla ? 1 : heads;
        HeadSize = headSize;
        ElemSize = elemSize;
        KvCount = mla ? 1 : 2;

        (Axis Axis, int Size)[] order = mla
            ? [(Axis.Block, numBlocks), (Axis.Token, blockSize), (Axis.Kv, 1), (Axis.Head, 1), (Axis.Dim, headSize)]
            : layout switch
            {
                TestLayout.FlashNhd or TestLayout.FlashNhdPadded => [(Axis.Kv, 2), (Axis.Block, numBlocks), (Axis.Token, blockSize), (Axis.Head, heads), (Axis.Dim, headSize)],
                TestLayout.FlashHnd or TestLayout.CpuSdpa => [(Axis.Kv, 2), (Axis.Block, numBlocks), (Axis.Head, heads), (Axis.Token, blockSize), (Axis.Dim, headSize)],
                TestLayout.BlocksFirstNhd => [(Axis.Block, numBlocks), (Axis.Kv, 2), (Axis.Token, blockSize), (Axis.Head, heads), (Axis.Dim, headSize)],
                TestLayout.BlocksFirstHnd => [(Axis.Block, numBlocks), (Axis.Kv, 2), (Axis.Head, heads), (Axis.Token, blockSize), (Axis.Dim, headSize)],
                TestLayout.Packed => [(Axis.Block, numBlocks), (Axis.Head, heads), (Axis.Token, blockSize), (Axis.Kv, 2), (Axis.Dim, headSize)],
                _ => throw new ArgumentOutOfRangeException(nameof(layout)),
            };

        long stride = 1;
        for (int i = order.Length - 1; i >= 0; i--)
        {
            var (axis, size) = order[i];
            if (layout == TestLayout.FlashNhdPadded && axis == Axis.Block) stride += 24; // padding after each block
            _strideByAxis[(int)axis] = stride;
            stride *= size;
        }
        Elements = stride;
        Bytes = Elements * elemSize;
        Base = (byte*)NativeMemory.AlignedAlloc((nuint)Bytes, 64);
    }

    public TestLayout Layout { get; }
    public int NumBlocks { get; }
    public int BlockSize { get; }
    public int Heads { get; }
    public int HeadSize { get; }
    public int ElemSize { get; }
    public int KvCount { get; }
    public long Elements { get; }
    public long Bytes { get; }
    public byte* Base { get; private set; }
    public Span<byte> Memory => new(Base, checked((int)Bytes));

    public KvLayerLayout Describe() => new(
        DeviceKind.Host, 0, ElemSize, KvCount, NumBlocks, BlockSize, Heads, HeadSize,
        (ulong)Base, (ulong)Bytes,
        _strideByAxis[(int)Axis.Kv], _strideByAxis[(int)Axis.Block], _strideByAxis[(int)Axis.Token], _strideByAxis[(int)Axis.Head]);

    /// <summary>Bytes of one head's vector (kv, slot, head) in this cache.</summary>
    public Span<byte> HeadVector(int kv, long slot, int head)
    {
        long block = slot / BlockSize, token = slot % BlockSize;
        long element = kv * _strideByAxis[(int)Axis.Kv] + block * _strideByAxis[(int)Axis.Block]
                       + token * _strideByAxis[(int)Axis.Token] + head * _strideByAxis[(int)Axis.Head];
        return new Span<byte>(Base + element * ElemSize, HeadSize * ElemSize);
    }

    public void FillRandom(Random random) => random.NextBytes(Memory);

    public void Fill(byte value) => Memory.Fill(value);

    public void Dispose()
    {
        if (Base == null) return;
        NativeMemory.AlignedFree(Base);
        Base = null;
    }
}

/// <summary>Several layers of one layout, as an engine registers them.</summary>
public sealed class TestModelCache : IDisposable
{
    public TestModelCache(TestLayout layout, int layers, int numBlocks, int blockSize, int heads, int headSize, int elemSize, bool mla = false)
    {
        Layers = Enumerable.Range(0, layers).Select(_ => new TestKvCache(layout, numBlocks, blockSize, heads, headSize, elemSize, mla)).ToArray();
    }

    public TestKvCache[] Layers { get; }
    public KvLayerLayout[] Describe() => Layers.Select(l => l.Describe()).ToArray();
    public long NumSlots => (long)Layers[0].NumBlocks * Layers[0].BlockSize;
    public void FillRandom(int seed)
    {
        var random = new Random(seed);
        foreach (var layer in Layers) layer.FillRandom(random);
    }
    public void Fill(byte value)
    {
        foreach (var layer in Layers) layer.Fill(value);
    }
    public byte[][] Snapshot() => Layers.Select(l => l.Memory.ToArray()).ToArray();

    /// <summary>Copies every head vector of (source slot) into (destination slot) of <paramref name="expected"/>, a snapshot of this cache's layout.</summary>
    public void ExpectCopied(byte[][] expected, TestModelCache source, long sourceSlot, long destinationSlot)
    {
        for (int l = 0; l < Layers.Length; l++)
        {
            var dst = Layers[l];
            for (int kv = 0; kv < dst.KvCount; kv++)
                for (int h = 0; h < dst.Heads; h++)
                {
                    var from = source.Layers[l].HeadVector(kv, sourceSlot, h);
                    unsafe
                    {
                        long offset = (long)(Unsafe(dst.HeadVector(kv, destinationSlot, h)) - (nint)dst.Base);
                        from.CopyTo(expected[l].AsSpan((int)offset, from.Length));
                    }
                }
        }
    }

    /// <summary>
    /// Retrieves <paramref name="tokens"/> with <paramref name="engine"/> into a guard-filled cache of
    /// <paramref name="destinationLayout"/> (same shape as this one, which the engine stored from,
    /// using the same <paramref name="slots"/>), checks that exactly the first
    /// <paramref name="expectedTokens"/> tokens arrived bit-exact and nothing else changed, and
    /// registers this cache again. Returns the retrieved token count.
    /// </summary>
    public long RetrieveAndCheck(LMCacheNative.Core.Engine.CacheEngine engine, TestLayout destinationLayout, int[] tokens, long[] slots, long expectedTokens)
    {
        var first = Layers[0];
        using var destination = new TestModelCache(destinationLayout, Layers.Length, first.NumBlocks, first.BlockSize, first.Heads, first.HeadSize, first.ElemSize);
        destination.Fill(0xA5);
        engine.RegisterLayers(destination.Describe());
        var expected = destination.Snapshot();
        for (int t = 0; t < expectedTokens; t++) destination.ExpectCopied(expected, this, slots[t], slots[t]);
        long retrieved = engine.Retrieve(tokens, slots.AsSpan(0, tokens.Length), 0, default).TokensMatched;
        engine.RegisterLayers(Describe());
        NUnit.Framework.Assert.That(retrieved, NUnit.Framework.Is.EqualTo(expectedTokens));
        var actual = destination.Snapshot();
        for (int l = 0; l < actual.Length; l++)
            NUnit.Framework.Assert.That(actual[l].AsSpan().SequenceEqual(expected[l]), NUnit.Framework.Is.True, $"layer {l}");
        return retrieved;
    }

    private static unsafe nint Unsafe(Span<byte> span)
    {
        fixed (byte* p = span) return (nint)p;
    }

    public void Dispose()
    {
        foreach (var layer in Layers) layer.Dispose();
    }
}
