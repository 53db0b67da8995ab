using System.Reflection;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using NUnit.Framework;

namespace LMCacheNative.Cuda.Tests;

/// <summary>
/// Pins the C# side of the kernel ABI to kernels/lmc_kernel_abi.h and kernels/kv_transfer.cuh: the
/// mirrored structs have the C layout (field order, offsets, sizes), the launch rules agree, the
/// kernel names are the table's, and the embedded fatbin is the committed one.
/// </summary>
public class KernelAbiTests
{
    private static readonly string AbiHeader = File.ReadAllText(Path.Combine(TestPaths.RepoRoot(), "kernels", "lmc_kernel_abi.h"));
    private static readonly string TransferHeader = File.ReadAllText(Path.Combine(TestPaths.RepoRoot(), "kernels", "kv_transfer.cuh"));

    /// <summary>(field name, offset, size) of a C struct of the header, laid out with natural alignment.</summary>
    private static List<(string Name, int Offset, int Size)> CLayout(string cName, out int size)
    {
        var body = Regex.Match(AbiHeader, @"typedef struct " + cName + @" \{(.*?)\} " + cName + ";", RegexOptions.Singleline).Groups[1].Value;
        Assert.That(body, Is.Not.Empty, cName);
        var fields = new List<(string, int, int)>();
        int offset = 0, align = 1;
        foreach (Match m in Regex.Matches(body, @"^\s*(?:const\s+)?(\w+)\s*(\*?)\s*(\w+);", RegexOptions.Multiline))
        {
            int bytes = m.Groups[2].Value == "*" ? 8 : m.Groups[1].Value switch
            {
                "uint64_t" or "int64_t" => 8,
                "int32_t" or "uint32_t" => 4,
                var t => throw new AssertionException($"{cName}: unexpected type {t}"),
            };
            offset = (offset + bytes - 1) / bytes * bytes;
            fields.Add((m.Groups[3].Value, offset, bytes));
            offset += bytes;
            align = Math.Max(align, bytes);
        }
        size = (offset + align - 1) / align * align;
        return fields;
    }

    [TestCase("lmc_k_layer", typeof(KLayer), KLayer.Size)]
    [TestCase("lmc_k_chunk", typeof(KChunk), KChunk.Size)]
    [TestCase("lmc_k_params", typeof(KParams), KParams.Size)]
    public void Mirror_HasTheHeadersLayout(string cName, Type mirror, int declaredSize)
    {
        var c = CLayout(cName, out int cSize);
        var cs = mirror.GetFields(BindingFlags.Public | BindingFlags.Instance);
        Assert.That(cSize, Is.EqualTo(declaredSize), $"sizeof({cName})");
        Assert.That(Marshal.SizeOf(mirror), Is.EqualTo(cSize), $"Marshal.SizeOf({mirror.Name})");
        Assert.That(cs.Select(f => f.Name.ToLowerInvariant()), Is.EqualTo(c.Select(f => f.Name.Replace("_", ""))), "field order");
        foreach (var (field, (name, offset, size)) in cs.Zip(c))
        {
            Assert.That((int)Marshal.OffsetOf(mirror, field.Name), Is.EqualTo(offset), $"{cName}.{name} offset");
            Assert.That(Marshal.SizeOf(field.FieldType), Is.EqualTo(size), $"{cName}.{name} size");
        }
    }

    [Test]
    public void KernelNames_AreTheTableOfKvTransferCuh()
    {
        var table = Regex.Matches(TransferHeader, @"F\((\d+),\s*(true|false),\s*(\w+)\)")
            .Select(m => (V: int.Parse(m.Groups[1].Value), Gather: m.Groups[2].Value == "true", Name: m.Groups[3].Value)).ToList();
        Assert.That(table, Has.Count.EqualTo(10));
        foreach (var (v, gather, name) in table) Assert.That(KernelAbi.KernelName(gather, v), Is.EqualTo(name));
        Assert.That(KernelAbi.AllKernelNames().Order(), Is.EqualTo(table.Select(t => t.Name).Order()));
    }

    [Test]
    public void VectorWidth_IsTheLargestPowerOfTwoUpTo16DividingEverything()
    {
        Assert.That(KernelAbi.VectorWidth(0), Is.EqualTo(16));
        Assert.That(KernelAbi.VectorWidth(0x7f0000001000UL | 2048 | 256), Is.EqualTo(16));
        Assert.That(KernelAbi.VectorWidth(24), Is.EqualTo(8));
        Assert.That(KernelAbi.VectorWidth(0x1000 | 12), Is.EqualTo(4));
        Assert.That(KernelAbi.VectorWidth(6), Is.EqualTo(2));
        Assert.That(KernelAbi.VectorWidth(7), Is.EqualTo(1));
        // The same rule as the header's lmc_k_vector_width (by its text).
        Assert.That(AbiHeader, Does.Contain("(bits & 15u) == 0 ? 16 : (bits & 7u) == 0 ? 8 : (bits & 3u) == 0 ? 4 : (bits & 1u) == 0 ? 2 : 1"));
    }

    [Test]
    public void BlockThreads_AreWholeWarpsUpTo128()
    {
        Assert.That(KernelAbi.BlockThreads(0), Is.EqualTo(32));
        Assert.That(KernelAbi.BlockThreads(1), Is.EqualTo(32));
        Assert.That(KernelAbi.BlockThreads(33), Is.EqualTo(64));
        Assert.That(KernelAbi.BlockThreads(128), Is.EqualTo(128));
        Assert.That(KernelAbi.BlockThreads(1 << 20), Is.EqualTo(128));
        Assert.That(AbiHeader, Does.Contain("if (warps > 4) warps = 4;"));
        Assert.That(File.ReadAllText(Path.Combine(TestPaths.RepoRoot(), "kernels", "kv_transfer.cu")), Does.Contain("__launch_bounds__(128)"));
    }

    [Test]
    public void EmbeddedFatbin_IsTheCommittedOne()
    {
        byte[]? embedded = KernelAbi.LoadFatbin();
        Assert.That(embedded, Is.Not.Null, "lmc_kernels.fatbin is embedded in LMCacheNative.Cuda");
        byte[] committed = File.ReadAllBytes(Path.Combine(TestPaths.RepoRoot(), "kernels", "prebuilt", "lmc_kernels.fatbin"));
        Assert.That(embedded, Is.EqualTo(committed));
        Assert.That(BitConverter.ToUInt32(embedded!, 0), Is.EqualTo(0xBA55ED50u), "fatbin magic");
    }
}
