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

    [TearDown]
    public void TearDown()
    {
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
        _engine.StartLookupServer(_socketPath);

        foreach (var (tokens, key) in new[] { (stored, salt), (stored[..20], salt), (stored.Concat(Tokens(5, 2)).ToArray(), salt), (stored, Array.Empty<byte>()) })
            Assert.That(LookupClient.Lookup(_socketPath, tokens, key, TimeSpan.FromSeconds(5)), Is.EqualTo(_engine.Lookup(tokens, key)));
        Assert.That(LookupClient.Lookup(_socketPath, stored, salt, TimeSpan.FromSeconds(5)), Is.EqualTo(29));
        Assert.That(LookupClient.Lookup(_socketPath, [], [], TimeSpan.FromSeconds(5)), Is.EqualTo(0));

        // Many clients at once.
        Parallel.For(0, 64, _ => Assert.That(LookupClient.Lookup(_socketPath, stored, salt, TimeSpan.FromSeconds(5)), Is.EqualTo(29)));
    }

    [Test]
    public void NoServer_IsAnIoError_AndAStoppedServerRemovesItsSocket()
    {
        _engine.StartLookupServer(_socketPath);
        Assert.That(Assert.Throws<LmcException>(() => _engine.StartLookupServer(_socketPath + "2"))!.Message, Does.Contain("already serves"));
        _engine.StopLookupServer();
        _engine.StopLookupServer();
        Assert.That(File.Exists(_socketPath), Is.False);
        var error = Assert.Throws<LmcException>(() => LookupClient.Lookup(_socketPath, Tokens(8, 1), [], TimeSpan.FromSeconds(1)))!;
        Assert.That(error.Kind, Is.EqualTo(LmcErrorKind.Io));
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
        Assert.That(error.Kind, Is.EqualTo(LmcErrorKind.Timeout));
        Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)));
        Assert.That(Assert.Throws<LmcException>(() => _engine.StartLookupServer(_socketPath))!.Message, Does.Contain("in use"));
    }

    [Test]
    public void GarbageFromOnePeer_DropsOnlyThatConnection()
    {
        _engine.Store(Tokens(16, 3), RandomSlots(new Random(2), _cache.NumSlots, 16), 0, default);
        _engine.StartLookupServer(_socketPath);
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
    public void AStaleSocketFile_IsReplaced()
    {
        File.WriteAllText(_socketPath, "left by a dead process");
        _engine.StartLookupServer(_socketPath);
        Assert.That(LookupClient.Lookup(_socketPath, Tokens(8, 9), [], TimeSpan.FromSeconds(5)), Is.EqualTo(0));
    }
}
