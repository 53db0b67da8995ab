using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using LMCacheNative.Core.Engine;

namespace LMCacheNative.Core.Lookup;

/// <summary>
/// Wire format of the lookup channel between processes on one machine (vLLM's scheduler asking the
/// engines of its workers). Little-endian throughout.
/// <code>
/// request:  magic "LMLQ" (4) | version u16 = 1 | reserved u16 | extra key length u32 | token count u32 | extra key | tokens (int32 each)
/// response: magic "LMLR" (4) | status i32 (0 = ok, else an LMC_E_* value) | hit tokens i64
/// </code>
/// One connection may carry any number of request/response pairs.
/// </summary>
internal static class LookupWire
{
    public const int RequestHeaderBytes = 16;
    public const int ResponseBytes = 16;
    public const ushort Version = 1;
    /// <summary>
    /// Bounds on one request: 1 Mi tokens (4 MiB, far beyond any prompt a scheduler asks about: an
    /// 8192-token prompt needs 32 KiB) and the engine's own bound on extra keys. Larger requests are refused.
    /// </summary>
    public const int MaxTokens = 1 << 20, MaxExtraKeyBytes = Keys.ChunkHasher.MaxExtraKeyBytes;
    /// <summary>A Unix socket address holds 107 bytes of path.</summary>
    public const int MaxSocketPathBytes = 107;
    public static ReadOnlySpan<byte> RequestMagic => "LMLQ"u8;
    public static ReadOnlySpan<byte> ResponseMagic => "LMLR"u8;

    public static void ValidateSocketPath(string socketPath)
    {
        if (socketPath.Length == 0) throw LmcException.InvalidArgument("socket_path is empty");
        if (System.Text.Encoding.UTF8.GetByteCount(socketPath) > MaxSocketPathBytes)
            throw LmcException.InvalidArgument($"socket_path is longer than a Unix socket address allows ({MaxSocketPathBytes} bytes): {socketPath}");
    }

    /// <summary>
    /// Whether the process at the other end of <paramref name="socket"/> runs as this process's user or
    /// as root (SO_PEERCRED), the only peers allowed on either side of the channel: another user could
    /// otherwise read which prompts are cached, or answer the scheduler's lookups.
    /// </summary>
    public static bool PeerIsTrusted(Socket socket, out uint peerUid)
    {
        Span<byte> credentials = stackalloc byte[12]; // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
        peerUid = uint.MaxValue;
        try
        {
            if (socket.GetRawSocketOption(SolSocket, SoPeerCred, credentials) < 12) return false;
        }
        catch (SocketException)
        {
            return false;
        }
        peerUid = BinaryPrimitives.ReadUInt32LittleEndian(credentials[4..]);
        return peerUid == 0 || peerUid == Posix.EffectiveUserId;
    }

    private const int SolSocket = 1, SoPeerCred = 17;
}

/// <summary>
/// Serves <see cref="CacheEngine.Lookup"/> on a Unix-domain socket, so that another process (vLLM's
/// scheduler) can ask this engine how much of a prompt it holds.
///
/// Local peers may be careless or hostile, so the server spends nothing on a peer that does not
/// finish a well-formed request quickly, and shares nothing with the engine's jobs:
/// <list type="bullet">
/// <item>Only peers running as this user or root are served (SO_PEERCRED); others are closed at once.</item>
/// <item>One dedicated thread multiplexes every connection with non-blocking reads; two dedicated
///   threads run the lookups. No thread-pool thread ever waits on a peer.</item>
/// <item>A connection must deliver a whole request within <see cref="RequestDeadline"/> of being
///   accepted (or of its previous answer), or it is closed: a half-open header or a peer that drips
///   one byte at a time holds nothing for long.</item>
/// <item>At most <see cref="MaxConnections"/> connections; a new one displaces the idle connection
///   that has waited longest, so real lookups, which arrive complete, are served even under a flood.</item>
/// <item>A request's buffer grows with the bytes actually received, up to the wire's bounds; nothing
///   is allocated for what a header merely announces.</item>
/// </list>
/// Lookups do not block stores or retrieves (see the engine's locking), and a failing peer only
/// loses its own connection.
/// </summary>
public sealed class LookupServer : IDisposable
{
    public const int MaxConnections = 64;
    public static readonly TimeSpan RequestDeadline = TimeSpan.FromSeconds(2);
    private const int LookupThreads = 2;
    /// <summary>How often the I/O thread wakes without traffic, to enforce deadlines and re-arm connections.</summary>
    private const int PollMicroseconds = 20_000;

