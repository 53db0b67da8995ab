using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using NUnit.Framework;

namespace LMCacheNative.Core.Tests;

/// <summary>
/// Store → retrieve through the engine, checked byte for byte against the test's own model of each
/// layout: the destination must equal a guard-filled snapshot with exactly the expected head vectors
/// copied in, so both wrong data and writes to slots that must stay untouched fail.
/// </summary>
public class EngineTransferTests
{
    private const int Layers = 2, Blocks = 16, BlockSize = 4, Heads = 2, HeadSize = 8;
    private const byte Guard = 0xA5;

    public static CacheEngine NewEngine(string json = "{\"chunk_size\": 8, \"save_unfull_chunk\": true}", string model = "test-model") =>
        new(EngineConfig.Parse(json), model, 1, 0);

    public static long[] RandomSlots(Random random, long numSlots, int count, int minusOneEvery = 0)
    {
        var all = Enumerable.Range(0, (int)numSlots).Select(i => (long)i).OrderBy(_ => random.Next()).Take(count).ToArray();
        if (minusOneEvery > 0)
            for (int i = minusOneEvery - 1; i < count; i += minusOneEvery) all[i] = -1;
        return all;
    }

    public static long[] BlockOrderSlots(Random random, int numBlocks, int blockSize, int count)
    {
        var blocks = Enumerable.Range(0, numBlocks).OrderBy(_ => random.Next()).ToArray();
        return Enumerable.Range(0, count).Select(t => (long)blocks[t / blockSize] * blockSize + t % blockSize).ToArray();
    }

    public static int[] Tokens(int count, int seed) => Enumerable.Range(0, count).Select(i => seed * 100_000 + i).ToArray();

    /// <summary>
    /// Registers <paramref name="destination"/> (guard-filled), retrieves every token of
    /// <paramref name="tokens"/>, writing those from <paramref name="firstToWrite"/> on, and checks it
    /// byte for byte against the test's model: each written token's KV from its slot in
    /// <paramref name="source"/>, slots of -1 and everything else untouched.
    /// </summary>
    private static TransferResult RetrieveAndCheck(CacheEngine engine, TestModelCache source, long[] sourceSlots,
        TestModelCache destination, long[] destinationSlots, int[] tokens, int firstToWrite = 0)
    {
        engine.RegisterLayers(destination.Describe());
        var expected = destination.Snapshot();
        for (int t = firstToWrite; t < tokens.Length; t++)
            if (destinationSlots[t] >= 0) destination.ExpectCopied(expected, source, sourceSlots[t], destinationSlots[t]);
        var result = engine.Retrieve(tokens, destinationSlots, firstToWrite, default);
        Assert.That(result.TokensMatched, Is.EqualTo(tokens.Length));
        var actual = destination.Snapshot();
        for (int l = 0; l < actual.Length; l++) Assert.That(actual[l].AsSpan().SequenceEqual(expected[l]), Is.True, $"layer {l}");
        return result;
    }

    [Test]
    public void StoreAndRetrieve_BetweenEveryPairOfLayouts_IsBitExact(
        [Values] TestLayout from, [Values] TestLayout to, [Values(1, 2, 4)] int elemSize)
    {
        var random = new Random(HashCode.Combine(from, to, elemSize));
        using var source = new TestModelCache(from, Layers, Blocks, BlockSize, Heads, HeadSize, elemSize);
        using var destination = new TestModelCache(to, Layers, Blocks, BlockSize, Heads, HeadSize, elemSize);
        source.FillRandom(random.Next());
        destination.Fill(Guard);
        using var engine = NewEngine();

        const int numTokens = 37; // four full chunks of 8 and a partial one of 5
        int[] tokens = Tokens(numTokens, 1);
        long[] sourceSlots = RandomSlots(random, source.NumSlots, numTokens);
        engine.RegisterLayers(source.Describe());
        Assert.That(engine.Store(tokens, sourceSlots, 0, default).TokensMatched, Is.EqualTo(numTokens));

        long[] destinationSlots = RandomSlots(random, destination.NumSlots, numTokens, minusOneEvery: 7);
        const int firstTokenToWrite = 5;
        var result = RetrieveAndCheck(engine, source, sourceSlots, destination, destinationSlots, tokens, firstTokenToWrite);
        int written = Enumerable.Range(firstTokenToWrite, numTokens - firstTokenToWrite).Count(t => destinationSlots[t] >= 0);
        Assert.That(result.BytesCopied, Is.EqualTo((long)written * engine.BytesPerToken));
    }

    [Test]
    public void StoreAndRetrieve_Mla_IsBitExact([Values(1, 2)] int elemSize)
    {
        var random = new Random(7);
        using var source = new TestModelCache(TestLayout.FlashNhd, 3, 8, 16, 1, 36, elemSize, mla: true);
        using var destination = new TestModelCache(TestLayout.FlashNhd, 3, 8, 16, 1, 36, elemSize, mla: true);
        source.FillRandom(3);
        destination.Fill(Guard);
        using var engine = NewEngine();
        int[] tokens = Tokens(40, 2);
        long[] sourceSlots = RandomSlots(random, source.NumSlots, 40);
        long[] destinationSlots = RandomSlots(random, destination.NumSlots, 40, minusOneEvery: 5);
        engine.RegisterLayers(source.Describe());
        engine.Store(tokens, sourceSlots, 0, default);
        RetrieveAndCheck(engine, source, sourceSlots, destination, destinationSlots, tokens);
    }

