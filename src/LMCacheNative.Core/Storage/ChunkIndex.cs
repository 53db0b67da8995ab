using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics.X86;
using LMCacheNative.Core.Keys;

namespace LMCacheNative.Core.Storage;

/// <summary>A value that carries its own <see cref="ChunkKey"/>, so an index need not store the whole key.</summary>
public interface IChunkKeyed
{
    ChunkKey Key { get; }
}

/// <summary>
/// Hash table from <see cref="ChunkKey"/> to the value that carries that key, built for a CPU tier
/// of a million chunks and more, where every probe of a key the cache has not seen misses the CPU
/// caches. Open addressing with linear probing over one array of 16-byte slots: the key's
/// <see cref="ChunkKey.Word0"/> and a handle, the value's place in a separate array of values
/// (handle + 1; 0 marks an empty slot).
///
/// Why handles instead of references in the slots: the table is a large object that lives as long
/// as the tier, and every insert writes into a random slot. Were those slots references to young
/// objects, each gen0 collection would scan every card the inserts since the previous one dirtied,
/// one random 256-byte card per insert (measured: 22 % of a store's time at 1M chunks). With handles
/// the table holds no references at all; the references sit in the values array, which fills in
/// handle order (freed handles are reused last-freed first), so a store's 256 new chunks dirty a few
/// adjacent cards.
///
/// Why not a <see cref="Dictionary{TKey,TValue}"/>: its probe reads a bucket array and then an entry
/// array (48 bytes an entry for a 32-byte key), two dependent cache misses per key once the table
/// outgrows the caches, and it offers no way to ask for a slot ahead of time. Here a key's home slot
/// is a function of the key's Word0 and the table's random seed (<see cref="Home"/>), so
/// callers that probe many keys in one go — a store plans 256 chunks at once — call
/// <see cref="Prefetch"/> on keys a few places ahead (<see cref="PrefetchDistance"/>) and the misses
/// overlap instead of adding up. A miss compares Word0 only and never touches the value; a Word0 match
/// is confirmed against the value's full key.
///
/// Memory: 16 bytes a slot at a load of 3/8 to 3/4, plus 8 bytes a value up to the load limit and
/// 4 bytes a freed handle (about 35 to 60 bytes an entry; a Dictionary of the same keys takes about 65).
///
/// Capacity is a power of two, at most <see cref="MaxLoadNumerator"/>/<see cref="MaxLoadDenominator"/>
/// full (doubling when an insert would pass that); removal shifts the following entries of the
/// cluster back (no tombstones, so probes never slow down with churn). Not thread-safe: the owner
/// locks.
/// </summary>
public sealed class ChunkIndex<TValue> where TValue : class, IChunkKeyed
{
    private struct Slot
    {
        public ulong Word0;
        /// <summary>Index into <see cref="_values"/> plus one; 0: the slot is empty.</summary>
        public int Handle;
    }

    /// <summary>Keys ahead of the one being probed that callers prefetch: enough misses in flight to cover DRAM latency.</summary>
    public const int PrefetchDistance = 16;
    public const int MaxLoadNumerator = 3, MaxLoadDenominator = 4;
    private const int MinCapacity = 16;
    /// <summary>Largest slot count: 2^30 slots (16 GiB of table) is beyond any pool this runs with.</summary>
    private const int MaxCapacity = 1 << 30;

    private Slot[] _slots;
    private int _mask;
    // Home slot = the top log2(capacity) bits of (Word0 ^ _homeSeed) * a 64-bit odd constant
    // (Fibonacci hashing), _homeSeed random per table: see Home.
    private int _homeShift;
    private readonly ulong _homeSeed;
    private readonly bool _randomHomes;
    private int _count;
    private int _growAt;
    // Values by handle; handles below _handlesUsed that are not in use are on _freeHandles. As long
    // as the table's load limit (_growAt entries), so that it grows with the table and never on an
    // insert of its own.
    private TValue?[] _values = [];
    private int _handlesUsed;
    private int[] _freeHandles = new int[MinCapacity];
    private int _freeCount;

