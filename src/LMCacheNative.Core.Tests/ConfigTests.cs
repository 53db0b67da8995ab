using LMCacheNative.Core.Config;
using NUnit.Framework;

namespace LMCacheNative.Core.Tests;

public class ConfigTests
{
    [TestCase(null)]
    [TestCase("")]
    [TestCase("{}")]
    [TestCase("  { }  ")]
    public void Defaults_AreLMCaches(string? json)
    {
        var c = EngineConfig.Parse(json);
        Assert.That(c.ChunkSize, Is.EqualTo(256));
        Assert.That(c.LocalCpu, Is.True);
        Assert.That(c.MaxLocalCpuSize, Is.EqualTo(5.0));
        Assert.That(c.MaxLocalCpuBytes, Is.EqualTo(5L << 30));
        Assert.That(c.SaveUnfullChunk, Is.False);
        Assert.That(c.HashAlgorithm, Is.EqualTo(ChunkHashAlgorithm.Sha256));
        Assert.That(c.BlockingTimeoutSecs, Is.EqualTo(10));
    }

    [Test]
    public void KnownKeys_AreApplied()
    {
        var c = EngineConfig.Parse("""
            {"chunk_size": 64, "local_cpu": true, "max_local_cpu_size": 0.5, "save_unfull_chunk": true,
             "pre_caching_hash_algorithm": "xxh3_128", "cache_policy": "lru", "local_disk": null, "remote_url": null,
             "use_layerwise": false, "extra_config": {"anything": [1, 2]}}
            """);
        Assert.That((c.ChunkSize, c.MaxLocalCpuBytes, c.SaveUnfullChunk, c.HashAlgorithm), Is.EqualTo((64, 1L << 29, true, ChunkHashAlgorithm.Xxh3_128)));
        Assert.That(c.CachePolicy, Is.EqualTo("LRU"));
        Assert.That(c.ExtraConfigJson, Does.Contain("anything"));
    }

    [TestCase("builtin")]
    [TestCase("sha256_cbor")]
    public void LMCacheHashNames_MapToSeedFreeSha256(string name) =>
        Assert.That(EngineConfig.Parse($"{{\"pre_caching_hash_algorithm\": \"{name}\"}}").HashAlgorithm, Is.EqualTo(ChunkHashAlgorithm.Sha256));

    [TestCase("{\"chunk_sise\": 256}", "chunk_sise")]
    [TestCase("{\"chunk_size\": 0}", "chunk_size")]
    [TestCase("{\"chunk_size\": 2.5}", "chunk_size")]
    [TestCase("{\"chunk_size\": \"256\"}", "chunk_size")]
    [TestCase("{\"max_local_cpu_size\": -1}", "max_local_cpu_size")]
    [TestCase("{\"local_cpu\": 1}", "local_cpu")]
    [TestCase("{\"pre_caching_hash_algorithm\": \"md5\"}", "pre_caching_hash_algorithm")]
    [TestCase("{\"cache_policy\": \"random\"}", "cache_policy")]
    [TestCase("{\"blocking_timeout_secs\": 0}", "blocking_timeout_secs")]
    [TestCase("{\"extra_config\": 5}", "extra_config")]
    [TestCase("{\"local_disk\": 5}", "local_disk")]
    [TestCase("{\"chunk_size\": 16, \"chunk_size\": 32}", "chunk_size")]
    public void InvalidKeysAndValues_AreRefused_NamingTheKey(string json, string key)
    {
        var error = Assert.Throws<LmcException>(() => EngineConfig.Parse(json))!;
        Assert.That(error.Kind, Is.EqualTo(LmcStatus.InvalidArgument));
        Assert.That(error.Message, Does.Contain($"\"{key}\""));
    }

    [TestCase("[1, 2]")]
    [TestCase("{\"chunk_size\": }")]
    [TestCase("chunk_size: 256")]
    public void NonObjects_AreRefused(string json) =>
        Assert.That(Assert.Throws<LmcException>(() => EngineConfig.Parse(json))!.Kind, Is.EqualTo(LmcStatus.InvalidArgument));

