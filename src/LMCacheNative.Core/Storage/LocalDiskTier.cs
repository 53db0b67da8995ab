using System.Text.RegularExpressions;
using LMCacheNative.Core.Keys;

namespace LMCacheNative.Core.Storage;

/// <summary>
/// The local disk tier (LMCache's LocalDiskBackend, config <c>local_disk</c> and
/// <c>max_local_disk_size</c>): one file per chunk, <c>&lt;namespace&gt;-&lt;key&gt;.lmcc</c>, each a
/// <see cref="ChunkRecord"/> (header with checksums, then the payload).
///
/// Durability: a record is written to a temporary name and renamed into place, so a reader never
/// sees a half-written file under a record name; a process killed mid-write leaves only a
/// temporary file, deleted at the next start. Only names of the tier's exact record and temporary
/// patterns are ever deleted: other files in the directory are the user's and are left alone.
/// Checksums catch anything else (a flipped bit, a truncated file): such a record is a miss,
/// deleted and counted, never loaded. Files are opened only when they are regular files, without
/// following links and without blocking (<see cref="Posix"/>): a FIFO, device or link under a
/// record's name is skipped and counted as a corrupt record, never waited on.
///
/// Warm restart: the index is rebuilt at <see cref="Bind"/> by reading every record's 128-byte
/// header (no payload is read), least recently written first, so LRU order survives a restart
/// approximately.
///
/// Sharing a directory: the first engine to open it takes an exclusive lock file and owns it
/// (writes, evicts, deletes corrupt records). Any further engine on the same directory, in this or
/// another process, opens it read-only: it serves hits from what it found at start and never
/// writes or deletes.
///
/// Capacity: <c>max_local_disk_size</c> bounds the whole directory, every model's records together,
/// and the owner enforces it. Records of other namespaces (other models, ranks or hash algorithms)
/// count toward it and are evicted in the same least-recently-written order as the owner's own.
/// </summary>
public sealed class LocalDiskTier : IStorageTier
{
    public const string RecordExtension = ".lmcc";
    private const string LockFileName = ".lmcache-native.lock";
    private const string TempMarker = ".tmp-";
    /// <summary><c>&lt;16 hex namespace&gt;-&lt;64 hex key&gt;.lmcc</c>: the only names this tier writes records under.</summary>
    private static readonly Regex RecordName = new(@"^[0-9a-f]{16}-[0-9a-f]{64}\.lmcc$", RegexOptions.CultureInvariant);
    /// <summary><c>.&lt;record name&gt;.tmp-&lt;32 hex&gt;</c>: the only temporary names it writes.</summary>
    private static readonly Regex TemporaryName = new(@"^\.[0-9a-f]{16}-[0-9a-f]{64}\.lmcc\.tmp-[0-9a-f]{32}$", RegexOptions.CultureInvariant);

    private readonly object _lock = new();
    private readonly string _directory;
    private readonly long _capacityBytes;
    private readonly StorageTierStats _stats = new();
    private readonly Dictionary<ChunkKey, LinkedListNode<Entry>> _index = new();
    private readonly LinkedList<Entry> _lru = new(); // First = least recently used
    private FileStream? _ownerLock;
    private TierBinding? _binding;
    private string _filePrefix = "";

    /// <summary>A record in the directory. <see cref="Foreign"/> records belong to another namespace:
    /// never read here, only counted toward the capacity and evicted.</summary>
    private sealed record Entry(ChunkKey Key, string Path, long Bytes, bool Foreign = false);

