using System.Reflection;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using LMCacheNative.Core;
using LMCacheNative.Exports;
using NUnit.Framework;

namespace LMCacheNative.Exports.Tests;

/// <summary>
/// Pins the C# side of the ABI to include/lmcache_native.h: struct mirrors have the header's sizes
/// and offsets, status values and the engine's error kinds equal the header's #defines, and every
/// [UnmanagedCallersOnly] entry point is declared in the header with the same number of parameters.
/// </summary>
public class AbiTests
{
    private static readonly string Header = File.ReadAllText(Path.Combine(RepoRoot(), "include", "lmcache_native.h"));

    private static string RepoRoot()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "LMCacheNative.sln"))) return dir.FullName;
        throw new InvalidOperationException("repository root not found");
    }

    private static Dictionary<string, long> HeaderDefines() =>
        Regex.Matches(Header, @"#define\s+(LMC_\w+)\s+\(?(-?\d+)\)?")
            .ToDictionary(m => m.Groups[1].Value, m => long.Parse(m.Groups[2].Value));

    [Test]
    public void StructMirrors_HaveTheHeadersLayout()
    {
        Assert.That(Marshal.SizeOf<NativeKvLayerDesc>(), Is.EqualTo(NativeKvLayerDesc.SizeV1).And.EqualTo(88));
        Assert.That(Marshal.OffsetOf<NativeKvLayerDesc>(nameof(NativeKvLayerDesc.BaseAddress)), Is.EqualTo((nint)40));
        Assert.That(Marshal.OffsetOf<NativeKvLayerDesc>(nameof(NativeKvLayerDesc.HeadStride)), Is.EqualTo((nint)80));
        Assert.That(Marshal.SizeOf<NativeStats>(), Is.EqualTo(NativeStats.SizeV1).And.EqualTo(128));
        Assert.That(Marshal.SizeOf<NativeTierStats>(), Is.EqualTo(NativeTierStats.SizeV1).And.EqualTo(136));
        Assert.That(Marshal.OffsetOf<NativeTierStats>(nameof(NativeTierStats.Hits)), Is.EqualTo((nint)40));
        Assert.That(Marshal.OffsetOf<NativeTierStats>(nameof(NativeTierStats.CapacityBytes)), Is.EqualTo((nint)128));
        Assert.That(Marshal.OffsetOf<NativeStats>(nameof(NativeStats.PoolCapacityBytes)), Is.EqualTo((nint)120));
        Assert.That(Marshal.SizeOf<NativeRequest>(), Is.EqualTo(NativeRequest.SizeV1).And.EqualTo(88));
        Assert.That(Marshal.OffsetOf<NativeRequest>(nameof(NativeRequest.FirstToken)), Is.EqualTo((nint)40));
        Assert.That(Marshal.OffsetOf<NativeRequest>(nameof(NativeRequest.TableBlockSize)), Is.EqualTo((nint)72));
        Assert.That(Marshal.OffsetOf<NativeRequest>(nameof(NativeRequest.Stream)), Is.EqualTo((nint)80));
        Assert.That(Marshal.SizeOf<NativeTransferResult>(), Is.EqualTo(NativeTransferResult.SizeV1).And.EqualTo(80));
        Assert.That(Marshal.OffsetOf<NativeTransferResult>(nameof(NativeTransferResult.ElapsedNs)), Is.EqualTo((nint)72));
        Assert.That(Marshal.SizeOf<NativeLookupResult>(), Is.EqualTo(NativeLookupResult.SizeV1).And.EqualTo(56));
        Assert.That(Marshal.OffsetOf<NativeLookupResult>(nameof(NativeLookupResult.ElapsedNs)), Is.EqualTo((nint)48));
        Assert.That(Marshal.SizeOf<NativeKvEvent>(), Is.EqualTo(NativeKvEvent.SizeV1).And.EqualTo(104));
        Assert.That(Marshal.OffsetOf<NativeKvEvent>(nameof(NativeKvEvent.ParentHashLen)), Is.EqualTo((nint)80));
        Assert.That(Marshal.OffsetOf<NativeKvEvent>(nameof(NativeKvEvent.TokenIdsCount)), Is.EqualTo((nint)96));
    }

    [Test]
    public void KvEventKindsAndMedia_EqualTheHeader()
    {
        var defines = HeaderDefines();
        Assert.That(defines["LMC_KV_EVENT_BLOCK_STORED"], Is.EqualTo((int)LMCacheNative.Core.Storage.KvEventKind.BlockStored));
        Assert.That(defines["LMC_KV_EVENT_BLOCK_REMOVED"], Is.EqualTo((int)LMCacheNative.Core.Storage.KvEventKind.BlockRemoved));
        Assert.That(defines["LMC_KV_EVENT_ALL_BLOCKS_CLEARED"], Is.EqualTo((int)LMCacheNative.Core.Storage.KvEventKind.AllBlocksCleared));
        Assert.That(defines["LMC_KV_MEDIUM_CPU"], Is.EqualTo((int)LMCacheNative.Core.Storage.KvEventMedium.Cpu));
        Assert.That(defines["LMC_KV_MEDIUM_DISK"], Is.EqualTo((int)LMCacheNative.Core.Storage.KvEventMedium.Disk));
        Assert.That(defines["LMC_KV_MEDIUM_REMOTE"], Is.EqualTo((int)LMCacheNative.Core.Storage.KvEventMedium.Remote));
        Assert.That(defines["LMC_KV_HASH_MAX_BYTES"], Is.EqualTo(LMCacheNative.Core.Keys.ChunkKey.MaxBytes));
    }

    [Test]
    public void StructFields_FollowTheHeadersFieldOrder()
    {
        foreach (var (cName, type) in new[]
                 {
                     ("lmc_kv_layer_desc", typeof(NativeKvLayerDesc)), ("lmc_stats", typeof(NativeStats)), ("lmc_tier_stats", typeof(NativeTierStats)),
                     ("lmc_request", typeof(NativeRequest)), ("lmc_transfer_result", typeof(NativeTransferResult)), ("lmc_lookup_result", typeof(NativeLookupResult)),
                     ("lmc_kv_event", typeof(NativeKvEvent)),
                 })
        {
            var body = Regex.Match(Header, @"typedef struct " + cName + @" \{(.*?)\} " + cName + ";", RegexOptions.Singleline).Groups[1].Value;
            var headerFields = Regex.Matches(body, @"^\s*(?:const\s+)?\w+\s*\*?\s*(\w+)(\[\w+\])?;", RegexOptions.Multiline).Select(m => m.Groups[1].Value.Replace("_", "")).ToList();
            var csFields = type.GetFields(BindingFlags.Public | BindingFlags.Instance).Select(f => f.Name.ToLowerInvariant()).ToList();
            Assert.That(csFields, Is.EqualTo(headerFields), cName);
        }
    }

    [Test]
    public void StatusValues_AndNames_EqualTheHeader()
    {
        var defines = HeaderDefines();
        var statuses = Enum.GetValues<LmcStatus>();
        foreach (var status in statuses)
            Assert.That(defines[StatusNames.HeaderName(status)], Is.EqualTo((int)status), status.ToString());
        Assert.That(defines.Keys.Count(k => k.StartsWith("LMC_E_") || k == "LMC_OK"), Is.EqualTo(statuses.Length));
        // 0, -1, -2, … without gaps: bindings enumerate the names until LMC_E_UNKNOWN.
        Assert.That(statuses.Select(s => -(int)s).Order(), Is.EqualTo(Enumerable.Range(0, statuses.Length)));
    }

    [Test]
    public void EveryExport_IsDeclaredInTheHeader_WithTheSameArity()
    {
        var declared = Regex.Matches(Header, @"LMC_API\s+[\w\s\*]+?\b(lmc_\w+)\s*\(([^)]*)\)", RegexOptions.Singleline)
            .ToDictionary(m => m.Groups[1].Value, m => m.Groups[2].Value.Trim() == "void" ? 0 : m.Groups[2].Value.Split(',').Length);
        var exported = typeof(Exports).Assembly.GetTypes()
            .SelectMany(t => t.GetMethods(BindingFlags.Static | BindingFlags.Public | BindingFlags.NonPublic))
            .Select(m => (Method: m, Attribute: m.GetCustomAttribute<UnmanagedCallersOnlyAttribute>()))
            .Where(x => x.Attribute is not null)
            .ToDictionary(x => x.Attribute!.EntryPoint!, x => x.Method.GetParameters().Length);
        Assert.That(exported.Keys.Order(), Is.EqualTo(declared.Keys.Order()));
        foreach (var (name, arity) in exported) Assert.That(arity, Is.EqualTo(declared[name]), name);
    }

    [Test]
    public void AbiAndLibraryVersions_EqualTheHeader()
    {
        var defines = HeaderDefines();
        Assert.That(Exports.AbiVersion, Is.EqualTo(defines["LMC_ABI_VERSION"]));
        Assert.That((Exports.VersionMajor, Exports.VersionMinor, Exports.VersionPatch),
            Is.EqualTo(((int)defines["LMC_VERSION_MAJOR"], (int)defines["LMC_VERSION_MINOR"], (int)defines["LMC_VERSION_PATCH"])));
        Assert.That(Exports.VersionText, Is.EqualTo($"{Exports.VersionMajor}.{Exports.VersionMinor}.{Exports.VersionPatch}"));
    }
}
