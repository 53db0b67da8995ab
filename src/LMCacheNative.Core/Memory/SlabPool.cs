using System.Runtime.InteropServices;

namespace LMCacheNative.Core.Memory;

/// <summary>
/// Where the pool's host memory comes from. Plain aligned host memory here; the CUDA path supplies
/// pinned, mapped memory (cuMemHostAlloc) through the same seam.
/// </summary>
public interface IHostMemoryAllocator
{
    /// <summary>
    /// Allocates <paramref name="bytes"/> bytes, aligned to at least 4 KiB (64 bytes, a cache line,
    /// for allocations smaller than a page); returns 0 when the memory is not available.
    /// </summary>
    nint Allocate(long bytes);
    void Free(nint address, long bytes);
}

/// <summary>
/// Page-aligned memory from the C runtime heap. Allocations of at least one huge page (2 MiB) are
/// aligned to 2 MiB and advised to use transparent huge pages: a slab is a whole chunk (tens of MiB
/// for a Llama-sized model), streamed through at memory speed, and with 4 KiB pages every 4 KiB of
/// it costs a TLB miss and, on first touch, a page fault (262,144 faults per GiB instead of 512).
/// Allocations smaller than a page (tiny chunks of a tiny model) are aligned to a cache line only:
/// page alignment would spend a whole 4 KiB page on each.
/// </summary>
public sealed unsafe class AlignedHostAllocator : IHostMemoryAllocator
{
    public const int Alignment = 4096;
    public const int HugePageBytes = 2 << 20;
    public const int CacheLineBytes = 64;

    public static readonly AlignedHostAllocator Instance = new();

    public nint Allocate(long bytes)
    {
        try
        {
            bool huge = bytes >= HugePageBytes && OperatingSystem.IsLinux();
            nuint alignment = huge ? HugePageBytes : bytes < Alignment ? (nuint)CacheLineBytes : Alignment;
            nint address = (nint)NativeMemory.AlignedAlloc((nuint)bytes, alignment);
            if (huge) Posix.AdviseHugePages(address, bytes & ~((long)HugePageBytes - 1));
            return address;
        }
        catch (OutOfMemoryException)
        {
            return 0;
        }
    }

    public void Free(nint address, long bytes) => NativeMemory.AlignedFree((void*)address);
}

/// <summary>
/// A pool of equal-sized slabs, one per cached chunk (a full chunk's bytes; a partial chunk uses a
/// whole slab too). Because every slab has the same size, freeing and reusing never fragments the
/// pool, however long it runs — unlike a first-fit allocator (LMCache issues #745, #1285). Slabs are
/// allocated on first use, up to the capacity, and kept for reuse until the pool is disposed.
///
/// Slabs of up to 64 KiB are carved from blocks of about 2 MiB (a huge page), one allocation per
/// block instead of one per slab: with tiny chunks (a 16-token chunk of a small model is a few
/// hundred bytes) one allocator call and a page fault every few slabs cost more than the store's
/// copy, and the C heap adds its own header and alignment padding to every slab. Larger slabs are
/// allocated alone, as before: their copy dwarfs that cost, and 1 MiB slabs carved two to a block
/// showed no gain in the layout benchmark (NHD fp8 chunk 16, within its ±20 % noise). Each slab in a
/// block starts at a multiple of the allocator's alignment for its size (64 bytes below a page,
/// 4 KiB from a page up), the guarantee a slab allocated alone had.
/// Not thread-safe: the cache engine calls it under its lock.
/// </summary>
public sealed class SlabPool : IDisposable
{
    /// <summary>Bytes a block of small slabs aims at: one transparent huge page.</summary>
    public const long BlockBytes = AlignedHostAllocator.HugePageBytes;
    /// <summary>Largest slab carved from a block (32 to a block); larger ones are one allocation each.</summary>
    public const long MaxCarvedSlabBytes = 64 << 10;

    private readonly IHostMemoryAllocator _allocator;
    private readonly Stack<nint> _free = new();
    // (address, bytes) of every allocation made, freed at disposal.
    private readonly List<(nint Address, long Bytes)> _blocks = new();
    // Distance between slabs carved from one block (SlabBytes rounded up to the slab alignment),
    // and slabs per full block (1: every slab is its own allocation).
    private readonly long _slabStride;
    private readonly long _slabsPerBlock;
    private long _allocatedSlabs;
    private bool _disposed;

    /// <param name="slabBytes">bytes per slab (one full chunk), > 0</param>
    /// <param name="capacityBytes">upper bound of the pool; it holds floor(capacity / slab) slabs</param>
    public SlabPool(long slabBytes, long capacityBytes, IHostMemoryAllocator allocator)
    {
        ArgumentOutOfRangeException.ThrowIfLessThanOrEqual(slabBytes, 0);
        ArgumentOutOfRangeException.ThrowIfNegative(capacityBytes);
        SlabBytes = slabBytes;
        CapacitySlabs = capacityBytes / slabBytes;
        _allocator = allocator;
        long alignment = slabBytes < AlignedHostAllocator.Alignment ? AlignedHostAllocator.CacheLineBytes : AlignedHostAllocator.Alignment;
        _slabStride = (slabBytes + alignment - 1) / alignment * alignment;
        _slabsPerBlock = slabBytes > MaxCarvedSlabBytes ? 1 : BlockBytes / _slabStride;
    }

    public long SlabBytes { get; }
    public long CapacitySlabs { get; }
    public long CapacityBytes => CapacitySlabs * SlabBytes;
    /// <summary>Slabs handed out and not yet returned.</summary>
    public long RentedSlabs { get; private set; }
    public long UsedBytes => RentedSlabs * SlabBytes;

    /// <summary>A slab, or 0 when the pool is at capacity (or the system is out of memory): the caller evicts and retries, or gives up.</summary>
    public nint TryRent()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_free.Count == 0 && !TryGrow()) return 0;
        RentedSlabs++;
        return _free.Pop();
    }

    /// <summary>
    /// Allocates the next block (never past the capacity) and pushes its slabs onto the free stack,
    /// the first slab on top so that slabs are handed out in address order. A block that cannot be
    /// had falls back to a single slab, so that memory pressure costs cache, not the store.
    /// </summary>
    private bool TryGrow()
    {
        long slabs = Math.Min(_slabsPerBlock, CapacitySlabs - _allocatedSlabs);
        if (slabs <= 0) return false;
        long bytes = slabs == 1 ? SlabBytes : slabs * _slabStride;
        nint block = _allocator.Allocate(bytes);
        if (block == 0 && slabs > 1)
        {
            slabs = 1;
            bytes = SlabBytes;
            block = _allocator.Allocate(bytes);
        }
        if (block == 0) return false;
        _blocks.Add((block, bytes));
        _allocatedSlabs += slabs;
        for (long i = slabs - 1; i >= 0; i--) _free.Push(block + (nint)(i * _slabStride));
        return true;
    }

    public void Return(nint slab)
    {
        if (_disposed) return;
        if (slab == 0) throw new ArgumentException("slab is null", nameof(slab));
        _free.Push(slab);
        RentedSlabs--;
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var (address, bytes) in _blocks) _allocator.Free(address, bytes);
        _blocks.Clear();
        _free.Clear();
        RentedSlabs = 0;
    }
}
