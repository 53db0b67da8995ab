using LMCacheNative.Core;
using NUnit.Framework;

namespace LMCacheNative.Exports.Tests;

/// <summary>Handles are unique across kinds, and a table refuses another kind's handle without touching it.</summary>
public class HandleTests
{
    private sealed class Item;

    [Test]
    public void HandlesOfDifferentKinds_NeverCollide_AndAreRefusedByTheOtherKind()
    {
        var engines = new HandleTable<Item>(HandleKind.Engine);
        var jobs = new HandleTable<Item>(HandleKind.Job);
        var engineItem = new Item();
        var jobItem = new Item();
        var handles = new HashSet<nint>();
        nint engine = engines.Add(engineItem), job = jobs.Add(jobItem);
        for (int i = 0; i < 100; i++)
        {
            Assert.That(handles.Add(engines.Add(new Item())), Is.True);
            Assert.That(handles.Add(jobs.Add(new Item())), Is.True);
        }
        Assert.That(engine, Is.Not.EqualTo(job));
        Assert.That(handles, Does.Not.Contain(engine).And.Not.Contain(job));

        var wrongKind = Assert.Throws<LmcException>(() => engines.Get(job))!;
        Assert.That(wrongKind.Kind, Is.EqualTo(LmcStatus.InvalidHandle));
        Assert.That(wrongKind.Message, Does.Contain("a job handle where an engine handle is expected"));
        Assert.That(engines.Remove(job), Is.Null);
        Assert.That(jobs.Remove(engine), Is.Null);
        Assert.That(engines.Get(engine), Is.SameAs(engineItem));
        Assert.That(jobs.Get(job), Is.SameAs(jobItem));
    }

    [TestCase(0L)]
    [TestCase(1L)]
    [TestCase(0x10000L)]
    [TestCase(-1L)]
    [TestCase(long.MaxValue)]
    public void MadeUpNumbers_AreInvalidHandles(long number)
    {
        var engines = new HandleTable<Item>(HandleKind.Engine);
        engines.Add(new Item());
        Assert.That(Assert.Throws<LmcException>(() => engines.Get((nint)number))!.Kind, Is.EqualTo(LmcStatus.InvalidHandle));
        Assert.That(engines.Remove((nint)number), Is.Null);
    }

    [Test]
    public void ADestroyedHandle_StaysInvalid()
    {
        var engines = new HandleTable<Item>(HandleKind.Engine);
        nint handle = engines.Add(new Item());
        Assert.That(engines.Remove(handle), Is.Not.Null);
        Assert.That(engines.Remove(handle), Is.Null);
        Assert.That(Assert.Throws<LmcException>(() => engines.Get(handle))!.Message, Does.Contain("not a live engine"));
    }
}
