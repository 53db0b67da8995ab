using System.Text;
using System.Text.Json;

namespace LMCacheNative.Core.Config;

/// <summary>Which hash chains the chunk keys. Both are seed-free and identical across processes.</summary>
public enum ChunkHashAlgorithm
{
    /// <summary>SHA-256, vLLM's default for prefix caching; 256-bit keys.</summary>
    Sha256,
    /// <summary>XXH3-128: much faster, 128-bit keys, not collision resistant against an adversary.</summary>
    Xxh3_128,
}

/// <summary>
/// The engine's configuration, parsed from a JSON object whose key names and defaults are LMCache's
/// (lmcache/v1/config.py). Every key is declared once, in <see cref="Keys"/>: its type, range,
/// default and meaning drive parsing, the resolved JSON (<see cref="ToJson"/>) and the published
/// schema (<see cref="SchemaJson"/>, lmc_config_schema) that bindings read instead of repeating the
/// keys. The engine accepts only keys it uses; unknown keys and invalid values are errors that name
/// the key; LMCache features this build lacks are <see cref="LmcStatus.Unsupported"/>.
/// </summary>
public sealed record EngineConfig
{
    /// <summary>LMCache's unit for sizes given in GB: 1 GB = 2^30 bytes.</summary>
    public const long BytesPerGb = 1L << 30;

    public int ChunkSize { get; init; } = 256;
    public bool LocalCpu { get; init; } = true;
    /// <summary>Host memory for the CPU tier, in GB (2^30 bytes), per engine (per TP rank).</summary>
    public double MaxLocalCpuSize { get; init; } = 5.0;
    public bool SaveUnfullChunk { get; init; }
    public ChunkHashAlgorithm HashAlgorithm { get; init; } = ChunkHashAlgorithm.Sha256;
    public string CachePolicy { get; init; } = "LRU";
    public double BlockingTimeoutSecs { get; init; } = 10;
    /// <summary>Directory of the local disk tier (LMCache's <c>local_disk</c>; a <c>file://</c> prefix is allowed), or null.</summary>
    public string? LocalDisk { get; init; }
    /// <summary>Disk tier capacity in GB (2^30 bytes); the tier is enabled when this is > 0 and <see cref="LocalDisk"/> is set.</summary>
    public double MaxLocalDiskSize { get; init; }
    /// <summary>Remote tier URL (<c>redis://host:port/db</c>, <c>rediss://</c> for TLS), or null.</summary>
    public string? RemoteUrl { get; init; }
    public string RemoteSerde { get; init; } = "naive";
    /// <summary>LMCache's free-form <c>extra_config</c> object, kept verbatim (raw JSON).</summary>
    public string ExtraConfigJson { get; init; } = "{}";
    /// <summary>LMCache's <c>enable_kv_events</c>: queue BlockStored / BlockRemoved / AllBlocksCleared events for routers.</summary>
    public bool EnableKvEvents { get; init; }
    /// <summary>Bound on the KV event queue (events); when full, new events are dropped and counted.</summary>
    public int KvEventsQueueSize { get; init; } = 65536;

    public long MaxLocalCpuBytes => LocalCpu ? (long)(MaxLocalCpuSize * BytesPerGb) : 0;

    // ---- the keys ----

    /// <summary>One configuration key: how it is parsed, written back and described.</summary>
    private sealed record Key(string Name, string Type, string Description,
        Func<EngineConfig, string, JsonElement, EngineConfig> Apply, Action<Utf8JsonWriter, EngineConfig> Write)
    {
        public double? Minimum { get; init; }
        public double? Maximum { get; init; }
        public bool ExclusiveMinimum { get; init; }
        public bool Nullable { get; init; }
        public string[]? Choices { get; init; }
        public string[]? UnsupportedValues { get; init; }
    }

    private static Key IntKey(string name, long min, long max, Func<EngineConfig, int> get, Func<EngineConfig, int, EngineConfig> set, string description) =>
        new(name, "integer", description, (c, k, v) => set(c, Int(k, v, min, max)), (w, c) => w.WriteNumber(name, get(c))) { Minimum = min, Maximum = max };

