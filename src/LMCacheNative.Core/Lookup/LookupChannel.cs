using System.Buffers.Binary;
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
    /// <summary>Bounds a request so a confused peer cannot make the server allocate without limit.</summary>
    public const int MaxTokens = 16 << 20, MaxExtraKeyBytes = 1 << 20;
    public static ReadOnlySpan<byte> RequestMagic => "LMLQ"u8;
    public static ReadOnlySpan<byte> ResponseMagic => "LMLR"u8;
}

/// <summary>
/// Serves <see cref="CacheEngine.Lookup"/> on a Unix-domain socket, so that another process (vLLM's
/// scheduler) can ask this engine how much of a prompt it holds. One background thread accepts;
/// each connection is served on its own thread-pool task. Lookups do not block stores or
/// retrieves (see the engine's locking), and a failing peer only loses its own connection.
/// </summary>
public sealed class LookupServer : IDisposable
{
    private readonly CacheEngine _engine;
    private readonly Socket _listener;
    private readonly Thread _acceptThread;
    private readonly CancellationTokenSource _stopping = new();
    private readonly List<Socket> _connections = new();

    public LookupServer(CacheEngine engine, string socketPath)
    {
        if (string.IsNullOrEmpty(socketPath)) throw LmcException.InvalidArgument("socket_path is empty");
        if (System.Text.Encoding.UTF8.GetByteCount(socketPath) > 107)
            throw LmcException.InvalidArgument($"socket_path is longer than a Unix socket address allows (107 bytes): {socketPath}");
        _engine = engine;
        SocketPath = socketPath;
        RemoveStaleSocket(socketPath);
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            _listener.Bind(new UnixDomainSocketEndPoint(socketPath));
            _listener.Listen(64);
        }
        catch (SocketException e)
        {
            _listener.Dispose();
            throw new LmcException(LmcErrorKind.Io, $"cannot listen on {socketPath}: {e.Message}");
        }
        _acceptThread = new Thread(AcceptLoop) { IsBackground = true, Name = "lmcache-native lookup server" };
        _acceptThread.Start();
    }

    public string SocketPath { get; }

    /// <summary>A socket file nobody listens on is left by a process that died; one somebody listens on is refused.</summary>
    private static void RemoveStaleSocket(string path)
    {
        if (!File.Exists(path)) return;
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException)
        {
            File.Delete(path);
            return;
        }
        throw LmcException.InvalidArgument($"socket_path {path} is in use by another lookup server");
    }

    private void AcceptLoop()
    {
        while (!_stopping.IsCancellationRequested)
        {
            Socket connection;
            try
            {
                connection = _listener.Accept();
            }
            catch (Exception) when (_stopping.IsCancellationRequested)
            {
                return;
            }
            catch (SocketException)
            {
                continue;
            }
            lock (_connections) _connections.Add(connection);
            _ = Task.Run(() => Serve(connection));
        }
    }

    private void Serve(Socket connection)
    {
        byte[] header = new byte[LookupWire.RequestHeaderBytes];
        byte[] response = new byte[LookupWire.ResponseBytes];
        try
        {
            while (!_stopping.IsCancellationRequested)
            {
                if (!ReadExactly(connection, header)) return; // peer closed
                if (!header.AsSpan(0, 4).SequenceEqual(LookupWire.RequestMagic)
                    || BinaryPrimitives.ReadUInt16LittleEndian(header.AsSpan(4)) != LookupWire.Version)
                    return; // not our protocol: drop the connection
                uint extraLength = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(8));
                uint tokenCount = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(12));
                if (extraLength > LookupWire.MaxExtraKeyBytes || tokenCount > LookupWire.MaxTokens) return;
                byte[] body = new byte[extraLength + tokenCount * sizeof(int)];
                if (!ReadExactly(connection, body)) return;

                int status = 0;
                long hit = 0;
                try
                {
                    hit = _engine.Lookup(MemoryMarshal.Cast<byte, int>(body.AsSpan((int)extraLength)), body.AsSpan(0, (int)extraLength));
                }
                catch (LmcException e)
                {
                    status = (int)e.Kind;
                }
                catch (Exception)
                {
                    status = (int)LmcErrorKind.Internal;
                }
                LookupWire.ResponseMagic.CopyTo(response);
                BinaryPrimitives.WriteInt32LittleEndian(response.AsSpan(4), status);
                BinaryPrimitives.WriteInt64LittleEndian(response.AsSpan(8), hit);
                connection.Send(response);
            }
        }
        catch (Exception)
        {
            // A peer that vanished mid-request costs only its connection.
        }
        finally
        {
            lock (_connections) _connections.Remove(connection);
            connection.Dispose();
        }
    }

    private static bool ReadExactly(Socket socket, Span<byte> buffer)
    {
        while (buffer.Length > 0)
        {
            int read = socket.Receive(buffer);
            if (read == 0) return false;
            buffer = buffer[read..];
        }
        return true;
    }

    public void Dispose()
    {
        if (_stopping.IsCancellationRequested) return;
        _stopping.Cancel();
        _listener.Dispose(); // unblocks Accept
        _acceptThread.Join();
        lock (_connections)
        {
            foreach (var connection in _connections) connection.Dispose();
            _connections.Clear();
        }
        try { File.Delete(SocketPath); } catch (IOException) { }
    }
}

