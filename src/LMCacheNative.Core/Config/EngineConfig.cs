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
/// (lmcache/v1/config.py). Unknown keys and invalid values are errors that name the key; known keys
/// whose feature this build lacks are <see cref="LmcErrorKind.Unsupported"/>.
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
    public bool SaveDecodeCache { get; init; }
    public ChunkHashAlgorithm HashAlgorithm { get; init; } = ChunkHashAlgorithm.Sha256;
    public string CachePolicy { get; init; } = "LRU";
    public int MinRetrieveTokens { get; init; }
    public bool EnableAsyncLoading { get; init; }
    public double LookupTimeoutMs { get; init; } = 3000;
    public double BlockingTimeoutSecs { get; init; } = 10;
    /// <summary>Directory of the local disk tier (LMCache's <c>local_disk</c>; a <c>file://</c> prefix is allowed), or null.</summary>
    public string? LocalDisk { get; init; }
    /// <summary>Disk tier capacity in GB (2^30 bytes); the tier is enabled when this is > 0 and <see cref="LocalDisk"/> is set.</summary>
    public double MaxLocalDiskSize { get; init; }
    /// <summary>Remote tier URL (<c>redis://host:port/db</c>, <c>rediss://</c> for TLS), or null.</summary>
    public string? RemoteUrl { get; init; }
    public string RemoteSerde { get; init; } = "naive";
    public int? PriorityLimit { get; init; }
    /// <summary>LMCache's free-form <c>extra_config</c> object, kept verbatim (raw JSON).</summary>
    public string ExtraConfigJson { get; init; } = "{}";

    public long MaxLocalCpuBytes => LocalCpu ? (long)(MaxLocalCpuSize * BytesPerGb) : 0;

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
                    config = Apply(config, property.Name, property.Value);
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

    private static EngineConfig Apply(EngineConfig c, string key, JsonElement v) => key switch
    {
        "chunk_size" => c with { ChunkSize = Int(key, v, min: 1, max: 1 << 20) },
        "local_cpu" => c with { LocalCpu = Bool(key, v) },
        "max_local_cpu_size" => c with { MaxLocalCpuSize = Number(key, v, min: 0, max: 1 << 20) },
        "save_unfull_chunk" => c with { SaveUnfullChunk = Bool(key, v) },
        "save_decode_cache" => c with { SaveDecodeCache = Bool(key, v) },
        "pre_caching_hash_algorithm" => c with { HashAlgorithm = HashName(key, v) },
        "cache_policy" => c with { CachePolicy = Policy(key, v) },
        "min_retrieve_tokens" => c with { MinRetrieveTokens = Int(key, v, min: 0, max: int.MaxValue) },
        "enable_async_loading" => c with { EnableAsyncLoading = Bool(key, v) },
        "lookup_timeout_ms" => c with { LookupTimeoutMs = Number(key, v, min: 0, max: 3_600_000, exclusiveMin: true) },
        "blocking_timeout_secs" => c with { BlockingTimeoutSecs = Number(key, v, min: 0, max: 3600, exclusiveMin: true) },
        "max_local_disk_size" => c with { MaxLocalDiskSize = Number(key, v, min: 0, max: 1 << 30) },
        "remote_serde" => c with { RemoteSerde = Serde(key, v) },
        "priority_limit" => c with { PriorityLimit = v.ValueKind == JsonValueKind.Null ? null : Int(key, v, min: int.MinValue, max: int.MaxValue) },
        "extra_config" => c with { ExtraConfigJson = ExtraConfig(key, v) },
        // Known LMCache keys for features that later tiers and paths add. The default value is
        // accepted so that LMCache configuration files load unchanged; anything else is refused.
        "local_disk" => c with { LocalDisk = OptionalText(key, v) },
        "remote_url" => c with { RemoteUrl = OptionalText(key, v) },
        "gds_path" => NullOnly(c, key, v),
        "use_layerwise" or "enable_blending" or "enable_pd" or "enable_p2p" or "enable_controller"
            or "local_cpu_use_hugepages" or "enable_lazy_memory_allocator" or "use_gpu_connector_v3" => FalseOnly(c, key, v),
        _ => throw LmcException.InvalidArgument($"config: unknown key \"{ForMessage(key)}\""),
    };

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
            throw LmcException.InvalidArgument($"config: \"{key}\" holds a string that is not valid Unicode text (a lone surrogate escape such as \\ud800)");
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

    /// <summary>
    /// The resolved configuration as a JSON object with LMCache's key names, credentials redacted
    /// (<see cref="Secrets"/>): this text is shown to users and written to logs.
    /// </summary>
    public string ToJson()
    {
        using var stream = new MemoryStream();
        using (var w = new Utf8JsonWriter(stream))
        {
            w.WriteStartObject();
            w.WriteNumber("chunk_size", ChunkSize);
            w.WriteBoolean("local_cpu", LocalCpu);
            w.WriteNumber("max_local_cpu_size", MaxLocalCpuSize);
            w.WriteBoolean("save_unfull_chunk", SaveUnfullChunk);
            w.WriteBoolean("save_decode_cache", SaveDecodeCache);
            w.WriteString("pre_caching_hash_algorithm", HashAlgorithm == ChunkHashAlgorithm.Sha256 ? "sha256" : "xxh3_128");
            w.WriteString("cache_policy", CachePolicy);
            w.WriteNumber("min_retrieve_tokens", MinRetrieveTokens);
            w.WriteBoolean("enable_async_loading", EnableAsyncLoading);
            w.WriteNumber("lookup_timeout_ms", LookupTimeoutMs);
            w.WriteNumber("blocking_timeout_secs", BlockingTimeoutSecs);
            if (LocalDisk is null) w.WriteNull("local_disk"); else w.WriteString("local_disk", LocalDisk);
            w.WriteNumber("max_local_disk_size", MaxLocalDiskSize);
            if (RemoteUrl is null) w.WriteNull("remote_url"); else w.WriteString("remote_url", Secrets.RedactUrls(RemoteUrl));
            w.WriteString("remote_serde", RemoteSerde);
            if (PriorityLimit is int limit) w.WriteNumber("priority_limit", limit); else w.WriteNull("priority_limit");
            w.WritePropertyName("extra_config");
            w.WriteRawValue(Secrets.RedactJson(ExtraConfigJson));
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.ToArray());
    }
}