    private readonly CacheEngine _engine;
    private readonly Socket _listener;
    private readonly Thread _ioThread;
    private readonly Thread[] _lookupThreads;
    private readonly CancellationTokenSource _stopping = new();
    /// <summary>Connections the I/O thread owns, by socket. Only the I/O thread touches it while running.</summary>
    private readonly Dictionary<Socket, Connection> _connections = new();
    /// <summary>Complete requests for the lookup threads; never more than <see cref="MaxConnections"/>.</summary>
    private readonly BlockingCollection<Connection> _requests = new(MaxConnections);
    /// <summary>Connections answered by a lookup thread, handed back to the I/O thread.</summary>
    private readonly ConcurrentQueue<Connection> _answered = new();

    public LookupServer(CacheEngine engine, string socketPath)
    {
        LookupWire.ValidateSocketPath(socketPath);
        _engine = engine;
        SocketPath = socketPath;
        RemoveStaleSocket(socketPath);
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            _listener.Bind(new UnixDomainSocketEndPoint(socketPath));
            // Connecting needs write permission on the socket file: only this user (root bypasses).
            if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(socketPath, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            _listener.Listen(MaxConnections);
            _listener.Blocking = false;
        }
        catch (Exception e) when (e is SocketException or IOException or UnauthorizedAccessException)
        {
            _listener.Dispose();
            throw new LmcException(LmcStatus.Io, $"cannot listen on {socketPath}: {e.Message}");
        }
        _lookupThreads = new Thread[LookupThreads];
        for (int i = 0; i < _lookupThreads.Length; i++)
        {
            _lookupThreads[i] = new Thread(LookupLoop) { IsBackground = true, Name = "lmcache-native lookup" };
            _lookupThreads[i].Start();
        }
        _ioThread = new Thread(IoLoop) { IsBackground = true, Name = "lmcache-native lookup server" };
        _ioThread.Start();
    }

    public string SocketPath { get; }

