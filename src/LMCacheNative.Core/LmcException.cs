namespace LMCacheNative.Core;

/// <summary>
/// The kinds of failure the engine reports. The numeric values are the C ABI's pinned status codes
/// (include/lmcache_native.h); the exports layer passes them through unchanged.
/// </summary>
public enum LmcErrorKind
{
    InvalidArgument = -1,
    InvalidHandle = -2,
    Unsupported = -3,
    OutOfMemory = -4,
    NotFound = -5,
    Io = -6,
    Cuda = -7,
    NoDevice = -8,
    BufferTooSmall = -9,
    Internal = -10,
    Timeout = -11,
}

/// <summary>An expected failure with a message meant for the caller (it names the bad key, field or argument).</summary>
public sealed class LmcException(LmcErrorKind kind, string message) : Exception(message)
{
    public LmcErrorKind Kind { get; } = kind;

    public static LmcException InvalidArgument(string message) => new(LmcErrorKind.InvalidArgument, message);
    public static LmcException Unsupported(string message) => new(LmcErrorKind.Unsupported, message);
}
