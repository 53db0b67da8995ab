using System.Diagnostics;
using System.Net.Sockets;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Lookup;
using NUnit.Framework;
using static LMCacheNative.Core.Tests.EngineTransferTests;

namespace LMCacheNative.Core.Tests;

/// <summary>The Unix-socket lookup channel: answers equal local lookups; failures are bounded and typed.</summary>
public class LookupChannelTests
{
    private string _socketPath = null!;
    private TestModelCache _cache = null!;
    private CacheEngine _engine = null!;

    [SetUp]
    public void SetUp()
    {
        _socketPath = Path.Combine(Path.GetTempPath(), $"lmcn-{Guid.NewGuid():N}.sock");
        _cache = new TestModelCache(TestLayout.FlashNhd, 2, 32, 4, 2, 8, 2);
        _engine = NewEngine("{\"chunk_size\": 8, \"save_unfull_chunk\": true}");
        _engine.RegisterLayers(_cache.Describe());
    }

    private LookupServer? _server;

    /// <summary>Serves <see cref="_engine"/> on the test's socket until the test ends.</summary>
    private void Serve() => _server = new LookupServer(_engine, _socketPath);

    [TearDown]
    public void TearDown()
    {
        _server?.Dispose();
        _engine.Dispose();
        _cache.Dispose();
        if (File.Exists(_socketPath)) File.Delete(_socketPath);
    }

    [Test]
    public void RemoteLookups_AnswerWhatLocalLookupsAnswer()
    {
        int[] stored = Tokens(29, 1);
        byte[] salt = [1, 2, 3];
        _engine.Store(stored, RandomSlots(new Random(1), _cache.NumSlots, 29), 0, salt);
        Serve();

        foreach (var (tokens, key) in new[] { (stored, salt), (stored[..20], salt), (stored.Concat(Tokens(5, 2)).ToArray(), salt), (stored, Array.Empty<byte>()) })
            Assert.That(LookupClient.Lookup(_socketPath, tokens, key, TimeSpan.FromSeconds(5)), Is.EqualTo(_engine.Lookup(tokens, key).HitTokens));
        Assert.That(LookupClient.Lookup(_socketPath, stored, salt, TimeSpan.FromSeconds(5)), Is.EqualTo(29));
        Assert.That(LookupClient.Lookup(_socketPath, [], [], TimeSpan.FromSeconds(5)), Is.EqualTo(0));

        // Many clients at once.
        Parallel.For(0, 64, _ => Assert.That(LookupClient.Lookup(_socketPath, stored, salt, TimeSpan.FromSeconds(5)), Is.EqualTo(29)));
    }

    [Test]
    public void NoServer_IsAnIoError_AndAStoppedServerRemovesItsSocket()
    {
        Serve();
        _server!.Dispose();
        _server.Dispose();
        Assert.That(File.Exists(_socketPath), Is.False);
        var error = Assert.Throws<LmcException>(() => LookupClient.Lookup(_socketPath, Tokens(8, 1), [], TimeSpan.FromSeconds(1)))!;
        Assert.That(error.Kind, Is.EqualTo(LmcStatus.Io));
    }

