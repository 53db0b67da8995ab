using System.Collections.Concurrent;
using LMCacheNative.Core;
using LMCacheNative.Core.Engine;

namespace LMCacheNative.Exports;

/// <summary>
/// Maps the opaque lmc_engine* values handed to C to engines. A handle is a number, never a
/// pointer into managed memory, and numbers are never reused, so a destroyed or made-up handle is
/// reported as LMC_E_INVALID_HANDLE instead of being dereferenced.
/// </summary>
internal static class HandleTable
{
    public static nint Add(CacheEngine engine) => s_engines.Add(engine);
    public static CacheEngine Get(nint handle) => s_engines.Get(handle);
    public static CacheEngine? Remove(nint handle) => s_engines.Remove(handle);

    private static readonly HandleTable<CacheEngine> s_engines = new("engine");
}

/// <summary>Background jobs (prefetch now; asynchronous transfers later) behind lmc_job*.</summary>
internal static class JobTable
{
    private static readonly HandleTable<Task<long>> s_jobs = new("job");

    public static nint Add(Task<long> job) => s_jobs.Add(job);
    public static Task<long> Get(nint handle) => s_jobs.Get(handle);
    public static void Remove(nint handle)
    {
        // A job still running keeps going; observe its failure so it is not reported as unobserved.
        s_jobs.Remove(handle)?.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
    }
}

/// <summary>
/// Opaque handles for one kind of object. A handle is a number, never a pointer into managed memory,
/// and numbers are never reused (across kinds either), so a destroyed or made-up handle is reported as
/// LMC_E_INVALID_HANDLE instead of being dereferenced.
/// </summary>
internal sealed class HandleTable<T>(string kind) where T : class
{
    // Handles start high and step by 16 so they look like (aligned) pointers to C debuggers, and a
    // small integer passed by mistake is never a live handle.
    private const long FirstHandle = 0x1_0000;
    private const long HandleStep = 16;

    private static long s_lastHandle = FirstHandle - HandleStep; // shared by every kind
    private readonly ConcurrentDictionary<nint, T> _items = new();

    public nint Add(T item)
    {
        nint handle = (nint)Interlocked.Add(ref s_lastHandle, HandleStep);
        _items[handle] = item;
        return handle;
    }

    public T Get(nint handle)
    {
        if (handle == 0) throw new LmcException(LmcErrorKind.InvalidHandle, $"{kind} handle is NULL");
        return _items.TryGetValue(handle, out var item)
            ? item
            : throw new LmcException(LmcErrorKind.InvalidHandle, $"{kind} handle 0x{handle:x} is not a live {kind} (destroyed, or never created)");
    }

    public T? Remove(nint handle) => _items.TryRemove(handle, out var item) ? item : null;
}
