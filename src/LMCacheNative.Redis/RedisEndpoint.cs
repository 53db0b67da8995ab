using System.Net;
using System.Text.Json;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using StackExchange.Redis;

namespace LMCacheNative.Redis;

/// <summary>The three ways the remote tier reaches its data.</summary>
public enum RedisTopology
{
    /// <summary>One server (or a primary with replicas the client does not follow).</summary>
    Standalone,
    /// <summary>Redis / Valkey Cluster: slots spread over masters; detected from the seed nodes.</summary>
    Cluster,
    /// <summary>A primary found and followed through Sentinel.</summary>
    Sentinel,
}

/// <summary>
/// What <c>remote_url</c> and the remote keys of <c>extra_config</c> say, checked, as
/// StackExchange.Redis options. Grammar (LMCache's URL forms, plus seed lists):
/// <code>
/// redis[s]://[[user]:password@]host[:port][,host[:port]...][/db]      standalone or cluster (detected)
/// valkey[s]://...                                                     the same (aliases)
/// redis-cluster://...                                                 the same (LMCache's cluster scheme)
/// redis[s]-sentinel://[[user]:password@]host[:port][,...]/service     Sentinel (service name in the path,
///                                                                     else $REDIS_SERVICE_NAME as in LMCache)
/// </code>
/// The 's' schemes use TLS. The user and password are the data nodes' ACL credentials (also sent to
/// the Sentinels, which usually run without). extra_config keys read here:
/// <c>remote_ttl_secs</c> (alias <c>valkey_ttl_sec</c>), <c>valkey_mode</c> ("standalone" or "cluster"),
/// <c>remote_connections</c> (multiplexers in the pool, 1..64, default 4), <c>remote_tls_ca_file</c>
/// (PEM or DER file of the CA that signed the servers' certificates), and LMCache's health-monitor keys
/// <c>ping_interval</c> (seconds between background pings of the store, default 30 as in LMCache) and
/// <c>ping_timeout</c> (seconds one ping may take, default 5 as in LMCache, at most blocking_timeout_secs).
/// </summary>
public sealed record RedisEndpoint(ConfigurationOptions Options, int Database, RedisTopology Topology, TimeSpan? Ttl, int Connections)
{
    public const int DefaultConnections = 4;
    public const int MaxConnections = 64;
    /// <summary>LMCache's DEFAULT_PING_INTERVAL and DEFAULT_PING_TIMEOUT (lmcache/v1/health_monitor/constants.py).</summary>
    public static readonly TimeSpan DefaultPingInterval = TimeSpan.FromSeconds(30), DefaultPingTimeout = TimeSpan.FromSeconds(5);

    /// <summary>Time between the end of one background ping round and the start of the next.</summary>
    public TimeSpan PingInterval { get; init; } = DefaultPingInterval;
    /// <summary>Bound on one ping round (ping_timeout, never above blocking_timeout_secs).</summary>
    public TimeSpan PingTimeout { get; init; } = DefaultPingTimeout;

    public static readonly string[] Schemes =
        ["redis", "rediss", "valkey", "valkeys", "redis-cluster", "rediss-cluster", "redis-sentinel", "rediss-sentinel"];

    /// <summary>Whether this tier serves the URL's scheme (case-insensitive).</summary>
    public static bool Serves(string url)
    {
        int colon = url.IndexOf("://", StringComparison.Ordinal);
        return colon > 0 && Schemes.Contains(url[..colon].ToLowerInvariant());
    }

    public static RedisEndpoint Parse(string url, EngineConfig config)
    {
        var timeout = TimeSpan.FromSeconds(config.BlockingTimeoutSecs);
        using var extra = JsonDocument.Parse(config.ExtraConfigJson);
        return Parse(url, timeout, extra.RootElement);
    }

    private static LmcException Bad(string url, string why) =>
        LmcException.InvalidArgument($"config: \"remote_url\" \"{Secrets.RedactUrls(url)}\": {why}");

