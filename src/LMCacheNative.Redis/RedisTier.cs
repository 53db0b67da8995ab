using System.Buffers;
using System.Net;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Storage;
using StackExchange.Redis;

namespace LMCacheNative.Redis;

/// <summary>
/// The remote tier on Redis or Valkey (LMCache's RemoteBackend), shared by every engine that points
/// at the same store: one server, a Redis/Valkey Cluster, or a primary found through Sentinel
/// (<see cref="RedisEndpoint"/> has the URL grammar). Topologies are StackExchange.Redis's own:
/// a cluster is detected from the seed nodes and MOVED/ASK are followed by the client; Sentinel's
/// switch-master is followed by the client.
///
/// One key per chunk, <c>lmcn:&lt;namespace fingerprint&gt;:&lt;chunk key&gt;</c>, whose value is a whole
/// <see cref="ChunkRecord"/> (header with checksums, then payload): one SET makes a chunk visible
/// atomically, so there is no window where metadata and data disagree (LMCache's Redis connector
/// keeps them under two keys). The keys carry no hash tag, so a cluster spreads a request's chunks
/// over all masters by their CRC16 slot.
///
/// Throughput: a pool of <see cref="RedisEndpoint.Connections"/> multiplexers (each with one
/// connection per node). A request's GETs are dealt round-robin over the pool and all sent before the
/// first answer is awaited; each answer is checked and copied into its CPU slab on a pool thread as
/// soon as it arrives, while later ones are still on the wire. Writes of the chunks queued together
/// are pipelined the same way.
///
/// Failure model: every operation is bounded by <c>blocking_timeout_secs</c>; a timeout, a refused
/// connection, a dead or hung node or a failed authentication turns a lookup or read into a miss
/// and a write into a skipped write, counted in the stats (per node too, with the last error
/// message). While a node is unreachable, calls to it fail fast; the client reconnects in the
/// background and hits come back when the node (or its promoted replica) does.
///
/// Health pings (LMCache's RemoteBackendHealthCheck): a background task PINGs every data node of the
/// first multiplexer each <see cref="RedisEndpoint.PingInterval"/>, bounded by
/// <see cref="RedisEndpoint.PingTimeout"/>; never on a request thread. It counts successes and errors
/// and keeps the newest latency and error code (<see cref="PingTimeoutErrorCode"/>,
/// <see cref="PingGenericErrorCode"/>) in the tier stats; a ping that fails on a live connection also sets the node's last error.
/// </summary>
public sealed class RedisTier : IStorageTier
{
    /// <summary>Chunks handed to one <see cref="WriteBatch"/> (a 2048-token request is 8 chunks of 256).</summary>
    private const int WriteBatchChunks = 16;
    /// <summary>Record bytes a write batch keeps in flight at once (each record is staged in a rented buffer).</summary>
    private const long MaxWriteBytesInFlight = 512L << 20;

    /// <summary>LMCache's ping error codes (lmcache/v1/health_monitor/constants.py); 0 is a successful ping.</summary>
    public const int PingTimeoutErrorCode = -1, PingGenericErrorCode = -2;

    private readonly CancellationTokenSource _stopPinging = new();
    private readonly Task _pinging;
    private readonly object _statsLock = new();
    private readonly StorageTierStats _stats = new();
    private readonly Dictionary<string, NodeCounters> _nodes = new(StringComparer.Ordinal);
    private readonly PooledConnection[] _pool;
    private readonly TimeSpan _timeout;
    private readonly RedisEndpoint _endpoint;
    private int _nextConnection;
    private volatile TierBinding? _binding;
    private string _keyPrefix = "lmcn:";

    /// <summary>Creates the tier for a URL of one of <see cref="RedisEndpoint.Schemes"/>; null for other schemes.</summary>
    public static IStorageTier? TryCreate(string remoteUrl, EngineConfig config) =>
        RedisEndpoint.Serves(remoteUrl) ? new RedisTier(remoteUrl, config) : null;

