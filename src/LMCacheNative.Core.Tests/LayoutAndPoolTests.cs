using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Memory;
using LMCacheNative.Core.Storage;
using NUnit.Framework;

namespace LMCacheNative.Core.Tests;

public class LayoutValidationTests
{
    // A layout that is never dereferenced: validation only reads the numbers.
    private static readonly KvLayerLayout FlashNhd = new(DeviceKind.Host, 0, 2, 2, 10, 16, 8, 128,
        BaseAddress: 0x10000, SpanBytes: 2 * 10 * 16 * 8 * 128 * 2, KvStride: 10 * 16 * 8 * 128, BlockStride: 16 * 8 * 128, TokenStride: 8 * 128, HeadStride: 128);

    [Test]
    public void EveryTestLayout_IsAccepted([Values] TestLayout layout, [Values(1, 2, 4)] int elemSize)
    {
        using var cache = new TestModelCache(layout, 2, 4, 16, 2, 8, elemSize);
        Assert.DoesNotThrow(() => LayoutValidator.Validate(cache.Describe()));
    }

    [Test]
    public void Mla_IsAccepted_AndIgnoresKvStride()
    {
        var mla = new KvLayerLayout(DeviceKind.Host, 0, 2, 1, 10, 64, 1, 576, 0x10000, 10 * 64 * 576 * 2, KvStride: 0, BlockStride: 64 * 576, TokenStride: 576, HeadStride: 12345);
        Assert.DoesNotThrow(() => LayoutValidator.Validate([mla]));
    }

