using System.Globalization;
using System.Text.RegularExpressions;
using LMCacheNative.Core.Config;
using LMCacheNative.Core.Engine;
using LMCacheNative.Core.Storage;
using LMCacheNative.Core.Tests;
using NUnit.Framework;

namespace LMCacheNative.Redis.Tests;

/// <summary>
/// The remote tier's background health pings (LMCache's remote_ping_* metrics) against a real
/// redis-server that answers, then is stopped, then comes back; and the per-node metrics.
/// </summary>
public class RedisPingTests
{
    private RedisServer _server = null!;
    private TestModelCache _source = null!;

    [SetUp]
    public void SetUp()
    {
        if (RedisServer.FindBinary() is null) Assert.Ignore("redis-server is not installed; ./build.sh installs it");
        _server = new RedisServer();
        _source = new TestModelCache(TestLayout.FlashHnd, 2, 32, 4, 2, 8, 2);
    }

    [TearDown]
    public void TearDown()
    {
        _source?.Dispose();
        _server?.Dispose();
    }

    /// <summary>An engine on the test server that pings every 100 ms, each ping bounded by 1 s.</summary>
    private CacheEngine PingingEngine()
    {
        var engine = new CacheEngine(EngineConfig.Parse(
                $"{{\"chunk_size\": 8, \"max_local_cpu_size\": 0.01, \"remote_url\": \"{_server.Url}\", \"blocking_timeout_secs\": 1, " +
                "\"extra_config\": {\"ping_interval\": 0.1, \"ping_timeout\": 1}}"),
            "ping-model", 1, 0, remoteTierFactory: RedisTier.TryCreate);
        engine.RegisterLayers(_source.Describe());
        return engine;
    }

    private static StorageTierStats Remote(CacheEngine engine) => engine.GetTierStats().Single(t => t.Name == "RemoteBackend").Counters;

