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
    // Handles start high and step by 16 so they look like (aligned) pointers to C debuggers, and a
    // small integer passed by mistake is never a live handle.
    private const long FirstHandle = 0x1_0000;
    private const long HandleStep = 16;

    private static readonly ConcurrentDictionary<nint, CacheEngine> s_engines = new();
    private static long s_lastHandle = FirstHandle - HandleStep;

    public static nint Add(CacheEngine engine)
    {
        nint handle = (nint)Interlocked.Add(ref s_lastHandle, HandleStep);
        s_engines[handle] = engine;
        return handle;
    }

    public static CacheEngine Get(nint handle)
    {
        if (handle == 0) throw new LmcException(LmcErrorKind.InvalidHandle, "engine handle is NULL");
        return s_engines.TryGetValue(handle, out var engine)
            ? engine
            : throw new LmcException(LmcErrorKind.InvalidHandle, $"engine handle 0x{handle:x} is not a live engine (destroyed, or never created)");
    }

    public static CacheEngine? Remove(nint handle) => s_engines.TryRemove(handle, out var engine) ? engine : null;
}
