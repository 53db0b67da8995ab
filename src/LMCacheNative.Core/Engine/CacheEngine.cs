using System.Buffers;
using System.Runtime.ExceptionServices;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Layout;
using LMCacheNative.Core.Lookup;
using LMCacheNative.Core.Memory;
using LMCacheNative.Core.Storage;
using LMCacheNative.Core.Transfer;

namespace LMCacheNative.Core.Engine;

/// <summary>Counters since creation and pool gauges; mirrors the C ABI's lmc_stats.</summary>
public readonly record struct EngineStats(
    long LookupRequests, long LookupTokens, long LookupHitTokens,
    long StoreRequests, long StoredTokens, long StoredBytes,
    long RetrieveRequests, long RetrieveRequestedTokens, long RetrievedTokens, long RetrievedBytes,
    long EvictedChunks, long StoreSkippedChunks, long CachedChunks, long PoolUsedBytes, long PoolCapacityBytes);

/// <summary>One lower tier's counters, for the C ABI's per-tier statistics.</summary>
public readonly record struct TierStats(string Name, StorageTierStats Counters);

/// <summary>What a store did, for the caller's log line.</summary>
public readonly record struct StoreResult(long TokensInCache, long TokensCopied, long BytesCopied, int ChunksSkippedForSpace);

/// <summary>What a retrieve did.</summary>
public readonly record struct RetrieveResult(long RetrievedTokens, long BytesWritten);

/// <summary>
/// The cache engine: chunked, prefix-chained keys over a CPU tier, and gather/scatter between the
/// registered paged KV layers and chunk objects. The engine owns the pool; the KV layers belong to
/// the caller.
///
/// Threading: any method may be called from any thread. Index and pool updates happen under one
/// short lock; copies run outside it while the chunks involved are pinned, so a lookup is never
/// stuck behind a large copy. Registration and disposal wait for calls in flight.
/// </summary>
public sealed class CacheEngine : IDisposable
{
    private readonly object _indexLock = new();
    // Readers: lookup/store/retrieve/stats/clear. Writer: register and dispose, which swap or free
    // what the readers use.
    private readonly ReaderWriterLockSlim _lifecycle = new(LockRecursionPolicy.NoRecursion);
    private readonly IHostMemoryAllocator _allocator;
    // The GPU path (LMCacheNative.Cuda), when the composition root supplies one.
    private readonly IDeviceBackend? _deviceBackend;
    // Asynchronous device transfers still in flight: re-registration and disposal wait for them,
    // because the device is still reading or writing the pool and the layers.
    private readonly object _deviceOperationsLock = new();
    private int _deviceOperations;
    // Lower tiers in LMCache's order (local disk, then remote), each with its write-behind worker.
    private readonly TierWriter[] _writers;
    private Registration? _registration;
    private bool _disposed;

    private long _lookupRequests, _lookupTokens, _lookupHitTokens;
    private long _storeRequests, _storedTokens, _storedBytes, _storeSkippedChunks;
    private long _retrieveRequests, _retrieveRequestedTokens, _retrievedTokens, _retrievedBytes;
    private long _evictedBeforeCurrentTier;

    private sealed class Registration(KvLayerLayout[] layers, ChunkHasher hasher, LocalCpuTier tier, IKvTransfer transfer, long bytesPerToken,
        IHostMemoryAllocator allocator)
    {
        public KvLayerLayout[] Layers { get; } = layers;
        public ChunkHasher Hasher { get; } = hasher;
        public LocalCpuTier Tier { get; } = tier;
        public IKvTransfer Transfer { get; } = transfer;
        public long BytesPerToken { get; } = bytesPerToken;
        /// <summary>Where the tier's pool comes from: plain host memory, or the device path's pinned memory.</summary>
        public IHostMemoryAllocator Allocator { get; } = allocator;
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
        _writers = CreateLowerTiers(config, remoteTierFactory);
    }

    private TierWriter[] CreateLowerTiers(EngineConfig config, RemoteTierFactory? remoteTierFactory)
    {
        var tiers = new List<IStorageTier>();
        try
        {
            if (config.LocalDisk is { } directory && config.MaxLocalDiskSize > 0)
                tiers.Add(new LocalDiskTier(directory, (long)(config.MaxLocalDiskSize * EngineConfig.BytesPerGb)));
            if (config.RemoteUrl is { } url)
            {
                var remote = remoteTierFactory?.Invoke(url, config)
                             ?? throw LmcException.Unsupported($"config: \"remote_url\" \"{Secrets.RedactUrls(url)}\": no remote backend for this URL scheme in this build");
                tiers.Add(remote);
            }
        }
        catch
        {
            foreach (var tier in tiers) tier.Dispose();
            throw;
        }
        return tiers.Select(t => new TierWriter(t, ReleaseWrittenChunk)).ToArray();
    }

