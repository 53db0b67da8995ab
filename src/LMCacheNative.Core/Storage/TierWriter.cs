using System.Collections.Concurrent;
using System.Diagnostics;
using LMCacheNative.Core.Metrics;

namespace LMCacheNative.Core.Storage;

/// <summary>
/// Write-behind for one lower tier: stores return as soon as the CPU tier has the chunk, and one
/// background thread per tier writes it down. The queue is bounded; when it is full the write is
/// dropped and counted, so a slow disk or network never grows memory or blocks the caller.
///
/// Each queued chunk is pinned in the CPU tier (its slab cannot be evicted or reused until the
/// write is done); <see cref="_release"/> unpins it under the engine's lock.
/// </summary>
internal sealed class TierWriter : IDisposable
{
    private readonly IStorageTier _tier;
    private readonly BlockingCollection<CachedChunk> _queue;
    private readonly Action<CachedChunk> _release;
    // Called on the writer thread once the tier holds a chunk (written now, or found there); null when KV events are off.
    private readonly Action<CachedChunk>? _stored;
    private readonly Thread _thread;
    private int _inFlight;
    private long _drops;
    private long _errors;
    private readonly object _idle = new();

    private int _queued;

    /// <param name="stored">told of each chunk the tier holds after its write (KV events); null for none</param>
    public TierWriter(IStorageTier tier, Action<CachedChunk> release, Action<CachedChunk>? stored = null)
    {
        _tier = tier;
        _release = release;
        _stored = stored;
        _queue = new BlockingCollection<CachedChunk>(new ConcurrentQueue<CachedChunk>());
        _thread = new Thread(Run) { IsBackground = true, Name = "lmcache-native write-behind: " + tier.Name };
        _thread.Start();
    }

    public IStorageTier Tier => _tier;

    /// <summary>
    /// Most chunks that may wait for this tier. Queued chunks stay pinned in the CPU pool, so the
    /// engine sets this to a fraction of the pool when layers are registered.
    /// </summary>
    public int MaxQueuedChunks { get; set; } = 16;
    /// <summary>Writes dropped because the queue was full.</summary>
    public long Drops => Interlocked.Read(ref _drops);
    /// <summary>Exceptions that escaped the tier's own error handling.</summary>
    public long Errors => Interlocked.Read(ref _errors);
    /// <summary>Writes queued or being written now (LMCache's remote_put_task_num for the remote tier).</summary>
    public int Pending => Math.Max(Volatile.Read(ref _inFlight), 0);
    /// <summary>Milliseconds per record write, skipped writes of records the tier already has excluded.</summary>
    public Histogram WriteMilliseconds { get; } = new(LMCacheBuckets.RemoteMilliseconds);

    /// <summary>Queues a pinned chunk; false (and the caller must unpin) when the queue is full or closed.</summary>
    public bool TryEnqueue(CachedChunk pinnedChunk)
    {
        Interlocked.Increment(ref _inFlight);
        bool added;
        try
        {
            added = false;
            if (Interlocked.Increment(ref _queued) <= MaxQueuedChunks && !_queue.IsAddingCompleted)
                added = _queue.TryAdd(pinnedChunk);
            if (!added) Interlocked.Decrement(ref _queued);
        }
        catch (InvalidOperationException)
        {
            added = false; // completed concurrently by Dispose
        }
        if (!added)
        {
            Done();
            Interlocked.Increment(ref _drops);
        }
        return added;
    }

    /// <summary>Waits until every queued write is done or the timeout passes; true when idle.</summary>
    /// <param name="timeout">how long to wait; <see cref="Timeout.InfiniteTimeSpan"/> waits for as long as it takes</param>
    public bool WaitIdle(TimeSpan timeout)
    {
        bool forever = timeout == Timeout.InfiniteTimeSpan;
        var deadline = forever ? DateTime.MaxValue : DateTime.UtcNow + timeout;
        lock (_idle)
        {
            while (Volatile.Read(ref _inFlight) > 0)
            {
                if (forever)
                {
                    Monitor.Wait(_idle);
                    continue;
                }
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero) return false;
                Monitor.Wait(_idle, left);
            }
            return true;
        }
    }

    /// <summary>
    /// Takes the oldest queued chunk and, up to the tier's <see cref="IStorageTier.WriteBatchSize"/>,
    /// the ones queued behind it, and writes them in one batch (a request's chunks arrive together).
    /// </summary>
    private void Run()
    {
        var batch = new List<CachedChunk>();
        var writes = new List<TierWrite>();
        int most = Math.Max(1, _tier.WriteBatchSize);
        var heldAfterWrite = new bool[most]; // per batch: does the tier hold each chunk (KV events)
        foreach (var first in _queue.GetConsumingEnumerable())
        {
            batch.Add(first);
            while (batch.Count < most && _queue.TryTake(out var next)) batch.Add(next);
            Interlocked.Add(ref _queued, -batch.Count);
            try
            {
                foreach (var chunk in batch) writes.Add(new TierWrite(chunk.Key, chunk.TokenCount, chunk.Data, chunk.PayloadBytes));
                Span<bool> held = _stored is null ? default : heldAfterWrite.AsSpan(0, batch.Count);
                long started = Stopwatch.GetTimestamp();
                int written = _tier.WriteBatch(writes, held);
                // A batch is timed as a whole: each record written counts the batch's time shared
                // out, so remote_time_to_put stays per record whatever the batch size.
                if (written > 0)
                {
                    double perRecord = Stopwatch.GetElapsedTime(started).TotalMilliseconds / written;
                    for (int i = 0; i < written; i++) WriteMilliseconds.Observe(perRecord);
                }
                for (int i = 0; i < held.Length; i++)
                    if (held[i]) _stored!(batch[i]);
            }
            catch (Exception)
            {
                // A tier reports its own failures; whatever escapes must not kill the writer thread.
                Interlocked.Increment(ref _errors);
            }
            finally
            {
                foreach (var chunk in batch)
                {
                    _release(chunk);
                    Done();
                }
                batch.Clear();
                writes.Clear();
            }
        }
    }

    private void Done()
    {
        if (Interlocked.Decrement(ref _inFlight) == 0)
            lock (_idle) Monitor.PulseAll(_idle);
    }

    /// <summary>Finishes the queued writes (they are what another process expects to find), then stops.</summary>
    public void Dispose()
    {
        _queue.CompleteAdding();
        _thread.Join();
        _queue.Dispose();
    }
}