    /// <summary>Large enough (8 MiB) to take the multi-core path of the host transfer.</summary>
    [Test]
    public void LargeRequest_TakesParallelPath_AndStaysBitExact(
        [Values(TestLayout.FlashNhd, TestLayout.FlashHnd, TestLayout.Packed)] TestLayout layout, [Values] bool vllmBlockOrder)
    {
        var random = new Random(11);
        using var source = new TestModelCache(layout, 2, 96, 16, 8, 128, 2);
        using var destination = new TestModelCache(vllmBlockOrder ? TestLayout.FlashHnd : TestLayout.BlocksFirstNhd, 2, 96, 16, 8, 128, 2);
        source.FillRandom(5);
        destination.Fill(Guard);
        using var engine = NewEngine("{\"chunk_size\": 256, \"max_local_cpu_size\": 0.1}");
        const int numTokens = 1024;
        int[] tokens = Tokens(numTokens, 3);
        // vLLM's order: whole blocks in random order, the tokens of a block in consecutive slots
        // (long runs); otherwise every token in a random slot (runs of one).
        long[] sourceSlots = vllmBlockOrder ? BlockOrderSlots(random, 96, 16, numTokens) : RandomSlots(random, source.NumSlots, numTokens);
        long[] destinationSlots = vllmBlockOrder ? BlockOrderSlots(random, 96, 16, numTokens) : RandomSlots(random, destination.NumSlots, numTokens);
        if (vllmBlockOrder) destinationSlots[700] = -1; // a hole inside a run
        engine.RegisterLayers(source.Describe());
        var stored = engine.Store(tokens, sourceSlots, 0, default);
        Assert.That(stored.BytesCopied, Is.GreaterThanOrEqualTo(Transfer.HostKvTransfer.ParallelThresholdBytes));
        RetrieveAndCheck(engine, source, sourceSlots, destination, destinationSlots, tokens);
    }

    /// <summary>
    /// Streaming-sized transfers (over 8 MiB, so non-temporal stores and every core) between two
    /// different layouts, with head vectors of 72 and 128 elements in fp8 and bf16 (72, 144, 128 and
    /// 256 bytes: runs shorter than a streaming run, not a multiple of 64 bytes, and exactly the HND
    /// case), whole blocks in vLLM's random order with odd-length runs (a request that starts and ends
    /// inside a block, holes), byte for byte against the model with guard bytes everywhere else.
    /// </summary>
    [Test]
    public void StreamingRequest_EveryLayoutAndHeadSize_IsBitExact(
        [Values(TestLayout.FlashNhd, TestLayout.FlashHnd, TestLayout.BlocksFirstHnd, TestLayout.Packed)] TestLayout layout,
        [Values(1, 2)] int elemSize, [Values(72, 128)] int headSize)
    {
        var random = new Random(HashCode.Combine(layout, elemSize, headSize));
        const int layers = 2, heads = 8, blockSize = 16;
        int bytesPerToken = layers * 2 * heads * headSize * elemSize;
        int numTokens = (int)(Transfer.HostKvTransfer.ParallelThresholdBytes * 2 / bytesPerToken) + 7; // over the streaming threshold, ends mid-block
        int blocks = numTokens / blockSize + 24;
        var other = layout == TestLayout.FlashHnd ? TestLayout.Packed : TestLayout.FlashHnd;
        using var source = new TestModelCache(layout, layers, blocks, blockSize, heads, headSize, elemSize);
        using var destination = new TestModelCache(other, layers, blocks, blockSize, heads, headSize, elemSize);
        source.FillRandom(random.Next());
        destination.Fill(Guard);
        using var engine = NewEngine("{\"chunk_size\": 256, \"max_local_cpu_size\": 0.2, \"save_unfull_chunk\": true}");
        int[] tokens = Tokens(numTokens, 4);
        // Shifted by 5 slots: every run starts and ends inside a block (runs of 11 and 5 tokens).
        long[] sourceSlots = BlockOrderSlots(random, blocks - 1, blockSize, numTokens).Select(s => s + 5).ToArray();
        long[] destinationSlots = BlockOrderSlots(random, blocks, blockSize, numTokens);
        for (int t = 3; t < numTokens; t += 509) destinationSlots[t] = -1; // holes that split runs
        engine.RegisterLayers(source.Describe());
        var stored = engine.Store(tokens, sourceSlots, 0, default);
        Assert.That(stored.BytesCopied, Is.GreaterThanOrEqualTo(2 * Transfer.HostKvTransfer.ParallelThresholdBytes - bytesPerToken));
        RetrieveAndCheck(engine, source, sourceSlots, destination, destinationSlots, tokens);
    }