    private static void WaitUntil(Func<bool> condition, TimeSpan timeout, string what)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (!condition())
        {
            if (DateTime.UtcNow > deadline) Assert.Fail($"not met in {timeout.TotalSeconds} s: {what}");
            Thread.Sleep(50);
        }
    }

    /// <summary>The value of the one sample of <paramref name="family"/> whose labels contain <paramref name="labels"/> (exposition text).</summary>
    private static double Sample(string exposition, string family, string labels = "")
    {
        var matches = Regex.Matches(exposition, "^" + Regex.Escape(family) + @"\{([^\n]*)\} (\S+)$", RegexOptions.Multiline)
            .Where(m => m.Groups[1].Value.Contains(labels, StringComparison.Ordinal)).ToArray();
        Assert.That(matches, Has.Length.EqualTo(1), $"one sample of {family} with {labels}");
        return double.Parse(matches[0].Groups[2].Value, CultureInfo.InvariantCulture);
    }

    [Test]
    public void PingsSucceed_AgainstALiveServer_FailWhenItStops_AndSucceedAgainWhenItIsBack()
    {
        using var engine = PingingEngine();
        WaitUntil(() => Remote(engine).PingSuccesses >= 3, TimeSpan.FromSeconds(10), "three successful pings");
        var live = Remote(engine);
        Assert.That((live.PingErrors, live.LastPingErrorCode), Is.EqualTo((0L, 0)));
        Assert.That(live.LastPingLatencyMs, Is.GreaterThan(0).And.LessThan(1000));
        string metrics = engine.GetPrometheusMetrics();
        Assert.That(Sample(metrics, "lmcache:remote_ping_successes_total"), Is.GreaterThanOrEqualTo(3));
        Assert.That(Sample(metrics, "lmcache:remote_ping_errors_total"), Is.EqualTo(0));
        Assert.That(Sample(metrics, "lmcache:remote_ping_error_code"), Is.EqualTo(0));
        Assert.That(Sample(metrics, "lmcache:remote_ping_latency"), Is.GreaterThan(0));
        Assert.That(Sample(metrics, "lmcache:lmcache_is_healthy"), Is.EqualTo(1));

        _server.Stop();
        WaitUntil(() => Remote(engine).PingErrors >= 2, TimeSpan.FromSeconds(10), "two failed pings");
        var down = Remote(engine);
        Assert.That(down.LastPingErrorCode, Is.AnyOf(RedisTier.PingTimeoutErrorCode, RedisTier.PingGenericErrorCode));
        metrics = engine.GetPrometheusMetrics();
        Assert.That(Sample(metrics, "lmcache:remote_ping_errors_total"), Is.GreaterThanOrEqualTo(2));
        Assert.That(Sample(metrics, "lmcache:remote_ping_error_code"), Is.AnyOf(-1.0, -2.0));
        Assert.That(Sample(metrics, "lmcache:lmcache_is_healthy"), Is.EqualTo(0), "a failing ping makes the engine unhealthy");
        // Pings ran in the background: no request failed, so the tier's operation errors did not move.
        Assert.That(down.Errors, Is.EqualTo(live.Errors));

        _server.Start();
        long successesBefore = Remote(engine).PingSuccesses;
        WaitUntil(() => Remote(engine) is { LastPingErrorCode: 0 } s && s.PingSuccesses > successesBefore, TimeSpan.FromSeconds(20),
            "pings succeed again after the restart");
        metrics = engine.GetPrometheusMetrics();
        Assert.That(Sample(metrics, "lmcache:remote_ping_error_code"), Is.EqualTo(0));
        Assert.That(Sample(metrics, "lmcache:lmcache_is_healthy"), Is.EqualTo(0), "still inside the window after the last failure");
    }

    [Test]
    public void PingsStop_WhenTheEngineIsDisposed()
    {
        var engine = PingingEngine();
        WaitUntil(() => Remote(engine).PingSuccesses >= 1, TimeSpan.FromSeconds(10), "a ping");
        engine.Dispose();
        // The server sees no more PINGs from this client: count its commands over half a second.
        long Pings() => long.Parse(Regex.Match(RedisCli("INFO commandstats"), @"cmdstat_ping:calls=(\d+)").Groups[1].Value is { Length: > 0 } v ? v : "0",
            CultureInfo.InvariantCulture);
        long before = Pings();
        Thread.Sleep(500);
        Assert.That(before, Is.GreaterThanOrEqualTo(1), "the server counted the pings");
        Assert.That(Pings(), Is.EqualTo(before), "no ping after Dispose");
    }

    private string RedisCli(string command)
    {
        var cli = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo("redis-cli", $"-p {_server.Port} {command}")
        {
            RedirectStandardOutput = true,
        })!;
        string output = cli.StandardOutput.ReadToEnd();
        cli.WaitForExit();
        return output;
    }

    [Test]
    public void NodeMetrics_AreTheTiersNodeStats_LabelledByNodeAndRole()
    {
        using var engine = PingingEngine();
        WaitUntil(() => Remote(engine).PingSuccesses >= 1, TimeSpan.FromSeconds(10), "a ping");
        int[] tokens = EngineTransferTests.Tokens(16, 7);
        long[] slots = EngineTransferTests.RandomSlots(new Random(3), _source.NumSlots, 16);
        engine.Store(tokens, slots, 0, default);
        Assert.That(engine.Flush(TimeSpan.FromSeconds(10)), Is.True);
        engine.Clear();
        Assert.That(engine.Retrieve(tokens, slots, 0, default).TokensMatched, Is.EqualTo(16));

        string metrics = engine.GetPrometheusMetrics();
        var node = Remote(engine).Nodes.Single(n => n.Endpoint == $"127.0.0.1:{_server.Port}");
        string labels = $"backend=\"RemoteBackend\",node=\"{node.Endpoint}\",node_role=\"master\"";
        Assert.That(node.BytesWritten, Is.GreaterThan(0));
        Assert.That(Sample(metrics, "lmcache:remote_node_written_bytes_total", labels), Is.EqualTo(node.BytesWritten));
        Assert.That(Sample(metrics, "lmcache:remote_node_read_bytes_total", labels), Is.EqualTo(node.BytesRead).And.EqualTo(node.BytesWritten));
        Assert.That(Sample(metrics, "lmcache:remote_node_errors_total", labels), Is.EqualTo(node.Errors));
        Assert.That(Sample(metrics, "lmcache:remote_node_reconnects_total", labels), Is.EqualTo(node.Reconnects));
        Assert.That(Sample(metrics, "lmcache:remote_node_redirects_total", labels), Is.EqualTo(0));
        Assert.That(Sample(metrics, "lmcache:remote_node_connected", labels), Is.EqualTo(1));
    }
}