    internal static RedisEndpoint Parse(string url, TimeSpan timeout, JsonElement extra)
    {
        int schemeEnd = url.IndexOf("://", StringComparison.Ordinal);
        if (schemeEnd <= 0) throw Bad(url, "not a URL of the form redis://host:port/db");
        string scheme = url[..schemeEnd].ToLowerInvariant();
        if (!Schemes.Contains(scheme)) throw Bad(url, $"scheme must be one of {string.Join(", ", Schemes)}");
        bool tls = scheme is "rediss" or "valkeys" or "rediss-cluster" or "rediss-sentinel";
        bool sentinel = scheme.EndsWith("-sentinel", StringComparison.Ordinal);

        string rest = url[(schemeEnd + 3)..];
        int query = rest.IndexOfAny(['?', '#']);
        if (query >= 0) throw Bad(url, "query strings and fragments are not supported (use extra_config)");
        int slash = rest.IndexOf('/');
        string authority = slash < 0 ? rest : rest[..slash];
        string path = slash < 0 ? "" : rest[(slash + 1)..].TrimEnd('/');
        string? user = null, password = null;
        int at = authority.LastIndexOf('@');
        if (at >= 0)
        {
            string userInfo = authority[..at];
            authority = authority[(at + 1)..];
            int colon = userInfo.IndexOf(':');
            if (colon >= 0)
            {
                user = colon > 0 ? Uri.UnescapeDataString(userInfo[..colon]) : null;
                password = Uri.UnescapeDataString(userInfo[(colon + 1)..]);
            }
            else
            {
                password = Uri.UnescapeDataString(userInfo); // redis://password@host, as redis-py reads it
            }
        }

        int timeoutMs = (int)Math.Clamp(timeout.TotalMilliseconds, 1, int.MaxValue);
        var options = new ConfigurationOptions
        {
            AbortOnConnectFail = false,
            ConnectTimeout = timeoutMs,
            SyncTimeout = timeoutMs,
            AsyncTimeout = timeoutMs,
            ConnectRetry = 1,
            Ssl = tls,
            // Commands issued while a node is disconnected fail at once instead of queueing until a timeout.
            BacklogPolicy = BacklogPolicy.FailFast,
            ReconnectRetryPolicy = new LinearRetry(500),
            // Cluster topology and Sentinel's view of the primary are re-read this often (seconds),
            // besides the refreshes that MOVED replies and Sentinel's switch-master messages trigger.
            ConfigCheckSeconds = 5,
            ClientName = "lmcache-native",
            User = user,
            Password = password,
        };
        foreach (string node in authority.Split(','))
            options.EndPoints.Add(ParseNode(url, node.Trim(), sentinel ? 26379 : 6379));

        int database = 0;
        string? serviceName = null;
        if (sentinel)
        {
            serviceName = path.Length > 0 ? Uri.UnescapeDataString(path) : Environment.GetEnvironmentVariable("REDIS_SERVICE_NAME");
            if (string.IsNullOrEmpty(serviceName))
                throw Bad(url, "a Sentinel URL names its service: redis-sentinel://host:port[,host:port...]/<service> (or set REDIS_SERVICE_NAME)");
            options.ServiceName = serviceName;
        }
        else if (path.Length > 0 && (!int.TryParse(path, out database) || database < 0))
        {
            throw Bad(url, $"database \"{path}\" must be a non-negative integer");
        }
        options.DefaultDatabase = database;

        // ---- extra_config ----
        var topology = sentinel ? RedisTopology.Sentinel : RedisTopology.Standalone;
        if (scheme.EndsWith("-cluster", StringComparison.Ordinal)) topology = RedisTopology.Cluster;
        if (Text(extra, "valkey_mode") is { } mode)
        {
            if (mode.Equals("cluster", StringComparison.OrdinalIgnoreCase))
            {
                if (sentinel) throw LmcException.InvalidArgument("config: \"extra_config.valkey_mode\" \"cluster\" does not go with a Sentinel URL");
                topology = RedisTopology.Cluster;
            }
            else if (!mode.Equals("standalone", StringComparison.OrdinalIgnoreCase))
            {
                throw LmcException.InvalidArgument($"config: \"extra_config.valkey_mode\" must be \"standalone\" or \"cluster\", got \"{Shorten(mode)}\"");
            }
        }
        if (topology == RedisTopology.Cluster && database != 0)
            throw Bad(url, "a cluster has only database 0");

        TimeSpan? ttl = ReadTtl(extra, "remote_ttl_secs") ?? ReadTtl(extra, "valkey_ttl_sec");
        if (ReadTtl(extra, "remote_ttl_secs") is not null && ReadTtl(extra, "valkey_ttl_sec") is not null)
            throw LmcException.InvalidArgument("config: give either \"extra_config.remote_ttl_secs\" or its alias \"valkey_ttl_sec\", not both");

        int connections = DefaultConnections;
        if (extra.ValueKind == JsonValueKind.Object && extra.TryGetProperty("remote_connections", out var pool) && pool.ValueKind != JsonValueKind.Null)
        {
            if (pool.ValueKind != JsonValueKind.Number || !pool.TryGetInt32(out connections) || connections < 1 || connections > MaxConnections)
                throw LmcException.InvalidArgument($"config: \"extra_config.remote_connections\" must be an integer in [1, {MaxConnections}]");
        }

        if (Text(extra, "remote_tls_ca_file") is { } caFile)
        {
            if (!tls) throw LmcException.InvalidArgument("config: \"extra_config.remote_tls_ca_file\" needs a TLS URL (rediss://, valkeys://, rediss-sentinel://)");
            if (!File.Exists(caFile)) throw LmcException.InvalidArgument($"config: \"extra_config.remote_tls_ca_file\": no file \"{Shorten(caFile)}\"");
            try
            {
                options.TrustIssuer(caFile);
            }
            catch (Exception e)
            {
                throw LmcException.InvalidArgument($"config: \"extra_config.remote_tls_ca_file\" \"{Shorten(caFile)}\" is not a certificate: {e.Message}");
            }
        }
        var pingInterval = ReadSeconds(extra, "ping_interval", MaxPingSeconds) ?? DefaultPingInterval;
        var pingTimeout = ReadSeconds(extra, "ping_timeout", MaxPingSeconds) ?? DefaultPingTimeout;
        if (pingTimeout > timeout) pingTimeout = timeout;
        return new RedisEndpoint(options, database, topology, ttl, connections) { PingInterval = pingInterval, PingTimeout = pingTimeout };
    }

