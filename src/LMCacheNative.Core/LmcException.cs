namespace LMCacheNative.Core;

/// <summary>
/// The C ABI's status codes (include/lmcache_native.h), declared once: the engine's failures carry
/// one, the exports return them unchanged, and lmc_status_name derives each name from its member
/// name (InvalidArgument → "LMC_E_INVALID_ARGUMENT"). Pinned: never renumber; append only, without
/// gaps, below the last.
/// </summary>
public enum LmcStatus
{
    Ok = 0,
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
public sealed class LmcException(LmcStatus kind, string message) : Exception(message)
{
    /// <summary>The status the C ABI reports; never <see cref="LmcStatus.Ok"/>.</summary>
    public LmcStatus Kind { get; } = kind;

    public static LmcException InvalidArgument(string message) => new(LmcStatus.InvalidArgument, message);
    public static LmcException Unsupported(string message) => new(LmcStatus.Unsupported, message);
}