    public RedisTier(string remoteUrl, EngineConfig config)
    {
        _timeout = TimeSpan.FromSeconds(config.BlockingTimeoutSecs);
        _endpoint = RedisEndpoint.Parse(remoteUrl, config);
        _stats.CapacityBytes = 0;
        // Connecting in the background keeps engine creation fast when the store is down.
        _pool = new PooledConnection[_endpoint.Connections];
        for (int i = 0; i < _pool.Length; i++) _pool[i] = new PooledConnection(this);
        _pinging = Task.Run(() => PingLoop(_stopPinging.Token));
    }

    public string Name => "RemoteBackend";

    /// <summary>The parsed URL and options (for tests and diagnostics).</summary>
    public RedisEndpoint Endpoint => _endpoint;

    public int WriteBatchSize => WriteBatchChunks;

    public void Bind(TierBinding binding)
    {
        _keyPrefix = "lmcn:" + Convert.ToHexStringLower(binding.Fingerprint, 0, 16) + ":";
        _binding = binding;
    }

    private RedisKey KeyOf(in ChunkKey key) => _keyPrefix + key.ToHex();

    // ---- connections ----

    /// <summary>
    /// One multiplexer of the pool. Until its first connection attempt has finished, callers wait for
    /// it (bounded by blocking_timeout_secs): a process that creates an engine, stores and exits must
    /// not lose its writes to the race with its own connect. A connect that failed outright (Sentinel
    /// unreachable at start) is retried, at most once a second.
    /// </summary>
    private sealed class PooledConnection(RedisTier tier)
    {
        private Task<ConnectionMultiplexer> _connecting = tier.Connect();
        private long _retryAtMs = Environment.TickCount64 + 1000;

        /// <summary>The current connect attempt (the ping loop awaits it instead of blocking a thread).</summary>
        public Task<ConnectionMultiplexer> Connecting => _connecting;

        public ConnectionMultiplexer? Get(DateTime deadline)
        {
            var connecting = _connecting;
            if (!connecting.IsCompleted)
            {
                try { connecting.Wait(Left(deadline)); } catch (Exception) { }
            }
            if (connecting.IsCompletedSuccessfully) return connecting.Result;
            if (connecting.IsCompleted && Environment.TickCount64 >= Interlocked.Read(ref _retryAtMs))
            {
                Interlocked.Exchange(ref _retryAtMs, Environment.TickCount64 + 1000);
                if (connecting.Exception?.InnerException is { } failure) tier.NodeFailed(null, failure.Message);
                Interlocked.CompareExchange(ref _connecting, tier.Connect(), connecting);
            }
            return null;
        }

        public void Dispose()
        {
            var connecting = _connecting;
            if (connecting.IsCompletedSuccessfully) connecting.Result.Dispose();
            else connecting.ContinueWith(t => { if (t.IsCompletedSuccessfully) t.Result.Dispose(); }, TaskScheduler.Default);
        }
    }

    private async Task<ConnectionMultiplexer> Connect()
    {
        // The connect log says why a first connect failed (authentication, TLS): the events below
        // are attached only once the multiplexer exists, after that first attempt.
        var log = new StringWriter();
        var multiplexer = await ConnectionMultiplexer.ConnectAsync(_endpoint.Options.Clone(), log).ConfigureAwait(false);
        multiplexer.ConnectionFailed += (_, e) =>
            NodeFailed(e.EndPoint, $"{e.FailureType}: {e.Exception?.Message ?? "connection failed"}");
        multiplexer.ConnectionRestored += (_, e) =>
        {
            lock (_statsLock)
            {
                _stats.Reconnects++;
                Node(e.EndPoint).Reconnects++;
            }
        };
        multiplexer.HashSlotMoved += (_, e) =>
        {
            lock (_statsLock) Node(e.OldEndPoint).Redirects++;
        };
        multiplexer.ErrorMessage += (_, e) => NodeFailed(e.EndPoint, e.Message, countError: false);
        // A failure during the first connect happened before these handlers: record it too.
        if (!multiplexer.IsConnected) NodeFailed(null, "not connected: " + Reason(log.ToString()));
        return multiplexer;
    }