    private static Key NumberKey(string name, double min, double max, bool exclusiveMin, Func<EngineConfig, double> get, Func<EngineConfig, double, EngineConfig> set,
        string description) =>
        new(name, "number", description, (c, k, v) => set(c, Number(k, v, min, max, exclusiveMin)), (w, c) => w.WriteNumber(name, get(c)))
            { Minimum = min, Maximum = max, ExclusiveMinimum = exclusiveMin };

    private static Key BoolKey(string name, Func<EngineConfig, bool> get, Func<EngineConfig, bool, EngineConfig> set, string description) =>
        new(name, "boolean", description, (c, k, v) => set(c, Bool(k, v)), (w, c) => w.WriteBoolean(name, get(c)));

    private static Key OptionalTextKey(string name, Func<EngineConfig, string?> get, Func<EngineConfig, string?, EngineConfig> set, string description,
        Func<string, string>? shown = null) =>
        new(name, "string", description, (c, k, v) => set(c, OptionalText(k, v)), (w, c) =>
        {
            if (get(c) is { } text) w.WriteString(name, shown is null ? text : shown(text)); else w.WriteNull(name);
        }) { Nullable = true };

    /// <summary>An LMCache feature this build does not have: false (its default) is accepted, true is unsupported.</summary>
    private static Key AbsentFeature(string name, string description) =>
        new(name, "boolean", description, FalseOnly, (w, _) => w.WriteBoolean(name, false)) { UnsupportedValues = ["true"] };