    private static EndPoint ParseNode(string url, string node, int defaultPort)
    {
        if (node.Length == 0) throw Bad(url, "empty host");
        string host = node;
        int port = defaultPort;
        if (node.StartsWith('['))
        {
            int close = node.IndexOf(']');
            if (close < 0) throw Bad(url, $"bad IPv6 host \"{node}\"");
            host = node[1..close];
            string after = node[(close + 1)..];
            if (after.Length > 0 && (!after.StartsWith(':') || !int.TryParse(after[1..], out port))) throw Bad(url, $"bad port in \"{node}\"");
        }
        else
        {
            int colon = node.LastIndexOf(':');
            if (colon >= 0)
            {
                host = node[..colon];
                if (!int.TryParse(node[(colon + 1)..], out port)) throw Bad(url, $"bad port in \"{node}\"");
            }
        }
        if (host.Length == 0) throw Bad(url, "empty host");
        if (port is < 1 or > 65535) throw Bad(url, $"port {port} is out of range");
        return IPAddress.TryParse(host, out var address) ? new IPEndPoint(address, port) : new DnsEndPoint(host, port);
    }

    private static string? Text(JsonElement extra, string name)
    {
        if (extra.ValueKind != JsonValueKind.Object || !extra.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null) return null;
        if (value.ValueKind != JsonValueKind.String || value.GetString() is not { Length: > 0 } text)
            throw LmcException.InvalidArgument($"config: \"extra_config.{name}\" must be a non-empty string");
        return text;
    }

    /// <summary>An expiry in seconds (> 0, at most a century: Redis keeps expiries as signed 64-bit milliseconds).</summary>
    private static TimeSpan? ReadTtl(JsonElement extra, string name)
    {
        if (extra.ValueKind != JsonValueKind.Object || !extra.TryGetProperty(name, out var ttl) || ttl.ValueKind == JsonValueKind.Null) return null;
        const double MaxTtlSeconds = 100 * 365.25 * 86400;
        if (ttl.ValueKind != JsonValueKind.Number || !ttl.TryGetDouble(out double seconds) || !(seconds > 0) || seconds > MaxTtlSeconds)
            throw LmcException.InvalidArgument($"config: \"extra_config.{name}\" must be a number of seconds > 0 and <= {MaxTtlSeconds:0} (a century)");
        return TimeSpan.FromSeconds(seconds);
    }

    private const double MaxPingSeconds = 86400;

    /// <summary>A number of seconds in (0, <paramref name="max"/>] under extra_config's <paramref name="name"/>; null when absent.</summary>
    private static TimeSpan? ReadSeconds(JsonElement extra, string name, double max)
    {
        if (extra.ValueKind != JsonValueKind.Object || !extra.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null) return null;
        if (value.ValueKind != JsonValueKind.Number || !value.TryGetDouble(out double seconds) || !(seconds > 0) || seconds > max)
            throw LmcException.InvalidArgument($"config: \"extra_config.{name}\" must be a number of seconds > 0 and <= {max:0}");
        return TimeSpan.FromSeconds(seconds);
    }

    private static string Shorten(string text) => text.Length <= 80 ? text : text[..77] + "...";
}