    /// <summary>
    /// Streaming-sized retrieve that starts writing mid-chunk (vLLM's own prefix covers the first
    /// tokens), into the same and into a different layout: the slots before the first token to write
    /// keep their guard bytes, every later one gets its token's KV (K and V of packed layers are copied
    /// in one pass; every run prefetches the next, past item and chunk ends).
    /// </summary>
    [Test]
    public void StreamingRetrieve_FromMidChunk_WritesOnlyFromThatToken(
        [Values(TestLayout.FlashNhd, TestLayout.FlashHnd, TestLayout.Packed)] TestLayout layout, [Values(1, 2)] int elemSize, [Values] bool sameLayout)
    {
        var random = new Random(HashCode.Combine(layout, elemSize, sameLayout));
        const int layers = 2, heads = 8, headSize = 128, blockSize = 16;
        int bytesPerToken = layers * 2 * heads * headSize * elemSize;
        int numTokens = (int)(Transfer.HostKvTransfer.ParallelThresholdBytes * 3 / bytesPerToken) / 256 * 256;
        int blocks = numTokens / blockSize + 8;
        using var source = new TestModelCache(layout, layers, blocks, blockSize, heads, headSize, elemSize);
        using var destination = new TestModelCache(sameLayout ? layout : TestLayout.BlocksFirstHnd, layers, blocks, blockSize, heads, headSize, elemSize);
        source.FillRandom(random.Next());
        destination.Fill(Guard);
        using var engine = NewEngine("{\"chunk_size\": 256, \"max_local_cpu_size\": 0.2}");
        int[] tokens = Tokens(numTokens, 6);
        long[] sourceSlots = BlockOrderSlots(random, blocks, blockSize, numTokens);
        long[] destinationSlots = BlockOrderSlots(random, blocks, blockSize, numTokens);
        engine.RegisterLayers(source.Describe());
        Assert.That(engine.Store(tokens, sourceSlots, 0, default).TokensMatched, Is.EqualTo(numTokens));

        const int firstToWrite = 256 + 100; // inside the second chunk, inside a block
        var retrieved = RetrieveAndCheck(engine, source, sourceSlots, destination, destinationSlots, tokens, firstToWrite);
        Assert.That(retrieved.BytesCopied, Is.EqualTo((long)(numTokens - firstToWrite) * bytesPerToken));
    }

    [Test]
    public void Retrieve_OnlyWritesTheRetrievedPrefix_AndLeavesLaterSlotsUntouched()
    {
        var random = new Random(5);
        using var cache = new TestModelCache(TestLayout.FlashNhd, Layers, Blocks, BlockSize, Heads, HeadSize, 2);
        cache.FillRandom(1);
        using var engine = NewEngine("{\"chunk_size\": 8}");
        engine.RegisterLayers(cache.Describe());
        int[] stored = Tokens(16, 4);
        long[] slots = RandomSlots(random, cache.NumSlots, 40);
        engine.Store(stored, slots.AsSpan(0, 16), 0, default);

        // The new request shares 16 tokens, then differs: only those 16 may be written.
        int[] request = stored.Concat(Tokens(24, 9)).ToArray();
        using var destination = new TestModelCache(TestLayout.FlashNhd, Layers, Blocks, BlockSize, Heads, HeadSize, 2);
        destination.Fill(Guard);
        engine.RegisterLayers(destination.Describe());
        var expected = destination.Snapshot();
        for (int t = 0; t < 16; t++) destination.ExpectCopied(expected, cache, slots[t], slots[t]);

        Assert.That(engine.Retrieve(request, slots, 0, default).TokensMatched, Is.EqualTo(16));
        var actual = destination.Snapshot();
        for (int l = 0; l < Layers; l++) Assert.That(actual[l], Is.EqualTo(expected[l]));
    }

    [Test]
    public void Retrieve_WithSlotPastTheCache_FailsAndWritesNothing()
    {
        using var cache = new TestModelCache(TestLayout.FlashNhd, Layers, Blocks, BlockSize, Heads, HeadSize, 2);
        cache.FillRandom(2);
        using var engine = NewEngine();
        engine.RegisterLayers(cache.Describe());
        int[] tokens = Tokens(16, 1);
        long[] slots = Enumerable.Range(0, 16).Select(i => (long)i).ToArray();
        engine.Store(tokens, slots, 0, default);
        var before = cache.Snapshot();
        slots[15] = cache.NumSlots; // one past the end
        for (int i = 0; i < 15; i++) slots[i] = 30 + i; // would overwrite other slots if copying started

        var error = Assert.Throws<LmcException>(() => engine.Retrieve(tokens, slots, 0, default))!;

        Assert.That(error.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(error.Message, Does.Contain("slot_mapping[15]"));
        var after = cache.Snapshot();
        for (int l = 0; l < Layers; l++) Assert.That(after[l], Is.EqualTo(before[l]));
    }
}
