using System.Buffers;
using System.Text.Json;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Storage;
using StackExchange.Redis;

namespace LMCacheNative.Redis;

/// <summary>
/// The remote tier on Redis or Valkey (LMCache's RemoteBackend with a <c>redis://</c> URL), shared by
/// every engine that points at the same server.
///
/// One key per chunk, <c>lmcn:&lt;namespace fingerprint&gt;:&lt;chunk key&gt;</c>, whose value is a whole
/// <see cref="ChunkRecord"/> (header with checksums, then payload): one SET makes a chunk visible
/// atomically, so there is no window where metadata and data disagree (LMCache's Redis connector
/// keeps them under two keys). Existence checks for a request are pipelined in one batch.
///
/// Failure model: every operation is bounded by <c>blocking_timeout_secs</c>; a timeout, a refused
/// connection or a dead server turns a lookup or read into a miss and a write into a skipped write,
/// counted in the stats. While the server is unreachable, calls fail fast without waiting, and the
/// client reconnects in the background; hits come back when the server does.
/// </summary>
public sealed class RedisTier : IStorageTier
{
    private readonly object _statsLock = new();
    private readonly StorageTierStats _stats = new();
    private readonly Task<ConnectionMultiplexer> _connecting;
    private readonly TimeSpan _timeout;
    private readonly TimeSpan? _ttl;
    private readonly int _database;
    private volatile TierBinding? _binding;
    private string _keyPrefix = "lmcn:";

    /// <summary>Creates the tier for a <c>redis://</c> or <c>rediss://</c> URL; null for other schemes.</summary>
    public static IStorageTier? TryCreate(string remoteUrl, EngineConfig config)
    {
        if (!remoteUrl.StartsWith("redis://", StringComparison.OrdinalIgnoreCase)
            && !remoteUrl.StartsWith("rediss://", StringComparison.OrdinalIgnoreCase)
            && !remoteUrl.StartsWith("valkey://", StringComparison.OrdinalIgnoreCase))
            return null;
        return new RedisTier(remoteUrl, config);
    }

    public RedisTier(string remoteUrl, EngineConfig config)
    {
        _timeout = TimeSpan.FromSeconds(config.BlockingTimeoutSecs);
        var (options, database) = ParseUrl(remoteUrl, _timeout);
        _database = database;
        _ttl = ReadTtl(config.ExtraConfigJson);
        _stats.CapacityBytes = 0;
        // Connecting in the background keeps engine creation fast when the server is down; until
        // the connection is up every call is a fast miss.
        _connecting = ConnectionMultiplexer.ConnectAsync(options);
        _connecting.ContinueWith(t =>
        {
            if (t.IsCompletedSuccessfully)
                t.Result.ConnectionRestored += (_, _) => { lock (_statsLock) _stats.Reconnects++; };
        }, TaskScheduler.Default);
    }

    public string Name => "RemoteBackend";

    /// <summary>URL grammar: <c>redis[s]://[[user]:password@]host[:port][/db]</c>; rediss means TLS.</summary>
    internal static (ConfigurationOptions Options, int Database) ParseUrl(string url, TimeSpan timeout)
    {
        if (!Uri.TryCreate(url, UriKind.Absolute, out var uri) || string.IsNullOrEmpty(uri.Host))
            throw LmcException.InvalidArgument($"config: \"remote_url\" \"{Secrets.RedactUrls(url)}\" is not a URL of the form redis://host:port/db");
        int database = 0;
        string path = uri.AbsolutePath.Trim('/');
        if (path.Length > 0 && (!int.TryParse(path, out database) || database < 0))
            throw LmcException.InvalidArgument($"config: \"remote_url\": database \"{path}\" must be a non-negative integer");
        int timeoutMs = (int)Math.Clamp(timeout.TotalMilliseconds, 1, int.MaxValue);
        var options = new ConfigurationOptions
        {
            AbortOnConnectFail = false,
            ConnectTimeout = timeoutMs,
            SyncTimeout = timeoutMs,
            AsyncTimeout = timeoutMs,
            ConnectRetry = 1,
            DefaultDatabase = database,
            Ssl = uri.Scheme.Equals("rediss", StringComparison.OrdinalIgnoreCase),
            // Commands issued while disconnected fail at once instead of queueing until a timeout.
            BacklogPolicy = BacklogPolicy.FailFast,
            ReconnectRetryPolicy = new LinearRetry(1000),
            ClientName = "lmcache-native",
        };
        options.EndPoints.Add(uri.Host, uri.Port > 0 ? uri.Port : 6379);
        if (uri.UserInfo.Length > 0)
        {
            string[] parts = uri.UserInfo.Split(':', 2);
            if (parts.Length == 2)
            {
                if (parts[0].Length > 0) options.User = Uri.UnescapeDataString(parts[0]);
                options.Password = Uri.UnescapeDataString(parts[1]);
            }
            else
            {
                options.Password = Uri.UnescapeDataString(parts[0]);
            }
        }
        return (options, database);
    }

