using System.Runtime.InteropServices;
using System.Text;
using LMCacheNative.Core;

namespace LMCacheNative.Exports;

/// <summary>
/// lmc_status_name's strings: "LMC_OK", and "LMC_E_" + the member name in upper snake case for the
/// others, made once from <see cref="LmcStatus"/> as NUL-terminated UTF-8 in memory that is never
/// freed (the header promises static storage).
/// </summary>
internal static unsafe class StatusNames
{
    private static readonly Dictionary<int, nint> s_names = Build();
    private static readonly nint s_unknown = Utf8("LMC_E_UNKNOWN");

    public static byte* Of(int status) => (byte*)(s_names.TryGetValue(status, out nint name) ? name : s_unknown);

    /// <summary>The header's name of a status: Ok → LMC_OK, InvalidArgument → LMC_E_INVALID_ARGUMENT.</summary>
    public static string HeaderName(LmcStatus status)
    {
        if (status == LmcStatus.Ok) return "LMC_OK";
        var snake = new StringBuilder("LMC_E_");
        string member = status.ToString();
        for (int i = 0; i < member.Length; i++)
        {
            if (i > 0 && char.IsUpper(member[i])) snake.Append('_');
            snake.Append(char.ToUpperInvariant(member[i]));
        }
        return snake.ToString();
    }

    private static Dictionary<int, nint> Build() =>
        Enum.GetValues<LmcStatus>().ToDictionary(s => (int)s, s => Utf8(HeaderName(s)));

    /// <summary>A NUL-terminated UTF-8 copy in memory that is never freed: static storage for C.</summary>
    public static nint Utf8(string text)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(text + "\0");
        nint memory = (nint)NativeMemory.Alloc((nuint)bytes.Length);
        bytes.CopyTo(new Span<byte>((void*)memory, bytes.Length));
        return memory;
    }
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
        return (int)LmcStatus.Ok;
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
        OutOfMemoryException => Fail((int)LmcStatus.OutOfMemory, "out of host memory: " + e.Message),
        _ => Fail((int)LmcStatus.Internal, $"internal error ({e.GetType().Name}): {e.Message}"),
    };
}
