using System.Buffers.Binary;
using System.IO.Hashing;
using System.Security.Cryptography;
using System.Text;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;
using NUnit.Framework;

namespace LMCacheNative.Core.Tests;

public class KeyTests
{
    private static readonly KeyNamespace Llama = new("meta-llama/Llama-3.1-8B", 2, 8, 128, 32, 2, 1, 0);

    private static ChunkKey[] Keys(ChunkHashAlgorithm algorithm, KeyNamespace ns, int[] tokens, byte[]? extra = null, int chunkSize = 4)
    {
        var keys = new ChunkKey[ChunkHasher.ChunkCount(tokens.Length, chunkSize)];
        new ChunkHasher(algorithm, ns).ComputeKeys(tokens, extra, chunkSize, keys);
        return keys;
    }

    /// <summary>
    /// The key format is a stored-data format: it must not drift between builds, or every cache on
    /// disk and in Redis goes cold. This rebuilds the documented chain from its definition with the
    /// BCL's incremental hashes, independently of the engine's code path.
    /// </summary>
    [Test]
    public void Keys_FollowTheDocumentedChain([Values] ChunkHashAlgorithm algorithm)
    {
        int[] tokens = [1, 2, 3, 4, 5, 6, 7];
        byte[] extra = Encoding.UTF8.GetBytes("salt");

        var ns = new List<byte>();
        ns.AddRange("lmcache-native:1"u8.ToArray());
        byte[] name = Encoding.UTF8.GetBytes(Llama.ModelName);
        ns.AddRange(BitConverter.GetBytes((long)name.Length));
        ns.AddRange(name);
        foreach (int field in new[] { 2, 8, 128, 32, 2, 1, 0 }) ns.AddRange(BitConverter.GetBytes(field));
        ns.AddRange(BitConverter.GetBytes((long)extra.Length));
        ns.AddRange(extra);

        byte[] Digest(byte[] input)
        {
            if (algorithm == ChunkHashAlgorithm.Sha256) return SHA256.HashData(input);
            byte[] full = new byte[32];
            XxHash128.Hash(input).CopyTo(full, 0);
            return full;
        }

        byte[] previous = Digest(ns.ToArray());
        var expected = new List<string>();
        foreach (var chunk in new[] { new[] { 1, 2, 3, 4 }, new[] { 5, 6, 7 } })
        {
            var input = new List<byte>(previous);
            input.AddRange(BitConverter.GetBytes(chunk.Length));
            foreach (int token in chunk) input.AddRange(BitConverter.GetBytes(token));
            previous = Digest(input.ToArray());
            expected.Add(Convert.ToHexStringLower(previous));
        }

        var keys = Keys(algorithm, Llama, tokens, extra);
        Assert.That(keys.Select(k => k.ToHex()), Is.EqualTo(expected));
    }

    [Test]
    public void Keys_AreDeterministic_AcrossHasherInstances([Values] ChunkHashAlgorithm algorithm)
    {
        int[] tokens = Enumerable.Range(0, 1000).Select(i => i * 7919).ToArray();
        Assert.That(Keys(algorithm, Llama, tokens), Is.EqualTo(Keys(algorithm, Llama with { }, tokens)));
    }

    [Test]
    public void Keys_AreChained_SoAChangeAffectsItsChunkAndEveryLaterOne()
    {
        int[] tokens = Enumerable.Range(0, 16).ToArray();
        var original = Keys(ChunkHashAlgorithm.Sha256, Llama, tokens);
        tokens[9] = 99; // chunk 2 of 4
        var changed = Keys(ChunkHashAlgorithm.Sha256, Llama, tokens);
        Assert.That(changed[..2], Is.EqualTo(original[..2]));
        for (int i = 2; i < 4; i++) Assert.That(changed[i], Is.Not.EqualTo(original[i]), $"chunk {i}");
    }

    [Test]
    public void PartialChunk_DiffersFromLongerChunkWithTheSameStart()
    {
        var partial = Keys(ChunkHashAlgorithm.Xxh3_128, Llama, [1, 2, 3, 4, 5, 6]);
        var full = Keys(ChunkHashAlgorithm.Xxh3_128, Llama, [1, 2, 3, 4, 5, 6, 7, 8]);
        Assert.That(partial[0], Is.EqualTo(full[0]));
        Assert.That(partial[1], Is.Not.EqualTo(full[1]));
        // Trailing zero tokens must not alias a shorter chunk either.
        var zeros = Keys(ChunkHashAlgorithm.Xxh3_128, Llama, [1, 2, 3, 4, 0, 0]);
        var fewer = Keys(ChunkHashAlgorithm.Xxh3_128, Llama, [1, 2, 3, 4, 0]);
        Assert.That(zeros[1], Is.Not.EqualTo(fewer[1]));
    }

