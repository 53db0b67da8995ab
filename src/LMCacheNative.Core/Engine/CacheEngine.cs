using System.Buffers;
using System.Diagnostics;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Memory;
using LMCacheNative.Core.Metrics;
using LMCacheNative.Core.Storage;
using LMCacheNative.Core.Transfer;

namespace LMCacheNative.Core.Engine;

/// <summary>
/// The cache engine: chunked, prefix-chained keys over a CPU tier and a chain of lower tiers, and
/// copies between the registered paged KV layers and chunk objects. The engine owns the pool; the
/// KV layers belong to the caller.
///
/// Every request goes plan → copy → complete: planning computes keys and pins or reserves chunks in
/// the CPU tier (reading from lower tiers what it lacks); the copy runs outside any lock through the
/// registration's <see cref="IKvTransfer"/> (at once on the host, on a stream on a GPU); completing
/// publishes, writes down, unpins and counts. A request runs either on the caller's thread
/// (<see cref="Store(in KvRequest)"/>) or as a job on the engine's workers (<see cref="StoreAsync"/>):
/// the same three steps either way.
///
/// Threading: any method may be called from any thread. The CPU tier takes its own short lock;
/// registration and disposal exclude calls (a reader-writer lock) and wait for jobs in flight.
/// </summary>
public sealed class CacheEngine : IDisposable
{
    // Readers: every call. Writer: register and dispose, which swap or free what the readers use.
    private readonly ReaderWriterLockSlim _lifecycle = new(LockRecursionPolicy.NoRecursion);
    private readonly IHostMemoryAllocator _allocator;
    private readonly IDeviceBackend? _deviceBackend;
    private readonly LowerTierChain _lowerTiers;
    private readonly EngineCounters _counters = new();
    private readonly EngineMetrics _metrics = new();
    private readonly JobRunner _jobs;
    private readonly InFlight _inFlight = new();
    // KV events for routers (enable_kv_events); null when off, and then no event code runs.
    private readonly KvEventQueue? _events;
    private Registration? _registration;
    private bool _disposed;

    /// <summary>What a registration fixes: layers, keys, the CPU tier and the copy path.</summary>
    /// <param name="EventHasher">
    /// KV events with more than one tensor-parallel rank: the keys a single-rank engine would compute
    /// (world size 1, worker 0), so that every rank names a chunk alike in its events. Null when
    /// events are off or there is one rank (the event hash is then the chunk key itself).
    /// </param>
    private sealed record Registration(KvLayerLayout[] Layers, ChunkHasher Hasher, LocalCpuTier Tier, IKvTransfer Transfer, IHostMemoryAllocator Allocator,
        ChunkHasher? EventHasher = null)
    {
        public KvShape Shape => Transfer.Shape;
        public long NumSlots => Layers[0].NumSlots;
    }

    /// <param name="deviceBackend">the GPU path for LMC_DEVICE_CUDA layers; without it they are refused as unsupported</param>
    public CacheEngine(EngineConfig config, string modelName, int worldSize, int workerId,
        IHostMemoryAllocator? allocator = null, RemoteTierFactory? remoteTierFactory = null, IDeviceBackend? deviceBackend = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(modelName);
        if (worldSize < 1) throw LmcException.InvalidArgument($"world_size must be >= 1, got {worldSize}");
        if (workerId < 0 || workerId >= worldSize)
            throw LmcException.InvalidArgument($"worker_id must be in [0, world_size = {worldSize}), got {workerId}");
        Config = config;
        ModelName = modelName;
        WorldSize = worldSize;
        WorkerId = workerId;
        _allocator = allocator ?? AlignedHostAllocator.Instance;
        _deviceBackend = deviceBackend;
        if (config.EnableKvEvents)
            _events = new KvEventQueue(config.KvEventsQueueSize);
        _lowerTiers = LowerTierChain.Create(config, remoteTierFactory, _events);
        _jobs = new JobRunner(2, "lmcache-native job");
    }

    /// <summary>Names of the lower tiers, in lookup order.</summary>
    public IReadOnlyList<string> LowerTierNames => _lowerTiers.Names;

    public EngineConfig Config { get; }
    public string ModelName { get; }
    public int WorldSize { get; }
    public int WorkerId { get; }
    public int ChunkSize => Config.ChunkSize;
    public bool IsRegistered => _registration is not null;