    /// <summary>Called by a write-behind worker when a chunk is written (or failed): drop its pin.</summary>
    private void ReleaseWrittenChunk(CachedChunk chunk)
    {
        lock (_indexLock)
        {
            var tier = _registration?.Tier;
            if (tier is null) return;
            tier.Unpin(chunk);
            if (!Config.LocalCpu) tier.RemoveIfUnpinned(chunk);
        }
    }

    /// <summary>Names of the lower tiers, in lookup order.</summary>
    public IReadOnlyList<string> LowerTierNames => _writers.Select(w => w.Tier.Name).ToArray();

    public EngineConfig Config { get; }
    public string ModelName { get; }
    public int WorldSize { get; }
    public int WorkerId { get; }
    public int ChunkSize => Config.ChunkSize;
    public bool IsRegistered => _registration is not null;

    /// <summary>Bytes of KV per token across all registered layers and K/V (0 before registration).</summary>
    public long BytesPerToken => _registration?.BytesPerToken ?? 0;

    public KeyNamespace? Namespace => _registration?.Hasher.Namespace;

    /// <summary>
    /// Validates and registers the layers (model layer order). Re-registering with the same
    /// namespace keeps the cache (chunks are layout-free); a different namespace clears it.
    /// </summary>
    public void RegisterLayers(IReadOnlyList<KvLayerLayout> layers)
    {
        LayoutValidator.Validate(layers);
        var first = layers[0];
        if (first.Device != DeviceKind.Host && _deviceBackend is null)
            throw new LmcException(LmcErrorKind.Unsupported,
                "layer 0: device_kind LMC_DEVICE_CUDA needs the CUDA path, which this build does not have yet; register host memory");

        var keyNamespace = new KeyNamespace(ModelName, first.ElemSize, first.NumKvHeads, first.HeadSize, layers.Count, first.KvCount, WorldSize, WorkerId);
        IKvTransfer transfer;
        IDeviceKvTransfer? device = null;
        IHostMemoryAllocator allocator;
        long bytesPerToken;
        if (first.Device == DeviceKind.Host)
        {
            var host = new HostKvTransfer(layers);
            transfer = host;
            bytesPerToken = host.BytesPerToken;
            allocator = _allocator;
        }
        else
        {
            // Driver, context, kernels and the layer table: once per registration, outside the lock.
            device = _deviceBackend!.Attach(layers);
            transfer = device;
            bytesPerToken = first.TokenRowBytes * layers.Count * first.KvCount;
            allocator = device.HostAllocator;
        }

        bool installed = false;
        _lifecycle.EnterWriteLock();
        try
        {
            ThrowIfDisposed();
            // Transfers still running on a device read or write the old layers and pool.
            WaitForDeviceOperations();
            var previous = _registration;
            LocalCpuTier tier;
            // Chunks are layout-free, so the cache survives a re-registration of the same namespace,
            // unless the pool's memory must change kind (pageable for host layers, pinned for a GPU).
            if (previous is not null && previous.Hasher.Namespace == keyNamespace && previous.Hasher.Algorithm == Config.HashAlgorithm
                && previous.Allocator == allocator)
            {
                tier = previous.Tier;
            }
            else
            {
                long slabBytes = checked(bytesPerToken * ChunkSize);
                // Without local_cpu the pool is only a staging area for the lower tiers: chunks
                // leave it once written down (LMCache sizes that buffer with max_local_cpu_size too).
                long poolBytes = Config.LocalCpu || _writers.Length > 0 ? (long)(Config.MaxLocalCpuSize * EngineConfig.BytesPerGb) : 0;
                tier = new LocalCpuTier(new SlabPool(slabBytes, poolBytes, allocator));
                if (previous is not null)
                {
                    // Queued writes read slabs of the old pool: let them finish before it goes.
                    foreach (var writer in _writers) writer.WaitIdle(Timeout.InfiniteTimeSpan);
                    _evictedBeforeCurrentTier += previous.Tier.EvictedChunks;
                    lock (_indexLock) previous.Tier.Dispose();
                }
                var binding = new TierBinding(keyNamespace, Config.HashAlgorithm, ChunkSize, bytesPerToken);
                foreach (var writer in _writers)
                {
                    writer.Tier.Bind(binding);
                    // Queued writes pin CPU chunks: a quarter of the pool at most, so stores keep room.
                    writer.MaxQueuedChunks = (int)Math.Clamp(tier.CapacitySlabs / 4, 1, int.MaxValue);
                }
            }
            lock (_indexLock)
                _registration = new Registration(layers.ToArray(), new ChunkHasher(Config.HashAlgorithm, keyNamespace), tier, transfer, bytesPerToken, allocator);
            installed = true;
            (previous?.Transfer as IDisposable)?.Dispose();
        }
        finally
        {
            _lifecycle.ExitWriteLock();
            if (!installed) device?.Dispose();
        }
    }

