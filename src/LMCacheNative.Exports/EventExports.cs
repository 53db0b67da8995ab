using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using LMCacheNative.Core;
using LMCacheNative.Core.Keys;
using LMCacheNative.Core.Storage;

namespace LMCacheNative.Exports;

/// <summary>Mirror of lmc_kv_event (104 bytes). Field order and sizes must match the header exactly.</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct NativeKvEvent
{
    public uint StructSize;
    public uint Kind;
    public uint Medium;
    public uint HashLen;
    public fixed byte BlockHash[32]; // ChunkKey.MaxBytes (a fixed buffer's size must be a literal)
    public fixed byte ParentHash[32];
    public uint ParentHashLen;
    public uint TokenCount;
    public long TokenIdsOffset;
    public long TokenIdsCount;

    public const int SizeV1 = 104;
}

/// <summary>lmc_engine_poll_events: drains the engine's KV event queue into the caller's arrays.</summary>
internal static unsafe class EventExports
{
    /// <summary>Most events one poll moves: bounds the managed staging buffer, whatever capacity the caller passes.</summary>
    private const int MaxEventsPerPoll = 4096;

    [UnmanagedCallersOnly(EntryPoint = "lmc_engine_poll_events")]
    public static int PollEvents(long* numEventsOut, long* numTokenIdsOut, ulong* droppedOut, nint engine,
        NativeKvEvent* events, uint eventSize, long capacity, int* tokenIds, long tokenCapacity)
    {
        try
        {
            Exports.RequireOut(numEventsOut, "num_events_out");
            Exports.RequireOut(numTokenIdsOut, "num_token_ids_out");
            Exports.RequireOut(droppedOut, "dropped_out");
            var cacheEngine = HandleTable.Get(engine);
            if (capacity < 0) throw LmcException.InvalidArgument($"capacity must be >= 0, got {capacity}");
            if (capacity > 0 && events == null) throw LmcException.InvalidArgument($"events is NULL but capacity is {capacity}");
            if (capacity > 0 && eventSize < NativeKvEvent.SizeV1)
                throw LmcException.InvalidArgument($"event_size must be sizeof(lmc_kv_event) (>= {NativeKvEvent.SizeV1}), got {eventSize}");
            if (tokenCapacity < 0) throw LmcException.InvalidArgument($"token_capacity must be >= 0, got {tokenCapacity}");
            if (tokenCapacity > 0 && tokenIds == null) throw LmcException.InvalidArgument($"token_ids is NULL but token_capacity is {tokenCapacity}");

            int next = cacheEngine.NextKvEventTokenCount();
            if (capacity > 0 && next > tokenCapacity)
                throw new LmcException(LmcStatus.BufferTooSmall,
                    $"token_capacity {tokenCapacity} is less than the {next} token ids of the next event (chunk_size is enough for any)");

            var staged = new KvEvent[(int)Math.Min(capacity, MaxEventsPerPoll)];
            var (count, tokens, dropped) = cacheEngine.PollEvents(staged, tokenCapacity);
            WriteEvents(events, eventSize, tokenIds, staged.AsSpan(0, count), cacheEngine.KvEventHashBytes);
            *numEventsOut = count;
            *numTokenIdsOut = tokens;
            *droppedOut = (ulong)dropped;
            return ErrorState.Ok();
        }
        catch (Exception e)
        {
            return ErrorState.FromException(e);
        }
    }

    /// <summary>
    /// Fills the caller's events (stride <paramref name="eventSize"/>, at most sizeof(NativeKvEvent)
    /// bytes each) and token ids. Kept out of the export: a local struct with fixed buffers gives its
    /// method a stack cookie, which an export would read before the runtime has started.
    /// </summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void WriteEvents(NativeKvEvent* events, uint eventSize, int* tokenIds, ReadOnlySpan<KvEvent> drained, int hashBytes)
    {
        uint written = Math.Min(eventSize, (uint)sizeof(NativeKvEvent));
        Span<byte> hash = stackalloc byte[ChunkKey.MaxBytes];
        long tokenOffset = 0;
        for (int i = 0; i < drained.Length; i++)
        {
            var e = drained[i];
            var native = new NativeKvEvent
            {
                StructSize = written,
                Kind = (uint)e.Kind,
                Medium = (uint)e.Medium,
                TokenCount = (uint)e.TokenCount,
                TokenIdsOffset = tokenOffset,
            };
            if (e.Kind != KvEventKind.AllBlocksCleared)
            {
                native.HashLen = (uint)hashBytes;
                e.BlockHash.WriteTo(hash);
                hash[..hashBytes].CopyTo(new Span<byte>(native.BlockHash, ChunkKey.MaxBytes));
            }
            if (e.ParentHash is { } parent)
            {
                native.ParentHashLen = (uint)hashBytes;
                parent.WriteTo(hash);
                hash[..hashBytes].CopyTo(new Span<byte>(native.ParentHash, ChunkKey.MaxBytes));
            }
            if (e.TokenIds is { } ids)
            {
                native.TokenIdsCount = ids.Length;
                ids.CopyTo(new Span<int>(tokenIds + tokenOffset, ids.Length));
                tokenOffset += ids.Length;
            }
            Buffer.MemoryCopy(&native, (byte*)events + (long)i * eventSize, written, written);
        }
    }
}
