using LMCacheNative.Core.Config;
using LMCacheNative.Core.Keys;

namespace LMCacheNative.Core.Storage;

/// <summary>Per-tier counters (cumulative since the tier was created).</summary>
public sealed class StorageTierStats
{
    public long Hits;            // chunks read successfully
    public long Misses;          // chunks asked for and not found (or unreadable)
    public long BytesRead;       // payload bytes read
    public long BytesWritten;    // payload bytes written
    public long Writes;          // records written
    public long Evictions;       // records removed to make room
    public long WriteQueueDrops; // writes dropped because the write-behind queue was full
    public long CorruptRecords;  // records refused for a bad header, length or checksum
    public long Errors;          // I/O or network failures (each turned into a miss or a skipped write)
    public long Reconnects;      // connections restored (remote tiers)
    public long UsedBytes;       // bytes held now (records, headers included)
    public long CapacityBytes;   // bound on UsedBytes (0 = unbounded or not applicable)
    // Background health pings of a remote tier (LMCache's remote_ping_* metrics); 0 for local tiers.
    public long PingSuccesses;      // ping rounds every pinged node answered
    public long PingErrors;         // ping rounds that failed (no connection, an error answer or a timeout)
    public double LastPingLatencyMs; // round-trip time of the newest successful round (slowest node), milliseconds
    public int LastPingErrorCode;   // newest round: 0 ok, -1 timed out, -2 any other failure (LMCache's codes)
    /// <summary>Per-node counters of a remote tier (one per server it talked to); empty for local tiers. The tier hands out a fresh list each time.</summary>
    public IReadOnlyList<NodeStats> Nodes = [];

    public StorageTierStats Snapshot() => (StorageTierStats)MemberwiseClone();
}

/// <summary>
/// Cumulative counters of one remote node (a Redis server: standalone, cluster master or replica,
/// Sentinel-found primary). <see cref="Redirects"/> counts slot moves this node answered with
/// (MOVED); <see cref="LastError"/> is the newest failure message (connection, authentication,
/// timeout), or null.
/// </summary>
public sealed record NodeStats(string Endpoint, string Role, bool Connected, long BytesRead, long BytesWritten, long Errors,
    long Reconnects, long Redirects, string? LastError);

/// <summary>One record to read into a payload buffer of <see cref="PayloadBytes"/> bytes at <see cref="Payload"/> (a pinned CPU slab).</summary>
public readonly record struct TierRead(ChunkKey Key, int TokenCount, nint Payload, long PayloadBytes);

/// <summary>One record to write from a payload of <see cref="PayloadBytes"/> bytes at <see cref="Payload"/> (a pinned CPU slab).</summary>
public readonly record struct TierWrite(ChunkKey Key, int TokenCount, nint Payload, long PayloadBytes);

/// <summary>What a tier stores records for: the engine's key namespace and chunk geometry.</summary>
public sealed record TierBinding(KeyNamespace Namespace, ChunkHashAlgorithm Algorithm, int ChunkSize, long BytesPerToken)
{
    public byte[] Fingerprint { get; } = ChunkRecord.NamespaceFingerprint(Namespace, Algorithm);
}

/// <summary>
/// A storage tier below the CPU pool (local disk, a remote store). It holds chunk records
/// (<see cref="ChunkRecord"/>) and is asked for whole prefixes, like LMCache's backends'
/// batched_contains. Implementations are thread-safe: lookups and reads come from request threads
/// while the engine's write-behind worker writes.
///
/// A tier never throws for I/O or network trouble: a failed read or lookup is a miss, a failed
/// write is skipped, and both are counted in <see cref="GetStats"/>. It must answer within a
/// bounded time (blocking_timeout_secs for remote tiers).
/// </summary>
public interface IStorageTier : IDisposable
{
    /// <summary>LMCache's backend name ("LocalDiskBackend", "RemoteBackend"), for logs and stats.</summary>
    string Name { get; }

    /// <summary>
    /// Called when layers are registered (again): from then on records are read and written for this
    /// binding. A disk tier scans its directory here (warm restart).
    /// </summary>
    void Bind(TierBinding binding);

    /// <summary>Number of leading <paramref name="keys"/> whose records the tier holds; stops at the first miss.</summary>
    int CountPrefix(ReadOnlySpan<ChunkKey> keys);

    /// <summary>Reads one record's payload into <paramref name="payload"/> (exactly its length); false on a miss or an unusable record.</summary>
    bool TryRead(in ChunkKey key, int tokenCount, Span<byte> payload);

    /// <summary>
    /// Reads several records in one go into their payload buffers; returns how many leading reads
    /// succeeded (the rest may or may not have been filled and must be ignored). The default reads
    /// one at a time; tiers override it to pipeline (remote) or parallelise (disk).
    /// </summary>
    unsafe int ReadPrefix(IReadOnlyList<TierRead> reads)
    {
        for (int i = 0; i < reads.Count; i++)
            if (!TryRead(reads[i].Key, reads[i].TokenCount, new Span<byte>((void*)reads[i].Payload, checked((int)reads[i].PayloadBytes))))
                return i;
        return reads.Count;
    }

    /// <summary>Whether the tier already holds the key (cheap enough to ask before a write).</summary>
    bool Contains(in ChunkKey key);

    /// <summary>Writes one record synchronously (the engine calls it from its write-behind worker); false if skipped or failed.</summary>
    bool Write(in ChunkKey key, int tokenCount, ReadOnlySpan<byte> payload);

    /// <summary>Most queued writes the write-behind worker hands to <see cref="WriteBatch"/> at once.</summary>
    int WriteBatchSize => 1;

    /// <summary>
    /// Writes the records the tier does not hold yet, in one go (the remote tier pipelines them over
    /// its connections); returns how many were written. The default checks and writes one at a time.
    /// </summary>
    /// <param name="held">when not empty (length = writes.Count): set to whether the tier holds each
    /// record after the call, written now or found there (KV events announce exactly those)</param>
    unsafe int WriteBatch(IReadOnlyList<TierWrite> writes, Span<bool> held = default)
    {
        int written = 0;
        for (int i = 0; i < writes.Count; i++)
        {
            var w = writes[i];
            bool present = Contains(w.Key);
            bool wrote = !present && Write(w.Key, w.TokenCount, new ReadOnlySpan<byte>((void*)w.Payload, checked((int)w.PayloadBytes)));
            if (wrote) written++;
            if (!held.IsEmpty) held[i] = present || wrote;
        }
        return written;
    }

    StorageTierStats GetStats();
}

