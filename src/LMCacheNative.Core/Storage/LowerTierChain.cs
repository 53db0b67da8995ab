using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Metrics;

namespace LMCacheNative.Core.Storage;

/// <summary>Creates the remote tier for a <c>remote_url</c>; null when the URL's scheme is not one it serves.</summary>
public delegate IStorageTier? RemoteTierFactory(string remoteUrl, EngineConfig config);

/// <summary>One lower tier's counters, for the C ABI's per-tier statistics.</summary>
public readonly record struct TierStats(string Name, StorageTierStats Counters);

/// <summary>
/// One lower tier's timings for metrics: milliseconds per batched read (one <see cref="IStorageTier.ReadPrefix"/>
/// call while promoting) and per record write, and the writes queued or in progress now.
/// </summary>
public readonly record struct TierTimings(string Name, HistogramSnapshot ReadMilliseconds, HistogramSnapshot WriteMilliseconds, int PendingWrites);

/// <summary>
/// The tiers below the CPU pool, in LMCache's lookup order (local disk, then remote), each with its
/// write-behind worker. It owns everything that involves more than the CPU tier: counting a
/// prefix that continues from one tier into the next, promoting chunks into the CPU tier, writing
/// new chunks down, flushing, and the per-tier statistics.
/// </summary>
public sealed class LowerTierChain : IDisposable
{
    private readonly TierWriter[] _writers;
    private readonly DiskEvents? _diskEvents;
    private readonly Histogram[] _readMilliseconds;

    private LowerTierChain(TierWriter[] writers, DiskEvents? diskEvents)
    {
        _writers = writers;
        _diskEvents = diskEvents;
        _readMilliseconds = writers.Select(_ => new Histogram(LMCacheBuckets.RemoteMilliseconds)).ToArray();
    }

    /// <summary>
    /// KV events of the disk tier. A disk record is known by its storage key only, so the chain
    /// remembers the event hash of each record it announced (BlockStored DISK) until the record
    /// leaves (eviction, a corrupt record dropped): a record it never announced (found on disk at
    /// start-up) leaves silently, so a router never hears of a removal without the store before it.
    /// About 80 bytes per announced record.
    /// </summary>
    private sealed class DiskEvents(KvEventQueue events)
    {
        private readonly System.Collections.Concurrent.ConcurrentDictionary<ChunkKey, (ChunkKey Hash, int Tokens)> _announced = new();

        public void Stored(CachedChunk chunk)
        {
            if (chunk.Lineage is not { } lineage) return;
            _announced[chunk.Key] = (lineage.EventHash, chunk.TokenCount);
            events.TryEnqueue(KvEvent.Stored(KvEventMedium.Disk, lineage));
        }

        // Called by the disk tier under its lock, so removals keep their order.
        public void Removed(ChunkKey key)
        {
            if (_announced.TryRemove(key, out var announced))
                events.TryEnqueue(KvEvent.Removed(KvEventMedium.Disk, announced.Hash, announced.Tokens));
        }

        public void Forget() => _announced.Clear();
    }