    /// <summary>
    /// Removes what a dead server left at <paramref name="path"/>: only a socket, and only when
    /// connecting to it is refused (nobody listens). A live socket, or anything that is not a socket
    /// (a user's file, a directory, a link), is refused and left in place.
    /// </summary>
    private static void RemoveStaleSocket(string path)
    {
        var kind = Posix.Inspect(path).Kind;
        if (kind == Posix.FileKind.Missing) return;
        if (kind != Posix.FileKind.Socket)
            throw LmcException.InvalidArgument($"socket_path {path} exists and is not a socket; it is left in place");
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { SendTimeout = 1000 };
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionRefused)
        {
            try
            {
                File.Delete(path);
            }
            catch (Exception delete) when (delete is IOException or UnauthorizedAccessException)
            {
                throw new LmcException(LmcStatus.Io, $"socket_path {path}: cannot remove the stale socket: {delete.Message}");
            }
            return;
        }
        catch (SocketException e)
        {
            throw new LmcException(LmcStatus.Io, $"socket_path {path}: cannot tell whether the socket is in use: {e.Message}");
        }
        throw LmcException.InvalidArgument($"socket_path {path} is in use by another lookup server");
    }

    /// <summary>One peer's connection and the request it is sending.</summary>
    private sealed class Connection(Socket socket, long deadline)
    {
        public readonly Socket Socket = socket;
        public readonly byte[] Header = new byte[LookupWire.RequestHeaderBytes];
        public int HeaderReceived;
        /// <summary>Extra key then tokens; grows with what arrives, up to <see cref="BodyLength"/>.</summary>
        public byte[] Body = [];
        public int BodyLength, BodyReceived, ExtraKeyLength;
        /// <summary>Stopwatch timestamp by which the current request must be complete.</summary>
        public long Deadline = deadline;

        public void StartNextRequest(long deadline)
        {
            HeaderReceived = BodyReceived = BodyLength = ExtraKeyLength = 0;
            Body = [];
            Deadline = deadline;
        }
    }

    private long NextDeadline() => Stopwatch.GetTimestamp() + (long)(RequestDeadline.TotalSeconds * Stopwatch.Frequency);

    private void IoLoop()
    {
        var readable = new List<Socket>(MaxConnections + 1);
        while (!_stopping.IsCancellationRequested)
        {
            while (_answered.TryDequeue(out var answered))
            {
                answered.StartNextRequest(NextDeadline());
                _connections.Add(answered.Socket, answered);
            }
            readable.Clear();
            readable.Add(_listener);
            readable.AddRange(_connections.Keys);
            try
            {
                Socket.Select(readable, null, null, PollMicroseconds);
            }
            catch (Exception) when (_stopping.IsCancellationRequested)
            {
                return;
            }
            foreach (var socket in readable)
            {
                if (socket == _listener) AcceptPending();
                else if (_connections.TryGetValue(socket, out var connection)) Receive(connection);
            }
            long now = Stopwatch.GetTimestamp();
            foreach (var late in _connections.Values.Where(c => c.Deadline < now).ToList())
            {
                // An idle connection (no byte of a next request) closing is routine; a half-sent request is not.
                if (late.HeaderReceived > 0) _engine.Metrics.LookupConnectionDropped();
                Drop(late);
            }
        }
    }

    private void AcceptPending()
    {
        while (true)
        {
            Socket socket;
            try
            {
                socket = _listener.Accept();
            }
            catch (SocketException)
            {
                return; // WouldBlock: none left; anything else: that peer is gone
            }
            catch (ObjectDisposedException)
            {
                return;
            }
            if (!LookupWire.PeerIsTrusted(socket, out _))
            {
                _engine.Metrics.LookupPeerRefused();
                socket.Dispose();
                continue;
            }
            socket.Blocking = false;
            if (_connections.Count + _requests.Count >= MaxConnections)
            {
                // Full: the idle connection that has waited longest for its request makes room.
                var oldest = _connections.Values.MinBy(c => c.Deadline);
                _engine.Metrics.LookupConnectionDropped();
                if (oldest is null)
                {
                    socket.Dispose();
                    continue;
                }
                Drop(oldest);
            }
            _connections.Add(socket, new Connection(socket, NextDeadline()));
        }
    }

    /// <summary>Reads what <paramref name="c"/>'s peer has sent; hands a complete request to the lookup threads.</summary>
    private void Receive(Connection c)
    {
        int read;
        SocketError error;
        if (c.HeaderReceived < LookupWire.RequestHeaderBytes)
        {
            read = c.Socket.Receive(c.Header, c.HeaderReceived, LookupWire.RequestHeaderBytes - c.HeaderReceived, SocketFlags.None, out error);
            if (!Received(c, read, error)) return;
            c.HeaderReceived += read;
            if (c.HeaderReceived < LookupWire.RequestHeaderBytes) return;
            var header = c.Header.AsSpan();
            uint extraLength = BinaryPrimitives.ReadUInt32LittleEndian(header[8..]);
            uint tokenCount = BinaryPrimitives.ReadUInt32LittleEndian(header[12..]);
            if (!header[..4].SequenceEqual(LookupWire.RequestMagic)
                || BinaryPrimitives.ReadUInt16LittleEndian(header[4..]) != LookupWire.Version
                || extraLength > LookupWire.MaxExtraKeyBytes || tokenCount > LookupWire.MaxTokens)
            {
                _engine.Metrics.LookupConnectionDropped();
                Drop(c); // not our protocol, or a request larger than any real one
                return;
            }
            c.ExtraKeyLength = (int)extraLength;
            c.BodyLength = (int)extraLength + (int)tokenCount * sizeof(int);
            c.Body = new byte[Math.Min(c.BodyLength, 4096)];
        }
        if (c.BodyReceived < c.BodyLength)
        {
            if (c.BodyReceived == c.Body.Length)
            {
                var grown = new byte[(int)Math.Min((long)c.Body.Length * 4, c.BodyLength)];
                c.Body.AsSpan(0, c.BodyReceived).CopyTo(grown);
                c.Body = grown;
            }
            read = c.Socket.Receive(c.Body, c.BodyReceived, c.Body.Length - c.BodyReceived, SocketFlags.None, out error);
            if (!Received(c, read, error)) return;
            c.BodyReceived += read;
            if (c.BodyReceived < c.BodyLength) return;
        }
        // Complete: the connection belongs to a lookup thread until it comes back through _answered.
        _connections.Remove(c.Socket);
        if (!_requests.TryAdd(c))
        {
            _engine.Metrics.LookupConnectionDropped();
            Drop(c);
        }
    }

    /// <summary>False (and the connection dropped) when the peer closed or the read failed.</summary>
    private bool Received(Connection c, int read, SocketError error)
    {
        if (error == SocketError.WouldBlock) return false;
        if (error == SocketError.Success && read > 0) return true;
        Drop(c);
        return false;
    }

    private void Drop(Connection c)
    {
        _connections.Remove(c.Socket);
        c.Socket.Dispose();
    }

    private void LookupLoop()
    {
        Span<byte> response = stackalloc byte[LookupWire.ResponseBytes];
        foreach (var c in _requests.GetConsumingEnumerable())
        {
            int status = 0;
            long hit = 0;
            try
            {
                var body = c.Body.AsSpan(0, c.BodyLength);
                hit = _engine.Lookup(MemoryMarshal.Cast<byte, int>(body[c.ExtraKeyLength..]), body[..c.ExtraKeyLength]).HitTokens;
            }
            catch (LmcException e)
            {
                status = (int)e.Kind;
            }
            catch (Exception)
            {
                status = (int)LmcStatus.Internal;
            }
            c.Body = [];
            LookupWire.ResponseMagic.CopyTo(response);
            BinaryPrimitives.WriteInt32LittleEndian(response[4..], status);
            BinaryPrimitives.WriteInt64LittleEndian(response[8..], hit);
            // Non-blocking: 16 bytes always fit unless the peer stopped reading its answers.
            int sent = c.Socket.Send(response, SocketFlags.None, out var error);
            if (error == SocketError.Success && sent == response.Length && !_stopping.IsCancellationRequested)
            {
                _answered.Enqueue(c);
            }
            else
            {
                        c.Socket.Dispose();
            }
        }
    }

    public void Dispose()
    {
        if (_stopping.IsCancellationRequested) return;
        _stopping.Cancel();
        _ioThread.Join();
        _listener.Dispose();
        // Lookups in flight finish (they hold the engine's read lock, which the engine's dispose waits for).
        _requests.CompleteAdding();
        foreach (var thread in _lookupThreads) thread.Join();
        foreach (var connection in _connections.Values) connection.Socket.Dispose();
        _connections.Clear();
        while (_answered.TryDequeue(out var answered)) answered.Socket.Dispose();
        _requests.Dispose();
        // Only the socket this server made: a file put in its place since is not the server's.
        if (Posix.Inspect(SocketPath).Kind == Posix.FileKind.Socket)
            try { File.Delete(SocketPath); } catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }
}