    [TestCase("{\"gds_path\": \"/mnt/gds\"}", "gds_path")]
    [TestCase("{\"use_layerwise\": true}", "use_layerwise")]
    [TestCase("{\"cache_policy\": \"LFU\"}", "cache_policy")]
    [TestCase("{\"remote_serde\": \"cachegen\"}", "remote_serde")]
    public void FeaturesNotInThisBuild_AreUnsupported_NamingTheKey(string json, string key)
    {
        var error = Assert.Throws<LmcException>(() => EngineConfig.Parse(json))!;
        Assert.That(error.Kind, Is.EqualTo(LmcStatus.Unsupported));
        Assert.That(error.Message, Does.Contain(key));
    }

    [Test]
    public void ResolvedJson_ParsesBackToTheSameConfig()
    {
        var c = EngineConfig.Parse("{\"chunk_size\": 16, \"max_local_cpu_size\": 0.25, \"pre_caching_hash_algorithm\": \"xxh3_128\", \"extra_config\": {\"k\": 1}}");
        var back = EngineConfig.Parse(c.ToJson());
        Assert.That(back with { ExtraConfigJson = "" }, Is.EqualTo(c with { ExtraConfigJson = "" }));
        Assert.That(back.ExtraConfigJson.Replace(" ", ""), Is.EqualTo("{\"k\":1}"));
    }

    [Test]
    public void TierKeys_AreKept()
    {
        var c = EngineConfig.Parse("{\"local_disk\": \"file:///tmp/lmc\", \"max_local_disk_size\": 2, \"remote_url\": \"redis://127.0.0.1:6379/1\", \"blocking_timeout_secs\": 0.5}");
        Assert.That((c.LocalDisk, c.MaxLocalDiskSize, c.RemoteUrl, c.BlockingTimeoutSecs), Is.EqualTo(("file:///tmp/lmc", 2.0, "redis://127.0.0.1:6379/1", 0.5)));
        Assert.That(Assert.Throws<LmcException>(() => EngineConfig.Parse("{\"local_disk\": \"\"}"))!.Message, Does.Contain("local_disk"));
    }

    [Test]
    public void LocalCpuFalse_GivesNoPool() =>
        Assert.That(EngineConfig.Parse("{\"local_cpu\": false}").MaxLocalCpuBytes, Is.EqualTo(0));

    [TestCase("redis://default:pw1@h:6379/0", "redis://default:***@h:6379/0")]
    [TestCase("redis://:pw1@h:6379", "redis://:***@h:6379")]
    [TestCase("rediss://pw1@h", "rediss://***@h")]
    [TestCase("redis-sentinel://u:pw1@h1:26379,h2:26379/mymaster", "redis-sentinel://u:***@h1:26379,h2:26379/mymaster")]
    [TestCase("redis://h:6379/0", "redis://h:6379/0")]
    [TestCase("see redis://a:pw1@h and valkey://b:pw1@k", "see redis://a:***@h and valkey://b:***@k")]
    public void Urls_LoseTheirPasswords_AndNothingElse(string text, string expected) =>
        Assert.That(Secrets.RedactUrls(text), Is.EqualTo(expected));

    [Test]
    public void ResolvedJson_RedactsTheUrlAndSecretNamedKeys_AtAnyDepth()
    {
        var c = EngineConfig.Parse("{\"remote_url\": \"redis://u:pw1@h:1/0\", \"extra_config\": {\"password\": \"pw1\", \"x\": [{\"api_key\": \"pw1\", \"n\": 3}], \"Auth\": 7}}");
        string json = c.ToJson();
        Assert.That(json, Does.Not.Contain("pw1"));
        Assert.That(c.RemoteUrl, Is.EqualTo("redis://u:pw1@h:1/0"), "the engine keeps the real value");
        using var parsed = System.Text.Json.JsonDocument.Parse(json);
        var extra = parsed.RootElement.GetProperty("extra_config");
        Assert.That(extra.GetProperty("x")[0].GetProperty("n").GetInt32(), Is.EqualTo(3));
        Assert.That(extra.GetProperty("Auth").GetString(), Is.EqualTo(Secrets.Mask));
    }