    private static readonly Key[] Keys =
    [
        IntKey("chunk_size", 1, 1 << 20, c => c.ChunkSize, (c, v) => c with { ChunkSize = v }, "tokens per chunk, the unit of caching"),
        BoolKey("local_cpu", c => c.LocalCpu, (c, v) => c with { LocalCpu = v },
            "keep chunks in the CPU pool; false: the pool only stages writes to the lower tiers"),
        NumberKey("max_local_cpu_size", 0, 1 << 20, false, c => c.MaxLocalCpuSize, (c, v) => c with { MaxLocalCpuSize = v },
            "CPU pool size in GB (2^30 bytes) per engine (per tensor-parallel rank)"),
        BoolKey("save_unfull_chunk", c => c.SaveUnfullChunk, (c, v) => c with { SaveUnfullChunk = v }, "also store a request's trailing partial chunk"),
        new("pre_caching_hash_algorithm", "string", "hash chaining the chunk keys: sha256 (LMCache's builtin and sha256_cbor map to it) or the faster xxh3_128",
            (c, k, v) => c with { HashAlgorithm = HashName(k, v) },
            (w, c) => w.WriteString("pre_caching_hash_algorithm", c.HashAlgorithm == ChunkHashAlgorithm.Sha256 ? "sha256" : "xxh3_128"))
            { Choices = ["sha256", "builtin", "sha256_cbor", "sha256_cbor_64bit", "xxh3_128", "xxhash"] },
        new("cache_policy", "string", "eviction policy of the CPU pool (case-insensitive)", (c, k, v) => c with { CachePolicy = Policy(k, v) },
            (w, c) => w.WriteString("cache_policy", c.CachePolicy)) { Choices = ["LRU"], UnsupportedValues = ["LFU", "FIFO", "MRU", "S3FIFO"] },
        NumberKey("blocking_timeout_secs", 0, 3600, true, c => c.BlockingTimeoutSecs, (c, v) => c with { BlockingTimeoutSecs = v },
            "bound in seconds on every remote-tier operation; a timeout is a miss"),
        OptionalTextKey("local_disk", c => c.LocalDisk, (c, v) => c with { LocalDisk = v },
            "directory of the local disk tier (a path or file://path); enabled with max_local_disk_size > 0"),
        NumberKey("max_local_disk_size", 0, 1 << 30, false, c => c.MaxLocalDiskSize, (c, v) => c with { MaxLocalDiskSize = v },
            "disk tier capacity in GB (2^30 bytes) for the whole directory, every model's records together"),
        OptionalTextKey("remote_url", c => c.RemoteUrl, (c, v) => c with { RemoteUrl = v },
            "remote tier: redis://[user:password@]host:port[,host:port...]/db (a cluster is detected from the seeds), rediss:// for TLS, "
            + "valkey[s]:// and redis-cluster:// as aliases, redis[s]-sentinel://host:port[,...]/<service> for Sentinel", Secrets.RedactUrls),
        new("remote_serde", "string", "serialisation of remote records", (c, k, v) => c with { RemoteSerde = Serde(k, v) },
            (w, c) => w.WriteString("remote_serde", c.RemoteSerde)) { Choices = ["naive"], UnsupportedValues = ["cachegen", "kivi"] },
        new("extra_config", "object", "free-form object; remote tier: remote_ttl_secs (alias valkey_ttl_sec) sets an expiry on remote records, "
            + "valkey_mode (standalone | cluster), remote_connections (multiplexer pool size, default 4), remote_tls_ca_file (CA of the servers' certificates), ping_interval / ping_timeout (seconds between / bound on the background health pings, default 30 / 5)", (c, k, v) => c with { ExtraConfigJson = ExtraConfig(k, v) },
            (w, c) =>
            {
                w.WritePropertyName("extra_config");
                w.WriteRawValue(Secrets.RedactJson(c.ExtraConfigJson));
            }) { Nullable = true },
        BoolKey("enable_kv_events", c => c.EnableKvEvents, (c, v) => c with { EnableKvEvents = v },
            "queue KV events (chunk stored in / removed from a tier, CPU tier cleared) for KV-aware routers; drained with lmc_engine_poll_events"),
        IntKey("kv_events_queue_size", 1, 1 << 24, c => c.KvEventsQueueSize, (c, v) => c with { KvEventsQueueSize = v },
            "most KV events held until polled; when full, newer events are dropped and counted (enable_kv_events)"),
        new("gds_path", "string", "GPUDirect Storage path: not in this build (null only)", NullOnly, (w, _) => w.WriteNull("gds_path"))
            { Nullable = true, UnsupportedValues = ["any path"] },
        AbsentFeature("use_layerwise", "layer-wise transfers: not in this build"),
        AbsentFeature("enable_blending", "CacheBlend: not in this build"),
        AbsentFeature("enable_pd", "disaggregated prefill: not in this build"),
        AbsentFeature("enable_p2p", "peer-to-peer sharing: not in this build"),
        AbsentFeature("enable_controller", "the LMCache controller: not in this build"),
        AbsentFeature("local_cpu_use_hugepages", "huge pages for the CPU pool: not in this build"),
        AbsentFeature("enable_lazy_memory_allocator", "lazy pool allocation: not in this build (slabs are allocated on demand anyway)"),
        AbsentFeature("use_gpu_connector_v3", "LMCache's v3 GPU connector: not applicable"),
    ];

    private static readonly Dictionary<string, Key> KeysByName = Keys.ToDictionary(k => k.Name, StringComparer.Ordinal);

