using System.Net;
using LMCacheNative.Core;
using LMCacheNative.Core.Config;
using NUnit.Framework;

namespace LMCacheNative.Redis.Tests;

/// <summary>The remote_url grammar and the remote keys of extra_config (no server needed).</summary>
public class RedisEndpointTests
{
    private static RedisEndpoint Parse(string url, string extra = "{}", double timeout = 2) =>
        RedisEndpoint.Parse(url, new EngineConfig { BlockingTimeoutSecs = timeout, ExtraConfigJson = extra });

    private static string[] Nodes(RedisEndpoint e) => e.Options.EndPoints.Select(p => p switch
    {
        DnsEndPoint d => $"{d.Host}:{d.Port}",
        _ => p.ToString()!,
    }).ToArray();

    [Test]
    public void ASingleServer_WithUserPasswordAndDatabase()
    {
        var e = Parse("redis://lmc:p%40ss@cache.example:7000/3");
        Assert.That(Nodes(e), Is.EqualTo(new[] { "cache.example:7000" }));
        Assert.That((e.Options.User, e.Options.Password, e.Database, e.Options.Ssl), Is.EqualTo(("lmc", "p@ss", 3, false)));
        Assert.That(e.Topology, Is.EqualTo(RedisTopology.Standalone));
        Assert.That(e.Options.SyncTimeout, Is.EqualTo(2000));
        Assert.That(e.Connections, Is.EqualTo(RedisEndpoint.DefaultConnections));
    }

    [Test]
    public void SeedLists_DefaultPorts_IPv6_AndThePasswordOnlyForm()
    {
        var e = Parse("redis://secret@10.0.0.1:7001,10.0.0.2,[::1]:7003/0");
        Assert.That(Nodes(e), Is.EqualTo(new[] { "10.0.0.1:7001", "10.0.0.2:6379", "[::1]:7003" }));
        Assert.That((e.Options.User, e.Options.Password), Is.EqualTo(((string?)null, "secret")));
    }

    [TestCase("rediss://h:1", true)]
    [TestCase("valkeys://h:1", true)]
    [TestCase("valkey://h:1", false)]
    [TestCase("REDIS://h:1", false)]
    public void TlsFollowsTheScheme(string url, bool tls) => Assert.That(Parse(url).Options.Ssl, Is.EqualTo(tls));

    [Test]
    public void ClusterMode_FromValkeyModeOrTheClusterScheme_OnlyWithDatabaseZero()
    {
        Assert.That(Parse("valkey://a:1,b:2", """{"valkey_mode": "cluster"}""").Topology, Is.EqualTo(RedisTopology.Cluster));
        Assert.That(Parse("redis-cluster://a:1").Topology, Is.EqualTo(RedisTopology.Cluster));
        Assert.That(Parse("valkey://a:1", """{"valkey_mode": "standalone"}""").Topology, Is.EqualTo(RedisTopology.Standalone));
        Assert.That(Assert.Throws<LmcException>(() => Parse("redis://a:1/2", """{"valkey_mode": "cluster"}"""))!.Message, Does.Contain("database 0"));
        Assert.That(Assert.Throws<LmcException>(() => Parse("redis://a:1", """{"valkey_mode": "ring"}"""))!.Message, Does.Contain("valkey_mode"));
    }

    [Test]
    public void Sentinel_TakesTheServiceFromThePath_AndDefaultsToPort26379()
    {
        var e = Parse("redis-sentinel://:pw@s1,s2:5000/my-service");
        Assert.That(e.Topology, Is.EqualTo(RedisTopology.Sentinel));
        Assert.That(e.Options.ServiceName, Is.EqualTo("my-service"));
        Assert.That(Nodes(e), Is.EqualTo(new[] { "s1:26379", "s2:5000" }));
        Assert.That(e.Options.Password, Is.EqualTo("pw"));
        Assert.That(Parse("rediss-sentinel://s1/x").Options.Ssl, Is.True);
    }

    [Test]
    public void Sentinel_WithoutAService_UsesRedisServiceName_OrSaysWhatIsMissing()
    {
        string? saved = Environment.GetEnvironmentVariable("REDIS_SERVICE_NAME");
        try
        {
            Environment.SetEnvironmentVariable("REDIS_SERVICE_NAME", null);
            var error = Assert.Throws<LmcException>(() => Parse("redis-sentinel://s1:26379"))!;
            Assert.That(error.Message, Does.Contain("service"));
            Environment.SetEnvironmentVariable("REDIS_SERVICE_NAME", "from-env");
            Assert.That(Parse("redis-sentinel://s1:26379").Options.ServiceName, Is.EqualTo("from-env"));
        }
        finally
        {
            Environment.SetEnvironmentVariable("REDIS_SERVICE_NAME", saved);
        }
    }