    /// <summary>Bytes of KV per token across all registered layers and K/V (0 before registration).</summary>
    public long BytesPerToken => _registration?.Shape.BytesPerToken ?? 0;

    public KeyNamespace? Namespace => _registration?.Hasher.Namespace;

    // ---- registration ----

    /// <summary>
    /// Validates and registers the layers (model layer order). Re-registering with the same
    /// namespace keeps the cache (chunks are layout-free); a different namespace, or memory of
    /// another kind for the pool, starts an empty one. Waits for jobs in flight on the old layers.
    /// </summary>
    public void RegisterLayers(IReadOnlyList<KvLayerLayout> layers)
    {
        LayoutValidator.Validate(layers);
        var first = layers[0];
        if (first.Device != DeviceKind.Host && _deviceBackend is null)
            throw new LmcException(LmcStatus.Unsupported,
                "layer 0: device_kind LMC_DEVICE_CUDA needs the CUDA path, which this build does not have; register host memory");

        var keyNamespace = new KeyNamespace(ModelName, first.ElemSize, first.NumKvHeads, first.HeadSize, layers.Count, first.KvCount, WorldSize, WorkerId);
        // Driver, context, kernels and the layer table: once per registration, outside the lock.
        IKvTransfer transfer = first.Device == DeviceKind.Host ? new HostKvTransfer(layers) : _deviceBackend!.Attach(layers);
        var allocator = transfer.PoolAllocator ?? _allocator;

        bool installed = false;
        _lifecycle.EnterWriteLock();
        try
        {
            ThrowIfDisposed();
            _inFlight.WaitForNone();
            var previous = _registration;
            LocalCpuTier tier;
            if (previous is not null && previous.Hasher.Namespace == keyNamespace && previous.Allocator == allocator)
            {
                tier = previous.Tier;
            }
            else
            {
                tier = NewCpuTier(transfer.Shape, allocator);
                if (previous is not null)
                {
                    // Queued writes read slabs of the old pool: let them finish before it goes.
                    _lowerTiers.Flush(Timeout.InfiniteTimeSpan);
                    _counters.TierReplaced(previous.Tier.EvictedChunks);
                    var replaced = previous.Tier.MetricsSnapshot();
                    _metrics.CpuTierReplaced(replaced.EvictionRounds, replaced.EvictionFailures);
                    previous.Tier.Dispose();
                    // Every chunk of the old pool is gone at once.
                    _events?.TryEnqueue(KvEvent.AllCleared(KvEventMedium.Cpu));
                }
                // Queued writes pin CPU chunks: a quarter of the pool at most, so stores keep room.
                _lowerTiers.Bind(new TierBinding(keyNamespace, Config.HashAlgorithm, ChunkSize, transfer.Shape.BytesPerToken),
                    (int)Math.Clamp(tier.CapacitySlabs / 4, 1, int.MaxValue));
            }
            var eventHasher = _events is not null && WorldSize > 1
                ? new ChunkHasher(Config.HashAlgorithm, keyNamespace with { WorldSize = 1, WorkerId = 0 })
                : null;
            _registration = new Registration(layers.ToArray(), new ChunkHasher(Config.HashAlgorithm, keyNamespace), tier, transfer, allocator, eventHasher);
            installed = true;
            previous?.Transfer.Dispose();
        }
        finally
        {
            _lifecycle.ExitWriteLock();
            if (!installed) transfer.Dispose();
        }
    }

    private LocalCpuTier NewCpuTier(KvShape shape, IHostMemoryAllocator allocator)
    {
        long slabBytes = checked(shape.ChunkBytes(ChunkSize));
        // Without local_cpu the pool is only a staging area for the lower tiers: chunks leave it
        // once written down (LMCache sizes that buffer with max_local_cpu_size too).
        bool stagingOnly = !Config.LocalCpu;
        long poolBytes = Config.LocalCpu || _lowerTiers.Count > 0 ? (long)(Config.MaxLocalCpuSize * EngineConfig.BytesPerGb) : 0;
        return new LocalCpuTier(new SlabPool(slabBytes, poolBytes, allocator), stagingOnly, _events);
    }

    // ---- lookup ----