    private static string Refusal(params KvLayerLayout[] layers)
    {
        var error = Assert.Throws<LmcException>(() => LayoutValidator.Validate(layers))!;
        Assert.That(error.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
        return error.Message;
    }

    [Test]
    public void BadFields_AreRefused_NamingLayerAndField()
    {
        Assert.That(Refusal(FlashNhd, FlashNhd with { BaseAddress = 0x900000, ElemSize = 3 }), Does.StartWith("layer 1:").And.Contain("elem_size"));
        Assert.That(Refusal(FlashNhd with { KvCount = 3 }), Does.Contain("kv_count"));
        Assert.That(Refusal(FlashNhd with { NumBlocks = 0 }), Does.Contain("num_blocks"));
        Assert.That(Refusal(FlashNhd with { BlockSize = -1 }), Does.Contain("block_size"));
        Assert.That(Refusal(FlashNhd with { NumKvHeads = 0 }), Does.Contain("num_kv_heads"));
        Assert.That(Refusal(FlashNhd with { HeadSize = 0 }), Does.Contain("head_size"));
        Assert.That(Refusal(FlashNhd with { BaseAddress = 0 }), Does.Contain("NULL"));
        Assert.That(Refusal(FlashNhd with { BaseAddress = 0x10001 }), Does.Contain("aligned"));
        Assert.That(Refusal(FlashNhd with { Device = (DeviceKind)7 }), Does.Contain("device_kind"));
        Assert.That(Refusal(FlashNhd with { DeviceIndex = 1 }), Does.Contain("device_index"));
        Assert.That(Refusal(FlashNhd with { BlockStride = -1 }), Does.Contain("block_stride"));
    }

    [Test]
    public void StridesThatMakeElementsAlias_AreRefused()
    {
        Assert.That(Refusal(FlashNhd with { HeadStride = 64 }), Does.Contain("head_stride (64)"));
        Assert.That(Refusal(FlashNhd with { TokenStride = 128 }), Does.Contain("overlap"));
        Assert.That(Refusal(FlashNhd with { KvStride = FlashNhd.BlockStride }), Does.Contain("overlap"));
    }

    [Test]
    public void SpanTooSmall_IsRefused()
    {
        Assert.That(Refusal(FlashNhd with { SpanBytes = FlashNhd.SpanBytes - 1 }), Does.Contain("span_bytes"));
    }

    [Test]
    public void LayersWithDifferentShapes_AreRefused()
    {
        var second = FlashNhd with { BaseAddress = 0x10_0000_0000, NumKvHeads = 4, SpanBytes = FlashNhd.SpanBytes };
        Assert.That(Refusal(FlashNhd, second), Does.Contain("layer 1: num_kv_heads"));
    }

    [Test]
    public void OverlappingLayers_AreRefused_ButSharedIdenticalOnesAreAccepted()
    {
        Assert.DoesNotThrow(() => LayoutValidator.Validate([FlashNhd, FlashNhd, FlashNhd with { BaseAddress = 0x10_0000_0000 }]));
        Assert.That(Refusal(FlashNhd, FlashNhd with { BaseAddress = FlashNhd.BaseAddress + 256 }), Does.Contain("overlaps layer 0"));
        Assert.That(Refusal(FlashNhd, FlashNhd with { BaseAddress = FlashNhd.BaseAddress + 2 }), Does.Contain("overlaps layer 0"), "half a head apart");
    }

    /// <summary>vLLM's cross-layer tensor [B, L, 2, N, H, D] registered as per-layer views: interleaved, disjoint.</summary>
    [Test]
    public void InterleavedLayersOfOneTensor_AreAccepted_WhenTheirElementsAreDisjoint()
    {
        const int B = 10, L = 3, N = 16, H = 8, D = 128;
        long kv = N * H * D, block = L * 2 * kv;
        var layers = Enumerable.Range(0, L).Select(l => new KvLayerLayout(DeviceKind.Host, 0, 2, 2, B, N, H, D,
            BaseAddress: 0x10000 + (ulong)(l * 2 * kv * 2), SpanBytes: (ulong)((B * block - l * 2 * kv) * 2),
            KvStride: kv, BlockStride: block, TokenStride: H * D, HeadStride: D)).ToArray();
        Assert.DoesNotThrow(() => LayoutValidator.Validate(layers));

        // Shift layer 1 by one token: its V rows now land on layer 0's rows.
        var shifted = layers.ToArray();
        shifted[1] = shifted[1] with { BaseAddress = layers[0].BaseAddress + (ulong)(kv * 2 + H * D * 2) };
        Assert.That(Refusal(shifted), Does.Contain("overlaps layer"));
    }
}

public class SlabPoolTests
{
    /// <summary>
    /// Alignment by size: a cache line below a page (no 4 KiB page per tiny slab), a page up to a huge
    /// page, 2 MiB from there (so the transparent huge page advice can cover it); the memory is usable
    /// end to end.
    /// </summary>
    [TestCase(256, 64)]
    [TestCase(4095, 64)]
    [TestCase(4096, 4096)]
    [TestCase(1 << 20, 4096)]
    [TestCase(2 << 20, 2 << 20)]
    [TestCase((5 << 20) + 64, 2 << 20)]
    public unsafe void AlignedHostAllocator_AlignsBySize(long bytes, long alignment)
    {
        nint address = AlignedHostAllocator.Instance.Allocate(bytes);
        try
        {
            Assert.That(address, Is.Not.EqualTo((nint)0));
            Assert.That(address % alignment, Is.Zero);
            var span = new Span<byte>((void*)address, (int)bytes);
            span.Fill(0x3C);
            Assert.That(span[0] == 0x3C && span[^1] == 0x3C, Is.True);
        }
        finally
        {
            AlignedHostAllocator.Instance.Free(address, bytes);
        }
    }

    private sealed class CountingAllocator(int failAfter = int.MaxValue, long largestBytes = long.MaxValue) : IHostMemoryAllocator
    {
        public int Allocations, Frees;
        public readonly List<long> Sizes = [];
        public long FreedBytes;
        public nint Allocate(long bytes) =>
            Allocations >= failAfter || bytes > largestBytes ? 0 : AlignedHostAllocator.Instance.Allocate(bytes) is var p && p != 0 ? Count(p, bytes) : 0;
        private nint Count(nint p, long bytes) { Allocations++; Sizes.Add(bytes); return p; }
        public void Free(nint address, long bytes) { Frees++; FreedBytes += bytes; AlignedHostAllocator.Instance.Free(address, bytes); }
    }