/// <summary>Asks a <see cref="LookupServer"/> in another process; every failure is an exception with a status kind.</summary>
public static class LookupClient
{
    /// <summary>
    /// Hit tokens of <paramref name="tokens"/> at the server on <paramref name="socketPath"/>.
    /// Throws <see cref="LmcException"/>: <see cref="LmcErrorKind.Timeout"/> when no answer came in
    /// time, <see cref="LmcErrorKind.Io"/> when there is no server or the connection broke, or the
    /// status the remote engine's lookup failed with.
    /// </summary>
    public static long Lookup(string socketPath, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKey, TimeSpan timeout)
    {
        if (tokens.Length > LookupWire.MaxTokens) throw LmcException.InvalidArgument($"num_tokens {tokens.Length} exceeds the lookup channel's {LookupWire.MaxTokens}");
        if (extraKey.Length > LookupWire.MaxExtraKeyBytes) throw LmcException.InvalidArgument($"extra_key_len {extraKey.Length} exceeds the lookup channel's {LookupWire.MaxExtraKeyBytes}");
        byte[] request = new byte[LookupWire.RequestHeaderBytes + extraKey.Length + tokens.Length * sizeof(int)];
        LookupWire.RequestMagic.CopyTo(request);
        BinaryPrimitives.WriteUInt16LittleEndian(request.AsSpan(4), LookupWire.Version);
        BinaryPrimitives.WriteUInt32LittleEndian(request.AsSpan(8), (uint)extraKey.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(request.AsSpan(12), (uint)tokens.Length);
        extraKey.CopyTo(request.AsSpan(LookupWire.RequestHeaderBytes));
        MemoryMarshal.AsBytes(tokens).CopyTo(request.AsSpan(LookupWire.RequestHeaderBytes + extraKey.Length));

        int timeoutMs = timeout == Timeout.InfiniteTimeSpan ? 0 : Math.Max(1, (int)Math.Min(timeout.TotalMilliseconds, int.MaxValue));
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified)
        {
            SendTimeout = timeoutMs,
            ReceiveTimeout = timeoutMs,
        };
        byte[] response = new byte[LookupWire.ResponseBytes];
        try
        {
            socket.Connect(new UnixDomainSocketEndPoint(socketPath));
            socket.Send(request);
            Span<byte> rest = response;
            while (rest.Length > 0)
            {
                int read = socket.Receive(rest);
                if (read == 0) throw new LmcException(LmcErrorKind.Io, $"lookup server {socketPath} closed the connection");
                rest = rest[read..];
            }
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
        {
            throw new LmcException(LmcErrorKind.Timeout, $"lookup server {socketPath} did not answer within {timeoutMs} ms");
        }
        catch (SocketException e)
        {
            throw new LmcException(LmcErrorKind.Io, $"lookup server {socketPath}: {e.Message}");
        }
        if (!response.AsSpan(0, 4).SequenceEqual(LookupWire.ResponseMagic))
            throw new LmcException(LmcErrorKind.Io, $"lookup server {socketPath} answered in an unknown format");
        int status = BinaryPrimitives.ReadInt32LittleEndian(response.AsSpan(4));
        if (status != 0)
            throw new LmcException(Enum.IsDefined((LmcErrorKind)status) ? (LmcErrorKind)status : LmcErrorKind.Internal,
                $"the engine behind {socketPath} failed the lookup with status {status}");
        return BinaryPrimitives.ReadInt64LittleEndian(response.AsSpan(8));
    }
}
