using System.Collections.Concurrent;
using LMCacheNative.Core;
using LMCacheNative.Core.Engine;

namespace LMCacheNative.Exports;

/// <summary>The kinds of object behind an opaque C handle. The value is stored in the handle's bits.</summary>
internal enum HandleKind
{
    Engine = 1,
    Job = 2,
}

/// <summary>
/// Numbers every handle of the process, whatever its kind. A handle is
/// <c>kind &lt;&lt; 48 | sequence * 16</c>: the sequence is one counter for all kinds, so no two live or
/// dead handles are ever equal, and the kind bits let a table refuse a handle of another kind with one
/// shift, before any lookup. Handles step by 16 so they look like aligned pointers to C debuggers,
/// and start high so a small integer passed by mistake is never a live handle.
/// </summary>
internal static class HandleNumbers
{
    private const int KindShift = 48;
    private const long SequenceMask = (1L << KindShift) - 1;
    private const long Step = 16;
    private static long s_lastSequence = 0x1_0000 - Step;

    public static nint Next(HandleKind kind) =>
        (nint)(((long)kind << KindShift) | (Interlocked.Add(ref s_lastSequence, Step) & SequenceMask));

    /// <summary>The kind encoded in <paramref name="handle"/>, or null for a number no table hands out.</summary>
    public static HandleKind? KindOf(nint handle) => ((long)handle >>> KindShift) switch
    {
        (long)HandleKind.Engine => HandleKind.Engine,
        (long)HandleKind.Job => HandleKind.Job,
        _ => null,
    };

    public static string Describe(HandleKind kind) => kind == HandleKind.Engine ? "engine" : "job";
    public static string WithArticle(HandleKind kind) => kind == HandleKind.Engine ? "an engine" : "a job";
}

/// <summary>Engines behind lmc_engine*.</summary>
internal static class HandleTable
{
    private static readonly HandleTable<CacheEngine> s_engines = new(HandleKind.Engine);

    public static nint Add(CacheEngine engine) => s_engines.Add(engine);
    public static CacheEngine Get(nint handle) => s_engines.Get(handle);
    public static CacheEngine? Remove(nint handle) => s_engines.Remove(handle);
}

/// <summary>
/// The lookup server of each engine that serves one (lmc_lookup_server_start), by engine handle. Kept
/// beside the engine, not in it: serving other processes is the C ABI's business, not the cache's.
/// One lock for start, stop and destroy, which are rare, so a server never outlives its engine.
/// </summary>
internal static class LookupServers
{
    private static readonly Dictionary<nint, LMCacheNative.Core.Lookup.LookupServer> s_servers = new();

    public static void Start(nint handle, CacheEngine engine, string socketPath)
    {
        lock (s_servers)
        {
            if (s_servers.TryGetValue(handle, out var running))
                throw LmcException.InvalidArgument($"the engine already serves lookups on {running.SocketPath}; stop that first");
            // Checked under the lock: a destroy that removed the handle meanwhile has already stopped its server.
            HandleTable.Get(handle);
            s_servers[handle] = new LMCacheNative.Core.Lookup.LookupServer(engine, socketPath);
        }
    }

    /// <summary>Stops the engine's server, if any (idempotent).</summary>
    public static void Stop(nint handle)
    {
        LMCacheNative.Core.Lookup.LookupServer? server;
        lock (s_servers)
        {
            if (!s_servers.Remove(handle, out server)) return;
        }
        server.Dispose();
    }
}

/// <summary>Background requests (stores, retrieves, prefetches) behind lmc_job*.</summary>
internal static class JobTable
{
    private static readonly HandleTable<Task<TransferResult>> s_jobs = new(HandleKind.Job);

    public static nint Add(Task<TransferResult> job) => s_jobs.Add(job);
    public static Task<TransferResult> Get(nint handle) => s_jobs.Get(handle);
    /// <summary>Drops a live job handle; false when <paramref name="handle"/> is not one.</summary>
    public static bool Remove(nint handle)
    {
        if (s_jobs.Remove(handle) is not { } job) return false;
        // A job still running keeps going; observe its failure so it is not reported as unobserved.
        job.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
        return true;
    }
}

/// <summary>
/// Opaque handles for one kind of object. A handle is a number, never a pointer into managed memory,
/// and numbers are never reused, so a destroyed, made-up or other-kind handle is reported as
/// LMC_E_INVALID_HANDLE instead of being dereferenced or acted on.
/// </summary>
internal sealed class HandleTable<T>(HandleKind kind) where T : class
{
    private readonly ConcurrentDictionary<nint, T> _items = new();
    private readonly string _name = HandleNumbers.Describe(kind);

    public nint Add(T item)
    {
        nint handle = HandleNumbers.Next(kind);
        _items[handle] = item;
        return handle;
    }

    public T Get(nint handle)
    {
        if (handle == 0) throw new LmcException(LmcStatus.InvalidHandle, $"{_name} handle is NULL");
        if (HandleNumbers.KindOf(handle) is { } other && other != kind)
            throw new LmcException(LmcStatus.InvalidHandle,
                $"handle 0x{handle:x} is {HandleNumbers.WithArticle(other)} handle where {HandleNumbers.WithArticle(kind)} handle is expected");
        return _items.TryGetValue(handle, out var item)
            ? item
            : throw new LmcException(LmcStatus.InvalidHandle, $"{_name} handle 0x{handle:x} is not a live {_name} (destroyed, or never created)");
    }

    /// <summary>Removes a live handle of this kind; any other number (another kind's included) removes nothing.</summary>
    public T? Remove(nint handle) =>
        HandleNumbers.KindOf(handle) == kind && _items.TryRemove(handle, out var item) ? item : null;
}
