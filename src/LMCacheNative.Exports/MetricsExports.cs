using System.Runtime.InteropServices;

namespace LMCacheNative.Exports;

/// <summary>The metrics section of the C ABI: the engine's counters as Prometheus text.</summary>
internal static unsafe class MetricsExports
{
    /// <summary>
    /// lmc_engine_get_metrics: the Prometheus text exposition format, with lmc_engine_get_config's
    /// size-query protocol (needed size including the NUL; LMC_E_BUFFER_TOO_SMALL when it does not fit).
    /// </summary>
    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_get_metrics")]
    public static int EngineGetMetrics(long* neededOut, nint engine, byte* buffer, long capacity)
    {
        try
        {
            Exports.RequireOut(neededOut, "needed_out");
            var cacheEngine = HandleTable.Get(engine);
            return Exports.WriteText(neededOut, buffer, capacity, cacheEngine.GetPrometheusMetrics(), "the metrics");
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }
}