    /// <summary>
    /// Leading tokens whose KV is cached in any tier (whole chunks, or all tokens when the trailing
    /// partial chunk is cached), and how many of them each tier holds. The prefix may be split: the
    /// first chunks in CPU memory, later ones on disk or remote.
    /// </summary>
    public LookupResult Lookup(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey)
    {
        long started = Stopwatch.GetTimestamp();
        using var scope = EnterCall();
        var reg = RequireRegistration();
        using var keys = ChunkKeys.Compute(reg.Hasher, tokens, extraKey, ChunkSize);
        var chunksByTier = new TierCounts();
        int hitChunks = reg.Tier.FindPrefix(keys.Span);
        chunksByTier[0] = hitChunks;
        hitChunks += _lowerTiers.CountPrefix(keys.Span[hitChunks..], ref chunksByTier);
        long hit = Math.Min((long)hitChunks * ChunkSize, tokens.Length);
        _counters.Lookup(tokens.Length, hit);

        // Tokens per tier: whole chunks, except that the last chunk of the hit may be partial.
        var tokensByTier = new TierCounts();
        long remaining = hit;
        for (int t = 0; t < TierCounts.MaxTiers; t++)
        {
            tokensByTier[t] = Math.Min(chunksByTier[t] * ChunkSize, remaining);
            remaining -= tokensByTier[t];
        }
        long elapsedNs = Stopwatch.GetElapsedTime(started).Ticks * 100;
        _metrics.Lookup(hit, elapsedNs);
        return new LookupResult(hit, tokensByTier, elapsedNs);
    }

    // ---- store ----

    /// <summary>
    /// Stores the KV of tokens from <see cref="KvRequest.FirstToken"/> (rounded down to a chunk
    /// boundary) to the end: full chunks, plus the trailing partial chunk with save_unfull_chunk.
    /// Stops before a chunk with a -1 slot, and when the pool has no room left. Chunks go to the CPU
    /// tier now and to the lower tiers in the background.
    /// </summary>
    public TransferResult Store(in KvRequest request) => RunNow(request, TransferDirection.Gather);

    /// <summary>Convenience form of <see cref="Store(in KvRequest)"/>.</summary>
    public TransferResult Store(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long skipLeadingTokens, ReadOnlySpan<byte> extraKey) =>
        Store(new KvRequest(tokens, extraKey, slotMapping, skipLeadingTokens));

    /// <summary>
    /// <see cref="Store(in KvRequest)"/> as a job: the request is checked now, and planned, copied and
    /// completed on the engine's workers (the copy on the request's stream for device layers). The
    /// stored chunks become visible to lookups when the task completes.
    /// </summary>
    public Task<TransferResult> StoreAsync(OwnedKvRequest request) => RunAsJob(request, TransferDirection.Gather);

    private PendingTransfer PlanStore(Registration reg, in KvRequest request)
    {
        CheckRequest(reg, request, OperationName(TransferDirection.Gather));
        var tokens = request.Tokens;
        int fullChunks = tokens.Length / ChunkSize;
        bool hasPartial = Config.SaveUnfullChunk && tokens.Length % ChunkSize != 0;
        int chunkCount = fullChunks + (hasPartial ? 1 : 0);
        int firstChunk = (int)(request.FirstToken / ChunkSize);
        long alignedSkip = (long)firstChunk * ChunkSize;
        if ((!Config.LocalCpu && _lowerTiers.Count == 0) || firstChunk >= chunkCount)
            return PendingTransfer.Store(reg, new LocalCpuTier.StorePlan(), [], 0, 0);

        // A chunk with a token that has no slot has no KV to store, and nothing after it is useful.
        int storableChunks = chunkCount;
        for (int c = firstChunk; c < chunkCount; c++)
        {
            int start = c * ChunkSize, end = Math.Min(start + ChunkSize, tokens.Length);
            if (request.Slots[start..end].Contains(-1L))
            {
                storableChunks = c;
                break;
            }
        }

        var keyedTokens = tokens[..Math.Min(tokens.Length, storableChunks * ChunkSize)];
        using var keys = ChunkKeys.Compute(reg.Hasher, keyedTokens, request.ExtraKey, ChunkSize);
        int numTokens = tokens.Length;
        var plan = reg.Tier.PlanStore(keys.Span[..storableChunks], firstChunk, c => Math.Min(ChunkSize, numTokens - c * ChunkSize), reg.Shape.BytesPerToken);
        if (_events is not null && plan.Fresh.Count > 0)
        {
            // The reserved chunks are this request's alone until published: no lock needed.
            var eventKeys = EventKeys(reg, keyedTokens, request.ExtraKey, keys.Span);
            foreach (var (index, chunk) in plan.Fresh) chunk.Lineage = Lineage(eventKeys, keyedTokens, index);
        }
        var transfers = new ChunkTransfer[plan.Fresh.Count];
        for (int i = 0; i < transfers.Length; i++)
        {
            var (index, chunk) = plan.Fresh[i];
            transfers[i] = new ChunkTransfer(chunk.Data, index * ChunkSize, chunk.TokenCount, index * ChunkSize);
        }
        long tokensMatched = Math.Max(Math.Min((long)plan.ReachedChunk * ChunkSize, tokens.Length) - alignedSkip, 0);
        return PendingTransfer.Store(reg, plan, transfers, tokensMatched, numTokens);
    }

