using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Storage;
using NUnit.Framework;

namespace LMCacheNative.Core.Tests;

/// <summary>The CPU tier's open-addressing index, checked against <see cref="Dictionary{TKey,TValue}"/> as the oracle.</summary>
public class ChunkIndexTests
{
    private sealed record Item(ChunkKey Key, int Id) : IChunkKeyed;

    // Tables whose home slot is Word0's low bits (production tables mix in a random seed), so that
    // the tests below can put keys where they want them.
    private static ChunkIndex<Item> Placed(int expectedCount = 0) => new(expectedCount, randomHomes: false);

    // Keys whose Word0 shares its low 16 bits: in a Placed table of up to 65536 slots they all have
    // the same home slot, so every insert, probe and removal walks one cluster.
    private static ChunkKey Colliding(int i) => new(((ulong)i << 16) | 0x1234, (ulong)i, 0, 0);

    [Test]
    public void InsertFindRemove_WithEveryKeyInOneCluster()
    {
        var index = Placed();
        var items = Enumerable.Range(0, 10).Select(i => new Item(Colliding(i), i)).ToArray();
        foreach (var item in items) Assert.That(index.TryAdd(item), Is.True);
        Assert.That(index.Count, Is.EqualTo(10));
        foreach (var item in items) Assert.That(index.Find(item.Key), Is.SameAs(item));
        Assert.That(index.Find(Colliding(10)), Is.Null, "a key of the same home slot that was never added");

        // Remove from the middle of the cluster: the later ones must still be found (backward shift).
        Assert.That(index.Remove(items[3].Key), Is.True);
        Assert.That(index.Remove(items[3].Key), Is.False);
        Assert.That(index.Find(items[3].Key), Is.Null);
        foreach (var item in items.Where(i => i.Id != 3)) Assert.That(index.Find(item.Key), Is.SameAs(item));
        Assert.That(index.Count, Is.EqualTo(9));
    }

    [Test]
    public void KeysEqualInWord0ButNotElsewhere_AreDistinct()
    {
        var index = Placed();
        var a = new Item(new ChunkKey(7, 1, 2, 3), 1);
        var b = new Item(new ChunkKey(7, 1, 2, 4), 2);
        Assert.That(index.TryAdd(a), Is.True);
        Assert.That(index.TryAdd(b), Is.True);
        Assert.That(index.Find(new ChunkKey(7, 1, 2, 4)), Is.SameAs(b));
        Assert.That(index.Find(new ChunkKey(7, 1, 2, 5)), Is.Null);
        Assert.That(index.TryAdd(new Item(new ChunkKey(7, 1, 2, 3), 3)), Is.False, "the key is present: the first value stays");
        Assert.That(index.Find(a.Key), Is.SameAs(a));
    }

    [Test]
    public void ClusterWrappingPastTheEndOfTheTable_SurvivesRemoval()
    {
        var index = Placed();
        int capacity = index.Capacity;
        ulong last = (ulong)capacity - 1;
        // Three keys homed in the last slot (two wrap to slots 0 and 1), then one homed in slot 0.
        var items = new[]
        {
            new Item(new ChunkKey(last, 1, 0, 0), 0), new Item(new ChunkKey(last, 2, 0, 0), 1),
            new Item(new ChunkKey(last, 3, 0, 0), 2), new Item(new ChunkKey((ulong)capacity, 4, 0, 0), 3),
        };
        foreach (var item in items) index.TryAdd(item);
        Assert.That(index.Remove(items[0].Key), Is.True);
        foreach (var item in items.Skip(1)) Assert.That(index.Find(item.Key), Is.SameAs(item));
        Assert.That(index.Remove(items[2].Key), Is.True);
        Assert.That(index.Find(items[1].Key), Is.SameAs(items[1]));
        Assert.That(index.Find(items[3].Key), Is.SameAs(items[3]));
        Assert.That(index.Capacity, Is.EqualTo(capacity));
    }

    [Test]
    public void EntryPastTheWrap_StaysWhenItsHomeIsBeforeTheEnd()
    {
        var index = Placed();
        ulong capacity = (ulong)index.Capacity;
        var a = new Item(new ChunkKey(capacity - 2, 1, 0, 0), 0); // slot capacity-2
        var b = new Item(new ChunkKey(capacity - 1, 2, 0, 0), 1); // slot capacity-1
        var c = new Item(new ChunkKey(capacity - 1, 3, 0, 0), 2); // home capacity-1, wraps to slot 0
        foreach (var item in new[] { a, b, c }) index.TryAdd(item);
        // Removing a leaves a hole before b and c, neither of which may move into it (their home is after it).
        Assert.That(index.Remove(a.Key), Is.True);
        Assert.That(index.Find(b.Key), Is.SameAs(b));
        Assert.That(index.Find(c.Key), Is.SameAs(c));
    }

    [Test]
    public void Grows_PastItsLoadLimit_AndKeepsEveryEntry()
    {
        var index = Placed(expectedCount: 12);
        Assert.That(index.Capacity, Is.EqualTo(16));
        var random = new Random(3);
        var items = Enumerable.Range(0, 5000).Select(i => new Item(new ChunkKey((ulong)random.NextInt64(), (ulong)i, 0, 0), i)).ToList();
        // Some colliding keys too, so that growth rehashes clusters.
        items.AddRange(Enumerable.Range(0, 50).Select(i => new Item(Colliding(i), 5000 + i)));
        foreach (var item in items) Assert.That(index.TryAdd(item), Is.True);
        Assert.That(index.Count, Is.EqualTo(items.Count));
        Assert.That(index.Capacity, Is.EqualTo(ChunkIndex<Item>.CapacityFor(items.Count)));
        Assert.That((double)index.Count / index.Capacity, Is.LessThanOrEqualTo(0.75));
        foreach (var item in items) Assert.That(index.Find(item.Key), Is.SameAs(item));
        Assert.That(index.ValuesToArray(), Is.EquivalentTo(items));
    }