    /// <summary>
    /// Number of leading tokens whose KV is cached in any tier (whole chunks, or all tokens when the
    /// trailing partial chunk is cached). The prefix may be split: the first chunks in CPU memory,
    /// later ones on disk or remote.
    /// </summary>
    public long Lookup(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey)
    {
        using var scope = EnterCall();
        var reg = RequireRegistration();
        int chunkCount = ChunkHasher.ChunkCount(tokens.Length, ChunkSize);
        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(chunkCount, 1));
        CachedChunk[] hits = ArrayPool<CachedChunk>.Shared.Rent(Math.Max(chunkCount, 1));
        try
        {
            reg.Hasher.ComputeKeys(tokens, extraKey, ChunkSize, keys.AsSpan(0, chunkCount));
            int hitChunks = 0;
            lock (_indexLock)
            {
                while (hitChunks < chunkCount && reg.Tier.Find(keys[hitChunks]) is { } chunk) hits[hitChunks++] = chunk;
                // Most recent last for the prefix: touching in reverse keeps the first chunks, which
                // every extension of the prompt needs, away from eviction the longest.
                for (int i = hitChunks - 1; i >= 0; i--) reg.Tier.Touch(hits[i]);
            }
            foreach (var writer in _writers)
            {
                if (hitChunks == chunkCount) break;
                hitChunks += writer.Tier.CountPrefix(keys.AsSpan(hitChunks, chunkCount - hitChunks));
            }
            long hit = Math.Min((long)hitChunks * ChunkSize, tokens.Length);
            lock (_indexLock)
            {
                _lookupRequests++;
                _lookupTokens += tokens.Length;
                _lookupHitTokens += hit;
            }
            return hit;
        }
        finally
        {
            ArrayPool<ChunkKey>.Shared.Return(keys);
            ArrayPool<CachedChunk>.Shared.Return(hits, clearArray: true);
        }
    }

    /// <summary>
    /// Stores the KV of tokens from <paramref name="skipLeadingTokens"/> (rounded down to a chunk
    /// boundary) to the end: full chunks, plus the trailing partial chunk with save_unfull_chunk.
    /// Stops before a chunk with a -1 slot, and when the pool has no room left. Chunks go to the CPU
    /// tier now and to the lower tiers in the background.
    /// </summary>
    public StoreResult Store(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long skipLeadingTokens, ReadOnlySpan<byte> extraKey)
    {
        using var scope = EnterCall();
        return StoreNow(BeginStore(tokens, slotMapping, skipLeadingTokens, extraKey), slotMapping);
    }

    /// <summary>Runs a planned store's copy on the calling thread and completes it.</summary>
    private StoreResult StoreNow(PendingStore op, ReadOnlySpan<long> slotMapping) =>
        CopyNow(op.Reg, TransferDirection.Gather, op.Transfers, slotMapping, bytes => CompleteStore(op, bytes), () => AbortStore(op));

    /// <summary>
    /// <see cref="Store"/> whose copy is only enqueued on the device stream <paramref name="stream"/>
    /// (0 = the default stream). Keys, reservations and pins are done before this returns; the chunks
    /// are published when the device has finished, which the returned task reports. Host layers copy
    /// synchronously and return a completed task. <paramref name="tokensInCache"/> is what the store
    /// will have cached once the task succeeds.
    /// </summary>
    public Task<StoreResult> StoreAsync(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long skipLeadingTokens, ReadOnlySpan<byte> extraKey,
        nint stream, out long tokensInCache)
    {
        using var scope = EnterCall();
        var op = BeginStore(tokens, slotMapping, skipLeadingTokens, extraKey);
        tokensInCache = op.TokensInCache;
        if (op.Transfers.Length == 0 || op.Reg.Transfer is not IDeviceKvTransfer device)
            return Task.FromResult(StoreNow(op, slotMapping));
        return CopyOnDevice(device, TransferDirection.Gather, op.Transfers, slotMapping, stream, bytes => CompleteStore(op, bytes), () => AbortStore(op));
    }

    /// <summary>A store between its planning (keys, reservations, pins) and its completion.</summary>
    private sealed class PendingStore(Registration reg)
    {
        public Registration Reg { get; } = reg;
        /// <summary>Nothing to store at all: completing only counts the request.</summary>
        public bool Trivial { get; init; }
        /// <summary>(chunk index, chunk) of every chunk this store holds a pin on.</summary>
        public List<(int Index, CachedChunk Chunk)> Held { get; } = [];
        /// <summary>Chunks reserved for this store, to be filled by the copy and then published.</summary>
        public List<(int Index, CachedChunk Chunk)> Fresh { get; } = [];
        public ChunkTransfer[] Transfers { get; set; } = [];
        public int SkippedForSpace { get; set; }
        public long TokensInCache { get; set; }
    }

    private PendingStore BeginStore(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long skipLeadingTokens, ReadOnlySpan<byte> extraKey)
    {
        var reg = RequireRegistration();
        CheckTokensAndSlots(tokens, slotMapping, reg, "store");
        if (skipLeadingTokens < 0 || skipLeadingTokens > tokens.Length)
            throw LmcException.InvalidArgument($"store: skip_leading_tokens must be in [0, num_tokens = {tokens.Length}], got {skipLeadingTokens}");

        int fullChunks = tokens.Length / ChunkSize;
        bool hasPartial = Config.SaveUnfullChunk && tokens.Length % ChunkSize != 0;
        int chunkCount = fullChunks + (hasPartial ? 1 : 0);
        int firstChunk = (int)(skipLeadingTokens / ChunkSize);
        long alignedSkip = (long)firstChunk * ChunkSize;
        if ((!Config.LocalCpu && _writers.Length == 0) || firstChunk >= chunkCount)
            return new PendingStore(reg) { Trivial = true };

        // A chunk with a token that has no slot has no KV to store, and nothing after it is useful.
        int storableChunks = chunkCount;
        for (int c = firstChunk; c < chunkCount; c++)
        {
            int start = c * ChunkSize, end = Math.Min(start + ChunkSize, tokens.Length);
            if (slotMapping[start..end].Contains(-1L)) { storableChunks = c; break; }
        }

        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(storableChunks, 1));
        var op = new PendingStore(reg);
        try
        {
            reg.Hasher.ComputeKeys(tokens, extraKey, ChunkSize, keys.AsSpan(0, storableChunks));
            int reachedChunk = firstChunk;
            lock (_indexLock)
            {
                // Pin everything this store touches, so that making room for a later chunk can never
                // evict an earlier chunk of the same prefix.
                for (int c = firstChunk; c < storableChunks; c++)
                {
                    if (reg.Tier.Find(keys[c]) is { } existing)
                    {
                        reg.Tier.Pin(existing);
                        op.Held.Add((c, existing));
                    }
                    else if (reg.Tier.IsPending(keys[c]))
                    {
                        // Another store is copying this very chunk right now: copying it twice
                        // would only waste the pool and count the tokens twice.
                    }
                    else
                    {
                        int count = Math.Min(ChunkSize, tokens.Length - c * ChunkSize);
                        var reserved = reg.Tier.TryReserve(keys[c], count, count * reg.BytesPerToken);
                        if (reserved is null)
                        {
                            op.SkippedForSpace = storableChunks - c;
                            break;
                        }
                        op.Fresh.Add((c, reserved));
                    }
                    reachedChunk = c + 1;
                }
            }

            if (op.Fresh.Count > 0)
            {
                var transfers = new ChunkTransfer[op.Fresh.Count];
                for (int i = 0; i < op.Fresh.Count; i++)
                {
                    int start = op.Fresh[i].Index * ChunkSize;
                    transfers[i] = new ChunkTransfer(op.Fresh[i].Chunk.Data, start, op.Fresh[i].Chunk.TokenCount, start);
                }
                op.Transfers = transfers;
            }
            long tokensInCache = Math.Min((long)reachedChunk * ChunkSize, tokens.Length) - alignedSkip;
            op.TokensInCache = Math.Max(tokensInCache, 0);
            return op;
        }
        finally
        {
            ArrayPool<ChunkKey>.Shared.Return(keys);
        }
    }

    /// <summary>The copy failed: the reserved chunks are dropped, the pins released.</summary>
    private void AbortStore(PendingStore op)
    {
        lock (_indexLock)
        {
            foreach (var (_, chunk) in op.Fresh) op.Reg.Tier.Abandon(chunk);
            foreach (var (_, chunk) in op.Held) op.Reg.Tier.Unpin(chunk);
        }
    }

    /// <summary>The copy is done: publishes the fresh chunks, queues them for the lower tiers, unpins, counts.</summary>
    private StoreResult CompleteStore(PendingStore op, long bytesCopied)
    {
        if (op.Trivial)
        {
            lock (_indexLock) _storeRequests++;
            return new StoreResult(0, 0, 0, 0);
        }
        var reg = op.Reg;
        var held = op.Held;
        long tokensCopied = op.Fresh.Sum(c => (long)c.Chunk.TokenCount);
        lock (_indexLock)
        {
            foreach (var (index, chunk) in op.Fresh)
            {
                var winner = reg.Tier.PublishPinned(chunk);
                held.Add((index, winner));
                if (winner != chunk) continue; // another store got there first and queued it
                foreach (var writer in _writers)
                {
                    reg.Tier.Pin(winner);
                    if (!writer.TryEnqueue(winner)) reg.Tier.Unpin(winner);
                }
            }
            // Unpin from the last chunk to the first, so the prefix ends up most recent.
            foreach (var (_, chunk) in held.OrderByDescending(h => h.Index))
            {
                reg.Tier.Unpin(chunk);
                if (!Config.LocalCpu) reg.Tier.RemoveIfUnpinned(chunk);
            }
            _storeRequests++;
            _storedTokens += tokensCopied;
            _storedBytes += bytesCopied;
            _storeSkippedChunks += op.SkippedForSpace;
        }
        return new StoreResult(op.TokensInCache, tokensCopied, bytesCopied, op.SkippedForSpace);
    }

    /// <summary>
    /// Retrieves the longest cached prefix, writing only the slots of tokens in
    /// [<paramref name="firstTokenToWrite"/>, retrieved) whose slot is not -1. Chunks found in a
    /// lower tier are read into the CPU tier first (promotion).
    /// </summary>
    public RetrieveResult Retrieve(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long firstTokenToWrite, ReadOnlySpan<byte> extraKey)
    {
        using var scope = EnterCall();
        return RetrieveNow(BeginRetrieve(tokens, slotMapping, firstTokenToWrite, extraKey), slotMapping);
    }

    /// <summary>Runs a planned retrieve's copy on the calling thread and completes it.</summary>
    private RetrieveResult RetrieveNow(PendingRetrieve op, ReadOnlySpan<long> slotMapping) =>
        CopyNow(op.Reg, TransferDirection.Scatter, op.Transfers, slotMapping, bytes => CompleteRetrieve(op, bytes), () => UnpinAll(op.Reg, op.Held));

    /// <summary>Copies a planned transfer on the calling thread; <paramref name="complete"/> gets the bytes moved, <paramref name="abort"/> runs if the copy throws.</summary>
    private static TResult CopyNow<TResult>(Registration reg, TransferDirection direction, ChunkTransfer[] transfers, ReadOnlySpan<long> slotMapping,
        Func<long, TResult> complete, Action abort)
    {
        long bytes = 0;
        try
        {
            if (transfers.Length > 0) bytes = reg.Transfer.Transfer(direction, transfers, slotMapping);
        }
        catch
        {
            abort();
            throw;
        }
        return complete(bytes);
    }

    /// <summary>
    /// Enqueues a planned transfer on the device stream and completes it (or aborts it) when the
    /// device is done; re-registration and destruction wait for it meanwhile.
    /// </summary>
    private Task<TResult> CopyOnDevice<TResult>(IDeviceKvTransfer device, TransferDirection direction, ChunkTransfer[] transfers,
        ReadOnlySpan<long> slotMapping, nint stream, Func<long, TResult> complete, Action abort)
    {
        Task<long> copy;
        BeginDeviceOperation();
        try
        {
            copy = device.TransferAsync(direction, transfers, slotMapping, stream);
        }
        catch
        {
            abort();
            EndDeviceOperation();
            throw;
        }
        return copy.ContinueWith(done =>
        {
            try
            {
                if (!done.IsCompletedSuccessfully)
                {
                    abort();
                    ExceptionDispatchInfo.Throw(done.Exception?.InnerException ?? new OperationCanceledException());
                }
                return complete(done.Result);
            }
            finally
            {
                EndDeviceOperation();
            }
        }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
    }

    /// <summary>
    /// <see cref="Retrieve"/> whose copy is only enqueued on the device stream <paramref name="stream"/>
    /// (0 = the default stream): work the caller enqueues on that stream afterwards sees the KV.
    /// Lookup, promotion from lower tiers and pinning are done before this returns; the chunks stay
    /// pinned until the device has finished, which the returned task reports. Host layers copy
    /// synchronously and return a completed task.
    /// </summary>
    public Task<RetrieveResult> RetrieveAsync(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long firstTokenToWrite, ReadOnlySpan<byte> extraKey,
        nint stream, out long retrievedTokens)
    {
        using var scope = EnterCall();
        var op = BeginRetrieve(tokens, slotMapping, firstTokenToWrite, extraKey);
        retrievedTokens = op.Retrieved;
        if (op.Transfers.Length == 0 || op.Reg.Transfer is not IDeviceKvTransfer device)
            return Task.FromResult(RetrieveNow(op, slotMapping));
        return CopyOnDevice(device, TransferDirection.Scatter, op.Transfers, slotMapping, stream, bytes => CompleteRetrieve(op, bytes), () => UnpinAll(op.Reg, op.Held));
    }

    /// <summary>A retrieve between pinning its prefix and its completion.</summary>
    private sealed class PendingRetrieve(Registration reg, List<CachedChunk> held, long retrieved, int numTokens, ChunkTransfer[] transfers)
    {
        public Registration Reg { get; } = reg;
        public List<CachedChunk> Held { get; } = held;
        public long Retrieved { get; } = retrieved;
        public int NumTokens { get; } = numTokens;
        public ChunkTransfer[] Transfers { get; } = transfers;
    }

    private PendingRetrieve BeginRetrieve(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long firstTokenToWrite, ReadOnlySpan<byte> extraKey)
    {
        var reg = RequireRegistration();
        CheckTokensAndSlots(tokens, slotMapping, reg, "retrieve");
        if (firstTokenToWrite < 0 || firstTokenToWrite > tokens.Length)
            throw LmcException.InvalidArgument($"retrieve: first_token_to_write must be in [0, num_tokens = {tokens.Length}], got {firstTokenToWrite}");

        int chunkCount = ChunkHasher.ChunkCount(tokens.Length, ChunkSize);
        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(chunkCount, 1));
        try
        {
            reg.Hasher.ComputeKeys(tokens, extraKey, ChunkSize, keys.AsSpan(0, chunkCount));
            var held = PinPrefix(reg, keys.AsSpan(0, chunkCount), tokens.Length);
            long retrieved = Math.Min((long)held.Count * ChunkSize, tokens.Length);

            ChunkTransfer[] transfers = [];
            int firstToCopy = (int)(firstTokenToWrite / ChunkSize);
            if (held.Count > firstToCopy)
            {
                transfers = new ChunkTransfer[held.Count - firstToCopy];
                for (int i = firstToCopy; i < held.Count; i++)
                    transfers[i - firstToCopy] = new ChunkTransfer(held[i].Data, i * ChunkSize, held[i].TokenCount, (int)firstTokenToWrite);
            }
            return new PendingRetrieve(reg, held, retrieved, tokens.Length, transfers);
        }
        finally
        {
            ArrayPool<ChunkKey>.Shared.Return(keys);
        }
    }

    /// <summary>The copy is done: counts the retrieve and releases the pins.</summary>
    private RetrieveResult CompleteRetrieve(PendingRetrieve op, long bytesWritten)
    {
        try
        {
            lock (_indexLock)
            {
                _retrieveRequests++;
                _retrieveRequestedTokens += op.NumTokens;
                _retrievedTokens += op.Retrieved;
                _retrievedBytes += bytesWritten;
            }
            return new RetrieveResult(op.Retrieved, bytesWritten);
        }
        finally
        {
            UnpinAll(op.Reg, op.Held);
        }
    }

    private void BeginDeviceOperation()
    {
        lock (_deviceOperationsLock) _deviceOperations++;
    }

    private void EndDeviceOperation()
    {
        lock (_deviceOperationsLock)
        {
            if (--_deviceOperations == 0) Monitor.PulseAll(_deviceOperationsLock);
        }
    }

    /// <summary>Blocks until no asynchronous device transfer is in flight.</summary>
    private void WaitForDeviceOperations()
    {
        lock (_deviceOperationsLock)
        {
            while (_deviceOperations > 0) Monitor.Wait(_deviceOperationsLock);
        }
    }

    /// <summary>
    /// Brings the longest cached prefix into the CPU tier (reading disk or remote chunks) without
    /// writing any KV layer; returns the number of leading tokens now in CPU memory. The retrieve
    /// that follows then finds them there.
    /// </summary>
    public long Prefetch(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey)
    {
        using var scope = EnterCall();
        var reg = RequireRegistration();
        int chunkCount = ChunkHasher.ChunkCount(tokens.Length, ChunkSize);
        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(chunkCount, 1));
        List<CachedChunk> held = [];
        try
        {
            reg.Hasher.ComputeKeys(tokens, extraKey, ChunkSize, keys.AsSpan(0, chunkCount));
            held = PinPrefix(reg, keys.AsSpan(0, chunkCount), tokens.Length);
            return Math.Min((long)held.Count * ChunkSize, tokens.Length);
        }
        finally
        {
            UnpinAll(reg, held);
            ArrayPool<ChunkKey>.Shared.Return(keys);
        }
    }

    /// <summary>
    /// Pins the longest prefix of <paramref name="keys"/> in the CPU tier, promoting chunks from the
    /// lower tiers as needed. Returns the pinned chunks in order; the caller unpins them.
    /// </summary>
    private List<CachedChunk> PinPrefix(Registration reg, ReadOnlySpan<ChunkKey> keys, int numTokens)
    {
        var held = new List<CachedChunk>(keys.Length);
        lock (_indexLock)
        {
            while (held.Count < keys.Length && reg.Tier.Find(keys[held.Count]) is { } chunk)
            {
                reg.Tier.Pin(chunk);
                held.Add(chunk);
            }
        }
        if (held.Count == keys.Length || _writers.Length == 0) return held;

        // Chunks pinned or reserved below; on an exception they are all released before it leaves.
        List<(CachedChunk Chunk, bool Reserved)> targets = [];
        int filled;
        try
        {
            // Which lower tier holds each further chunk: each tier continues where the previous stopped.
            int planned = held.Count;
            var sources = new List<IStorageTier>();
            foreach (var writer in _writers)
            {
                int n = writer.Tier.CountPrefix(keys[planned..]);
                for (int i = 0; i < n; i++) sources.Add(writer.Tier);
                planned += n;
                if (planned == keys.Length) break;
            }

            // Reserve CPU slabs for every planned chunk first, so that each tier can read its whole
            // run of chunks in one batch (pipelined for Redis, in parallel for disk).
            int start = held.Count;
            targets = new List<(CachedChunk Chunk, bool Reserved)>(sources.Count);
            lock (_indexLock)
            {
                for (int i = 0; i < sources.Count; i++)
                {
                    int index = start + i;
                    if (reg.Tier.Find(keys[index]) is { } promotedMeanwhile)
                    {
                        reg.Tier.Pin(promotedMeanwhile);
                        targets.Add((promotedMeanwhile, false));
                        continue;
                    }
                    int tokenCount = Math.Min(ChunkSize, numTokens - index * ChunkSize);
                    var reserved = reg.Tier.TryReserve(keys[index], tokenCount, tokenCount * reg.BytesPerToken);
                    if (reserved is null) break; // no room in the CPU tier: the prefix ends here
                    targets.Add((reserved, true));
                }
            }

            // Read run by run (consecutive chunks from one tier); the prefix ends at the first chunk
            // that could not be read (vanished, failed its checksum, timed out).
            filled = targets.Count;
            for (int runStart = 0; runStart < filled;)
            {
                var tier = sources[runStart];
                int runEnd = runStart;
                while (runEnd < filled && sources[runEnd] == tier) runEnd++;
                var reads = new List<TierRead>(runEnd - runStart);
                var readTargets = new List<int>(runEnd - runStart);
                for (int i = runStart; i < runEnd; i++)
                {
                    if (!targets[i].Reserved) continue;
                    var chunk = targets[i].Chunk;
                    reads.Add(new TierRead(chunk.Key, chunk.TokenCount, chunk.Data, chunk.PayloadBytes));
                    readTargets.Add(i);
                }
                int ok = reads.Count == 0 ? 0 : tier.ReadPrefix(reads);
                if (ok < reads.Count)
                {
                    filled = readTargets[ok];
                    break;
                }
                runStart = runEnd;
            }
        }
        catch
        {
            lock (_indexLock)
            {
                foreach (var (chunk, reserved) in targets)
                    if (reserved) reg.Tier.Abandon(chunk); else reg.Tier.Unpin(chunk);
                foreach (var chunk in held) reg.Tier.Unpin(chunk);
            }
            throw;
        }

        lock (_indexLock)
        {
            for (int i = 0; i < targets.Count; i++)
            {
                var (chunk, reserved) = targets[i];
                if (i < filled) held.Add(reserved ? reg.Tier.PublishPinned(chunk) : chunk);
                else if (reserved) reg.Tier.Abandon(chunk);
                else reg.Tier.Unpin(chunk);
            }
        }
        return held;
    }

    private void UnpinAll(Registration registration, List<CachedChunk> held)
    {
        if (held.Count == 0) return;
        lock (_indexLock)
        {
            for (int i = held.Count - 1; i >= 0; i--)
            {
                registration.Tier.Unpin(held[i]);
                if (!Config.LocalCpu) registration.Tier.RemoveIfUnpinned(held[i]);
            }
        }
    }

    /// <summary>Waits until the lower tiers have written everything stored so far; false on timeout.</summary>
    public bool Flush(TimeSpan timeout)
    {
        using var scope = EnterCall();
        bool forever = timeout == Timeout.InfiniteTimeSpan;
        var deadline = forever ? DateTime.MaxValue : DateTime.UtcNow + timeout;
        foreach (var writer in _writers)
        {
            var left = forever ? Timeout.InfiniteTimeSpan : deadline - DateTime.UtcNow;
            if (!forever && left < TimeSpan.Zero) return false;
            if (!writer.WaitIdle(left)) return false;
        }
        return true;
    }

    /// <summary>Counters of each lower tier, in lookup order; write-behind drops included.</summary>
    public IReadOnlyList<TierStats> GetTierStats()
    {
        using var scope = EnterCall();
        return _writers.Select(w =>
        {
            var counters = w.Tier.GetStats();
            counters.WriteQueueDrops += w.Drops;
            counters.Errors += w.Errors;
            return new TierStats(w.Tier.Name, counters);
        }).ToArray();
    }

    public EngineStats GetStats()
    {
        using var scope = EnterCall();
        lock (_indexLock)
        {
            var tier = _registration?.Tier;
            return new EngineStats(
                _lookupRequests, _lookupTokens, _lookupHitTokens,
                _storeRequests, _storedTokens, _storedBytes,
                _retrieveRequests, _retrieveRequestedTokens, _retrievedTokens, _retrievedBytes,
                _evictedBeforeCurrentTier + (tier?.EvictedChunks ?? 0), _storeSkippedChunks,
                tier?.Count ?? 0, tier?.UsedBytes ?? 0,
                tier?.CapacityBytes ?? Config.MaxLocalCpuBytes);
        }
    }

    /// <summary>
    /// Drops every chunk of the CPU tier (chunks being read are freed when their readers finish).
    /// The lower tiers keep their records: they may be shared with other engines.
    /// </summary>
    public void Clear()
    {
        using var scope = EnterCall();
        lock (_indexLock) _registration?.Tier.Clear();
    }

    private readonly object _lookupServerLock = new();
    private LookupServer? _lookupServer;

    /// <summary>Serves this engine's lookups to other processes on a Unix-domain socket (see <see cref="LookupServer"/>).</summary>
    public void StartLookupServer(string socketPath)
    {
        using var scope = EnterCall();
        lock (_lookupServerLock)
        {
            if (_lookupServer is not null)
                throw LmcException.InvalidArgument($"the engine already serves lookups on {_lookupServer.SocketPath}; stop that first");
            _lookupServer = new LookupServer(this, socketPath);
        }
    }

    /// <summary>Stops the lookup server, if any (idempotent).</summary>
    public void StopLookupServer()
    {
        LookupServer? server;
        lock (_lookupServerLock)
        {
            server = _lookupServer;
            _lookupServer = null;
        }
        server?.Dispose();
    }

    public void Dispose()
    {
        // Before taking the write lock: the server's in-flight lookups hold read locks.
        StopLookupServer();
        _lifecycle.EnterWriteLock();
        try
        {
            if (_disposed) return;
            _disposed = true;
            // Device transfers in flight still use the pool and queue chunks for the writers.
            WaitForDeviceOperations();
            // Writers first: they finish the queued writes (what other processes expect to find)
            // and release their pins through the CPU tier, which must still exist.
            foreach (var writer in _writers) writer.Dispose();
            foreach (var writer in _writers) writer.Tier.Dispose();
            var registration = _registration;
            lock (_indexLock)
            {
                _registration?.Tier.Dispose();
                _registration = null;
            }
            (registration?.Transfer as IDisposable)?.Dispose();
        }
        finally
        {
            _lifecycle.ExitWriteLock();
        }
    }

    private static void CheckTokensAndSlots(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, Registration reg, string operation)
    {
        if (slotMapping.Length != tokens.Length)
            throw LmcException.InvalidArgument($"{operation}: slot_mapping has {slotMapping.Length} entries for {tokens.Length} tokens");
        long numSlots = reg.NumSlots;
        for (int i = 0; i < slotMapping.Length; i++)
        {
            long slot = slotMapping[i];
            if (slot >= numSlots || slot < -1)
                throw LmcException.InvalidArgument(
                    $"{operation}: slot_mapping[{i}] = {slot} is outside the cache (valid: -1 or 0..{numSlots - 1})");
        }
    }

    private Registration RequireRegistration() =>
        _registration ?? throw LmcException.InvalidArgument("no KV layers registered: call register_layers first");

    private void ThrowIfDisposed()
    {
        if (_disposed) throw new LmcException(LmcErrorKind.InvalidHandle, "the engine has been destroyed");
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
}
