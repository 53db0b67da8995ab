using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Layout;

namespace LMCacheNative.Exports;

/// <summary>
/// The C ABI (include/lmcache_native.h). Each export validates its raw arguments, translates them
/// into engine types, calls the engine and maps every exception to a status code: an exception that
/// escaped an [UnmanagedCallersOnly] method would abort the host process (vLLM with it).
/// </summary>
internal static unsafe class Exports
{
    // Must equal LMC_VERSION_* and LMC_ABI_VERSION in the header (pinned by AbiTests).
    internal const int VersionMajor = 0, VersionMinor = 1, VersionPatch = 0;
    internal const int AbiVersion = 1;

    // ---- versions and errors: these cannot fail and leave the last error message unchanged ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_version_number")]
    public static int VersionNumber() => VersionMajor * 10000 + VersionMinor * 100 + VersionPatch;

    [UnmanagedCallersOnly(EntryPoint = "lmc_abi_version")]
    public static int AbiVersionNumber() => AbiVersion;

    internal const string VersionText = "0.1.0";

    [UnmanagedCallersOnly(EntryPoint = "lmc_version_string")]
    public static byte* VersionString() => Literal("0.1.0\0"u8);

    [UnmanagedCallersOnly(EntryPoint = "lmc_status_name")]
    public static byte* StatusName(int status) => status switch
    {
        Status.Ok => Literal("LMC_OK\0"u8),
        Status.InvalidArgument => Literal("LMC_E_INVALID_ARGUMENT\0"u8),
        Status.InvalidHandle => Literal("LMC_E_INVALID_HANDLE\0"u8),
        Status.Unsupported => Literal("LMC_E_UNSUPPORTED\0"u8),
        Status.OutOfMemory => Literal("LMC_E_OUT_OF_MEMORY\0"u8),
        Status.NotFound => Literal("LMC_E_NOT_FOUND\0"u8),
        Status.Io => Literal("LMC_E_IO\0"u8),
        Status.Cuda => Literal("LMC_E_CUDA\0"u8),
        Status.NoDevice => Literal("LMC_E_NO_DEVICE\0"u8),
        Status.BufferTooSmall => Literal("LMC_E_BUFFER_TOO_SMALL\0"u8),
        Status.Internal => Literal("LMC_E_INTERNAL\0"u8),
        Status.Timeout => Literal("LMC_E_TIMEOUT\0"u8),
        _ => Literal("LMC_E_UNKNOWN\0"u8),
    };

    [UnmanagedCallersOnly(EntryPoint = "lmc_last_error_message")]
    public static byte* LastErrorMessage() => ErrorState.Message;

    // UTF-8 literals live in the image's read-only data, so their address is stable for the process.
    private static byte* Literal(ReadOnlySpan<byte> nulTerminated)
    {
        fixed (byte* p = nulTerminated) return p;
    }