    [TestCase("redis_password", true)]
    [TestCase("authToken", true)]
    [TestCase("API-KEY", true)]
    [TestCase("secret", true)]
    [TestCase("min_retrieve_tokens", false)]
    [TestCase("author", false)]
    [TestCase("chunk_size", false)]
    public void SecretKeys_AreRecognisedByWholeWords(string key, bool secret) =>
        Assert.That(Secrets.IsSecretKey(key), Is.EqualTo(secret));

    [TestCase("{\"extra_config\": {\"k\": \"\\ud800\"}}")]
    [TestCase("{\"extra_config\": {\"\\udc00\": 1}}")]
    [TestCase("{\"\\ud800\": 1}")]
    [TestCase("{\"cache_policy\": \"\\ud800x\"}")]
    [TestCase("{\"extra_config\": {\"a\": [[[\"\\ud800\"]]]}}")]
    public void LoneSurrogates_AreInvalidArguments(string json) =>
        Assert.That(Assert.Throws<LmcException>(() => EngineConfig.Parse(json))!.Kind, Is.EqualTo(LmcStatus.InvalidArgument));

    /// <summary>Keys only the vLLM connector reads belong to the connector: the engine refuses them like any unknown key.</summary>
    [TestCase("save_decode_cache")]
    [TestCase("min_retrieve_tokens")]
    [TestCase("enable_async_loading")]
    [TestCase("lookup_timeout_ms")]
    [TestCase("priority_limit")]
    public void ConnectorKeys_AreNotTheEngines(string key) =>
        Assert.That(Assert.Throws<LmcException>(() => EngineConfig.Parse($"{{\"{key}\": null}}"))!.Message, Does.Contain("unknown key"));

    [Test]
    public void TheSchema_ListsEveryKeyOnce_WithDefaultsThatParseBack()
    {
        using var schema = System.Text.Json.JsonDocument.Parse(EngineConfig.SchemaJson);
        var keys = schema.RootElement.EnumerateArray().ToList();
        var names = keys.Select(k => k.GetProperty("name").GetString()!).ToList();
        Assert.That(names, Is.Unique);
        using var resolved = System.Text.Json.JsonDocument.Parse(new EngineConfig().ToJson());
        Assert.That(names, Is.EquivalentTo(resolved.RootElement.EnumerateObject().Select(p => p.Name)));
        // Every key's default, given back, is accepted and yields the default configuration.
        string defaults = "{" + string.Join(", ", keys.Select(k => $"\"{k.GetProperty("name").GetString()}\": {k.GetProperty("default").GetRawText()}")) + "}";
        Assert.That(EngineConfig.Parse(defaults).ToJson(), Is.EqualTo(new EngineConfig().ToJson()));
        var chunk = keys.Single(k => k.GetProperty("name").GetString() == "chunk_size");
        Assert.That((chunk.GetProperty("type").GetString(), chunk.GetProperty("default").GetInt32(), chunk.GetProperty("minimum").GetDouble()), Is.EqualTo(("integer", 256, 1.0)));
        // The advertised bounds are the enforced ones.
        foreach (var key in keys.Where(k => k.TryGetProperty("maximum", out _)))
        {
            string name = key.GetProperty("name").GetString()!;
            double max = key.GetProperty("maximum").GetDouble();
            Assert.That(() => EngineConfig.Parse($"{{\"{name}\": {max}}}"), Throws.Nothing, name);
            Assert.That(Assert.Throws<LmcException>(() => EngineConfig.Parse($"{{\"{name}\": {max * 2 + 1}}}"))!.Message, Does.Contain(name));
        }
    }
}