    // ---- retrieve ----

    /// <summary>
    /// Retrieves the longest cached prefix, writing only the slots of tokens in
    /// [<see cref="KvRequest.FirstToken"/>, prefix end) whose slot is not -1. Chunks found in a lower
    /// tier are read into the CPU tier first (promotion).
    /// </summary>
    public TransferResult Retrieve(in KvRequest request) => RunNow(request, TransferDirection.Scatter);

    /// <summary>Convenience form of <see cref="Retrieve(in KvRequest)"/>.</summary>
    public TransferResult Retrieve(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long firstTokenToWrite, ReadOnlySpan<byte> extraKey) =>
        Retrieve(new KvRequest(tokens, extraKey, slotMapping, firstTokenToWrite));

    /// <summary>
    /// <see cref="Retrieve(in KvRequest)"/> as a job: checked now; lookups, lower-tier reads and the
    /// copy run on the engine's workers (the copy on the request's stream for device layers).
    /// </summary>
    public Task<TransferResult> RetrieveAsync(OwnedKvRequest request) => RunAsJob(request, TransferDirection.Scatter);

    private PendingTransfer PlanRetrieve(Registration reg, in KvRequest request)
    {
        CheckRequest(reg, request, OperationName(TransferDirection.Scatter));
        var (held, byTier) = PinPrefix(reg, request.Tokens, request.ExtraKey);
        long matched = Math.Min((long)held.Count * ChunkSize, request.Tokens.Length);
        int firstToCopy = (int)(request.FirstToken / ChunkSize);
        var transfers = new ChunkTransfer[Math.Max(held.Count - firstToCopy, 0)];
        for (int i = firstToCopy; i < held.Count; i++)
            transfers[i - firstToCopy] = new ChunkTransfer(held[i].Data, i * ChunkSize, held[i].TokenCount, (int)request.FirstToken);
        return PendingTransfer.Retrieve(reg, held, transfers, matched, request.Tokens.Length, byTier);
    }

    // ---- prefetch ----

    /// <summary>
    /// Brings the longest cached prefix into the CPU tier (reading disk or remote chunks) without
    /// writing any KV layer. TokensMatched: leading tokens now in CPU memory; the retrieve that
    /// follows finds them there.
    /// </summary>
    public TransferResult Prefetch(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey)
    {
        long started = Stopwatch.GetTimestamp();
        using var scope = EnterCall();
        return PrefetchNow(RequireRegistration(), tokens, extraKey, started);
    }

    /// <summary><see cref="Prefetch"/> as a job on the engine's workers.</summary>
    public Task<TransferResult> PrefetchAsync(OwnedKvRequest request)
    {
        long started = Stopwatch.GetTimestamp();
        using var scope = EnterCall();
        var reg = RequireRegistration();
        if (request.FirstToken != 0) throw LmcException.InvalidArgument($"prefetch: first_token must be 0, got {request.FirstToken}");
        return RunJob(() => Task.FromResult(PrefetchNow(reg, request.Tokens, request.ExtraKey, started)));
    }

    private TransferResult PrefetchNow(Registration reg, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, long started)
    {
        var (held, byTier) = PinPrefix(reg, tokens, extraKey);
        reg.Tier.Release(held);
        long matched = Math.Min((long)held.Count * ChunkSize, tokens.Length);
        return new TransferResult(matched, 0, 0, 0, byTier, Stopwatch.GetElapsedTime(started).Ticks * 100);
    }