    /// <param name="expectedCount">entries the table should hold without growing (rounded up to a power-of-two capacity)</param>
    public ChunkIndex(int expectedCount = 0) : this(expectedCount, randomHomes: true)
    {
    }

    /// <param name="randomHomes">false: a key's home slot is Word0's low bits, so that tests can place keys in chosen slots</param>
    internal ChunkIndex(int expectedCount, bool randomHomes)
    {
        _randomHomes = randomHomes;
        _homeSeed = randomHomes ? (ulong)Random.Shared.NextInt64() ^ ((ulong)Random.Shared.NextInt64() << 1) : 0;
        _slots = null!;
        Allocate(CapacityFor(expectedCount));
    }

    /// <summary>
    /// A key's home slot. Chunk keys are hashes, but of tokens that users choose, and a prompt can be
    /// searched offline for chunk keys that share Word0's low bits (about 2^20 tries for 20 bits, with
    /// any hash): with homes taken straight from those bits such keys would pile into one cluster and
    /// make every probe of it linear (the Dictionary this replaced had the same weakness). A per-table
    /// random seed mixed in by one multiplication puts the homes out of an outsider's reach, for one
    /// multiply per probe.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal int Home(ulong word0) =>
        _randomHomes ? (int)(((word0 ^ _homeSeed) * 0x9E3779B97F4A7C15UL) >> _homeShift) : (int)word0 & _mask;

    public int Count => _count;

    /// <summary>Slots allocated (a power of two).</summary>
    public int Capacity => _slots.Length;

    /// <summary>Smallest power-of-two capacity that holds <paramref name="count"/> entries within the load limit.</summary>
    public static int CapacityFor(long count)
    {
        long needed = Math.Max(MinCapacity, (count * MaxLoadDenominator + MaxLoadNumerator - 1) / MaxLoadNumerator);
        if (needed > MaxCapacity) throw new ArgumentOutOfRangeException(nameof(count), count, "more entries than a chunk index holds");
        return (int)BitOperations.RoundUpToPowerOf2((uint)needed);
    }

    /// <summary>
    /// Asks the CPU to start loading <paramref name="key"/>'s home slot into the cache (no effect
    /// where SSE is unavailable; SSE is in the x64 baseline that NativeAOT targets).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public unsafe void Prefetch(in ChunkKey key)
    {
        if (Sse.IsSupported)
        {
            // The address is only a hint: should the GC move the array meanwhile, a prefetch of the
            // old address loads a useless line and never faults.
            ref Slot home = ref _slots[Home(key.Word0)];
            Sse.Prefetch0(Unsafe.AsPointer(ref home));
        }
    }

    /// <summary>Prefetches the home slots of the first <see cref="PrefetchDistance"/> keys: call before a loop that then calls <see cref="PrefetchAhead"/>.</summary>
    public void PrefetchFirst(ReadOnlySpan<ChunkKey> keys)
    {
        int end = Math.Min(keys.Length, PrefetchDistance);
        for (int i = 0; i < end; i++) Prefetch(keys[i]);
    }

    /// <summary>In a loop probing <c>keys[i]</c>: prefetches <c>keys[i + PrefetchDistance]</c> when there is one.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void PrefetchAhead(ReadOnlySpan<ChunkKey> keys, int i)
    {
        int ahead = i + PrefetchDistance;
        if ((uint)ahead < (uint)keys.Length) Prefetch(keys[ahead]);
    }

    /// <summary>The value stored under <paramref name="key"/>, or null.</summary>
    public TValue? Find(in ChunkKey key)
    {
        var slots = _slots;
        int mask = _mask;
        ulong word0 = key.Word0;
        for (int i = Home(word0); ; i = (i + 1) & mask)
        {
            ref Slot slot = ref slots[i];
            if (slot.Handle == 0) return null;
            if (slot.Word0 == word0 && _values[slot.Handle - 1] is { } value && value.Key == key) return value;
        }
    }

    public bool ContainsKey(in ChunkKey key) => Find(key) is not null;

