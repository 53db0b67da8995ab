using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using LMCacheNative.Core;
using LMCacheNative.Core.Engine;

namespace LMCacheNative.Exports;

/// <summary>
/// The request section of the C ABI: lookup, store, retrieve and prefetch, each taking one
/// lmc_request, synchronously or as a job, and the job functions. Every job's result is an
/// lmc_transfer_result, the same struct the synchronous calls fill.
/// </summary>
internal static unsafe class RequestExports
{
    [UnmanagedCallersOnly(EntryPoint = "lmc_lookup")]
    public static int Lookup(NativeLookupResult* resultOut, nint engine, NativeRequest* request)
    {
        try
        {
            uint size = ResultSize(resultOut, "result_out", NativeLookupResult.SizeV1);
            var cacheEngine = HandleTable.Get(engine);
            var input = ReadRequest(request, needsDestination: false);
            if (input.FirstToken != 0) throw LmcException.InvalidArgument($"lookup: request->first_token must be 0, got {input.FirstToken}");
            WriteLookupResult(resultOut, size, cacheEngine.Lookup(input.Tokens, input.ExtraKey));
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_store")]
    public static int Store(NativeTransferResult* resultOut, nint engine, NativeRequest* request, nint* jobOut) =>
        Transfer(resultOut, engine, request, jobOut, store: true);

    [UnmanagedCallersOnly(EntryPoint = "lmc_retrieve")]
    public static int Retrieve(NativeTransferResult* resultOut, nint engine, NativeRequest* request, nint* jobOut) =>
        Transfer(resultOut, engine, request, jobOut, store: false);

    /// <summary>One path for both directions: synchronous when job_out is NULL, a job otherwise.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)] // see WriteResult
    private static int Transfer(NativeTransferResult* resultOut, nint engine, NativeRequest* request, nint* jobOut, bool store)
    {
        RequestInput input = default;
        try
        {
            uint size = jobOut == null ? ResultSize(resultOut, "result_out", NativeTransferResult.SizeV1) : 0;
            var cacheEngine = HandleTable.Get(engine);
            input = ReadRequest(request, needsDestination: true);
            var kvRequest = input.ToKvRequest();
            if (jobOut != null)
            {
                var owned = kvRequest.ToOwned();
                var job = store ? cacheEngine.StoreAsync(owned) : cacheEngine.RetrieveAsync(owned);
                *jobOut = JobTable.Add(job);
                return ErrorState.Ok();
            }
            var result = store ? cacheEngine.Store(kvRequest) : cacheEngine.Retrieve(kvRequest);
            WriteResult(resultOut, size, result);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
        finally
        {
            input.Dispose();
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_prefetch_start")]
    public static int PrefetchStart(nint* jobOut, nint engine, NativeRequest* request)
    {
        try
        {
            Exports.RequireOut(jobOut, "job_out");
            var cacheEngine = HandleTable.Get(engine);
            var input = ReadRequest(request, needsDestination: false);
            var owned = new OwnedKvRequest(input.Tokens.ToArray(), input.ExtraKey.ToArray(), [], input.FirstToken, 0);
            *jobOut = JobTable.Add(cacheEngine.PrefetchAsync(owned));
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    // ---- jobs ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_job_wait")]
    public static int JobWait(NativeTransferResult* resultOut, nint job, long timeoutMs) => WaitForJob(resultOut, job, timeoutMs);

    [UnmanagedCallersOnly(EntryPoint = "lmc_job_result")]
    public static int JobResult(NativeTransferResult* resultOut, nint job) => WaitForJob(resultOut, job, 0);

    [MethodImpl(MethodImplOptions.NoInlining)] // see WriteResult
    private static int WaitForJob(NativeTransferResult* resultOut, nint job, long timeoutMs)
    {
        try
        {
            uint size = ResultSize(resultOut, "result_out", NativeTransferResult.SizeV1);
            var task = JobTable.Get(job);
            if (timeoutMs < -1) throw LmcException.InvalidArgument($"timeout_ms must be >= -1, got {timeoutMs}");
            try
            {
                // Task.Wait takes at most int.MaxValue ms (24.8 days): longer bounds wait forever.
                if (!task.Wait(timeoutMs == -1 || timeoutMs > int.MaxValue ? Timeout.InfiniteTimeSpan : TimeSpan.FromMilliseconds(timeoutMs)))
                    return ErrorState.Fail((int)LmcStatus.Timeout, $"the job is still running after {timeoutMs} ms");
            }
            catch (AggregateException failed) when (failed.InnerException is { } inner)
            {
                return ErrorState.FromException(inner);
            }
            WriteResult(resultOut, size, task.Result);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_job_poll")]
    public static int JobPoll(int* finishedOut, nint job)
    {
        try
        {
            Exports.RequireOut(finishedOut, "finished_out");
            *finishedOut = JobTable.Get(job).IsCompleted ? 1 : 0;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_job_destroy")]
    public static void JobDestroy(nint job)
    {
        try
        {
            if (job == 0 || JobTable.Remove(job)) ErrorState.Ok();
            else JobTable.Get(job); // not a live job: throws with the reason, recorded below
        }
        catch (Exception e)
        {
            ErrorState.FromException(e);
        }
    }

    /// <summary>Writes the first <paramref name="size"/> bytes of a lookup result (see <see cref="WriteResult"/> on inlining).</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void WriteLookupResult(NativeLookupResult* resultOut, uint size, in LookupResult result)
    {
        var native = new NativeLookupResult { StructSize = size, HitTokens = result.HitTokens, ElapsedNs = result.ElapsedNanoseconds };
        for (int t = 0; t < TierCounts.MaxTiers; t++) native.TokensByTier[t] = result.TokensByTier[t];
        Buffer.MemoryCopy(&native, resultOut, size, Math.Min(size, (uint)sizeof(NativeLookupResult)));
    }

    // ---- argument translation ----

    /// <summary>
    /// A request read from the caller's lmc_request: spans over the caller's memory, and the slot
    /// mapping either over the caller's memory too or, for a block table, expanded into a rented
    /// array that <see cref="Dispose"/> returns.
    /// </summary>
    private ref struct RequestInput
    {
        public ReadOnlySpan<int> Tokens;
        public ReadOnlySpan<byte> ExtraKey;
        public ReadOnlySpan<long> Slots;
        public long FirstToken;
        public nint Stream;
        public long[]? Rented;

        public readonly KvRequest ToKvRequest() => new(Tokens, ExtraKey, Slots, FirstToken, Stream);

        public void Dispose()
        {
            if (Rented is not null) ArrayPool<long>.Shared.Return(Rented);
            Rented = null;
        }
    }

    private static RequestInput ReadRequest(NativeRequest* request, bool needsDestination)
    {
        if (request == null) throw LmcException.InvalidArgument("request is NULL");
        if (request->StructSize < NativeRequest.SizeV1)
            throw LmcException.InvalidArgument($"request->struct_size {request->StructSize} is smaller than lmc_request ({NativeRequest.SizeV1} bytes); set it to sizeof(lmc_request)");
        if (request->Reserved != 0) throw LmcException.InvalidArgument($"request->reserved must be 0, got {request->Reserved}");
        // Refused before anything is copied (a job copies the request): 1 MiB is the bound everywhere.
        if (request->ExtraKeyLen > Core.Keys.ChunkHasher.MaxExtraKeyBytes)
            throw LmcException.InvalidArgument($"extra_key_len {request->ExtraKeyLen} exceeds the limit of {Core.Keys.ChunkHasher.MaxExtraKeyBytes} bytes");
        var input = new RequestInput
        {
            Tokens = Exports.Input(request->Tokens, request->NumTokens, "request->tokens", "request->num_tokens"),
            ExtraKey = Exports.Input(request->ExtraKey, request->ExtraKeyLen, "request->extra_key", "request->extra_key_len"),
            FirstToken = request->FirstToken,
            Stream = request->Stream,
        };
        if (input.FirstToken < 0 || input.FirstToken > input.Tokens.Length)
            throw LmcException.InvalidArgument($"request->first_token must be in [0, num_tokens = {input.Tokens.Length}], got {input.FirstToken}");
        if (!needsDestination) return input;

        switch (request->DestinationKind)
        {
            case NativeRequest.DestinationSlots:
                input.Slots = Exports.Input(request->SlotMapping, request->NumTokens, "request->slot_mapping", "request->num_tokens");
                break;
            case NativeRequest.DestinationBlockTable:
                var blockIds = Exports.Input(request->BlockIds, request->NumBlockIds, "request->block_ids", "request->num_block_ids");
                if (request->TableBlockSize < 1)
                    throw LmcException.InvalidArgument($"request->table_block_size must be >= 1, got {request->TableBlockSize}");
                input.Rented = ArrayPool<long>.Shared.Rent(Math.Max(input.Tokens.Length, 1));
                var slots = input.Rented.AsSpan(0, input.Tokens.Length);
                BlockTable.ExpandToSlots(blockIds, request->TableBlockSize, slots);
                input.Slots = slots;
                break;
            default:
                throw LmcException.InvalidArgument(
                    $"request->destination_kind must be LMC_DESTINATION_SLOTS (0) or LMC_DESTINATION_BLOCK_TABLE (1), got {request->DestinationKind}");
        }
        return input;
    }

    /// <summary>The caller's struct_size of a result struct (at least its first 8 bytes).</summary>
    private static uint ResultSize(void* result, string name, int currentSize)
    {
        Exports.RequireOut(result, name);
        uint size = *(uint*)result;
        if (size < 8) throw LmcException.InvalidArgument($"{name}->struct_size must be set to the struct's size ({currentSize} bytes), got {size}");
        return size;
    }

    /// <summary>
    /// Writes the first <paramref name="size"/> bytes of the result (an older caller's struct is
    /// shorter). Never inlined into an export: a local struct with a fixed buffer gives its method a
    /// stack cookie, and an export's cookie is read in its prologue, before the runtime starts on a
    /// process's first call, so the export would fail fast when it is the first call into the library.
    /// </summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void WriteResult(NativeTransferResult* resultOut, uint size, in TransferResult result)
    {
        var native = new NativeTransferResult
        {
            StructSize = size,
            TokensMatched = result.TokensMatched,
            TokensCopied = result.TokensCopied,
            BytesCopied = result.BytesCopied,
            ChunksSkippedForSpace = result.ChunksSkippedForSpace,
            ElapsedNs = result.ElapsedNanoseconds,
        };
        for (int t = 0; t < TierCounts.MaxTiers; t++) native.ChunksByTier[t] = result.ChunksByTier[t];
        Buffer.MemoryCopy(&native, resultOut, size, Math.Min(size, (uint)sizeof(NativeTransferResult)));
    }
}