    /// <summary>
    /// Pins the longest cached prefix in the CPU tier, promoting chunks from the lower tiers as needed;
    /// returns the pinned chunks in order (the caller releases them) and which tier served each.
    /// </summary>
    private (List<CachedChunk> Held, TierCounts ByTier) PinPrefix(Registration reg, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey)
    {
        using var keys = ChunkKeys.Compute(reg.Hasher, tokens, extraKey, ChunkSize);
        var byTier = new TierCounts();
        var held = reg.Tier.PinPrefix(keys.Span);
        byTier[0] = held.Count;
        int numTokens = tokens.Length;
        Func<int, ChunkLineage>? lineage = null;
        if (_events is not null && _lowerTiers.Count > 0 && held.Count < keys.Span.Length)
        {
            // Most retrieves promote nothing: the event hashes (a second hash chain with several
            // ranks) are computed only when the first chunk is promoted.
            var tokenArray = tokens.ToArray();
            var extraArray = extraKey.ToArray();
            var keyArray = keys.Span.ToArray();
            ChunkKey[]? eventKeys = null;
            lineage = c => Lineage(eventKeys ??= EventKeys(reg, tokenArray, extraArray, keyArray), tokenArray, c);
        }
        try
        {
            _lowerTiers.Promote(reg.Tier, keys.Span, held.Count, c => Math.Min(ChunkSize, numTokens - c * ChunkSize), reg.Shape.BytesPerToken, held, ref byTier,
                lineage);
        }
        catch
        {
            reg.Tier.Release(held);
            throw;
        }
        return (held, byTier);
    }

    // ---- KV events ----

    /// <summary>The event hash of each chunk: its key with one rank, else the key a single-rank engine would compute.</summary>
    private ChunkKey[] EventKeys(Registration reg, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, ReadOnlySpan<ChunkKey> keys)
    {
        if (reg.EventHasher is null) return keys.ToArray();
        var eventKeys = new ChunkKey[keys.Length];
        reg.EventHasher.ComputeKeys(tokens, extraKey, ChunkSize, eventKeys);
        return eventKeys;
    }

    private ChunkLineage Lineage(ChunkKey[] eventKeys, ReadOnlySpan<int> tokens, int index)
    {
        int start = index * ChunkSize;
        int count = Math.Min(ChunkSize, tokens.Length - start);
        return new ChunkLineage(eventKeys[index], index > 0 ? eventKeys[index - 1] : null, tokens.Slice(start, count).ToArray());
    }

    /// <summary>Whether <c>enable_kv_events</c> is on.</summary>
    public bool KvEventsEnabled => _events is not null;

    /// <summary>Bytes of an event hash: 32 for SHA-256 keys, 16 for XXH3-128.</summary>
    public int KvEventHashBytes => ChunkHasher.DigestBytes(Config.HashAlgorithm);

    /// <summary>
    /// Moves the oldest queued KV events into <paramref name="destination"/> without waiting (see
    /// <see cref="KvEventQueue.Drain"/>); with events off, nothing and 0 dropped. Any thread.
    /// </summary>
    public (int Events, long TokenIds, long Dropped) PollEvents(Span<KvEvent> destination, long tokenCapacity)
    {
        using var scope = EnterCall();
        return _events?.Drain(destination, tokenCapacity) ?? (0, 0, 0);
    }

    /// <summary>Token ids of the next queued event: the room a poll needs to make progress.</summary>
    public int NextKvEventTokenCount()
    {
        using var scope = EnterCall();
        return _events?.PeekTokenCount() ?? 0;
    }

    /// <summary>KV events dropped because the queue was full, since the engine started.</summary>
    public long KvEventsDropped => _events?.DroppedTotal ?? 0;

    // ---- one path for stores and retrieves, synchronous or not: plan, copy, complete ----

    /// <summary>Plans, copies and completes on the caller's thread (waiting for a device copy).</summary>
    private TransferResult RunNow(in KvRequest request, TransferDirection direction)
    {
        long started = Stopwatch.GetTimestamp();
        using var scope = EnterCall();
        var reg = RequireRegistration();
        return Wait(Copy(reg, Plan(reg, request, direction), request.Slots, request.Stream, started));
    }

    /// <summary>Checks the request now, then plans, copies and completes it on the engine's workers.</summary>
    private Task<TransferResult> RunAsJob(OwnedKvRequest request, TransferDirection direction)
    {
        long started = Stopwatch.GetTimestamp();
        using var scope = EnterCall();
        var reg = RequireRegistration();
        CheckRequest(reg, request.AsRequest(), OperationName(direction));
        return RunJob(() => Copy(reg, Plan(reg, request.AsRequest(), direction), request.Slots, request.Stream, started));
    }

