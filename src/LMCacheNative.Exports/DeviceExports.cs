using System.Runtime.InteropServices;
using LMCacheNative.Core;
using LMCacheNative.Cuda;

namespace LMCacheNative.Exports;

/// <summary>
/// The CUDA section of the C ABI: the device query and the stream-ordered store and retrieve. The
/// CUDA backend is created here for the whole process; creating it loads nothing (the driver is
/// loaded on the first CUDA registration or device query), so the library keeps working without
/// libcuda.so.1.
/// </summary>
internal static unsafe class DeviceExports
{
    /// <summary>The process's CUDA backend, handed to every engine (composition root).</summary>
    internal static readonly CudaBackend Cuda = new();

    [UnmanagedCallersOnly(EntryPoint = "lmc_cuda_device_count")]
    public static int CudaDeviceCount(int* countOut)
    {
        try
        {
            Exports.RequireOut(countOut, "count_out");
            *countOut = Cuda.DeviceCount();
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_store_async")]
    public static int StoreAsync(nint* jobOut, long* storedTokensOut, nint engine, int* tokens, long* slotMapping, long numTokens,
        long skipLeadingTokens, byte* extraKey, long extraKeyLength, nint stream)
    {
        try
        {
            Exports.RequireOut(jobOut, "job_out");
            Exports.RequireOut(storedTokensOut, "stored_tokens_out");
            var cacheEngine = HandleTable.Get(engine);
            var input = Exports.Transfer(tokens, slotMapping, numTokens, extraKey, extraKeyLength);
            var store = cacheEngine.StoreAsync(input.Tokens, input.Slots, skipLeadingTokens, input.ExtraKey, stream, out long tokensInCache);
            // GetResult rethrows the original exception, so a failed job reports its own status.
            var job = store.ContinueWith(static t => t.GetAwaiter().GetResult().TokensInCache,
                CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            *jobOut = JobTable.Add(job);
            *storedTokensOut = tokensInCache;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_retrieve_async")]
    public static int RetrieveAsync(nint* jobOut, long* retrievedTokensOut, nint engine, int* tokens, long* slotMapping, long numTokens,
        long firstTokenToWrite, byte* extraKey, long extraKeyLength, nint stream)
    {
        try
        {
            Exports.RequireOut(jobOut, "job_out");
            Exports.RequireOut(retrievedTokensOut, "retrieved_tokens_out");
            var cacheEngine = HandleTable.Get(engine);
            var input = Exports.Transfer(tokens, slotMapping, numTokens, extraKey, extraKeyLength);
            var retrieve = cacheEngine.RetrieveAsync(input.Tokens, input.Slots, firstTokenToWrite, input.ExtraKey, stream, out long retrieved);
            var job = retrieve.ContinueWith(static t => t.GetAwaiter().GetResult().RetrievedTokens,
                CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            *jobOut = JobTable.Add(job);
            *retrievedTokensOut = retrieved;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }
}