    // ---- engine lifetime ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_create")]
    public static int EngineCreate(nint* engineOut, byte* configJson, byte* modelName, int worldSize, int workerId)
    {
        try
        {
            RequireOut(engineOut, "engine_out");
            if (modelName == null) throw LmcException.InvalidArgument("model_name is NULL (pass \"\" for none)");
            var config = EngineConfig.Parse(Utf8(configJson, "config_json"));
            var engine = new CacheEngine(config, Utf8(modelName, "model_name")!, worldSize, workerId,
                remoteTierFactory: LMCacheNative.Redis.RedisTier.TryCreate, deviceBackend: DeviceExports.Cuda);
            *engineOut = HandleTable.Add(engine);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_destroy")]
    public static void EngineDestroy(nint engine)
    {
        try
        {
            if (engine == 0) ErrorState.Ok();
            else if (HandleTable.Remove(engine) is { } removed)
            {
                removed.Dispose();
                ErrorState.Ok();
            }
            else HandleTable.Get(engine); // not a live engine: throws with the reason, recorded below
        }
        catch (Exception e)
        {
            ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_get_config")]
    public static int EngineGetConfig(long* neededOut, nint engine, byte* buffer, long capacity)
    {
        try
        {
            RequireOut(neededOut, "needed_out");
            var cacheEngine = HandleTable.Get(engine);
            if (capacity < 0) throw LmcException.InvalidArgument($"capacity must be >= 0, got {capacity}");
            if (buffer == null && capacity > 0) throw LmcException.InvalidArgument("buffer is NULL but capacity is not 0");
            byte[] json = Encoding.UTF8.GetBytes(cacheEngine.Config.ToJson());
            *neededOut = json.Length + 1;
            if (capacity < json.Length + 1)
                return ErrorState.Fail(Status.BufferTooSmall, $"buffer holds {capacity} bytes; the configuration needs {json.Length + 1}");
            json.CopyTo(new Span<byte>(buffer, json.Length));
            buffer[json.Length] = 0;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    // ---- registration ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_register_layers")]
    public static int EngineRegisterLayers(nint engine, NativeKvLayerDesc* layers, int numLayers)
    {
        try
        {
            var cacheEngine = HandleTable.Get(engine);
            if (layers == null) throw LmcException.InvalidArgument("layers is NULL");
            if (numLayers < 1) throw LmcException.InvalidArgument($"num_layers must be >= 1, got {numLayers}");
            // The array's element size is the caller's sizeof(lmc_kv_layer_desc): a newer header may
            // have appended fields, and this build reads only the fields it knows.
            uint stride = layers->StructSize;
            if (stride < NativeKvLayerDesc.SizeV1)
                throw LmcException.InvalidArgument($"layer 0: struct_size {stride} is smaller than lmc_kv_layer_desc ({NativeKvLayerDesc.SizeV1} bytes); set it to sizeof(lmc_kv_layer_desc)");
            if (stride > 4096 || stride % 8 != 0)
                throw LmcException.InvalidArgument($"layer 0: struct_size {stride} is not a plausible sizeof(lmc_kv_layer_desc)");
            var parsed = new KvLayerLayout[numLayers];
            for (int i = 0; i < numLayers; i++)
            {
                var d = (NativeKvLayerDesc*)((byte*)layers + (long)i * stride);
                if (d->StructSize != stride)
                    throw LmcException.InvalidArgument($"layer {i}: struct_size {d->StructSize} differs from layer 0's {stride}");
                if (d->Reserved != 0) throw LmcException.InvalidArgument($"layer {i}: reserved must be 0, got {d->Reserved}");
                parsed[i] = new KvLayerLayout((DeviceKind)d->DeviceKind, d->DeviceIndex, d->ElemSize, d->KvCount, d->NumBlocks,
                    d->BlockSize, d->NumKvHeads, d->HeadSize, d->BaseAddress, d->SpanBytes,
                    d->KvStride, d->BlockStride, d->TokenStride, d->HeadStride);
            }
            cacheEngine.RegisterLayers(parsed);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    // ---- lookup, store, retrieve ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_lookup")]
    public static int Lookup(long* hitTokensOut, nint engine, int* tokens, long numTokens, byte* extraKey, long extraKeyLength)
    {
        try
        {
            RequireOut(hitTokensOut, "hit_tokens_out");
            var cacheEngine = HandleTable.Get(engine);
            var tokenSpan = Input(tokens, numTokens, "tokens", "num_tokens");
            var extra = Input(extraKey, extraKeyLength, "extra_key", "extra_key_len");
            *hitTokensOut = cacheEngine.Lookup(tokenSpan, extra);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_store")]
    public static int Store(long* storedTokensOut, nint engine, int* tokens, long* slotMapping, long numTokens,
        long skipLeadingTokens, byte* extraKey, long extraKeyLength)
    {
        try
        {
            RequireOut(storedTokensOut, "stored_tokens_out");
            var cacheEngine = HandleTable.Get(engine);
            var input = Transfer(tokens, slotMapping, numTokens, extraKey, extraKeyLength);
            *storedTokensOut = cacheEngine.Store(input.Tokens, input.Slots, skipLeadingTokens, input.ExtraKey).TokensInCache;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_retrieve")]
    public static int Retrieve(long* retrievedTokensOut, nint engine, int* tokens, long* slotMapping, long numTokens,
        long firstTokenToWrite, byte* extraKey, long extraKeyLength)
    {
        try
        {
            RequireOut(retrievedTokensOut, "retrieved_tokens_out");
            var cacheEngine = HandleTable.Get(engine);
            var input = Transfer(tokens, slotMapping, numTokens, extraKey, extraKeyLength);
            *retrievedTokensOut = cacheEngine.Retrieve(input.Tokens, input.Slots, firstTokenToWrite, input.ExtraKey).RetrievedTokens;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    // ---- statistics and maintenance ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_get_stats")]
    public static int EngineGetStats(nint engine, NativeStats* stats)
    {
        try
        {
            var cacheEngine = HandleTable.Get(engine);
            if (stats == null) throw LmcException.InvalidArgument("stats is NULL");
            uint size = stats->StructSize;
            if (size < 8) throw LmcException.InvalidArgument($"stats->struct_size must be set to sizeof(lmc_stats), got {size}");
            var s = cacheEngine.GetStats();
            var native = new NativeStats
            {
                StructSize = size,
                LookupRequests = (ulong)s.LookupRequests,
                LookupTokens = (ulong)s.LookupTokens,
                LookupHitTokens = (ulong)s.LookupHitTokens,
                StoreRequests = (ulong)s.StoreRequests,
                StoredTokens = (ulong)s.StoredTokens,
                StoredBytes = (ulong)s.StoredBytes,
                RetrieveRequests = (ulong)s.RetrieveRequests,
                RetrieveRequestedTokens = (ulong)s.RetrieveRequestedTokens,
                RetrievedTokens = (ulong)s.RetrievedTokens,
                RetrievedBytes = (ulong)s.RetrievedBytes,
                EvictedChunks = (ulong)s.EvictedChunks,
                StoreSkippedChunks = (ulong)s.StoreSkippedChunks,
                CachedChunks = (ulong)s.CachedChunks,
                PoolUsedBytes = (ulong)s.PoolUsedBytes,
                PoolCapacityBytes = (ulong)s.PoolCapacityBytes,
            };
            // Only the bytes the caller's struct has: an older caller's struct is shorter.
            Buffer.MemoryCopy(&native, stats, size, Math.Min(size, (uint)sizeof(NativeStats)));
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_clear")]
    public static int EngineClear(nint engine)
    {
        try
        {
            HandleTable.Get(engine).Clear();
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_flush")]
    public static int EngineFlush(nint engine, long timeoutMs)
    {
        try
        {
            var cacheEngine = HandleTable.Get(engine);
            var timeout = TimeoutArgument(timeoutMs, allowZero: true);
            return cacheEngine.Flush(timeout)
                ? ErrorState.Ok()
                : ErrorState.Fail(Status.Timeout, $"the lower tiers are still writing after {timeoutMs} ms");
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_tier_count")]
    public static int EngineTierCount(int* countOut, nint engine)
    {
        try
        {
            RequireOut(countOut, "count_out");
            *countOut = HandleTable.Get(engine).LowerTierNames.Count;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_get_tier_stats")]
    public static int EngineGetTierStats(nint engine, int tierIndex, NativeTierStats* stats)
    {
        try
        {
            var cacheEngine = HandleTable.Get(engine);
            if (stats == null) throw LmcException.InvalidArgument("stats is NULL");
            uint size = stats->StructSize;
            if (size < 8) throw LmcException.InvalidArgument($"stats->struct_size must be set to sizeof(lmc_tier_stats), got {size}");
            var tiers = cacheEngine.GetTierStats();
            if (tierIndex < 0 || tierIndex >= tiers.Count)
                throw new LmcException(LmcErrorKind.NotFound, $"tier_index {tierIndex}: the engine has {tiers.Count} lower tier(s)");
            WriteTierStats(stats, size, tiers[tierIndex]);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    /// <summary>
    /// Fills the caller's lmc_tier_stats. Kept out of the export on purpose: a local struct with a
    /// fixed buffer gives its method a stack cookie, and an export's cookie is read in its prologue,
    /// before the runtime starts on a process's first call, so the export would fail fast when it is
    /// the first call into the library.
    /// </summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void WriteTierStats(NativeTierStats* stats, uint size, TierStats tier)
    {
        var (name, c) = tier;
        var native = new NativeTierStats
        {
            StructSize = size,
            Hits = (ulong)c.Hits,
            Misses = (ulong)c.Misses,
            BytesRead = (ulong)c.BytesRead,
            BytesWritten = (ulong)c.BytesWritten,
            Writes = (ulong)c.Writes,
            Evictions = (ulong)c.Evictions,
            WriteQueueDrops = (ulong)c.WriteQueueDrops,
            CorruptRecords = (ulong)c.CorruptRecords,
            Errors = (ulong)c.Errors,
            Reconnects = (ulong)c.Reconnects,
            UsedBytes = (ulong)Math.Max(0, c.UsedBytes),
            CapacityBytes = (ulong)Math.Max(0, c.CapacityBytes),
        };
        int written = System.Text.Encoding.UTF8.GetBytes(name.AsSpan(0, Math.Min(name.Length, 31)), new Span<byte>(native.Name, 31));
        native.Name[written] = 0;
        Buffer.MemoryCopy(&native, stats, size, Math.Min(size, (uint)sizeof(NativeTierStats)));
    }

    // ---- lookups across processes ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_lookup_server_start")]
    public static int LookupServerStart(nint engine, byte* socketPath)
    {
        try
        {
            var cacheEngine = HandleTable.Get(engine);
            string path = Utf8(socketPath, "socket_path") ?? throw LmcException.InvalidArgument("socket_path is NULL");
            cacheEngine.StartLookupServer(path);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_lookup_server_stop")]
    public static int LookupServerStop(nint engine)
    {
        try
        {
            HandleTable.Get(engine).StopLookupServer();
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_remote_lookup")]
    public static int RemoteLookup(long* hitTokensOut, byte* socketPath, int* tokens, long numTokens, byte* extraKey, long extraKeyLength, long timeoutMs)
    {
        try
        {
            RequireOut(hitTokensOut, "hit_tokens_out");
            string path = Utf8(socketPath, "socket_path") ?? throw LmcException.InvalidArgument("socket_path is NULL");
            var timeout = TimeoutArgument(timeoutMs, allowZero: false);
            var tokenSpan = Input(tokens, numTokens, "tokens", "num_tokens");
            var extra = Input(extraKey, extraKeyLength, "extra_key", "extra_key_len");
            *hitTokensOut = LMCacheNative.Core.Lookup.LookupClient.Lookup(path, tokenSpan, extra, timeout);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    // ---- asynchronous operations ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_prefetch_start")]
    public static int PrefetchStart(nint* jobOut, nint engine, int* tokens, long numTokens, byte* extraKey, long extraKeyLength)
    {
        try
        {
            RequireOut(jobOut, "job_out");
            var cacheEngine = HandleTable.Get(engine);
            // Copied: the caller's buffers are borrowed for this call only.
            // Refused here, before anything is copied, not by the job: a caller's mistake is the call's status.
            if (extraKeyLength > LMCacheNative.Core.Keys.ChunkHasher.MaxExtraKeyBytes)
                throw LmcException.InvalidArgument($"extra_key_len {extraKeyLength} exceeds the limit of {LMCacheNative.Core.Keys.ChunkHasher.MaxExtraKeyBytes} bytes");
            int[] tokenCopy = Input(tokens, numTokens, "tokens", "num_tokens").ToArray();
            byte[] extraCopy = Input(extraKey, extraKeyLength, "extra_key", "extra_key_len").ToArray();
            var task = Task.Run(() => cacheEngine.Prefetch(tokenCopy, extraCopy));
            *jobOut = JobTable.Add(task);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_job_wait")]
    public static int JobWait(long* resultOut, nint job, long timeoutMs)
    {
        try
        {
            RequireOut(resultOut, "result_out");
            var task = JobTable.Get(job);
            if (timeoutMs < -1) throw LmcException.InvalidArgument($"timeout_ms must be >= -1, got {timeoutMs}");
            try
            {
                // Task.Wait takes at most int.MaxValue ms (24.8 days): longer bounds wait forever.
                if (!task.Wait(timeoutMs == -1 || timeoutMs > int.MaxValue ? Timeout.InfiniteTimeSpan : TimeSpan.FromMilliseconds(timeoutMs)))
                    return ErrorState.Fail(Status.Timeout, $"the job is still running after {timeoutMs} ms");
            }
            catch (AggregateException failed) when (failed.InnerException is { } inner)
            {
                return ErrorState.FromException(inner);
            }
            *resultOut = task.Result;
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

    // ---- argument translation ----

    /// <summary>
    /// A timeout_ms argument: -1 waits without bound; otherwise at most int.MaxValue ms (24.8 days),
    /// the longest wait the runtime's timers take. Anything else is the caller's mistake.
    /// </summary>
    internal static TimeSpan TimeoutArgument(long timeoutMs, bool allowZero)
    {
        if (timeoutMs == -1) return Timeout.InfiniteTimeSpan;
        long minimum = allowZero ? 0 : 1;
        if (timeoutMs < minimum || timeoutMs > int.MaxValue)
            throw LmcException.InvalidArgument($"timeout_ms must be -1 (no bound) or in [{minimum}, {int.MaxValue}], got {timeoutMs}");
        return TimeSpan.FromMilliseconds(timeoutMs);
    }

    internal static void RequireOut(void* pointer, string name)
    {
        if (pointer == null) throw LmcException.InvalidArgument($"{name} is NULL");
    }

    /// <summary>The tokens, slot mapping and extra key of a store or retrieve, checked for NULLs and lengths.</summary>
    internal readonly ref struct TransferInput(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slots, ReadOnlySpan<byte> extraKey)
    {
        public ReadOnlySpan<int> Tokens { get; } = tokens;
        public ReadOnlySpan<long> Slots { get; } = slots;
        public ReadOnlySpan<byte> ExtraKey { get; } = extraKey;
    }

    internal static TransferInput Transfer(int* tokens, long* slotMapping, long numTokens, byte* extraKey, long extraKeyLength) => new(
        Input(tokens, numTokens, "tokens", "num_tokens"),
        Input(slotMapping, numTokens, "slot_mapping", "num_tokens"),
        Input(extraKey, extraKeyLength, "extra_key", "extra_key_len"));

    internal static ReadOnlySpan<T> Input<T>(T* pointer, long length, string name, string lengthName) where T : unmanaged
    {
        if (length < 0) throw LmcException.InvalidArgument($"{lengthName} must be >= 0, got {length}");
        if (length > Array.MaxLength) throw LmcException.InvalidArgument($"{lengthName} {length} is too large");
        if (length > 0 && pointer == null) throw LmcException.InvalidArgument($"{name} is NULL but {lengthName} is {length}");
        return length == 0 ? ReadOnlySpan<T>.Empty : new ReadOnlySpan<T>(pointer, (int)length);
    }

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    /// <summary>
    /// Decodes a NUL-terminated UTF-8 string, refusing invalid bytes: replacing them would map
    /// different model names onto one key namespace.
    /// </summary>
    private static string? Utf8(byte* text, string name)
    {
        if (text == null) return null;
        var bytes = MemoryMarshal.CreateReadOnlySpanFromNullTerminated(text);
        try
        {
            return StrictUtf8.GetString(bytes);
        }
        catch (DecoderFallbackException e)
        {
            throw LmcException.InvalidArgument($"{name} is not valid UTF-8 (byte {e.Index})");
        }
    }
}