    [Test]
    public void AServerThatNeverAnswers_IsATimeout_WithinTheBound()
    {
        // A listener that accepts nothing: the connection queues in the backlog, no answer comes.
        using var silent = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        silent.Bind(new UnixDomainSocketEndPoint(_socketPath));
        silent.Listen(4);
        var watch = Stopwatch.StartNew();
        var error = Assert.Throws<LmcException>(() => LookupClient.Lookup(_socketPath, Tokens(8, 1), [], TimeSpan.FromMilliseconds(300)))!;
        Assert.That(error.Kind, Is.EqualTo(LmcStatus.Timeout));
        Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)));
        Assert.That(Assert.Throws<LmcException>(() => new LookupServer(_engine, _socketPath))!.Message, Does.Contain("in use"));
    }

    [Test]
    public void GarbageFromOnePeer_DropsOnlyThatConnection()
    {
        _engine.Store(Tokens(16, 3), RandomSlots(new Random(2), _cache.NumSlots, 16), 0, default);
        Serve();
        using (var rogue = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            rogue.Connect(new UnixDomainSocketEndPoint(_socketPath));
            rogue.Send("GET / HTTP/1.1\r\n\r\n"u8.ToArray());
            rogue.ReceiveTimeout = 2000;
            // The server closes a connection that does not speak its protocol: end of stream, or a
            // reset when it closed with the rogue's bytes unread.
            int received;
            try { received = rogue.Receive(new byte[16]); }
            catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset) { received = 0; }
            Assert.That(received, Is.EqualTo(0));
        }
        Assert.That(LookupClient.Lookup(_socketPath, Tokens(16, 3), [], TimeSpan.FromSeconds(5)), Is.EqualTo(16));
    }

    [Test]
    public void AStaleSocket_IsReplaced()
    {
        // What a killed server leaves: a socket file nobody listens on (.NET's own sockets unlink
        // their file when disposed, so a process that exits without cleaning up makes it).
        var dead = Process.Start("/usr/bin/python3", ["-c", $"import socket; socket.socket(socket.AF_UNIX).bind('{_socketPath}')"])!;
        dead.WaitForExit();
        Assert.That(Posix.Inspect(_socketPath).Kind, Is.EqualTo(Posix.FileKind.Socket));
        Serve();
        Assert.That(LookupClient.Lookup(_socketPath, Tokens(8, 9), [], TimeSpan.FromSeconds(5)), Is.EqualTo(0));
    }

    [Test]
    public void ARegularFileOrDirectoryAtTheSocketPath_IsRefused_AndKept()
    {
        File.WriteAllText(_socketPath, "the user's file");
        var error = Assert.Throws<LmcException>(() => new LookupServer(_engine, _socketPath))!;
        Assert.That(error.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(error.Message, Does.Contain("not a socket"));
        Assert.That(File.ReadAllText(_socketPath), Is.EqualTo("the user's file"));
        File.Delete(_socketPath);
        Directory.CreateDirectory(_socketPath);
        Assert.Throws<LmcException>(() => new LookupServer(_engine, _socketPath));
        Assert.That(Directory.Exists(_socketPath), Is.True);
        Directory.Delete(_socketPath);
    }

    [Test]
    public void TheSocketFile_IsOnlyForItsUser()
    {
        Serve();
        Assert.That(File.GetUnixFileMode(_socketPath), Is.EqualTo(UnixFileMode.UserRead | UnixFileMode.UserWrite));
    }

    /// <summary>A server speaking the wire format that answers whatever <paramref name="answer"/> says.</summary>
    private Thread FakeServer(Action<Socket> answer, out Socket listener)
    {
        var server = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        server.Bind(new UnixDomainSocketEndPoint(_socketPath));
        server.Listen(8);
        listener = server;
        var thread = new Thread(() =>
        {
            try
            {
                while (true)
                {
                    using var peer = server.Accept();
                    var header = new byte[16];
                    int got = 0;
                    while (got < 16) got += peer.Receive(header, got, 16 - got, SocketFlags.None);
                    int body = BitConverter.ToInt32(header, 8) + 4 * BitConverter.ToInt32(header, 12);
                    var rest = new byte[body];
                    got = 0;
                    while (got < body) got += peer.Receive(rest, got, body - got, SocketFlags.None);
                    answer(peer);
                }
            }
            catch (Exception)
            {
                // listener closed by the test
            }
        }) { IsBackground = true };
        thread.Start();
        return thread;
    }

    private static byte[] Response(int status, long hit)
    {
        var response = new byte[16];
        "LMLR"u8.CopyTo(response);
        BitConverter.TryWriteBytes(response.AsSpan(4), status);
        BitConverter.TryWriteBytes(response.AsSpan(8), hit);
        return response;
    }

    [TestCase(-5L)]
    [TestCase(101L)]
    [TestCase(1L << 62)]
    [TestCase(long.MinValue)]
    public void AnAnswerOutsideZeroToTheTokenCount_IsAProtocolError(long hit)
    {
        FakeServer(peer => peer.Send(Response(0, hit)), out var listener);
        using (listener)
        {
            var error = Assert.Throws<LmcException>(() => LookupClient.Lookup(_socketPath, Tokens(100, 1), [], TimeSpan.FromSeconds(5)))!;
            Assert.That(error.Kind, Is.EqualTo(LmcStatus.Io));
            Assert.That(error.Message, Does.Contain("protocol error"));
        }
    }

    [TestCase(-10, LmcStatus.Io)]
    [TestCase(-999, LmcStatus.Io)]
    [TestCase(7, LmcStatus.Io)]
    [TestCase(-1, LmcStatus.InvalidArgument)]
    public void ARemoteFailureStatus_MapsToAKnownKind_NeverInternal(int status, LmcStatus expected)
    {
        FakeServer(peer => peer.Send(Response(status, 0)), out var listener);
        using (listener)
            Assert.That(Assert.Throws<LmcException>(() => LookupClient.Lookup(_socketPath, Tokens(10, 1), [], TimeSpan.FromSeconds(5)))!.Kind, Is.EqualTo(expected));
    }

    [Test]
    public void TheTimeout_BoundsTheWholeExchange_NotEachRead()
    {
        // A peer that drips its answer one byte every 100 ms takes 1.6 s in all.
        FakeServer(peer =>
        {
            foreach (byte b in Response(0, 5))
            {
                peer.Send([b]);
                Thread.Sleep(100);
            }
        }, out var listener);
        using (listener)
        {
            var watch = Stopwatch.StartNew();
            var error = Assert.Throws<LmcException>(() => LookupClient.Lookup(_socketPath, Tokens(10, 1), [], TimeSpan.FromMilliseconds(500)))!;
            Assert.That(error.Kind, Is.EqualTo(LmcStatus.Timeout));
            Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromMilliseconds(1200)), "bounded by the 500 ms deadline, not 16 reads of 500 ms");
        }
    }

    private Socket ConnectRaw()
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Connect(new UnixDomainSocketEndPoint(_socketPath));
        return socket;
    }

    private static byte[] RequestHeader(uint extraKeyLength, uint tokenCount)
    {
        var header = new byte[16];
        "LMLQ"u8.CopyTo(header);
        BitConverter.TryWriteBytes(header.AsSpan(4), (ushort)1);
        BitConverter.TryWriteBytes(header.AsSpan(8), extraKeyLength);
        BitConverter.TryWriteBytes(header.AsSpan(12), tokenCount);
        return header;
    }

    [Test]
    public void HalfOpenAndIdleConnections_DoNotStarveRealLookups()
    {
        int[] stored = Tokens(16, 3);
        _engine.Store(stored, RandomSlots(new Random(2), _cache.NumSlots, 16), 0, default);
        Serve();
        var hostile = new List<Socket>();
        try
        {
            // 200 peers: idle ones, and ones that sent half a header or a header and part of the body.
            for (int i = 0; i < 200; i++)
            {
                var socket = ConnectRaw();
                if (i % 3 == 1) socket.Send(RequestHeader(0, 100).AsSpan(0, 8));
                if (i % 3 == 2) socket.Send(RequestHeader(0, 100).Concat(new byte[40]).ToArray());
                hostile.Add(socket);
            }
            var watch = Stopwatch.StartNew();
            Parallel.For(0, 32, _ => Assert.That(LookupClient.Lookup(_socketPath, stored, [], TimeSpan.FromSeconds(2)), Is.EqualTo(16)));
            Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(4)));

            // Within the request deadline (2 s) and a poll, every hostile connection is closed.
            Thread.Sleep(LookupServer.RequestDeadline + TimeSpan.FromMilliseconds(500));
            foreach (var socket in hostile)
            {
                socket.ReceiveTimeout = 1000;
                int received;
                try { received = socket.Receive(new byte[16]); }
                catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset) { received = 0; }
                Assert.That(received, Is.EqualTo(0), "closed by the server");
            }
        }
        finally
        {
            foreach (var socket in hostile) socket.Dispose();
        }
    }

    [Test]
    public void ADripFeedingPeer_IsCutOffAtTheRequestDeadline()
    {
        Serve();
        using var drip = ConnectRaw();
        var request = RequestHeader(0, 4).Concat(new byte[16]).ToArray();
        var watch = Stopwatch.StartNew();
        int sent = 0;
        try
        {
            for (; sent < request.Length - 1 && watch.Elapsed < TimeSpan.FromSeconds(6); sent++)
            {
                drip.Send(request, sent, 1, SocketFlags.None);
                Thread.Sleep(200);
            }
        }
        catch (SocketException)
        {
            // the server closed the connection: what the test waits for
        }
        drip.ReceiveTimeout = 3000;
        int received;
        try { received = drip.Receive(new byte[16]); }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.ConnectionReset or SocketError.Shutdown) { received = 0; }
        Assert.That(received, Is.EqualTo(0));
        Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(5)), $"cut off after {sent} bytes");
    }

    [Test]
    public void AnnouncedBodies_AreNotAllocated_AndOversizedRequestsAreRefused()
    {
        Serve();
        // Larger than the wire allows: dropped at the header.
        using (var huge = ConnectRaw())
        {
            huge.Send(RequestHeader(0, (uint)LookupWire.MaxTokens + 1));
            huge.ReceiveTimeout = 2000;
            Assert.That(huge.Receive(new byte[16]), Is.EqualTo(0));
        }
        // 24 peers announcing the largest allowed body and sending none of it cost no memory.
        long before = GC.GetTotalAllocatedBytes(precise: true);
        var announced = Enumerable.Range(0, 24).Select(_ =>
        {
            var socket = ConnectRaw();
            socket.Send(RequestHeader((uint)LookupWire.MaxExtraKeyBytes, (uint)LookupWire.MaxTokens));
            return socket;
        }).ToList();
        Thread.Sleep(300);
        long allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        foreach (var socket in announced) socket.Dispose();
        Assert.That(allocated, Is.LessThan(8L << 20), $"24 announced bodies of {LookupWire.MaxExtraKeyBytes + 4L * LookupWire.MaxTokens} bytes");
        Assert.That(LookupClient.Lookup(_socketPath, Tokens(8, 1), [], TimeSpan.FromSeconds(2)), Is.EqualTo(0));
    }

    [Test]
    public void AFloodOfConnections_IsCapped_AndTheNewestAreServed()
    {
        Serve();
        var idle = Enumerable.Range(0, LookupServer.MaxConnections * 3).Select(_ => ConnectRaw()).ToList();
        try
        {
            Assert.That(LookupClient.Lookup(_socketPath, Tokens(8, 1), [], TimeSpan.FromSeconds(2)), Is.EqualTo(0));
            Thread.Sleep(200);
            int open = idle.Count(s => !(s.Poll(0, SelectMode.SelectRead) && s.Available == 0));
            Assert.That(open, Is.LessThanOrEqualTo(LookupServer.MaxConnections), "connections the server still holds");
        }
        finally
        {
            foreach (var socket in idle) socket.Dispose();
        }
    }

    [Test]
    public void HeldConnections_DoNotDelayTheEnginesJobs()
    {
        // 64 idle and 64 half-open connections once held one thread-pool thread each, and the same
        // process's prefetch jobs (thread-pool work) timed out behind them.
        int[] stored = Tokens(16, 4);
        _engine.Store(stored, RandomSlots(new Random(3), _cache.NumSlots, 16), 0, default);
        Serve();
        var held = Enumerable.Range(0, 128).Select(i =>
        {
            var socket = ConnectRaw();
            if (i % 2 == 1) socket.Send(RequestHeader(0, 1000).AsSpan(0, 10));
            return socket;
        }).ToList();
        try
        {
            Thread.Sleep(200);
            var watch = Stopwatch.StartNew();
            var jobs = Enumerable.Range(0, 16).Select(_ => Task.Run(() => _engine.Prefetch(stored, default).TokensMatched)).ToArray();
            Assert.That(Task.WaitAll(jobs, TimeSpan.FromSeconds(3)), Is.True, "prefetch jobs finish while peers hold connections");
            Assert.That(jobs.Select(j => j.Result), Is.All.EqualTo(16));
            Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)));
        }
        finally
        {
            foreach (var socket in held) socket.Dispose();
        }
    }

    /// <summary>Runs a Python snippet as user nobody (65534); null when this process cannot (not root, no setpriv).</summary>
    private static Process? RunAsNobody(string python)
    {
        if (Environment.UserName != "root" || !File.Exists("/usr/bin/setpriv") || !File.Exists("/usr/bin/python3")) return null;
        var start = new ProcessStartInfo("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", python])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        return Process.Start(start);
    }

    [Test]
    public void APeerOfAnotherUser_IsNotServed()
    {
        Serve();
        File.SetUnixFileMode(_socketPath, (UnixFileMode)0x1B6); // 0666: let the other user reach the check itself
        using var client = RunAsNobody($$"""
            import socket, struct
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(3)
            s.connect("{{_socketPath}}")
            try:
                s.sendall(b"LMLQ" + struct.pack("<HHII", 1, 0, 0, 1) + struct.pack("<i", 7))
                print(len(s.recv(16)))
            except OSError as e:
                print(type(e).__name__)
            """);
        if (client is null) Assert.Ignore("needs root and setpriv to run a peer as another user");
        Assert.That(client.WaitForExit(10_000), Is.True);
        string output = client.StandardOutput.ReadToEnd().Trim();
        Assert.That(output, Is.AnyOf("0", "ConnectionResetError", "BrokenPipeError"), () => client.StandardError.ReadToEnd());
        Assert.That(LookupClient.Lookup(_socketPath, Tokens(8, 1), [], TimeSpan.FromSeconds(2)), Is.EqualTo(0), "this user is still served");
    }

    [Test]
    public void AServerOfAnotherUser_IsNotAsked()
    {
        string directory = Path.Combine(Path.GetTempPath(), "lmcn-other-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(directory);
        File.SetUnixFileMode(directory, (UnixFileMode)0x1FF); // 0777: the other user creates its socket here
        string path = Path.Combine(directory, "squatter.sock");
        try
        {
            using var squatter = RunAsNobody($$"""
                import os, socket, struct
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind("{{path}}")
                os.chmod("{{path}}", 0o666)
                s.listen(1)
                print("ready", flush=True)
                s.settimeout(10)
                c, _ = s.accept()
                c.sendall(b"LMLR" + struct.pack("<iq", 0, 3))
                """);
            if (squatter is null) Assert.Ignore("needs root and setpriv to run a peer as another user");
            Assert.That(squatter.StandardOutput.ReadLine(), Is.EqualTo("ready"), () => squatter.StandardError.ReadToEnd());
            var error = Assert.Throws<LmcException>(() => LookupClient.Lookup(path, Tokens(8, 1), [], TimeSpan.FromSeconds(2)))!;
            Assert.That(error.Kind, Is.EqualTo(LmcStatus.Io));
            Assert.That(error.Message, Does.Contain("65534"));
            squatter.Kill();
        }
        finally
        {
            Directory.Delete(directory, recursive: true);
        }
    }

    [Test]
    public void BadSocketPaths_AreInvalidArguments()
    {
        foreach (var path in new[] { "", new string('x', 200) })
            Assert.That(Assert.Throws<LmcException>(() => LookupClient.Lookup(path, Tokens(8, 1), [], TimeSpan.FromSeconds(1)))!.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
    }
}