    [Test]
    public void Capacity_IsWholeSlabs_AndSlabsAreReusedNotReallocated()
    {
        var allocator = new CountingAllocator();
        using (var pool = new SlabPool(1000, 3500, allocator))
        {
            Assert.That(pool.CapacitySlabs, Is.EqualTo(3));
            var slabs = Enumerable.Range(0, 3).Select(_ => pool.TryRent()).ToArray();
            Assert.That(slabs, Has.None.EqualTo((nint)0));
            Assert.That(pool.TryRent(), Is.EqualTo((nint)0), "at capacity");
            for (int round = 0; round < 1000; round++)
            {
                pool.Return(slabs[round % 3]);
                slabs[round % 3] = pool.TryRent();
            }
            // The three slabs are carved from one block of 3 x 1024 bytes (1000 rounded up to 64).
            Assert.That(allocator.Sizes, Is.EqualTo(new long[] { 3 * 1024 }), "freed slabs are reused; the pool never fragments or grows");
            Assert.That(pool.UsedBytes, Is.EqualTo(3000));
        }
        Assert.That(allocator.Frees, Is.EqualTo(1));
    }

    [Test]
    public unsafe void SmallSlabs_AreCarvedFromHugePageBlocks_AlignedAndDisjoint()
    {
        // 16-token chunks of 16 bytes per token: 256-byte slabs, 8192 to a 2 MiB block.
        const long slab = 256, slabs = 20_000;
        var allocator = new CountingAllocator();
        using (var pool = new SlabPool(slab, slab * slabs, allocator))
        {
            var rented = new List<nint>();
            for (nint p; (p = pool.TryRent()) != 0;) rented.Add(p);
            Assert.That(rented, Has.Count.EqualTo(slabs), "every slab of the capacity, no more");
            Assert.That(allocator.Sizes, Is.EqualTo(new long[] { 2 << 20, 2 << 20, (slabs - 2 * 8192) * slab }),
                "two full 2 MiB blocks and the rest of the capacity, not one allocation per slab");
            Assert.That(rented.All(p => p % AlignedHostAllocator.CacheLineBytes == 0), Is.True, "each slab on a cache line");
            var sorted = rented.Order().ToArray();
            for (int i = 1; i < sorted.Length; i++)
                Assert.That(sorted[i] - sorted[i - 1], Is.GreaterThanOrEqualTo((nint)slab), "slabs never overlap");
            // Every byte of every slab is usable.
            foreach (var p in rented) new Span<byte>((void*)p, (int)slab).Fill(0x5A);
            Assert.That(rented.All(p => ((byte*)p)[0] == 0x5A && ((byte*)p)[slab - 1] == 0x5A), Is.True);
        }
        Assert.That(allocator.Frees, Is.EqualTo(3));
        Assert.That(allocator.FreedBytes, Is.EqualTo(allocator.Sizes.Sum()), "every block freed with its own size");
    }

    [Test]
    public void PageSizedSlabs_StayPageAligned_AndLargeSlabsAreAllocatedAlone()
    {
        var allocator = new CountingAllocator();
        using (var pool = new SlabPool(5000, 5000 * 4, allocator))
        {
            var slabs = Enumerable.Range(0, 4).Select(_ => pool.TryRent()).ToArray();
            Assert.That(slabs.All(p => p != 0 && p % AlignedHostAllocator.Alignment == 0), Is.True, "a slab of a page or more starts on a page");
            Assert.That(allocator.Sizes, Is.EqualTo(new long[] { 4 * 8192 }));
        }
        var largest = new CountingAllocator();
        using (var pool = new SlabPool(SlabPool.MaxCarvedSlabBytes, 64 * SlabPool.MaxCarvedSlabBytes, largest))
        {
            Assert.That(pool.TryRent(), Is.Not.EqualTo((nint)0));
            Assert.That(largest.Sizes, Is.EqualTo(new long[] { 2 << 20 }), "64 KiB slabs: still 32 to a block");
        }
        foreach (long size in new long[] { SlabPool.MaxCarvedSlabBytes + 4096, 1 << 20, 3 << 20 })
        {
            var alone = new CountingAllocator();
            using var pool = new SlabPool(size, 4 * size, alone);
            Assert.That(pool.TryRent(), Is.Not.EqualTo((nint)0));
            Assert.That(pool.TryRent(), Is.Not.EqualTo((nint)0));
            Assert.That(alone.Sizes, Is.EqualTo(new[] { size, size }), $"{size}-byte slabs: one allocation each, as before");
        }
    }