    [Test]
    public void EveryNamespaceField_SeparatesKeys()
    {
        int[] tokens = [1, 2, 3, 4];
        var variants = new[]
        {
            Llama, Llama with { ModelName = "other" }, Llama with { ElemSize = 1 }, Llama with { NumKvHeads = 4 },
            Llama with { HeadSize = 64 }, Llama with { NumLayers = 31 }, Llama with { KvCount = 1 },
            Llama with { WorldSize = 2 }, Llama with { WorldSize = 2, WorkerId = 1 },
        };
        var first = variants.Select(ns => Keys(ChunkHashAlgorithm.Sha256, ns, tokens)[0]).ToList();
        Assert.That(first.Distinct().Count(), Is.EqualTo(variants.Length));
    }

    [Test]
    public void ExtraKey_IsUsedAtFullWidth()
    {
        int[] tokens = [1, 2, 3, 4];
        byte[] a = Enumerable.Range(0, 300).Select(i => (byte)i).ToArray();
        byte[] b = (byte[])a.Clone();
        b[^1] ^= 0x80;
        Assert.That(Keys(ChunkHashAlgorithm.Sha256, Llama, tokens, a)[0], Is.Not.EqualTo(Keys(ChunkHashAlgorithm.Sha256, Llama, tokens, b)[0]));
        Assert.That(Keys(ChunkHashAlgorithm.Sha256, Llama, tokens, [])[0], Is.Not.EqualTo(Keys(ChunkHashAlgorithm.Sha256, Llama, tokens, [0])[0]));
    }

    [Test]
    public void Algorithms_GiveDifferentKeys_AndXxh3LeavesTheUpperHalfZero()
    {
        int[] tokens = [1, 2, 3, 4];
        var sha = Keys(ChunkHashAlgorithm.Sha256, Llama, tokens)[0];
        var xxh = Keys(ChunkHashAlgorithm.Xxh3_128, Llama, tokens)[0];
        Assert.That(sha, Is.Not.EqualTo(xxh));
        Assert.That((xxh.Word2, xxh.Word3), Is.EqualTo((0UL, 0UL)));
        Assert.That(sha.Word2 | sha.Word3, Is.Not.Zero);
    }

    [Test]
    public void ChunkKey_RoundTripsThroughBytes()
    {
        byte[] bytes = Enumerable.Range(1, 32).Select(i => (byte)i).ToArray();
        var key = ChunkKey.FromBytes(bytes);
        byte[] back = new byte[32];
        key.WriteTo(back);
        Assert.That(back, Is.EqualTo(bytes));
        Assert.That(key.Word0, Is.EqualTo(BinaryPrimitives.ReadUInt64LittleEndian(bytes)));
    }

    /// <summary>
    /// The OpenSSL path (one pre-fetched EVP digest per chunk, tokens hashed in place) gives the very
    /// keys of the BCL path, for full and partial chunks, chunk sizes 1 to 256 and extra keys (one over the 16 KiB update piece);
    /// and it is the path taken where OpenSSL 3 is present (Debian 12 ships it).
    /// </summary>
    [Test]
    public void Sha256Keys_FromOpenSsl_EqualTheBclOnes([Values(1, 16, 256)] int chunkSize, [Values(0, 37, 100_000)] int extraBytes)
    {
        Assert.That(OpenSslSha256.IsAvailable, Is.True, "libcrypto.so.3 should be loadable on this machine");
        var random = new Random(chunkSize + extraBytes);
        int[] tokens = Enumerable.Range(0, 3 * chunkSize + 5).Select(_ => random.Next()).ToArray();
        byte[] extra = new byte[extraBytes];
        random.NextBytes(extra);
        var hasher = new ChunkHasher(ChunkHashAlgorithm.Sha256, Llama);
        int count = ChunkHasher.ChunkCount(tokens.Length, chunkSize);
        var fromOpenSsl = new ChunkKey[count];
        var fromBcl = new ChunkKey[count];
        hasher.ComputeKeys(tokens, extra, chunkSize, fromOpenSsl);
        hasher.ComputeKeysWithBcl(tokens, extra, chunkSize, fromBcl);
        Assert.That(fromOpenSsl, Is.EqualTo(fromBcl));
        Assert.That(fromOpenSsl.Distinct().Count(), Is.EqualTo(count));
    }

    /// <summary>Contexts of several threads at once do not mix (each thread has its own).</summary>
    [Test]
    public void Sha256Keys_OnManyThreadsAtOnce_AreTheSingleThreadedOnes()
    {
        var hasher = new ChunkHasher(ChunkHashAlgorithm.Sha256, Llama);
        var inputs = Enumerable.Range(0, 8).Select(seed => Enumerable.Range(0, 1000).Select(i => i * (seed + 1)).ToArray()).ToArray();
        var expected = inputs.Select(tokens =>
        {
            var keys = new ChunkKey[ChunkHasher.ChunkCount(tokens.Length, 16)];
            hasher.ComputeKeysWithBcl(tokens, default, 16, keys);
            return keys;
        }).ToArray();
        Parallel.For(0, 64, i =>
        {
            var tokens = inputs[i % inputs.Length];
            var keys = new ChunkKey[ChunkHasher.ChunkCount(tokens.Length, 16)];
            hasher.ComputeKeys(tokens, default, 16, keys);
            Assert.That(keys, Is.EqualTo(expected[i % inputs.Length]));
        });
    }
}
