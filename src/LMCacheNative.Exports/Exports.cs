using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Storage;

namespace LMCacheNative.Exports;

/// <summary>
/// The C ABI (include/lmcache_native.h). Each export validates its raw arguments, translates them
/// into engine types, calls the engine and maps every exception to a status code: an exception that
/// escaped an [UnmanagedCallersOnly] method would abort the host process (vLLM with it).
/// </summary>
internal static unsafe class Exports
{
    // Must equal LMC_VERSION_* and LMC_ABI_VERSION in the header (pinned by AbiTests).
    internal const int VersionMajor = 0, VersionMinor = 3, VersionPatch = 0;
    internal const int AbiVersion = 2;

    // ---- versions and errors: these cannot fail and leave the last error message unchanged ----

    [UnmanagedCallersOnly(EntryPoint = "lmc_version_number")]
    public static int VersionNumber() => VersionMajor * 10000 + VersionMinor * 100 + VersionPatch;

    [UnmanagedCallersOnly(EntryPoint = "lmc_abi_version")]
    public static int AbiVersionNumber() => AbiVersion;

    internal static string VersionText => $"{VersionMajor}.{VersionMinor}.{VersionPatch}";
    private static readonly nint s_versionText = StatusNames.Utf8(VersionText);

    [UnmanagedCallersOnly(EntryPoint = "lmc_version_string")]
    public static byte* VersionString() => (byte*)s_versionText;

    [UnmanagedCallersOnly(EntryPoint = "lmc_status_name")]
    public static byte* StatusName(int status) => StatusNames.Of(status);

    [UnmanagedCallersOnly(EntryPoint = "lmc_last_error_message")]
    public static byte* LastErrorMessage() => ErrorState.Message;

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
                // The server's lookups hold the engine's calls open: it stops first.
                LookupServers.Stop(engine);
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
            return WriteText(neededOut, buffer, capacity, cacheEngine.Config.ToJson(), "the configuration");
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_config_schema")]
    public static int ConfigSchema(long* neededOut, byte* buffer, long capacity)
    {
        try
        {
            RequireOut(neededOut, "needed_out");
            return WriteText(neededOut, buffer, capacity, EngineConfig.SchemaJson, "the schema");
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    /// <summary>The size-query protocol: reports the bytes needed (NUL included), writes only when they fit.</summary>
    internal static int WriteText(long* neededOut, byte* buffer, long capacity, string text, string what)
    {
        if (capacity < 0) throw LmcException.InvalidArgument($"capacity must be >= 0, got {capacity}");
        if (buffer == null && capacity > 0) throw LmcException.InvalidArgument("buffer is NULL but capacity is not 0");
        byte[] utf8 = Encoding.UTF8.GetBytes(text);
        *neededOut = utf8.Length + 1;
        if (capacity < utf8.Length + 1)
            return ErrorState.Fail((int)LmcStatus.BufferTooSmall, $"buffer holds {capacity} bytes; {what} needs {utf8.Length + 1}");
        utf8.CopyTo(new Span<byte>(buffer, utf8.Length));
        buffer[utf8.Length] = 0;
        return ErrorState.Ok();
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
                : ErrorState.Fail((int)LmcStatus.Timeout, $"the lower tiers are still writing after {timeoutMs} ms");
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
                throw new LmcException(LmcStatus.NotFound, $"tier_index {tierIndex}: the engine has {tiers.Count} lower tier(s)");
            WriteTierStats(stats, size, tiers[tierIndex]);
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_get_tier_nodes")]
    public static int EngineGetTierNodes(long* neededOut, nint engine, int tierIndex, byte* buffer, long capacity)
    {
        try
        {
            RequireOut(neededOut, "needed_out");
            var tiers = HandleTable.Get(engine).GetTierStats();
            if (tierIndex < 0 || tierIndex >= tiers.Count)
                throw new LmcException(LmcStatus.NotFound, $"tier_index {tierIndex}: the engine has {tiers.Count} lower tier(s)");
            return WriteText(neededOut, buffer, capacity, TierNodesJson(tiers[tierIndex].Counters.Nodes), "the node list");
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    /// <summary>The per-node counters as the JSON array lmc_engine_get_tier_nodes documents (written by hand: no reflection under NativeAOT).</summary>
    private static string TierNodesJson(IReadOnlyList<NodeStats> nodes)
    {
        using var stream = new MemoryStream();
        using (var w = new System.Text.Json.Utf8JsonWriter(stream))
        {
            w.WriteStartArray();
            foreach (var n in nodes)
            {
                w.WriteStartObject();
                w.WriteString("endpoint", n.Endpoint);
                w.WriteString("role", n.Role);
                w.WriteBoolean("connected", n.Connected);
                w.WriteNumber("bytes_read", n.BytesRead);
                w.WriteNumber("bytes_written", n.BytesWritten);
                w.WriteNumber("errors", n.Errors);
                w.WriteNumber("reconnects", n.Reconnects);
                w.WriteNumber("redirects", n.Redirects);
                if (n.LastError is null) w.WriteNull("last_error"); else w.WriteString("last_error", Secrets.RedactUrls(n.LastError));
                w.WriteEndObject();
            }
            w.WriteEndArray();
        }
        return Encoding.UTF8.GetString(stream.ToArray());
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
            LookupServers.Start(engine, cacheEngine, path);
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
            HandleTable.Get(engine);
            LookupServers.Stop(engine);
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