    [Test]
    public void CapacityFor_IsThePowerOfTwoThatKeepsTheLoadAtMostThreeQuarters()
    {
        Assert.That(ChunkIndex<Item>.CapacityFor(0), Is.EqualTo(16));
        Assert.That(ChunkIndex<Item>.CapacityFor(12), Is.EqualTo(16));
        Assert.That(ChunkIndex<Item>.CapacityFor(13), Is.EqualTo(32));
        Assert.That(ChunkIndex<Item>.CapacityFor(1_100_000), Is.EqualTo(1 << 21));
        Assert.That(ChunkIndex<Item>.CapacityFor(3 << 19), Is.EqualTo(1 << 21));
        Assert.That(ChunkIndex<Item>.CapacityFor((3 << 19) + 1), Is.EqualTo(1 << 22));
        Assert.Throws<ArgumentOutOfRangeException>(() => ChunkIndex<Item>.CapacityFor(1L << 40));
    }

    [Test]
    public void Clear_EmptiesTheTable_AndKeepsItUsable()
    {
        var index = Placed();
        var items = Enumerable.Range(0, 100).Select(i => new Item(Colliding(i), i)).ToArray();
        foreach (var item in items) index.TryAdd(item);
        int capacity = index.Capacity;
        index.Clear();
        Assert.That(index.Count, Is.Zero);
        Assert.That(index.ValuesToArray(), Is.Empty);
        Assert.That(index.Capacity, Is.EqualTo(capacity));
        foreach (var item in items) Assert.That(index.Find(item.Key), Is.Null);
        Assert.That(index.TryAdd(items[5]), Is.True);
        Assert.That(index.Find(items[5].Key), Is.SameAs(items[5]));
    }

    [Test]
    public void Prefetch_OfAnyKey_ChangesNothing()
    {
        var index = Placed();
        var item = new Item(Colliding(1), 1);
        index.TryAdd(item);
        ChunkKey[] keys = Enumerable.Range(0, 40).Select(i => new ChunkKey(ulong.MaxValue - (ulong)i, 0, 0, 0)).ToArray();
        index.PrefetchFirst(keys);
        for (int i = 0; i < keys.Length; i++) index.PrefetchAhead(keys, i);
        index.PrefetchFirst([]);
        Assert.That(index.Count, Is.EqualTo(1));
        Assert.That(index.Find(item.Key), Is.SameAs(item));
    }

    /// <summary>
    /// Random adds, finds and removes against a Dictionary. Word0's low 16 bits are one of the first
    /// or the last 8 values, so that in every table size the keys crowd into the first and the last
    /// slots: clusters are long and wrap around the end, which is where backward shift can go wrong.
    /// </summary>
    [Test]
    public void RandomOperations_AgreeWithADictionary([Values(1, 2, 3)] int seed, [Values] bool randomHomes)
    {
        var random = new Random(seed);
        var index = new ChunkIndex<Item>(0, randomHomes);
        var oracle = new Dictionary<ChunkKey, Item>();
        var universe = Enumerable.Range(0, 3000)
            .Select(i => new ChunkKey((ulong)(uint)(random.Next(-8, 8) & 0xFFFF) | ((ulong)(uint)random.Next() << 16), (ulong)i, 0, 0)).ToArray();
        for (int step = 0; step < 60_000; step++)
        {
            var key = universe[random.Next(universe.Length)];
            switch (random.Next(3))
            {
                case 0:
                    var item = new Item(key, step);
                    bool added = index.TryAdd(item);
                    Assert.That(added, Is.EqualTo(oracle.TryAdd(key, item)), $"add at step {step}");
                    break;
                case 1:
                    Assert.That(index.Remove(key), Is.EqualTo(oracle.Remove(key)), $"remove at step {step}");
                    break;
                default:
                    Assert.That(index.Find(key), Is.SameAs(oracle.GetValueOrDefault(key)), $"find at step {step}");
                    break;
            }
            Assert.That(index.Count, Is.EqualTo(oracle.Count));
            if (step % 5000 == 0)
                foreach (var (k, v) in oracle) Assert.That(index.Find(k), Is.SameAs(v));
        }
        Assert.That(index.ValuesToArray(), Is.EquivalentTo(oracle.Values));
    }

    /// <summary>
    /// Keys chosen to share Word0's low 16 bits (what someone who wanted one long cluster would
    /// search prompts for) spread over a production table's slots: its homes mix in a random seed.
    /// </summary>
    [Test]
    public void KeysSharingTheirLowBits_SpreadInATableWithRandomHomes()
    {
        var index = new ChunkIndex<Item>(4000);
        var keys = Enumerable.Range(0, 2000).Select(i => Colliding(i)).ToArray();
        int distinctHomes = keys.Select(k => index.Home(k.Word0)).Distinct().Count();
        // 2000 keys thrown at random into 8192 slots land in about 1780 distinct ones.
        Assert.That(index.Capacity, Is.EqualTo(8192));
        Assert.That(distinctHomes, Is.GreaterThan(1600));
        Assert.That(Placed(4000).Home(keys[0].Word0), Is.EqualTo(Placed(4000).Home(keys[1].Word0)), "without the seed they would share one home");
        foreach (var (key, i) in keys.Select((k, i) => (k, i))) Assert.That(index.TryAdd(new Item(key, i)), Is.True);
        foreach (var key in keys) Assert.That(index.Find(key)?.Key, Is.EqualTo(key));
    }
}
