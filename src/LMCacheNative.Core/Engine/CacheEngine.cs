using System.Buffers;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Layout;
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
    private Registration? _registration;
    private bool _disposed;

    private long _lookupRequests, _lookupTokens, _lookupHitTokens;
    private long _storeRequests, _storedTokens, _storedBytes, _storeSkippedChunks;
    private long _retrieveRequests, _retrieveRequestedTokens, _retrievedTokens, _retrievedBytes;
    private long _evictedBeforeCurrentTier;

    private sealed class Registration(KvLayerLayout[] layers, ChunkHasher hasher, LocalCpuTier tier, IKvTransfer transfer, long bytesPerToken)
    {
        public KvLayerLayout[] Layers { get; } = layers;
        public ChunkHasher Hasher { get; } = hasher;
        public LocalCpuTier Tier { get; } = tier;
        public IKvTransfer Transfer { get; } = transfer;
        public long BytesPerToken { get; } = bytesPerToken;
        public long NumSlots => Layers[0].NumSlots;
    }

    public CacheEngine(EngineConfig config, string modelName, int worldSize, int workerId, IHostMemoryAllocator? allocator = null)
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
    }

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
        if (first.Device != DeviceKind.Host)
            throw new LmcException(LmcErrorKind.Unsupported,
                "layer 0: device_kind LMC_DEVICE_CUDA needs the CUDA path, which this build does not have yet; register host memory");

        var keyNamespace = new KeyNamespace(ModelName, first.ElemSize, first.NumKvHeads, first.HeadSize, layers.Count, first.KvCount, WorldSize, WorkerId);
        var transfer = new HostKvTransfer(layers);
        long bytesPerToken = transfer.BytesPerToken;

        _lifecycle.EnterWriteLock();
        try
        {
            ThrowIfDisposed();
            var previous = _registration;
            LocalCpuTier tier;
            if (previous is not null && previous.Hasher.Namespace == keyNamespace && previous.Hasher.Algorithm == Config.HashAlgorithm)
            {
                tier = previous.Tier;
            }
            else
            {
                long slabBytes = checked(bytesPerToken * ChunkSize);
                tier = new LocalCpuTier(new SlabPool(slabBytes, Config.MaxLocalCpuBytes, _allocator));
                if (previous is not null)
                {
                    _evictedBeforeCurrentTier += previous.Tier.EvictedChunks;
                    previous.Tier.Dispose();
                }
            }
            _registration = new Registration(layers.ToArray(), new ChunkHasher(Config.HashAlgorithm, keyNamespace), tier, transfer, bytesPerToken);
        }
        finally
        {
            _lifecycle.ExitWriteLock();
        }
    }

    /// <summary>Number of leading tokens whose KV is cached (whole chunks, or all tokens when the trailing partial chunk is cached).</summary>
    public long Lookup(ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey)
    {
        using var scope = EnterCall();
        var reg = RequireRegistration();
        int chunkCount = ChunkHasher.ChunkCount(tokens.Length, ChunkSize);
        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(chunkCount, 1));
        try
        {
            reg.Hasher.ComputeKeys(tokens, extraKey, ChunkSize, keys.AsSpan(0, chunkCount));
            int hitChunks = 0;
            lock (_indexLock)
            {
                while (hitChunks < chunkCount && reg.Tier.Contains(keys[hitChunks])) hitChunks++;
                // Most recent last for the prefix: touching in reverse keeps the first chunks, which
                // every extension of the prompt needs, away from eviction the longest.
                for (int i = hitChunks - 1; i >= 0; i--) reg.Tier.Touch(reg.Tier.Find(keys[i])!);
                long hit = Math.Min((long)hitChunks * ChunkSize, tokens.Length);
                _lookupRequests++;
                _lookupTokens += tokens.Length;
                _lookupHitTokens += hit;
                return hit;
            }
        }
        finally
        {
            ArrayPool<ChunkKey>.Shared.Return(keys);
        }
    }

    /// <summary>
    /// Stores the KV of tokens from <paramref name="skipLeadingTokens"/> (rounded down to a chunk
    /// boundary) to the end: full chunks, plus the trailing partial chunk with save_unfull_chunk.
    /// Stops before a chunk with a -1 slot, and when the pool has no room left.
    /// </summary>
    public StoreResult Store(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long skipLeadingTokens, ReadOnlySpan<byte> extraKey)
    {
        using var scope = EnterCall();
        var reg = RequireRegistration();
        CheckTokensAndSlots(tokens, slotMapping, reg, "store");
        if (skipLeadingTokens < 0 || skipLeadingTokens > tokens.Length)
            throw LmcException.InvalidArgument($"store: skip_leading_tokens must be in [0, num_tokens = {tokens.Length}], got {skipLeadingTokens}");

        int fullChunks = tokens.Length / ChunkSize;
        bool hasPartial = Config.SaveUnfullChunk && tokens.Length % ChunkSize != 0;
        int chunkCount = fullChunks + (hasPartial ? 1 : 0);
        int firstChunk = (int)(skipLeadingTokens / ChunkSize);
        long alignedSkip = (long)firstChunk * ChunkSize;
        if (!Config.LocalCpu || firstChunk >= chunkCount)
        {
            lock (_indexLock) _storeRequests++;
            return new StoreResult(0, 0, 0, 0);
        }

        // A chunk with a token that has no slot has no KV to store, and nothing after it is useful.
        int storableChunks = chunkCount;
        for (int c = firstChunk; c < chunkCount; c++)
        {
            int start = c * ChunkSize, end = Math.Min(start + ChunkSize, tokens.Length);
            if (slotMapping[start..end].Contains(-1L)) { storableChunks = c; break; }
        }

        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(storableChunks, 1));
        var held = new List<CachedChunk>(Math.Max(storableChunks - firstChunk, 0));
        var fresh = new List<CachedChunk>();
        try
        {
            reg.Hasher.ComputeKeys(tokens, extraKey, ChunkSize, keys.AsSpan(0, storableChunks));
            int reachedChunk = firstChunk;
            int skippedForSpace = 0;
            lock (_indexLock)
            {
                // Pin everything this store touches, so that making room for a later chunk can never
                // evict an earlier chunk of the same prefix.
                for (int c = firstChunk; c < storableChunks; c++)
                {
                    if (reg.Tier.Find(keys[c]) is { } existing)
                    {
                        reg.Tier.Pin(existing);
                        held.Add(existing);
                    }
                    else
                    {
                        int count = Math.Min(ChunkSize, tokens.Length - c * ChunkSize);
                        var reserved = reg.Tier.TryReserve(keys[c], count, count * reg.BytesPerToken);
                        if (reserved is null)
                        {
                            skippedForSpace = storableChunks - c;
                            break;
                        }
                        fresh.Add(reserved);
                    }
                    reachedChunk = c + 1;
                }
            }

            long bytesCopied = 0;
            try
            {
                if (fresh.Count > 0)
                {
                    var transfers = new ChunkTransfer[fresh.Count];
                    for (int i = 0; i < fresh.Count; i++)
                    {
                        int chunkIndex = IndexOf(keys, firstChunk, reachedChunk, fresh[i].Key);
                        int start = chunkIndex * ChunkSize;
                        transfers[i] = new ChunkTransfer(fresh[i].Data, start, fresh[i].TokenCount, start);
                    }
                    bytesCopied = reg.Transfer.Transfer(TransferDirection.Gather, transfers, slotMapping);
                }
            }
            catch
            {
                lock (_indexLock)
                {
                    foreach (var chunk in fresh) reg.Tier.Abandon(chunk);
                    foreach (var chunk in held) reg.Tier.Unpin(chunk);
                }
                throw;
            }

            long tokensCopied = fresh.Sum(c => (long)c.TokenCount);
            lock (_indexLock)
            {
                // Publish and unpin from the last chunk to the first, so the prefix ends up most recent.
                var all = held.Concat(fresh).OrderByDescending(c => IndexOf(keys, firstChunk, reachedChunk, c.Key)).ToList();
                foreach (var chunk in all)
                {
                    if (chunk.Published) reg.Tier.Unpin(chunk);
                    else reg.Tier.Publish(chunk);
                }
                _storeRequests++;
                _storedTokens += tokensCopied;
                _storedBytes += bytesCopied;
                _storeSkippedChunks += skippedForSpace;
            }
            long tokensInCache = Math.Min((long)reachedChunk * ChunkSize, tokens.Length) - alignedSkip;
            return new StoreResult(Math.Max(tokensInCache, 0), tokensCopied, bytesCopied, skippedForSpace);
        }
        finally
        {
            ArrayPool<ChunkKey>.Shared.Return(keys);
        }
    }

    /// <summary>
    /// Retrieves the longest cached prefix, writing only the slots of tokens in
    /// [<paramref name="firstTokenToWrite"/>, retrieved) whose slot is not -1.
    /// </summary>
    public RetrieveResult Retrieve(ReadOnlySpan<int> tokens, ReadOnlySpan<long> slotMapping, long firstTokenToWrite, ReadOnlySpan<byte> extraKey)
    {
        using var scope = EnterCall();
        var reg = RequireRegistration();
        CheckTokensAndSlots(tokens, slotMapping, reg, "retrieve");
        if (firstTokenToWrite < 0 || firstTokenToWrite > tokens.Length)
            throw LmcException.InvalidArgument($"retrieve: first_token_to_write must be in [0, num_tokens = {tokens.Length}], got {firstTokenToWrite}");

        int chunkCount = ChunkHasher.ChunkCount(tokens.Length, ChunkSize);
        ChunkKey[] keys = ArrayPool<ChunkKey>.Shared.Rent(Math.Max(chunkCount, 1));
        var pinned = new List<CachedChunk>();
        try
        {
            reg.Hasher.ComputeKeys(tokens, extraKey, ChunkSize, keys.AsSpan(0, chunkCount));
            int hitChunks = 0;
            lock (_indexLock)
            {
                for (; hitChunks < chunkCount; hitChunks++)
                {
                    if (reg.Tier.Find(keys[hitChunks]) is not { } chunk) break;
                    long chunkEnd = Math.Min((long)(hitChunks + 1) * ChunkSize, tokens.Length);
                    if (chunkEnd > firstTokenToWrite)
                    {
                        reg.Tier.Pin(chunk);
                        pinned.Add(chunk);
                    }
                    else
                    {
                        reg.Tier.Touch(chunk);
                    }
                }
            }
            long retrieved = Math.Min((long)hitChunks * ChunkSize, tokens.Length);

            long bytesWritten = 0;
            try
            {
                if (pinned.Count > 0)
                {
                    var transfers = new ChunkTransfer[pinned.Count];
                    int firstPinnedChunk = hitChunks - pinned.Count;
                    for (int i = 0; i < pinned.Count; i++)
                    {
                        int start = (firstPinnedChunk + i) * ChunkSize;
                        transfers[i] = new ChunkTransfer(pinned[i].Data, start, pinned[i].TokenCount, (int)firstTokenToWrite);
                    }
                    bytesWritten = reg.Transfer.Transfer(TransferDirection.Scatter, transfers, slotMapping);
                }
            }
            finally
            {
                lock (_indexLock)
                {
                    for (int i = pinned.Count - 1; i >= 0; i--) reg.Tier.Unpin(pinned[i]);
                }
            }

            lock (_indexLock)
            {
                _retrieveRequests++;
                _retrieveRequestedTokens += tokens.Length;
                _retrievedTokens += retrieved;
                _retrievedBytes += bytesWritten;
            }
            return new RetrieveResult(retrieved, bytesWritten);
        }
        finally
        {
            ArrayPool<ChunkKey>.Shared.Return(keys);
        }
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
                tier?.CapacityBytes ?? (long)Math.Floor((double)Config.MaxLocalCpuBytes));
        }
    }

    /// <summary>Drops every cached chunk; chunks being read are freed when their readers finish.</summary>
    public void Clear()
    {
        using var scope = EnterCall();
        lock (_indexLock) _registration?.Tier.Clear();
    }

    public void Dispose()
    {
        _lifecycle.EnterWriteLock();
        try
        {
            if (_disposed) return;
            _disposed = true;
            _registration?.Tier.Dispose();
            _registration = null;
        }
        finally
        {
            _lifecycle.ExitWriteLock();
        }
    }

    private static int IndexOf(ChunkKey[] keys, int from, int to, ChunkKey key)
    {
        for (int i = from; i < to; i++)
            if (keys[i] == key) return i;
        throw new InvalidOperationException("chunk key not among the request's keys");
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