    [Test]
    public void BlockRefused_FallsBackToSingleSlabs()
    {
        // The system refuses anything above 4 KiB: the pool still hands out slabs, one allocation each.
        var allocator = new CountingAllocator(largestBytes: 4096);
        using var pool = new SlabPool(64, 1 << 20, allocator);
        Assert.That(pool.TryRent(), Is.Not.EqualTo((nint)0));
        Assert.That(pool.TryRent(), Is.Not.EqualTo((nint)0));
        Assert.That(allocator.Sizes, Is.EqualTo(new long[] { 64, 64 }));
    }

    [Test]
    public void SystemOutOfMemory_ReportsNoSlab()
    {
        // Slabs of a huge page, one allocation each: the third is refused by the system.
        using var pool = new SlabPool(2 << 20, 16L << 20, new CountingAllocator(failAfter: 2));
        Assert.That(pool.TryRent(), Is.Not.EqualTo((nint)0));
        Assert.That(pool.TryRent(), Is.Not.EqualTo((nint)0));
        Assert.That(pool.TryRent(), Is.EqualTo((nint)0));
        using var small = new SlabPool(64, 1 << 20, new CountingAllocator(failAfter: 0));
        Assert.That(small.TryRent(), Is.EqualTo((nint)0), "neither a block nor a single slab to be had");
    }
}

public class LocalCpuTierTests
{
    private static ChunkKey Key(int i) => new((ulong)i, 0, 0, 0);

    private static LocalCpuTier Tier(int slabs) => new(new SlabPool(64, 64 * slabs, AlignedHostAllocator.Instance));

    private static CachedChunk Put(LocalCpuTier tier, int i)
    {
        var chunk = tier.TryReserve(Key(i), 1, 64) ?? throw new AssertionException($"no room for {i}");
        tier.Publish(chunk);
        return chunk;
    }

    [Test]
    public void Eviction_TakesTheLeastRecentlyUsed()
    {
        using var tier = Tier(3);
        var a = Put(tier, 1);
        Put(tier, 2);
        Put(tier, 3);
        tier.Touch(a);
        Put(tier, 4);
        Assert.That(tier.Contains(Key(2)), Is.False);
        Assert.That(tier.KeysOldestFirst(), Is.EqualTo(new[] { Key(3), Key(1), Key(4) }));
        Assert.That(tier.EvictedChunks, Is.EqualTo(1));
    }

    [Test]
    public void PinnedChunks_AreNeverEvicted_AndReserveGivesUpInsteadOfWaiting()
    {
        using var tier = Tier(2);
        var a = Put(tier, 1);
        var b = Put(tier, 2);
        tier.Pin(a);
        tier.Pin(b);
        Assert.That(tier.TryReserve(Key(3), 1, 64), Is.Null);
        tier.Unpin(b);
        Assert.That(tier.TryReserve(Key(3), 1, 64), Is.Not.Null);
        Assert.That(tier.Contains(Key(1)), Is.True);
        Assert.That(tier.Contains(Key(2)), Is.False);
    }

    [Test]
    public void ClearingAPinnedChunk_FreesItsSlabOnlyAtTheLastUnpin()
    {
        using var tier = Tier(1);
        var a = Put(tier, 1);
        tier.Pin(a);
        tier.Pin(a);
        tier.Clear();
        Assert.That(tier.Count, Is.EqualTo(0));
        Assert.That(tier.UsedBytes, Is.EqualTo(64), "still being read");
        tier.Unpin(a);
        Assert.That(tier.UsedBytes, Is.EqualTo(64));
        tier.Unpin(a);
        Assert.That(tier.UsedBytes, Is.EqualTo(0));
        Assert.That(() => tier.Unpin(a), Throws.InvalidOperationException);
    }

    [Test]
    public void PublishingAKeyTwice_KeepsTheFirst_AndReturnsTheSecondSlab()
    {
        using var tier = Tier(2);
        var first = tier.TryReserve(Key(1), 1, 64)!;
        var second = tier.TryReserve(Key(1), 1, 64)!;
        tier.Publish(first);
        tier.Publish(second);
        Assert.That(tier.Find(Key(1)), Is.SameAs(first));
        Assert.That(tier.Count, Is.EqualTo(1));
        Assert.That(tier.UsedBytes, Is.EqualTo(64));
    }
}