/// <summary>Asks a <see cref="LookupServer"/> in another process; every failure is an exception with a status kind.</summary>
public static class LookupClient
{
    /// <summary>
    /// Hit tokens of <paramref name="tokens"/> at the server on <paramref name="socketPath"/>, always in
    /// [0, tokens.Length]. <paramref name="timeout"/> bounds the whole exchange (connect, send, answer).
    /// Throws <see cref="LmcException"/>: <see cref="LmcStatus.Timeout"/> when no answer came in
    /// time, <see cref="LmcStatus.Io"/> when there is no server, the connection broke, the server
    /// runs as another user or answered outside the protocol, or the status the remote engine's
    /// lookup failed with.
    /// </summary>
    public static long Lookup(string socketPath, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, TimeSpan timeout)
    {
        LookupWire.ValidateSocketPath(socketPath);
        if (tokens.Length > LookupWire.MaxTokens) throw LmcException.InvalidArgument($"num_tokens {tokens.Length} exceeds the lookup channel's {LookupWire.MaxTokens}");
        if (extraKey.Length > LookupWire.MaxExtraKeyBytes) throw LmcException.InvalidArgument($"extra_key_len {extraKey.Length} exceeds the lookup channel's {LookupWire.MaxExtraKeyBytes}");
        byte[] request = new byte[LookupWire.RequestHeaderBytes + extraKey.Length + tokens.Length * sizeof(int)];
        LookupWire.RequestMagic.CopyTo(request);
        BinaryPrimitives.WriteUInt16LittleEndian(request.AsSpan(4), LookupWire.Version);
        BinaryPrimitives.WriteUInt32LittleEndian(request.AsSpan(8), (uint)extraKey.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(request.AsSpan(12), (uint)tokens.Length);
        extraKey.CopyTo(request.AsSpan(LookupWire.RequestHeaderBytes));
        MemoryMarshal.AsBytes(tokens).CopyTo(request.AsSpan(LookupWire.RequestHeaderBytes + extraKey.Length));

        var deadline = new Deadline(timeout);
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        byte[] response = new byte[LookupWire.ResponseBytes];
        try
        {
            // SO_SNDTIMEO also bounds connect() on a Unix socket whose listener's backlog is full.
            socket.SendTimeout = deadline.RemainingMilliseconds(socketPath);
            socket.Connect(new UnixDomainSocketEndPoint(socketPath));
            if (!LookupWire.PeerIsTrusted(socket, out uint serverUid))
                throw new LmcException(LmcStatus.Io, $"lookup server {socketPath} runs as user {serverUid}, not as this user or root: not asked");
            for (int sent = 0; sent < request.Length;)
            {
                socket.SendTimeout = deadline.RemainingMilliseconds(socketPath);
                sent += socket.Send(request, sent, request.Length - sent, SocketFlags.None);
            }
            for (int received = 0; received < response.Length;)
            {
                socket.ReceiveTimeout = deadline.RemainingMilliseconds(socketPath);
                int read = socket.Receive(response, received, response.Length - received, SocketFlags.None);
                if (read == 0) throw new LmcException(LmcStatus.Io, $"lookup server {socketPath} closed the connection");
                received += read;
            }
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
        {
            throw deadline.Expired(socketPath);
        }
        catch (SocketException e)
        {
            throw new LmcException(LmcStatus.Io, $"lookup server {socketPath}: {e.Message}");
        }
        if (!response.AsSpan(0, 4).SequenceEqual(LookupWire.ResponseMagic))
            throw new LmcException(LmcStatus.Io, $"lookup server {socketPath} answered in an unknown format");
        int status = BinaryPrimitives.ReadInt32LittleEndian(response.AsSpan(4));
        long hit = BinaryPrimitives.ReadInt64LittleEndian(response.AsSpan(8));
        if (status != 0)
        {
            // The remote engine's own failure kinds pass through; a status outside the protocol, or
            // the remote's internal error (not a bug of this call), is an I/O failure of the channel.
            var kind = Enum.IsDefined((LmcStatus)status) && status != (int)LmcStatus.Internal ? (LmcStatus)status : LmcStatus.Io;
            throw new LmcException(kind, $"the engine behind {socketPath} failed the lookup with status {status}");
        }
        if (hit < 0 || hit > tokens.Length)
            throw new LmcException(LmcStatus.Io, $"lookup server {socketPath} answered {hit} hit tokens for a {tokens.Length}-token prompt: protocol error, not used");
        return hit;
    }

    /// <summary>The end of a bounded exchange; infinite when the timeout is.</summary>
    private readonly struct Deadline(TimeSpan timeout)
    {
        private readonly long _end = timeout == Timeout.InfiniteTimeSpan ? long.MaxValue
            : Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);
        private readonly TimeSpan _timeout = timeout;

        /// <summary>Milliseconds left as a socket timeout (0 = none); throws the timeout when none are left.</summary>
        public int RemainingMilliseconds(string socketPath)
        {
            if (_end == long.MaxValue) return 0;
            long left = _end - Stopwatch.GetTimestamp();
            if (left <= 0) throw Expired(socketPath);
            return (int)Math.Clamp(left * 1000 / Stopwatch.Frequency, 1, int.MaxValue);
        }

        public LmcException Expired(string socketPath) =>
            new(LmcStatus.Timeout, $"lookup server {socketPath} did not answer within {_timeout.TotalMilliseconds:0} ms");
    }
}
