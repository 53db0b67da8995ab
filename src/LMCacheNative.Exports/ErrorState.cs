using System.Runtime.InteropServices;
using System.Text;
using LMCacheNative.Core;

namespace LMCacheNative.Exports;

/// <summary>Status codes of include/lmcache_native.h. Pinned: never renumber.</summary>
internal static class Status
{
    public const int Ok = 0;
    public const int InvalidArgument = -1;
    public const int InvalidHandle = -2;
    public const int Unsupported = -3;
    public const int OutOfMemory = -4;
    public const int NotFound = -5;
    public const int Io = -6;
    public const int Cuda = -7;
    public const int NoDevice = -8;
    public const int BufferTooSmall = -9;
    public const int Internal = -10;
    public const int Timeout = -11;
}

/// <summary>
/// The thread-local last error message behind lmc_last_error_message(). Each thread owns one native,
/// NUL-terminated UTF-8 buffer that is overwritten by the next failing call on that thread and
/// emptied by the next succeeding one; it is never freed, so a pointer handed out stays readable.
/// </summary>
internal static unsafe class ErrorState
{
    [ThreadStatic] private static byte* t_buffer;
    [ThreadStatic] private static int t_capacity;

    /// <summary>Static empty string for threads that never failed.</summary>
    public static byte* Message => t_buffer != null ? t_buffer : EmptyString();

    private static byte* EmptyString()
    {
        fixed (byte* empty = "\0"u8) return empty;
    }

    /// <summary>Records success: the message becomes "". Returns LMC_OK.</summary>
    public static int Ok()
    {
        if (t_buffer != null) t_buffer[0] = 0;
        return Status.Ok;
    }

    /// <summary>Records a failure message and returns its status.</summary>
    public static int Fail(int status, string message)
    {
        int needed = Encoding.UTF8.GetMaxByteCount(message.Length) + 1;
        if (needed > t_capacity)
        {
            byte* grown = (byte*)NativeMemory.Realloc(t_buffer, (nuint)needed);
            if (grown == null) return status; // keep the old message rather than fail the failure path
            t_buffer = grown;
            t_capacity = needed;
        }
        int written = Encoding.UTF8.GetBytes(message, new Span<byte>(t_buffer, t_capacity - 1));
        t_buffer[written] = 0;
        return status;
    }

    /// <summary>
    /// Maps any exception to a status and message. Expected failures carry their own kind; anything
    /// else is a bug in the library and reported as LMC_E_INTERNAL with its type, so the caller's
    /// process keeps running either way.
    /// </summary>
    public static int FromException(Exception e) => e switch
    {
        LmcException lmc => Fail((int)lmc.Kind, lmc.Message),
        OutOfMemoryException => Fail(Status.OutOfMemory, "out of host memory: " + e.Message),
        _ => Fail(Status.Internal, $"internal error ({e.GetType().Name}): {e.Message}"),
    };
}