    /// <summary>Optional expiry of remote records: <c>extra_config.remote_ttl_secs</c> (seconds, > 0).</summary>
    private static TimeSpan? ReadTtl(string extraConfigJson)
    {
        using var doc = JsonDocument.Parse(extraConfigJson);
        if (!doc.RootElement.TryGetProperty("remote_ttl_secs", out var ttl) || ttl.ValueKind == JsonValueKind.Null) return null;
        // Redis keeps expiries in milliseconds as a signed 64-bit number; a century is far below that.
        const double MaxTtlSeconds = 100 * 365.25 * 86400;
        if (ttl.ValueKind != JsonValueKind.Number || !ttl.TryGetDouble(out double seconds) || !(seconds > 0) || seconds > MaxTtlSeconds)
            throw LmcException.InvalidArgument($"config: \"extra_config.remote_ttl_secs\" must be a number of seconds > 0 and <= {MaxTtlSeconds:0} (a century)");
        return TimeSpan.FromSeconds(seconds);
    }

    public void Bind(TierBinding binding)
    {
        _keyPrefix = "lmcn:" + Convert.ToHexStringLower(binding.Fingerprint, 0, 16) + ":";
        _binding = binding;
    }

    private RedisKey KeyOf(in ChunkKey key) => _keyPrefix + key.ToHex();

    /// <summary>
    /// The database when the connection is up; null (a fast miss) otherwise. Until the first
    /// connection attempt has finished, callers wait for it (bounded by blocking_timeout_secs): a
    /// process that creates an engine, stores and exits must not lose its writes to the race with
    /// its own connect, nor a fresh engine miss its first lookups.
    /// </summary>
    private IDatabase? Database()
    {
        if (!_connecting.IsCompleted)
        {
            try
            {
                _connecting.Wait(_timeout);
            }
            catch (Exception)
            {
                return null;
            }
        }
        if (!_connecting.IsCompletedSuccessfully) return null;
        var multiplexer = _connecting.Result;
        return multiplexer.IsConnected ? multiplexer.GetDatabase(_database) : null;
    }

    public int CountPrefix(ReadOnlySpan<ChunkKey> keys)
    {
        if (keys.Length == 0) return 0;
        var db = Database();
        if (db is null)
        {
            Count(misses: keys.Length, errors: 1);
            return 0;
        }
        var tasks = new Task<bool>[keys.Length];
        try
        {
            var batch = db.CreateBatch();
            for (int i = 0; i < keys.Length; i++) tasks[i] = batch.KeyExistsAsync(KeyOf(keys[i]));
            batch.Execute();
            Task.WaitAll(tasks, _timeout);
        }
        catch (Exception)
        {
            // Failed or timed-out checks count as misses below; the prefix ends at the first one.
            Count(errors: 1);
        }
        int present = 0;
        while (present < keys.Length && tasks[present] is { IsCompletedSuccessfully: true, Result: true }) present++;
        foreach (var task in tasks) task?.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
        return present;
    }

    public bool Contains(in ChunkKey key)
    {
        var db = Database();
        if (db is null) return false;
        try
        {
            return db.KeyExists(KeyOf(key));
        }
        catch (Exception)
        {
            Count(errors: 1);
            return false;
        }
    }