    public LocalDiskTier(string directory, long capacityBytes)
    {
        if (string.IsNullOrWhiteSpace(directory)) throw LmcException.InvalidArgument("config: \"local_disk\" is empty");
        if (directory.StartsWith("file://", StringComparison.Ordinal)) directory = directory["file://".Length..];
        _directory = Path.GetFullPath(directory);
        _capacityBytes = capacityBytes;
        try
        {
            // Records hold KV of users' prompts: a directory this tier creates is private to its user.
            if (!Directory.Exists(_directory) && !OperatingSystem.IsWindows())
                Directory.CreateDirectory(_directory, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            Directory.CreateDirectory(_directory);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LmcException(LmcStatus.Io, $"config: \"local_disk\": cannot create {_directory}: {e.Message}");
        }
        try
        {
            // FileShare.None is an exclusive advisory lock (flock) on Unix: one owner per directory.
            _ownerLock = new FileStream(Path.Combine(_directory, LockFileName), FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException)
        {
            _ownerLock = null;
        }
        catch (UnauthorizedAccessException)
        {
            _ownerLock = null;
        }
        _stats.CapacityBytes = capacityBytes;
    }

    public string Name => "LocalDiskBackend";

    /// <summary>
    /// Told, under the tier's lock, of each of this namespace's records that leaves the index
    /// (evicted, found corrupt, deleted by the directory's owner); set once before use (KV events).
    /// It must be quick and must not call back into the tier.
    /// </summary>
    public Action<ChunkKey>? RecordRemoved { get; set; }
    public string DirectoryPath => _directory;
    /// <summary>False when another engine owns the directory: this one only reads.</summary>
    public bool IsOwner => _ownerLock is not null;

    public void Bind(TierBinding binding)
    {
        lock (_lock)
        {
            _binding = binding;
            _filePrefix = Convert.ToHexStringLower(binding.Fingerprint, 0, 8) + "-";
            _index.Clear();
            _lru.Clear();
            _stats.UsedBytes = 0;
            Scan();
        }
    }

    private void Scan()
    {
        var found = new List<(Entry Entry, DateTime WrittenAt)>();
        Span<byte> header = stackalloc byte[ChunkRecord.HeaderSize];
        List<string> files;
        try
        {
            files = Directory.EnumerateFiles(_directory).ToList();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _stats.Errors++;
            return;
        }
        foreach (string path in files)
        {
            string name = Path.GetFileName(path);
            if (TemporaryName.IsMatch(name))
            {
                // Left by a process killed mid-write; never a record.
                if (IsOwner && Posix.Inspect(path).Kind == Posix.FileKind.Regular) TryDelete(path);
                continue;
            }
            if (!RecordName.IsMatch(name)) continue; // not this tier's: left alone
            if (!name.StartsWith(_filePrefix, StringComparison.Ordinal))
            {
                // Another namespace's record: it shares this directory's capacity.
                var (kind, length, writtenAt) = Posix.Inspect(path);
                if (kind == Posix.FileKind.Regular) found.Add((new Entry(default, path, length, Foreign: true), writtenAt));
                continue;
            }
            try
            {
                using var file = Posix.OpenRegularFileForRead(path);
                if (file is null) continue; // removed since the directory was listed
                long length = file.Length;
                if (file.ReadAtLeast(header, ChunkRecord.HeaderSize, throwOnEndOfStream: false) < ChunkRecord.HeaderSize
                    || ChunkRecord.ReadHeader(header, _binding!.Fingerprint) is not { SameNamespace: true } h
                    || length != ChunkRecord.HeaderSize + h.PayloadLength
                    || name != FileName(h.Key))
                {
                    _stats.CorruptRecords++;
                    if (IsOwner) TryDelete(path);
                    continue;
                }
                found.Add((new Entry(h.Key, path, length), Posix.Inspect(path).LastWriteUtc));
            }
            catch (IOException) when (Posix.HoldsNonRegularFile(path))
            {
                // A FIFO, device, socket or link under a record's name: not a record, and not the
                // tier's to delete.
                _stats.CorruptRecords++;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                _stats.Errors++;
            }
        }
        foreach (var (entry, _) in found.OrderBy(f => f.WrittenAt))
        {
            var node = _lru.AddLast(entry);
            if (!entry.Foreign) _index[entry.Key] = node;
            _stats.UsedBytes += entry.Bytes;
        }
        if (IsOwner) EvictUntilFits(0);
    }

    private string FileName(in ChunkKey key) => _filePrefix + key.ToHex() + RecordExtension;

    public int CountPrefix(ReadOnlySpan<ChunkKey> keys)
    {
        lock (_lock)
        {
            int count = 0;
            while (count < keys.Length && _index.ContainsKey(keys[count])) count++;
            return count;
        }
    }

    public bool Contains(in ChunkKey key)
    {
        lock (_lock) return _index.ContainsKey(key);
    }

    public bool TryRead(in ChunkKey key, int tokenCount, Span<byte> payload)
    {
        bool ok = Read(key, tokenCount, payload);
        if (ok) CountHit(payload.Length);
        return ok;
    }

    /// <summary>
    /// Reads the records in parallel (a cold read waits on the device, a warm one on the copy and
    /// checksum). Only the leading successes are used, so only they count as hits.
    /// </summary>
    public unsafe int ReadPrefix(IReadOnlyList<TierRead> reads)
    {
        var ok = new bool[reads.Count];
        int firstFailure = int.MaxValue;
        Parallel.For(0, reads.Count, i =>
        {
            if (i > Volatile.Read(ref firstFailure)) return; // past a failure: not needed
            var r = reads[i];
            ok[i] = Read(r.Key, r.TokenCount, new Span<byte>((void*)r.Payload, checked((int)r.PayloadBytes)));
            if (!ok[i])
            {
                int seen;
                while (i < (seen = Volatile.Read(ref firstFailure)) && Interlocked.CompareExchange(ref firstFailure, i, seen) != seen) { }
            }
        });
        int leading = 0;
        while (leading < ok.Length && ok[leading]) CountHit(reads[leading++].PayloadBytes);
        return leading;
    }

    private void CountHit(long payloadBytes)
    {
        lock (_lock)
        {
            _stats.Hits++;
            _stats.BytesRead += payloadBytes;
        }
    }

    /// <summary>Reads and checks one record; counts misses and corrupt records, not hits (the caller decides what was used).</summary>
    private bool Read(in ChunkKey key, int tokenCount, Span<byte> payload)
    {
        string path;
        TierBinding binding;
        lock (_lock)
        {
            if (_binding is null || !_index.TryGetValue(key, out var node))
            {
                _stats.Misses++;
                return false;
            }
            path = node.Value.Path;
            binding = _binding;
            _lru.Remove(node);
            _lru.AddLast(node);
        }

        bool ok;
        try
        {
            using var file = Posix.OpenRegularFileForRead(path) ?? throw new FileNotFoundException(path);
            Span<byte> header = stackalloc byte[ChunkRecord.HeaderSize];
            ok = file.Length == ChunkRecord.HeaderSize + payload.Length
                 && file.ReadAtLeast(header, ChunkRecord.HeaderSize, throwOnEndOfStream: false) == ChunkRecord.HeaderSize
                 && ChunkRecord.ReadHeader(header, binding.Fingerprint) is { SameNamespace: true } h
                 && h.Key == key && h.TokenCount == tokenCount && h.PayloadLength == payload.Length
                 && file.ReadAtLeast(payload, payload.Length, throwOnEndOfStream: false) == payload.Length
                 && System.IO.Hashing.XxHash3.HashToUInt64(payload) == h.PayloadChecksum;
        }
        catch (FileNotFoundException)
        {
            // Removed by the directory's owner (eviction) since we indexed it: a plain miss.
            lock (_lock)
            {
                RemoveFromIndex(key);
                _stats.Misses++;
            }
            return false;
        }
        catch (IOException) when (Posix.HoldsNonRegularFile(path))
        {
            // Something other than a regular file was put under the record's name: never read,
            // never waited on, not the tier's to delete; the record is gone from the index.
            lock (_lock)
            {
                _stats.CorruptRecords++;
                _stats.Misses++;
                RemoveFromIndex(key);
            }
            return false;
        }
        catch (Exception)
        {
            // Any failure to read is a miss; the caller's request goes on without this chunk.
            lock (_lock)
            {
                _stats.Errors++;
                _stats.Misses++;
            }
            return false;
        }

        if (ok) return true;
        lock (_lock)
        {
            _stats.CorruptRecords++;
            _stats.Misses++;
            RemoveFromIndex(key);
            if (IsOwner) TryDelete(path);
            return false;
        }
    }

    public bool Write(in ChunkKey key, int tokenCount, ReadOnlySpan<byte> payload)
    {
        TierBinding binding;
        string path;
        long recordBytes = ChunkRecord.HeaderSize + payload.Length;
        lock (_lock)
        {
            if (!IsOwner || _binding is null || _index.ContainsKey(key)) return false;
            if (recordBytes > _capacityBytes) return false;
            EvictUntilFits(recordBytes);
            binding = _binding;
            path = Path.Combine(_directory, FileName(key));
        }

        string temporary = Path.Combine(_directory, "." + Path.GetFileName(path) + TempMarker + Guid.NewGuid().ToString("N"));
        try
        {
            Span<byte> header = stackalloc byte[ChunkRecord.HeaderSize];
            ChunkRecord.WriteHeader(header, key, binding.Fingerprint, tokenCount, payload);
            using (var file = new FileStream(temporary, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1, FileOptions.None))
            {
                file.SetLength(recordBytes);
                file.Write(header);
                file.Write(payload);
            }
            File.Move(temporary, path, overwrite: true);
        }
        catch (Exception)
        {
            // Disk full, a file-size limit (.NET reports EFBIG as ArgumentOutOfRangeException),
            // permissions, a vanished directory: skip this record, leave nothing behind, keep serving.
            TryDelete(temporary);
            Interlocked.Increment(ref _stats.Errors);
            return false;
        }

        lock (_lock)
        {
            if (_index.ContainsKey(key)) return false;
            EvictUntilFits(recordBytes);
            _index[key] = _lru.AddLast(new Entry(key, path, recordBytes));
            _stats.UsedBytes += recordBytes;
            _stats.Writes++;
            _stats.BytesWritten += payload.Length;
            return true;
        }
    }

    public StorageTierStats GetStats()
    {
        lock (_lock) return _stats.Snapshot();
    }

    /// <summary>Makes room for <paramref name="incomingBytes"/> by deleting least recently used records. Caller holds the lock.</summary>
    private void EvictUntilFits(long incomingBytes)
    {
        while (_stats.UsedBytes + incomingBytes > _capacityBytes && _lru.First is { } oldest)
        {
            TryDelete(oldest.Value.Path);
            if (oldest.Value.Foreign)
            {
                _lru.RemoveFirst();
                _stats.UsedBytes -= oldest.Value.Bytes;
            }
            else RemoveFromIndex(oldest.Value.Key);
            _stats.Evictions++;
        }
    }

    private void RemoveFromIndex(in ChunkKey key)
    {
        if (!_index.Remove(key, out var node)) return;
        _lru.Remove(node);
        _stats.UsedBytes -= node.Value.Bytes;
        RecordRemoved?.Invoke(key);
    }

    private void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Interlocked.Increment(ref _stats.Errors);
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            _ownerLock?.Dispose();
            _ownerLock = null;
            _index.Clear();
            _lru.Clear();
        }
    }
}