    private PendingTransfer Plan(Registration reg, in KvRequest request, TransferDirection direction) =>
        direction == TransferDirection.Gather ? PlanStore(reg, request) : PlanRetrieve(reg, request);

    private static string OperationName(TransferDirection direction) => direction == TransferDirection.Gather ? "store" : "retrieve";

    /// <summary>A planned request: the chunks it holds or reserved, the copies to make, and what it will report.</summary>
    private sealed class PendingTransfer
    {
        public required Registration Reg { get; init; }
        public required TransferDirection Direction { get; init; }
        public required ChunkTransfer[] Transfers { get; init; }
        /// <summary>Store: cached chunks pinned, and chunks reserved for the copy. Retrieve: the prefix, pinned.</summary>
        public LocalCpuTier.StorePlan? StorePlan { get; init; }
        public List<CachedChunk> Held { get; init; } = [];
        public long TokensMatched { get; init; }
        public int NumTokens { get; init; }
        public TierCounts ChunksByTier;

        public static PendingTransfer Store(Registration reg, LocalCpuTier.StorePlan plan, ChunkTransfer[] transfers, long matched, int numTokens)
        {
            var pending = new PendingTransfer
            {
                Reg = reg, Direction = TransferDirection.Gather, Transfers = transfers, StorePlan = plan, TokensMatched = matched, NumTokens = numTokens,
            };
            pending.ChunksByTier[0] = plan.Held.Count;
            return pending;
        }

        public static PendingTransfer Retrieve(Registration reg, List<CachedChunk> held, ChunkTransfer[] transfers, long matched, int numTokens, TierCounts byTier) =>
            new()
            {
                Reg = reg, Direction = TransferDirection.Scatter, Transfers = transfers, Held = held, TokensMatched = matched, NumTokens = numTokens,
                ChunksByTier = byTier,
            };
    }