    /// <summary>The tiers the configuration asks for (none without <c>local_disk</c> or <c>remote_url</c>).</summary>
    /// <param name="events">the engine's KV event queue; null when events are off</param>
    public static LowerTierChain Create(EngineConfig config, RemoteTierFactory? remoteTierFactory, KvEventQueue? events = null)
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
        // A written chunk's pin goes back to the CPU tier that holds it.
        static void Release(CachedChunk chunk) => chunk.Owner.Release(chunk);
        DiskEvents? diskEvents = events is null ? null : new DiskEvents(events);
        var writers = tiers.Select(tier =>
        {
            if (events is null) return new TierWriter(tier, Release);
            if (tier is LocalDiskTier disk)
            {
                disk.RecordRemoved = diskEvents!.Removed;
                return new TierWriter(tier, Release, diskEvents.Stored);
            }
            // A remote store's expiry (TTL) and other clients' deletions cannot be seen without
            // polling it: remote chunks get BlockStored events only.
            return new TierWriter(tier, Release, chunk =>
            {
                if (chunk.Lineage is { } lineage) events.TryEnqueue(KvEvent.Stored(KvEventMedium.Remote, lineage));
            });
        }).ToArray();
        return new LowerTierChain(writers, diskEvents);
    }

    public int Count => _writers.Length;
    public IReadOnlyList<string> Names => _writers.Select(w => w.Tier.Name).ToArray();

    /// <summary>
    /// Points every tier at a registration's namespace (a disk tier rescans its directory). At most
    /// <paramref name="maxQueuedChunks"/> chunks wait for each tier: queued chunks stay pinned in the
    /// CPU pool, so the queue must leave room for stores.
    /// </summary>
    public void Bind(TierBinding binding, int maxQueuedChunks)
    {
        // The disk tier re-indexes its directory for the new binding: earlier announcements are moot.
        _diskEvents?.Forget();
        foreach (var writer in _writers)
        {
            writer.Tier.Bind(binding);
            writer.MaxQueuedChunks = maxQueuedChunks;
        }
    }

    /// <summary>
    /// How far the prefix continues below the CPU tier: keys[start..] are asked of the first tier,
    /// what it lacks of the next, and so on. Adds each tier's chunks to <paramref name="byTier"/>
    /// ([1 + tier]); returns the chunks found in all.
    /// </summary>
    public int CountPrefix(ReadOnlySpan<ChunkKey> keys, ref TierCounts byTier)
    {
        int[] runs = PrefixRuns(keys);
        for (int t = 0; t < runs.Length; t++) byTier[1 + t] += runs[t];
        return runs.Sum();
    }

    /// <summary>How many of <paramref name="keys"/> each tier continues the prefix with, in lookup order.</summary>
    private int[] PrefixRuns(ReadOnlySpan<ChunkKey> keys)
    {
        var runs = new int[_writers.Length];
        for (int t = 0, found = 0; t < _writers.Length && found < keys.Length; t++)
        {
            runs[t] = _writers[t].Tier.CountPrefix(keys[found..]);
            found += runs[t];
        }
        return runs;
    }

    /// <summary>
    /// Reads the chunks of <paramref name="keys"/> from <paramref name="start"/> on from the lower tiers
    /// into <paramref name="cpu"/> and appends them, pinned, to <paramref name="held"/>; stops at the
    /// first chunk no tier has, that could not be read (vanished, failed its checksum, timed out), or
    /// for which the CPU tier has no room. Counts each chunk's source in <paramref name="byTier"/>.
    /// </summary>
    /// <param name="tokenCount">tokens of chunk i (the last may be partial)</param>
    /// <param name="lineage">event hash, parent and tokens of chunk i, for KV events; null when events are off</param>
    public void Promote(LocalCpuTier cpu, ReadOnlySpan<ChunkKey> keys, int start, Func<int, int> tokenCount, long bytesPerToken,
        List<CachedChunk> held, ref TierCounts byTier, Func<int, ChunkLineage>? lineage = null)
    {
        if (start >= keys.Length || _writers.Length == 0) return;

        // Which tier holds each further chunk: each continues where the previous one stopped.
        int[] runs = PrefixRuns(keys[start..]);
        var sources = new List<int>(runs.Sum());
        for (int t = 0; t < runs.Length; t++) sources.AddRange(Enumerable.Repeat(t, runs[t]));
        if (sources.Count == 0) return;

        // Reserve CPU slabs for every planned chunk first, so that each tier can read its whole run
        // in one batch (pipelined for Redis, in parallel for disk). A chunk another request promoted
        // meanwhile is pinned instead of read.
        var targets = new List<(CachedChunk Chunk, bool Reserved)>(sources.Count);
        int filled = 0;
        try
        {
            for (int i = 0; i < sources.Count; i++)
            {
                int index = start + i;
                var cached = cpu.PinPrefix(keys.Slice(index, 1));
                if (cached.Count == 1)
                {
                    targets.Add((cached[0], false));
                    continue;
                }
                int tokens = tokenCount(index);
                if (cpu.TryReserve(keys[index], tokens, tokens * bytesPerToken) is not { } reserved) break; // no room: the prefix ends here
                reserved.Lineage = lineage?.Invoke(index);
                targets.Add((reserved, true));
            }

            // Read run by run (consecutive chunks from one tier).
            filled = targets.Count;
            for (int runStart = 0; runStart < filled;)
            {
                int tier = sources[runStart];
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
                int ok = 0;
                if (reads.Count > 0)
                {
                    long readStarted = System.Diagnostics.Stopwatch.GetTimestamp();
                    ok = _writers[tier].Tier.ReadPrefix(reads);
                    _readMilliseconds[tier].Observe(System.Diagnostics.Stopwatch.GetElapsedTime(readStarted).TotalMilliseconds);
                }
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
            cpu.AbandonAndRelease(targets.Where(t => t.Reserved).Select(t => t.Chunk), targets.Where(t => !t.Reserved).Select(t => t.Chunk));
            throw;
        }

        var published = cpu.PublishAll(targets.Take(filled).Where(t => t.Reserved).Select(t => t.Chunk));
        int next = 0;
        for (int i = 0; i < filled; i++)
        {
            held.Add(targets[i].Reserved ? published[next++].Chunk : targets[i].Chunk);
            byTier[1 + sources[i]]++;
        }
        cpu.AbandonAndRelease(targets.Skip(filled).Where(t => t.Reserved).Select(t => t.Chunk), targets.Skip(filled).Where(t => !t.Reserved).Select(t => t.Chunk));
    }

    /// <summary>
    /// Queues a chunk the CPU tier just gained for every lower tier. Each queued write holds a pin of
    /// its own; a full queue drops the write (counted) instead of waiting.
    /// </summary>
    public void WriteBehind(CachedChunk published)
    {
        foreach (var writer in _writers)
        {
            published.Owner.Pin(published);
            if (!writer.TryEnqueue(published)) published.Owner.Release(published);
        }
    }

    /// <summary>Waits until every queued write is done, for at most <paramref name="timeout"/> in all; false on timeout.</summary>
    public bool Flush(TimeSpan timeout)
    {
        bool forever = timeout == Timeout.InfiniteTimeSpan;
        long deadline = forever ? long.MaxValue : Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        foreach (var writer in _writers)
        {
            if (forever)
            {
                writer.WaitIdle(Timeout.InfiniteTimeSpan);
                continue;
            }
            long left = deadline - Environment.TickCount64;
            if (left < 0 || !writer.WaitIdle(TimeSpan.FromMilliseconds(left))) return false;
        }
        return true;
    }

    /// <summary>Counters of each tier, in lookup order; write-behind drops and escaped errors included.</summary>
    public IReadOnlyList<TierStats> Stats() => _writers.Select(w =>
    {
        var counters = w.Tier.GetStats();
        counters.WriteQueueDrops += w.Drops;
        counters.Errors += w.Errors;
        return new TierStats(w.Tier.Name, counters);
    }).ToArray();

    /// <summary>Read and write timings of each tier, in lookup order.</summary>
    public IReadOnlyList<TierTimings> Timings() => _writers.Select((w, t) =>
        new TierTimings(w.Tier.Name, _readMilliseconds[t].Snapshot(), w.WriteMilliseconds.Snapshot(), w.Pending)).ToArray();

    /// <summary>Finishes the queued writes (what other processes expect to find), then closes the tiers.</summary>
    public void Dispose()
    {
        foreach (var writer in _writers) writer.Dispose();
        foreach (var writer in _writers) writer.Tier.Dispose();
    }
}