    /// <summary>Parses a JSON object; null, empty or whitespace text means all defaults.</summary>
    public static EngineConfig Parse(string? json)
    {
        if (string.IsNullOrWhiteSpace(json)) return new EngineConfig();
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json, new JsonDocumentOptions { AllowTrailingCommas = false, CommentHandling = JsonCommentHandling.Skip });
        }
        catch (JsonException e)
        {
            throw LmcException.InvalidArgument($"config: not valid JSON: {e.Message}");
        }
        using (document)
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object)
                throw LmcException.InvalidArgument("config: expected a JSON object of LMCache configuration keys");
            var config = new EngineConfig();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            try
            {
                foreach (var property in document.RootElement.EnumerateObject())
                {
                    if (!seen.Add(property.Name))
                        throw LmcException.InvalidArgument($"config: key \"{ForMessage(property.Name)}\" appears more than once");
                    RequireValidStrings(property.Name, property.Value);
                    if (!KeysByName.TryGetValue(property.Name, out var key))
                        throw LmcException.InvalidArgument($"config: unknown key \"{ForMessage(property.Name)}\"");
                    config = key.Apply(config, property.Name, property.Value);
                }
            }
            catch (InvalidOperationException e)
            {
                // System.Text.Json refuses to decode a key that holds an escaped lone surrogate ("\ud800").
                throw LmcException.InvalidArgument($"config: a key is not valid Unicode text: {e.Message}");
            }
            return config;
        }
    }

    /// <summary>
    /// The resolved configuration as a JSON object with LMCache's key names, credentials redacted
    /// (<see cref="Secrets"/>): this text is shown to users and written to logs.
    /// </summary>
    public string ToJson() => WriteJson(w =>
    {
        w.WriteStartObject();
        foreach (var key in Keys) key.Write(w, this);
        w.WriteEndObject();
    });

    /// <summary>Every key with its type, default, range and meaning, as a JSON array (lmc_config_schema).</summary>
    public static string SchemaJson => s_schemaJson ??= BuildSchemaJson();

    // Built on first use (lmc_config_schema), not when the first engine parses its configuration.
    private static string? s_schemaJson;

    private static string BuildSchemaJson() => WriteJson(w =>
    {
        using var defaultsDocument = JsonDocument.Parse(new EngineConfig().ToJson());
        var defaults = defaultsDocument.RootElement;
        w.WriteStartArray();
        foreach (var key in Keys)
        {
            w.WriteStartObject();
            w.WriteString("name", key.Name);
            w.WriteString("type", key.Type);
            w.WritePropertyName("default");
            defaults.GetProperty(key.Name).WriteTo(w);
            w.WriteBoolean("nullable", key.Nullable);
            if (key.Minimum is { } min) w.WriteNumber("minimum", min);
            if (key.Maximum is { } max) w.WriteNumber("maximum", max);
            if (key.ExclusiveMinimum) w.WriteBoolean("exclusive_minimum", true);
            WriteStrings(w, "choices", key.Choices);
            WriteStrings(w, "unsupported_values", key.UnsupportedValues);
            w.WriteString("description", key.Description);
            w.WriteEndObject();
        }
        w.WriteEndArray();
    });

    private static void WriteStrings(Utf8JsonWriter w, string name, string[]? values)
    {
        if (values is null) return;
        w.WriteStartArray(name);
        foreach (var value in values) w.WriteStringValue(value);
        w.WriteEndArray();
    }

    private static string WriteJson(Action<Utf8JsonWriter> write)
    {
        using var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream)) write(writer);
        return Encoding.UTF8.GetString(stream.ToArray());
    }

    // ---- value parsers ----

    /// <summary>
    /// Refuses strings, at any depth, that are not valid Unicode (an escaped lone surrogate such as
    /// "\ud800" is valid JSON but no text): they could not be printed, compared or passed on.
    /// </summary>
    private static void RequireValidStrings(string key, JsonElement v)
    {
        try
        {
            Walk(v);
        }
        catch (InvalidOperationException)
        {
            throw LmcException.InvalidArgument($"config: \"{ForMessage(key)}\" holds a string that is not valid Unicode text (a lone surrogate escape such as \\ud800)");
        }

        static void Walk(JsonElement e)
        {
            switch (e.ValueKind)
            {
                case JsonValueKind.String:
                    _ = e.GetString();
                    break;
                case JsonValueKind.Array:
                    foreach (var item in e.EnumerateArray()) Walk(item);
                    break;
                case JsonValueKind.Object:
                    foreach (var member in e.EnumerateObject())
                    {
                        _ = member.Name;
                        Walk(member.Value);
                    }
                    break;
            }
        }
    }

    private static int Int(string key, JsonElement v, long min, long max)
    {
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out long value))
            throw LmcException.InvalidArgument($"config: \"{key}\" must be an integer, got {Describe(v)}");
        if (value < min || value > max)
            throw LmcException.InvalidArgument($"config: \"{key}\" must be in [{min}, {max}], got {value}");
        return (int)value;
    }

    private static double Number(string key, JsonElement v, double min, double max, bool exclusiveMin = false)
    {
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetDouble(out double value) || !double.IsFinite(value))
            throw LmcException.InvalidArgument($"config: \"{key}\" must be a number, got {Describe(v)}");
        if (value < min || (exclusiveMin && value == min) || value > max)
            throw LmcException.InvalidArgument($"config: \"{key}\" must be {(exclusiveMin ? ">" : ">=")} {min} and <= {max}, got {value}");
        return value;
    }

    private static bool Bool(string key, JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.True => true,
        JsonValueKind.False => false,
        _ => throw LmcException.InvalidArgument($"config: \"{key}\" must be true or false, got {Describe(v)}"),
    };

    private static string Text(string key, JsonElement v) =>
        v.ValueKind == JsonValueKind.String ? v.GetString()! : throw LmcException.InvalidArgument($"config: \"{key}\" must be a string, got {Describe(v)}");

    private static string? OptionalText(string key, JsonElement v)
    {
        if (v.ValueKind == JsonValueKind.Null) return null;
        string text = Text(key, v);
        if (text.Length == 0) throw LmcException.InvalidArgument($"config: \"{key}\" must not be empty (use null)");
        return text;
    }

    private static ChunkHashAlgorithm HashName(string key, JsonElement v) => Text(key, v) switch
    {
        // LMCache's "builtin" is Python's hash(), which differs per process; the seed-free SHA-256
        // chain replaces it, as do the SHA-256 variants LMCache borrows from vLLM.
        "sha256" or "builtin" or "sha256_cbor" or "sha256_cbor_64bit" => ChunkHashAlgorithm.Sha256,
        "xxh3_128" or "xxhash" => ChunkHashAlgorithm.Xxh3_128,
        var other => throw LmcException.InvalidArgument($"config: \"{key}\" must be \"sha256\" or \"xxh3_128\", got \"{ForMessage(other)}\""),
    };

    private static string Policy(string key, JsonElement v)
    {
        string policy = Text(key, v);
        if (policy.Equals("LRU", StringComparison.OrdinalIgnoreCase)) return "LRU";
        if (policy is "LFU" or "FIFO" or "MRU" or "S3FIFO")
            throw LmcException.Unsupported($"config: \"{key}\" \"{policy}\" is not supported yet; only \"LRU\" is");
        throw LmcException.InvalidArgument($"config: \"{key}\" must be one of LRU, LFU, FIFO, MRU, S3FIFO, got \"{ForMessage(policy)}\"");
    }

    private static string Serde(string key, JsonElement v)
    {
        string serde = Text(key, v);
        if (serde == "naive") return serde;
        if (serde is "cachegen" or "kivi")
            throw LmcException.Unsupported($"config: \"{key}\" \"{serde}\" is not supported; only \"naive\" is");
        throw LmcException.InvalidArgument($"config: \"{key}\" must be \"naive\", got \"{ForMessage(serde)}\"");
    }

    private static string ExtraConfig(string key, JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.Null => "{}",
        JsonValueKind.Object => v.GetRawText(),
        _ => throw LmcException.InvalidArgument($"config: \"{key}\" must be a JSON object or null, got {Describe(v)}"),
    };

    private static EngineConfig NullOnly(EngineConfig c, string key, JsonElement v)
    {
        if (v.ValueKind == JsonValueKind.Null) return c;
        if (v.ValueKind != JsonValueKind.String)
            throw LmcException.InvalidArgument($"config: \"{key}\" must be a string or null, got {Describe(v)}");
        throw LmcException.Unsupported($"config: \"{key}\" names a storage back-end this build does not have");
    }

    private static EngineConfig FalseOnly(EngineConfig c, string key, JsonElement v)
    {
        if (!Bool(key, v)) return c;
        throw LmcException.Unsupported($"config: \"{key}\": true is not supported by this build");
    }

    private static string Describe(JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.String => $"\"{ForMessage(v.GetString()!)}\"",
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "an array",
        _ => ForMessage(v.GetRawText()),
    };

    /// <summary>A value as quoted in a message: credentials redacted, cut to 80 characters (a message is not a dump).</summary>
    private static string ForMessage(string text)
    {
        text = Secrets.RedactUrls(text);
        return text.Length <= 80 ? text : text[..77] + "...";
    }
}