    /// <summary>
    /// Starts the planned copy and completes the request when it is done (at once for host layers;
    /// when the device has passed it for device layers), or undoes the plan if it fails.
    /// </summary>
    private Task<TransferResult> Copy(Registration reg, PendingTransfer op, ReadOnlySpan<long> slots, nint stream, long started)
    {
        Task<long> copy;
        _inFlight.Begin();
        try
        {
            copy = op.Transfers.Length == 0 ? Task.FromResult(0L) : reg.Transfer.CopyAsync(op.Direction, op.Transfers, slots, stream);
        }
        catch
        {
            Abort(op);
            _inFlight.End();
            throw;
        }
        if (copy.IsCompleted) return Task.FromResult(Finish(op, copy, started));
        return copy.ContinueWith(done => Finish(op, done, started), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
    }

    private TransferResult Finish(PendingTransfer op, Task<long> copy, long started)
    {
        try
        {
            if (!copy.IsCompletedSuccessfully)
            {
                Abort(op);
                System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(copy.Exception?.InnerException ?? new OperationCanceledException());
            }
            return op.Direction == TransferDirection.Gather ? CompleteStore(op, copy.Result, started) : CompleteRetrieve(op, copy.Result, started);
        }
        finally
        {
            _inFlight.End();
        }
    }

    /// <summary>The copy is done: publishes the fresh chunks, queues them for the lower tiers, unpins, counts.</summary>
    private TransferResult CompleteStore(PendingTransfer op, long bytesCopied, long started)
    {
        var plan = op.StorePlan!;
        var tier = op.Reg.Tier;
        // Counted while the chunks are still pinned: after the release below another store may
        // evict them.
        var fresh = new CachedChunk[plan.Fresh.Count];
        long tokensCopied = 0;
        for (int i = 0; i < fresh.Length; i++)
        {
            fresh[i] = plan.Fresh[i].Chunk;
            tokensCopied += fresh[i].TokenCount;
        }
        var published = tier.PublishAll(fresh);
        for (int i = 0; i < published.Count; i++)
        {
            // Another store that got there first has queued its own copy already.
            if (published[i].New) _lowerTiers.WriteBehind(published[i].Chunk);
        }
        // Released from the last chunk to the first, so the prefix's head ends up most recent: Held and
        // Fresh each run in chunk order, so a merge from their ends gives that order (no sort, nothing
        // allocated per chunk but the one array).
        var release = new CachedChunk[plan.Held.Count + published.Count];
        for (int h = plan.Held.Count - 1, f = published.Count - 1, n = 0; n < release.Length; n++)
            release[n] = f < 0 || (h >= 0 && plan.Held[h].Index > plan.Fresh[f].Index) ? plan.Held[h--].Chunk : published[f--].Chunk;
        tier.Release(release);
        _counters.Store(tokensCopied, bytesCopied, plan.SkippedForSpace);
        long elapsedNs = Stopwatch.GetElapsedTime(started).Ticks * 100;
        _metrics.Store(tokensCopied, elapsedNs);
        return new TransferResult(op.TokensMatched, tokensCopied, bytesCopied, plan.SkippedForSpace, op.ChunksByTier, elapsedNs);
    }

    /// <summary>The copy is done: counts the retrieve and releases the pins.</summary>
    private TransferResult CompleteRetrieve(PendingTransfer op, long bytesWritten, long started)
    {
        op.Reg.Tier.Release(Enumerable.Reverse(op.Held));
        _counters.Retrieve(op.NumTokens, op.TokensMatched, bytesWritten);
        long tokensWritten = bytesWritten / op.Reg.Shape.BytesPerToken;
        long elapsedNs = Stopwatch.GetElapsedTime(started).Ticks * 100;
        _metrics.Retrieve(op.TokensMatched, op.ChunksByTier, elapsedNs);
        return new TransferResult(op.TokensMatched, tokensWritten, bytesWritten, 0, op.ChunksByTier, elapsedNs);
    }

    /// <summary>The copy failed or could not start: reserved chunks are dropped, pins released, nothing published.</summary>
    private static void Abort(PendingTransfer op)
    {
        if (op.StorePlan is { } plan)
            op.Reg.Tier.AbandonAndRelease(plan.Fresh.Select(f => f.Chunk), plan.Held.Select(h => h.Chunk));
        else
            op.Reg.Tier.Release(op.Held);
    }

    private static TransferResult Wait(Task<TransferResult> task) => task.GetAwaiter().GetResult();

    /// <summary>Runs a request as a job; registration and disposal wait for it.</summary>
    private Task<TransferResult> RunJob(Func<Task<TransferResult>> work)
    {
        _inFlight.Begin();
        var job = _jobs.Submit(work);
        job.ContinueWith(_ => _inFlight.End(), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        return job;
    }

    // ---- maintenance ----

    /// <summary>Waits until the lower tiers have written everything stored so far; false on timeout.</summary>
    public bool Flush(TimeSpan timeout)
    {
        using var scope = EnterCall();
        return _lowerTiers.Flush(timeout);
    }

    /// <summary>Counters of each lower tier, in lookup order; write-behind drops included.</summary>
    public IReadOnlyList<TierStats> GetTierStats()
    {
        using var scope = EnterCall();
        return _lowerTiers.Stats();
    }

    public EngineStats GetStats()
    {
        using var scope = EnterCall();
        var tier = _registration?.Tier;
        var (chunks, evicted, used) = tier?.Snapshot() ?? (0, 0, 0);
        return _counters.Snapshot(chunks, evicted, used, tier?.CapacityBytes ?? Config.MaxLocalCpuBytes);
    }

    /// <summary>What the engine counts for Prometheus beyond <see cref="GetStats"/> (the lookup server adds to it).</summary>
    internal EngineMetrics Metrics => _metrics;

    /// <summary>
    /// Every metric in the Prometheus text exposition format (version 0.0.4), with LMCache's names,
    /// labels (model_name, worker_id, role = "worker") and histogram buckets; docs/metrics.md lists them.
    /// </summary>
    public string GetPrometheusMetrics()
    {
        using var scope = EnterCall();
        var tier = _registration?.Tier;
        var cpu = tier?.MetricsSnapshot() ?? default;
        var stats = _counters.Snapshot(cpu.Chunks, cpu.EvictedChunks, cpu.UsedBytes, tier?.CapacityBytes ?? Config.MaxLocalCpuBytes);
        return EngineExposition.Render(this, stats, cpu, _metrics, _lowerTiers.Stats(), _lowerTiers.Timings(), _registration is not null);
    }

    /// <summary>
    /// Drops every chunk of the CPU tier (chunks being read are freed when their readers finish).
    /// The lower tiers keep their records: they may be shared with other engines.
    /// </summary>
    public void Clear()
    {
        using var scope = EnterCall();
        _registration?.Tier.Clear();
    }

    /// <summary>Frees the cache. Stop a <see cref="LookupServer"/> serving this engine first: its lookups hold calls open.</summary>
    public void Dispose()
    {
        _lifecycle.EnterWriteLock();
        try
        {
            if (_disposed) return;
            _disposed = true;
            // Jobs and device copies in flight still use the pool and queue chunks for the writers.
            _inFlight.WaitForNone();
            _jobs.Dispose();
            // Writers first: they finish the queued writes (what other processes expect to find)
            // and release their pins through the CPU tier, which must still exist.
            _lowerTiers.Dispose();
            _registration?.Tier.Dispose();
            _registration?.Transfer.Dispose();
            _registration = null;
        }
        finally
        {
            _lifecycle.ExitWriteLock();
        }
    }

    // ---- argument checks and the call lifecycle ----

    private void CheckRequest(Registration reg, in KvRequest request, string operation)
    {
        if (request.Slots.Length != request.Tokens.Length)
            throw LmcException.InvalidArgument($"{operation}: slot_mapping has {request.Slots.Length} entries for {request.Tokens.Length} tokens");
        if (request.FirstToken < 0 || request.FirstToken > request.Tokens.Length)
            throw LmcException.InvalidArgument(
                $"{operation}: first_token ({(operation == "store" ? "skip_leading_tokens" : "first_token_to_write")}) must be in [0, num_tokens = {request.Tokens.Length}], got {request.FirstToken}");
        if (request.ExtraKey.Length > ChunkHasher.MaxExtraKeyBytes)
            throw LmcException.InvalidArgument($"extra_key_len {request.ExtraKey.Length} exceeds the limit of {ChunkHasher.MaxExtraKeyBytes} bytes");
        long numSlots = reg.NumSlots;
        var slots = request.Slots;
        for (int i = 0; i < slots.Length; i++)
        {
            long slot = slots[i];
            if (slot >= numSlots || slot < -1)
                throw LmcException.InvalidArgument($"{operation}: slot_mapping[{i}] = {slot} is outside the cache (valid: -1 or 0..{numSlots - 1})");
        }
    }

    private Registration RequireRegistration() =>
        _registration ?? throw LmcException.InvalidArgument("no KV layers registered: call register_layers first");

    private void ThrowIfDisposed()
    {
        if (_disposed) throw new LmcException(LmcStatus.InvalidHandle, "the engine has been destroyed");
    }

    private CallScope EnterCall()
    {
        _lifecycle.EnterReadLock();
        if (_disposed)
        {
            _lifecycle.ExitReadLock();
            ThrowIfDisposed();
        }
        return new CallScope(_lifecycle);
    }

    private readonly struct CallScope(ReaderWriterLockSlim lifecycle) : IDisposable
    {
        public void Dispose() => lifecycle.ExitReadLock();
    }

    /// <summary>Requests whose copy is still running (jobs, device copies); re-registration and disposal wait for none.</summary>
    private sealed class InFlight
    {
        private int _count;

        public void Begin()
        {
            lock (this) _count++;
        }

        public void End()
        {
            lock (this)
                if (--_count == 0) Monitor.PulseAll(this);
        }

        public void WaitForNone()
        {
            lock (this)
                while (_count > 0) Monitor.Wait(this);
        }
    }

    /// <summary>A request's chunk keys in a rented array, returned on dispose.</summary>
    private readonly struct ChunkKeys : IDisposable
    {
        private readonly ChunkKey[] _keys;
        private readonly int _count;

        private ChunkKeys(ChunkKey[] keys, int count)
        {
            _keys = keys;
            _count = count;
        }

        public static ChunkKeys Compute(ChunkHasher hasher, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, int chunkSize)
        {
            int count = ChunkHasher.ChunkCount(tokens.Length, chunkSize);
            var keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(count, 1));
            try
            {
                hasher.ComputeKeys(tokens, extraKey, chunkSize, keys.AsSpan(0, count));
            }
            catch
            {
                ArrayPool<ChunkKey>.Shared.Return(keys);
                throw;
            }
            return new ChunkKeys(keys, count);
        }

        public ReadOnlySpan<ChunkKey> Span => _keys.AsSpan(0, _count);

        public void Dispose() => ArrayPool<ChunkKey>.Shared.Return(_keys);
    }
}