    [Test]
    public void TtlAlias_PoolSize_AndTheirLimits()
    {
        Assert.That(Parse("redis://h", """{"valkey_ttl_sec": 30}""").Ttl, Is.EqualTo(TimeSpan.FromSeconds(30)));
        Assert.That(Parse("redis://h", """{"remote_ttl_secs": 1.5}""").Ttl, Is.EqualTo(TimeSpan.FromSeconds(1.5)));
        Assert.That(Parse("redis://h").Ttl, Is.Null);
        Assert.Throws<LmcException>(() => Parse("redis://h", """{"remote_ttl_secs": 5, "valkey_ttl_sec": 5}"""));
        Assert.Throws<LmcException>(() => Parse("redis://h", """{"valkey_ttl_sec": 0}"""));
        Assert.That(Parse("redis://h", """{"remote_connections": 1}""").Connections, Is.EqualTo(1));
        foreach (string bad in new[] { "0", "65", "2.5", "\"4\"" })
            Assert.That(Assert.Throws<LmcException>(() => Parse("redis://h", $$"""{"remote_connections": {{bad}}}"""))!.Message,
                Does.Contain("remote_connections"));
    }

    [Test]
    public void PingKeys_AreLMCaches_WithItsDefaults_AndTheTimeoutBoundedByBlockingTimeout()
    {
        var defaults = Parse("redis://h", timeout: 10);
        Assert.That((defaults.PingInterval, defaults.PingTimeout), Is.EqualTo((TimeSpan.FromSeconds(30), TimeSpan.FromSeconds(5))));
        var set = Parse("redis://h", """{"ping_interval": 0.25, "ping_timeout": 1.5}""", timeout: 10);
        Assert.That((set.PingInterval, set.PingTimeout), Is.EqualTo((TimeSpan.FromMilliseconds(250), TimeSpan.FromMilliseconds(1500))));
        Assert.That(Parse("redis://h", """{"ping_timeout": 4}""", timeout: 2).PingTimeout, Is.EqualTo(TimeSpan.FromSeconds(2)), "never above blocking_timeout_secs");
        foreach (string key in new[] { "ping_interval", "ping_timeout" })
        foreach (string bad in new[] { "0", "-1", "\"5\"", "86401" })
            Assert.That(Assert.Throws<LmcException>(() => Parse("redis://h", $$"""{"{{key}}": {{bad}}}"""))!.Message, Does.Contain(key));
    }

    [Test]
    public void TheCaFile_NeedsTlsAndAnExistingCertificate()
    {
        Assert.That(Assert.Throws<LmcException>(() => Parse("redis://h", """{"remote_tls_ca_file": "/etc/hostname"}"""))!.Message, Does.Contain("TLS"));
        Assert.That(Assert.Throws<LmcException>(() => Parse("rediss://h", """{"remote_tls_ca_file": "/nonexistent/ca.pem"}"""))!.Message, Does.Contain("no file"));
        string notACertificate = Path.GetTempFileName();
        try
        {
            File.WriteAllText(notACertificate, "not a certificate");
            Assert.That(Assert.Throws<LmcException>(() => Parse("rediss://h", $$"""{"remote_tls_ca_file": "{{notACertificate}}"}"""))!.Message,
                Does.Contain("not a certificate"));
        }
        finally
        {
            File.Delete(notACertificate);
        }
    }

    [TestCase("redis://")]
    [TestCase("redis://h:99999")]
    [TestCase("redis://h:port")]
    [TestCase("redis://a:1,,b:2")]
    [TestCase("redis://h:1/db")]
    [TestCase("redis://h:1/0?ssl=true")]
    [TestCase("nothing")]
    public void BadUrls_AreRefused_WithThePasswordRedacted(string url)
    {
        var error = Assert.Throws<LmcException>(() => Parse(url.Replace("redis://", "redis://u:topsecret@")))!;
        Assert.That(error.Message, Does.Contain("remote_url"));
        Assert.That(error.Message, Does.Not.Contain("topsecret"));
    }

    [Test]
    public void OtherSchemes_AreNotServed()
    {
        Assert.That(RedisEndpoint.Serves("lm://h:1"), Is.False);
        Assert.That(RedisEndpoint.Serves("unix:///tmp/redis.sock"), Is.False);
        foreach (string scheme in RedisEndpoint.Schemes) Assert.That(RedisEndpoint.Serves(scheme + "://h"), Is.True);
    }
}