    /// <summary>The most telling line of a connect log: one naming an authentication or TLS failure, else the last one.</summary>
    private static string Reason(string log)
    {
        var lines = log.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        string[] telling = ["WRONGPASS", "NOAUTH", "Authentication", "AuthenticationFailure", "certificate", "SSL", "TLS", "refused"];
        return lines.LastOrDefault(l => telling.Any(t => l.Contains(t, StringComparison.OrdinalIgnoreCase)))
               ?? lines.LastOrDefault() ?? "no connection";
    }

    /// <summary>The connected multiplexers' databases, the first one rotated per call; empty when none is connected.</summary>
    private IDatabase[] Databases()
    {
        var databases = new List<IDatabase>(_pool.Length);
        int first = (int)((uint)Interlocked.Increment(ref _nextConnection) % (uint)_pool.Length);
        var deadline = DateTime.UtcNow + _timeout; // the pool connects in parallel: one wait for all
        for (int i = 0; i < _pool.Length; i++)
        {
            var multiplexer = _pool[(first + i) % _pool.Length].Get(deadline);
            if (multiplexer is { IsConnected: true }) databases.Add(multiplexer.GetDatabase(_endpoint.Database));
        }
        return databases.ToArray();
    }

    // ---- health pings ----

    private async Task PingLoop(CancellationToken stop)
    {
        while (!stop.IsCancellationRequested)
        {
            try
            {
                try { await PingOnce(stop).ConfigureAwait(false); }
                catch (Exception) when (!stop.IsCancellationRequested) { } // PingOnce records its own failures; nothing may end the loop
                await Task.Delay(_endpoint.PingInterval, stop).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (stop.IsCancellationRequested)
            {
                return;
            }
        }
    }

    /// <summary>
    /// One ping round: PING every data node (not Sentinels) the first multiplexer knows, in parallel,
    /// all within <see cref="RedisEndpoint.PingTimeout"/>. The round succeeds when every node answers;
    /// its latency is the slowest answer.
    /// </summary>
    private async Task PingOnce(CancellationToken stop)
    {
        var timeout = _endpoint.PingTimeout;
        var started = DateTime.UtcNow;
        EndPoint? failedNode = null;
        int code;
        string? failure = null;
        double latencyMs = 0;
        try
        {
            var connection = _pool[0];
            var multiplexer = connection.Get(DateTime.MinValue); // never blocks; also triggers a due reconnect
            if (multiplexer is null && !connection.Connecting.IsCompleted)
            {
                try { await connection.Connecting.WaitAsync(timeout, stop).ConfigureAwait(false); } catch (TimeoutException) { }
                multiplexer = connection.Get(DateTime.MinValue);
            }
            if (multiplexer is null) throw new InvalidOperationException("no connection to the store");
            var servers = multiplexer.GetEndPoints().Select(e => multiplexer.GetServer(e)).Where(s => s.ServerType != ServerType.Sentinel).ToArray();
            if (servers.Length == 0) throw new InvalidOperationException("no data node known");
            var pings = servers.Select(async server =>
            {
                var watch = System.Diagnostics.Stopwatch.StartNew();
                bool wasConnected = server.IsConnected;
                try
                {
                    await server.PingAsync().ConfigureAwait(false);
                    return watch.Elapsed.TotalMilliseconds;
                }
                catch (Exception)
                {
                    // Only news on a live connection: a lost one already has its reason (connection
                    // failure, WRONGPASS, TLS) as the node's last error, which the ping must not hide.
                    if (wasConnected) failedNode ??= server.EndPoint;
                    throw;
                }
            }).ToArray();
            var left = timeout - (DateTime.UtcNow - started);
            var all = Task.WhenAll(pings);
            latencyMs = (await all.WaitAsync(left > TimeSpan.Zero ? left : TimeSpan.Zero, stop).ConfigureAwait(false)).Max();
            code = 0;
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            throw;
        }
        catch (TimeoutException)
        {
            code = PingTimeoutErrorCode;
            failure = $"PING timed out after {timeout.TotalSeconds:0.###} s";
        }
        catch (Exception e)
        {
            code = PingGenericErrorCode;
            failure = "PING failed: " + e.Message;
        }
        lock (_statsLock)
        {
            _stats.LastPingErrorCode = code;
            if (code == 0)
            {
                _stats.PingSuccesses++;
                _stats.LastPingLatencyMs = latencyMs;
            }
            else
            {
                _stats.PingErrors++;
            }
        }
        // A node that failed its PING gets that as its newest failure, not as one more failed
        // operation (its Errors count those). Without a connection the connect failure already says why.
        if (failure is not null && failedNode is not null) NodeFailed(failedNode, failure, countError: false);
    }

    // ---- lookups ----

    public int CountPrefix(ReadOnlySpan<ChunkKey> keys)
    {
        if (keys.Length == 0) return 0;
        var databases = Databases();
        if (databases.Length == 0)
        {
            Count(misses: keys.Length, errors: 1);
            return 0;
        }
        var tasks = new Task<bool>[keys.Length];
        try
        {
            // Pipelined: every EXISTS is sent before the first answer is awaited (a cluster client
            // routes each to its slot's master).
            for (int i = 0; i < keys.Length; i++) tasks[i] = databases[i % databases.Length].KeyExistsAsync(KeyOf(keys[i]));
            Task.WaitAll(tasks, _timeout);
        }
        catch (Exception)
        {
            // Failed or timed-out checks count as misses below; the prefix ends at the first one.
        }
        int present = 0;
        while (present < keys.Length && tasks[present] is { IsCompletedSuccessfully: true, Result: true }) present++;
        if (present < keys.Length && tasks[present] is { IsCompletedSuccessfully: false } failed)
        {
            Count(errors: 1);
            NodeFailed(SafeEndpoint(databases[present % databases.Length], KeyOf(keys[present])),
                failed.Exception?.InnerException?.Message ?? "timed out", countError: true);
        }
        foreach (var task in tasks) task?.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
        return present;
    }

    public bool Contains(in ChunkKey key)
    {
        var databases = Databases();
        if (databases.Length == 0) return false;
        try
        {
            return databases[0].KeyExists(KeyOf(key));
        }
        catch (Exception e)
        {
            Count(errors: 1);
            NodeFailed(SafeEndpoint(databases[0], KeyOf(key)), e.Message);
            return false;
        }
    }

    // ---- reads ----

    /// <summary>One GET: the batched path with a single read (the payload is a pinned CPU slab).</summary>
    public unsafe bool TryRead(in ChunkKey key, int tokenCount, Span<byte> payload)
    {
        fixed (byte* destination = payload)
            return ReadPrefix([new TierRead(key, tokenCount, (nint)destination, payload.Length)]) == 1;
    }

    private enum Outcome : byte { Pending, Loaded, Missing, Corrupt, Failed }

    /// <summary>
    /// The answers of one <see cref="ReadPrefix"/> call. Each answer is checked and copied into its
    /// slab by the continuation of its GET; once the caller has its prefix it sets
    /// <see cref="Abandoned"/> and waits until no copy is running, so that no slab is written after
    /// <see cref="ReadPrefix"/> returned (the engine then reuses the slabs it did not publish).
    /// </summary>
    private sealed class ReadBatch(IReadOnlyList<TierRead> reads, byte[] fingerprint)
    {
        public readonly Outcome[] Outcomes = new Outcome[reads.Count];
        public readonly string?[] Failures = new string?[reads.Count];
        public bool Abandoned;
        public int Copying;

        public unsafe void Arrived(int index, Task<Lease<byte>?> answer)
        {
            Lease<byte>? lease = answer.IsCompletedSuccessfully ? answer.Result : null;
            try
            {
                lock (this)
                {
                    if (Abandoned) return;
                    Copying++;
                }
                var outcome = Outcome.Failed;
                try
                {
                    if (!answer.IsCompletedSuccessfully)
                    {
                        Failures[index] = answer.Exception?.InnerException?.Message ?? "cancelled";
                    }
                    else if (lease is null)
                    {
                        outcome = Outcome.Missing;
                    }
                    else
                    {
                        var r = reads[index];
                        var payload = new Span<byte>((void*)r.Payload, checked((int)r.PayloadBytes));
                        outcome = ChunkRecord.TryOpen(lease.Span, r.Key, fingerprint, r.TokenCount, payload) ? Outcome.Loaded : Outcome.Corrupt;
                    }
                }
                finally
                {
                    lock (this)
                    {
                        Outcomes[index] = outcome;
                        Copying--;
                        Monitor.PulseAll(this);
                    }
                }
            }
            finally
            {
                lease?.Dispose();
            }
        }
    }

    /// <summary>
    /// Reads a request's chunks: all GETs are sent at once over the pool, each answer is verified
    /// and copied as it arrives, and the call returns as soon as the leading run is known (all
    /// loaded, or the first one missing, refused or failed) or blocking_timeout_secs has passed.
    /// </summary>
    public int ReadPrefix(IReadOnlyList<TierRead> reads)
    {
        var binding = _binding;
        var databases = binding is null ? [] : Databases();
        if (databases.Length == 0 || binding is null)
        {
            Count(misses: reads.Count, errors: binding is null ? 0 : 1);
            return 0;
        }
        var deadline = DateTime.UtcNow + _timeout;
        var batch = new ReadBatch(reads, binding.Fingerprint);
        var endpoints = new EndPoint?[reads.Count];
        int sent = 0;
        try
        {
            for (; sent < reads.Count; sent++)
            {
                var db = databases[sent % databases.Length];
                var key = KeyOf(reads[sent].Key);
                endpoints[sent] = SafeEndpoint(db, key);
                int index = sent;
                db.StringGetLeaseAsync(key).ContinueWith((t, state) => ((ReadBatch)state!).Arrived(index, t), batch,
                    CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
            }
        }
        catch (Exception e)
        {
            // A GET that could not even be queued ends the prefix there.
            lock (batch)
            {
                batch.Outcomes[sent] = Outcome.Failed;
                batch.Failures[sent] = e.Message;
            }
        }

        int prefix = 0;
        bool timedOut = false;
        lock (batch)
        {
            while (prefix < reads.Count)
            {
                var outcome = batch.Outcomes[prefix];
                if (outcome == Outcome.Loaded)
                {
                    prefix++;
                    continue;
                }
                if (outcome != Outcome.Pending) break;
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero)
                {
                    timedOut = true;
                    break;
                }
                Monitor.Wait(batch, left);
            }
            batch.Abandoned = true;
            while (batch.Copying > 0) Monitor.Wait(batch);
        }

        long bytes = 0;
        lock (_statsLock)
        {
            for (int i = 0; i < prefix; i++)
            {
                bytes += reads[i].PayloadBytes;
                Node(endpoints[i]).BytesRead += reads[i].PayloadBytes;
            }
            _stats.Hits += prefix;
            _stats.BytesRead += bytes;
            if (prefix < reads.Count)
            {
                _stats.Misses++;
                if (timedOut || batch.Outcomes[prefix] == Outcome.Failed) _stats.Errors++;
            }
        }
        if (prefix < reads.Count && (timedOut || batch.Outcomes[prefix] == Outcome.Failed))
            NodeFailed(endpoints[prefix], timedOut ? $"GET timed out after {_timeout.TotalSeconds:0.###} s" : batch.Failures[prefix] ?? "failed", countError: true);
        for (int i = 0; i < reads.Count; i++)
        {
            if (batch.Outcomes[i] != Outcome.Corrupt) continue;
            // A record that fails its checks is never loaded; it is deleted so that the next store rewrites it.
            Count(corrupt: 1);
            try { databases[0].KeyDelete(KeyOf(reads[i].Key), CommandFlags.FireAndForget); } catch (Exception) { }
        }
        return prefix;
    }

    // ---- writes ----

    public unsafe bool Write(in ChunkKey key, int tokenCount, ReadOnlySpan<byte> payload)
    {
        fixed (byte* source = payload)
            return WriteBatch([new TierWrite(key, tokenCount, (nint)source, payload.Length)], default, checkFirst: false) == 1;
    }

    public int WriteBatch(IReadOnlyList<TierWrite> writes, Span<bool> held = default) => WriteBatch(writes, held, checkFirst: true);

    /// <summary>
    /// Pipelined writes: the EXISTS of every chunk go out together, then the SET NX of those missing,
    /// dealt over the pool, at most <see cref="MaxWriteBytesInFlight"/> staged at once. Each record is
    /// staged (header + payload) in a rented buffer that goes back to the pool only when its SET has
    /// completed or failed, never while the client may still be sending it.
    /// </summary>
    private unsafe int WriteBatch(IReadOnlyList<TierWrite> writes, Span<bool> held, bool checkFirst)
    {
        held.Clear();
        // Whether the server holds each record after the batch (KV events): a span cannot be
        // captured by Collect below, so an array when the caller asks.
        bool[]? heldAfter = held.IsEmpty ? null : new bool[writes.Count];
        var binding = _binding;
        var databases = binding is null ? [] : Databases();
        if (databases.Length == 0 || binding is null)
        {
            Count(errors: 1);
            return 0;
        }
        var deadline = DateTime.UtcNow + _timeout;
        var keys = new RedisKey[writes.Count];
        for (int i = 0; i < writes.Count; i++) keys[i] = KeyOf(writes[i].Key);
        var present = new Task<bool>?[writes.Count];
        if (checkFirst)
        {
            for (int i = 0; i < writes.Count; i++) present[i] = databases[i % databases.Length].KeyExistsAsync(keys[i]);
            try { Task.WaitAll(present!, Left(deadline)); } catch (Exception) { }
        }

        var sets = new List<(int Index, Task<bool> Task, long Bytes, EndPoint? Node)>(writes.Count);
        long inFlight = 0;
        int written = 0;
        bool failed = false;
        string? failure = null;
        EndPoint? failedNode = null;

        void Collect((int Index, Task<bool> Task, long Bytes, EndPoint? Node) set)
        {
            bool done;
            try { done = set.Task.Wait(Left(deadline)); }
            catch (Exception e) { done = false; failure ??= e.InnerException?.Message ?? e.Message; }
            inFlight -= set.Bytes;
            if (done && set.Task.IsCompletedSuccessfully)
            {
                if (heldAfter is not null) heldAfter[set.Index] = true;
                if (!set.Task.Result) return; // another engine wrote it first
                written++;
                lock (_statsLock)
                {
                    _stats.Writes++;
                    _stats.BytesWritten += writes[set.Index].PayloadBytes;
                    Node(set.Node).BytesWritten += writes[set.Index].PayloadBytes;
                }
                return;
            }
            failed = true;
            failedNode ??= set.Node;
            failure ??= done ? "SET failed" : $"SET timed out after {_timeout.TotalSeconds:0.###} s";
        }

        for (int i = 0; i < writes.Count && !failed; i++)
        {
            if (present[i] is { } check && !(check.IsCompletedSuccessfully && !check.Result))
            {
                if (!check.IsCompletedSuccessfully) { failed = true; failure = check.Exception?.InnerException?.Message ?? "EXISTS timed out"; }
                if (heldAfter is not null && check.IsCompletedSuccessfully) heldAfter[i] = true;
                continue; // held already (or unknown: skipped)
            }
            var w = writes[i];
            int recordLength = checked(ChunkRecord.HeaderSize + (int)w.PayloadBytes);
            while (sets.Count > 0 && inFlight + recordLength > MaxWriteBytesInFlight && !failed)
            {
                Collect(sets[0]);
                sets.RemoveAt(0);
            }
            if (failed) break;
            byte[] buffer = ArrayPool<byte>.Shared.Rent(recordLength);
            Task<bool> set;
            var db = databases[i % databases.Length];
            try
            {
                var payload = new ReadOnlySpan<byte>((void*)w.Payload, checked((int)w.PayloadBytes));
                ChunkRecord.WriteHeader(buffer, w.Key, binding.Fingerprint, w.TokenCount, payload);
                payload.CopyTo(buffer.AsSpan(ChunkRecord.HeaderSize));
                set = db.StringSetAsync(keys[i], new ReadOnlyMemory<byte>(buffer, 0, recordLength), _endpoint.Ttl, When.NotExists);
            }
            catch (Exception e)
            {
                ArrayPool<byte>.Shared.Return(buffer);
                failed = true;
                failure = e.Message;
                failedNode = SafeEndpoint(db, keys[i]);
                break;
            }
            set.ContinueWith(static (t, b) => { _ = t.Exception; ArrayPool<byte>.Shared.Return((byte[])b!); }, buffer, TaskScheduler.Default);
            inFlight += recordLength;
            sets.Add((i, set, recordLength, SafeEndpoint(db, keys[i])));
        }
        foreach (var set in sets) Collect(set);
        heldAfter?.CopyTo(held);
        foreach (var check in present) check?.ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
        if (failed)
        {
            Count(errors: 1);
            NodeFailed(failedNode, failure ?? "write failed", countError: true);
        }
        return written;
    }

    private static TimeSpan Left(DateTime deadline)
    {
        var left = deadline - DateTime.UtcNow;
        return left > TimeSpan.Zero ? left : TimeSpan.Zero;
    }

    // ---- statistics ----

    private sealed class NodeCounters
    {
        public long BytesRead, BytesWritten, Errors, Reconnects, Redirects;
        public string? LastError;
    }

    /// <summary>"host:port" of an endpoint; "(tier)" for failures not tied to one node.</summary>
    private static string NodeName(EndPoint? endPoint) => endPoint switch
    {
        null => "(tier)",
        DnsEndPoint dns => $"{dns.Host}:{dns.Port}",
        IPEndPoint ip => ip.ToString(),
        _ => endPoint.ToString() ?? "(unknown)",
    };

    /// <summary>The counters of a node; call under <see cref="_statsLock"/>.</summary>
    private NodeCounters Node(EndPoint? endPoint)
    {
        string name = NodeName(endPoint);
        if (!_nodes.TryGetValue(name, out var node)) _nodes[name] = node = new NodeCounters();
        return node;
    }

    private void NodeFailed(EndPoint? endPoint, string message, bool countError = true)
    {
        lock (_statsLock)
        {
            var node = Node(endPoint);
            if (countError) node.Errors++;
            node.LastError = message.Length <= 300 ? message : message[..297] + "...";
        }
    }

    /// <summary>The node the client would send a key's command to (computed locally, no round trip); null when unknown.</summary>
    private static EndPoint? SafeEndpoint(IDatabase db, RedisKey key)
    {
        try { return db.Multiplexer.GetServer(key).EndPoint; } catch (Exception) { return null; }
    }

    public StorageTierStats GetStats()
    {
        // Role and state of every node the client knows (cluster masters and replicas included).
        var known = new Dictionary<string, (string Role, bool Connected)>(StringComparer.Ordinal);
        foreach (var connection in _pool)
        {
            if (connection.Get(DateTime.MinValue) is not { } multiplexer) continue;
            try
            {
                foreach (var endPoint in multiplexer.GetEndPoints())
                {
                    var server = multiplexer.GetServer(endPoint);
                    string role = server.ServerType == ServerType.Sentinel ? "sentinel" : server.IsReplica ? "replica" : "master";
                    string name = NodeName(endPoint);
                    bool connected = server.IsConnected || (known.TryGetValue(name, out var seen) && seen.Connected);
                    known[name] = (role, connected);
                }
            }
            catch (Exception)
            {
                // A topology change in progress: the counters below are still reported.
            }
        }
        lock (_statsLock)
        {
            var snapshot = _stats.Snapshot();
            var names = known.Keys.Union(_nodes.Keys).Order(StringComparer.Ordinal);
            snapshot.Nodes = names.Select(name =>
            {
                var c = _nodes.GetValueOrDefault(name) ?? new NodeCounters();
                var (role, connected) = known.TryGetValue(name, out var k) ? k : ("unknown", false);
                return new NodeStats(name, role, connected, c.BytesRead, c.BytesWritten, c.Errors, c.Reconnects, c.Redirects, c.LastError);
            }).ToArray();
            return snapshot;
        }
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
        _stopPinging.Cancel();
        // The loop ends at its next await; a ping in flight fails once its multiplexer is disposed.
        try { _pinging.Wait(_endpoint.PingTimeout); } catch (Exception) { }
        foreach (var connection in _pool) connection.Dispose();
    }
}