    /// <summary>Stores <paramref name="value"/> under its key; returns false (and changes nothing) when the key is present already.</summary>
    public bool TryAdd(TValue value)
    {
        ArgumentNullException.ThrowIfNull(value);
        if (_count >= _growAt) Grow();
        ChunkKey key = value.Key;
        ulong word0 = key.Word0;
        var slots = _slots;
        int mask = _mask;
        for (int i = Home(word0); ; i = (i + 1) & mask)
        {
            ref Slot slot = ref slots[i];
            if (slot.Handle == 0)
            {
                int handle = TakeHandle();
                _values[handle] = value;
                slot.Word0 = word0;
                slot.Handle = handle + 1;
                _count++;
                return true;
            }
            if (slot.Word0 == word0 && _values[slot.Handle - 1]!.Key == key) return false;
        }
    }

    /// <summary>Removes the entry under <paramref name="key"/>; returns whether there was one.</summary>
    public bool Remove(in ChunkKey key)
    {
        var slots = _slots;
        int mask = _mask;
        ulong word0 = key.Word0;
        int hole = Home(word0);
        for (; ; hole = (hole + 1) & mask)
        {
            ref Slot slot = ref slots[hole];
            if (slot.Handle == 0) return false;
            if (slot.Word0 == word0 && _values[slot.Handle - 1]!.Key == key) break;
        }
        ReturnHandle(slots[hole].Handle - 1);
        // Backward shift: walk the rest of the cluster and move back every entry whose home slot does
        // not lie (cyclically) after the hole, so that no probe ever crosses an empty slot before
        // reaching its key.
        for (int next = (hole + 1) & mask; ; next = (next + 1) & mask)
        {
            ref Slot candidate = ref slots[next];
            if (candidate.Handle == 0) break;
            int home = Home(candidate.Word0);
            // candidate may stay where it is when its home lies in (hole, next], cyclically.
            bool stays = hole <= next ? hole < home && home <= next : hole < home || home <= next;
            if (stays) continue;
            slots[hole] = candidate;
            hole = next;
        }
        slots[hole] = default;
        _count--;
        return true;
    }

    /// <summary>Removes every entry; keeps the capacity.</summary>
    public void Clear()
    {
        Array.Clear(_slots);
        Array.Clear(_values);
        _handlesUsed = 0;
        _freeCount = 0;
        _count = 0;
    }

    /// <summary>The values, in table order (a copy: the caller may change the table while walking it).</summary>
    public TValue[] ValuesToArray()
    {
        var values = new TValue[_count];
        int n = 0;
        foreach (ref readonly Slot slot in _slots.AsSpan())
            if (slot.Handle != 0) values[n++] = _values[slot.Handle - 1]!;
        return values;
    }

    private void Grow()
    {
        var old = _slots;
        if (old.Length >= MaxCapacity) throw new InvalidOperationException("chunk index full");
        Allocate(old.Length * 2);
        var slots = _slots;
        int mask = _mask;
        foreach (ref readonly Slot entry in old.AsSpan())
        {
            if (entry.Handle == 0) continue;
            int i = Home(entry.Word0);
            while (slots[i].Handle != 0) i = (i + 1) & mask;
            slots[i] = entry;
        }
    }

    private int TakeHandle()
    {
        if (_freeCount > 0) return _freeHandles[--_freeCount];
        // Fewer handles are in use than entries fit below the load limit, and _values is that long.
        return _handlesUsed++;
    }

    private void ReturnHandle(int handle)
    {
        _values[handle] = null;
        if (_freeCount == _freeHandles.Length) Array.Resize(ref _freeHandles, _freeHandles.Length * 2);
        _freeHandles[_freeCount++] = handle;
    }

    private void Allocate(int capacity)
    {
        _slots = new Slot[capacity];
        _mask = capacity - 1;
        _homeShift = 64 - BitOperations.Log2((uint)capacity);
        _growAt = (int)((long)capacity * MaxLoadNumerator / MaxLoadDenominator);
        if (_values.Length < _growAt) Array.Resize(ref _values, _growAt);
    }
}