    /// <summary>One GET: the batched path with a single read (the payload is a pinned CPU slab).</summary>
    public unsafe bool TryRead(in ChunkKey key, int tokenCount, Span<byte> payload)
    {
        fixed (byte* destination = payload)
            return ReadPrefix([new TierRead(key, tokenCount, (nint)destination, payload.Length)]) == 1;
    }

    /// <summary>
    /// Pipelines the GETs of a whole request: every request is sent before the first answer is
    /// read, so the round trips overlap; answers are then checked and copied in order.
    /// </summary>
    public unsafe int ReadPrefix(IReadOnlyList<TierRead> reads)
    {
        var db = Database();
        var binding = _binding;
        if (db is null || binding is null)
        {
            Count(misses: reads.Count);
            return 0;
        }
        var pending = new Task<Lease<byte>?>[reads.Count];
        var deadline = DateTime.UtcNow + _timeout;
        int succeeded = 0, consumed = 0; // consumed: answers taken (and disposed) by the loop
        try
        {
            for (int i = 0; i < reads.Count; i++) pending[i] = db.StringGetLeaseAsync(KeyOf(reads[i].Key));
            for (; succeeded < reads.Count; succeeded++)
            {
                var task = pending[succeeded];
                var left = deadline - DateTime.UtcNow;
                if (left < TimeSpan.Zero || !task.Wait(left) || !task.IsCompletedSuccessfully)
                {
                    Count(misses: 1, errors: 1);
                    break;
                }
                consumed = succeeded + 1;
                using var lease = task.Result;
                var r = reads[succeeded];
                var payload = new Span<byte>((void*)r.Payload, checked((int)r.PayloadBytes));
                if (lease is null)
                {
                    Count(misses: 1);
                    break;
                }
                if (!ChunkRecord.TryOpen(lease.Span, r.Key, binding.Fingerprint, r.TokenCount, payload))
                {
                    Count(misses: 1, corrupt: 1);
                    try { db.KeyDelete(KeyOf(r.Key), CommandFlags.FireAndForget); } catch (Exception) { }
                    break;
                }
                lock (_statsLock)
                {
                    _stats.Hits++;
                    _stats.BytesRead += payload.Length;
                }
            }
        }
        catch (Exception)
        {
            Count(errors: 1);
        }
        // Leases of answers not used (after a failure) go back to the pool when they arrive.
        for (int i = consumed; i < pending.Length; i++)
            pending[i]?.ContinueWith(static t => { if (t.IsCompletedSuccessfully) t.Result?.Dispose(); }, TaskScheduler.Default);
        return succeeded;
    }

    public bool Write(in ChunkKey key, int tokenCount, ReadOnlySpan<byte> payload)
    {
        var db = Database();
        var binding = _binding;
        if (db is null || binding is null)
        {
            Count(errors: 1);
            return false;
        }
        int recordLength = ChunkRecord.HeaderSize + payload.Length;
        byte[] buffer = ArrayPool<byte>.Shared.Rent(recordLength);
        try
        {
            ChunkRecord.WriteHeader(buffer, key, binding.Fingerprint, tokenCount, payload);
            payload.CopyTo(buffer.AsSpan(ChunkRecord.HeaderSize));
            bool written = db.StringSet(KeyOf(key), new ReadOnlyMemory<byte>(buffer, 0, recordLength), _ttl, When.NotExists);
            if (written)
                lock (_statsLock)
                {
                    _stats.Writes++;
                    _stats.BytesWritten += payload.Length;
                }
            return written;
        }
        catch (Exception)
        {
            Count(errors: 1);
            return false;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    public StorageTierStats GetStats()
    {
        lock (_statsLock) return _stats.Snapshot();
    }

    private void Count(long misses = 0, long errors = 0, long corrupt = 0)
    {
        lock (_statsLock)
        {
            _stats.Misses += misses;
            _stats.Errors += errors;
            _stats.CorruptRecords += corrupt;
        }
    }

    public void Dispose()
    {
        if (_connecting.IsCompletedSuccessfully) _connecting.Result.Dispose();
        else _connecting.ContinueWith(t => { if (t.IsCompletedSuccessfully) t.Result.Dispose(); }, TaskScheduler.Default);
    }
}
