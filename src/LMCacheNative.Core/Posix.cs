using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace LMCacheNative.Core;

/// <summary>
/// The few libc calls the engine needs to share a machine with other local users safely; the rest
/// of the engine is plain .NET. .NET's FileStream follows symbolic links and its open() blocks on a
/// FIFO until a writer appears (forever, if none does), so the disk tier opens records with
/// <c>open(O_NOFOLLOW | O_NONBLOCK)</c> followed by <c>statx</c> on the descriptor (the object actually
/// opened, not the one seen a moment earlier, is checked to be a regular file), and classifies names
/// with <c>statx</c> without following links. The lookup channel compares peers' credentials with
/// <c>geteuid</c>.
/// </summary>
internal static partial class Posix
{
    /// <summary>What <see cref="Inspect"/> found at a path (the link itself for a symbolic link).</summary>
    public enum FileKind
    {
        Missing,
        Regular,
        Socket,
        /// <summary>A directory, symbolic link, FIFO or device.</summary>
        Other,
    }

    /// <summary>Type, size in bytes and modification time of the entry at <paramref name="path"/>, never following a link.</summary>
    public static (FileKind Kind, long Length, DateTime LastWriteUtc) Inspect(string path)
    {
        StatxBuffer buffer = default;
        if (Statx(AtFdCwd, path, AtSymlinkNoFollow, StatxType | StatxSize | StatxMtime, ref buffer) != 0)
            return (FileKind.Missing, 0, default);
        var kind = IsRegular(buffer.Mode) ? FileKind.Regular : (buffer.Mode & 0xF000) == 0xC000 ? FileKind.Socket : FileKind.Other; // S_IFSOCK
        return (kind, (long)buffer.Size,
            DateTime.UnixEpoch.AddSeconds(buffer.MtimeSeconds).AddTicks(buffer.MtimeNanoseconds / 100));
    }

    /// <summary>
    /// Opens <paramref name="path"/> for reading when it is a regular file. Returns null when nothing
    /// is there; throws <see cref="IOException"/> when something else is there (a FIFO, device,
    /// socket, directory or symbolic link) or the open fails otherwise. Never blocks on a FIFO.
    /// </summary>
    public static FileStream? OpenRegularFileForRead(string path)
    {
        int fd = Open(path, ReadOnly | NoFollow | NonBlocking | CloseOnExec);
        if (fd < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            if (errno == Enoent) return null;
            // ELOOP: the name is a symbolic link (O_NOFOLLOW); ENXIO: a socket or a FIFO without a peer.
            throw new IOException($"cannot open {path}: {Marshal.GetPInvokeErrorMessage(errno)} (errno {errno})");
        }
        var handle = new SafeFileHandle(fd, ownsHandle: true);
        StatxBuffer buffer = default;
        if (Statx(fd, "", AtEmptyPath, StatxType, ref buffer) != 0 || !IsRegular(buffer.Mode))
        {
            handle.Dispose();
            throw new IOException($"{path} is not a regular file");
        }
        return new FileStream(handle, FileAccess.Read, bufferSize: 1);
    }

    /// <summary>Whether something other than a regular file (a link, FIFO, socket, device, directory) is at <paramref name="path"/>.</summary>
    public static bool HoldsNonRegularFile(string path) => Inspect(path).Kind is FileKind.Socket or FileKind.Other;

    private static bool IsRegular(ushort mode) => (mode & 0xF000) == 0x8000; // S_IFMT, S_IFREG

    // Linux flags. O_NOFOLLOW is 0x8000 on arm64 and 0x20000 on x86-64; the others agree.
    private const int ReadOnly = 0, NonBlocking = 0x800, CloseOnExec = 0x80000;
    private static readonly int NoFollow = RuntimeInformation.ProcessArchitecture == Architecture.Arm64 ? 0x8000 : 0x20000;
    private const int AtFdCwd = -100, AtSymlinkNoFollow = 0x100, AtEmptyPath = 0x1000;
    private const uint StatxType = 0x1, StatxMtime = 0x40, StatxSize = 0x200;
    private const int Enoent = 2;

    /// <summary>The fields of <c>struct statx</c> (256 bytes, the same on every architecture) that are read here.</summary>
    [StructLayout(LayoutKind.Explicit, Size = 256)]
    private struct StatxBuffer
    {
        [FieldOffset(28)] public ushort Mode;
        [FieldOffset(40)] public ulong Size;
        [FieldOffset(112)] public long MtimeSeconds;
        [FieldOffset(120)] public uint MtimeNanoseconds;
    }

    /// <summary>The effective user id of this process (who may talk to its lookup sockets).</summary>
    public static uint EffectiveUserId => GetEffectiveUserId();

    private const int MadviseHugePage = 14; // MADV_HUGEPAGE (linux/mman.h)

    /// <summary>
    /// Asks the kernel to back <c>[address, address + bytes)</c> with transparent huge pages where it
    /// can (THP in "madvise" mode, Debian's default, gives them only to regions that ask). A hint:
    /// false when the kernel refuses (THP disabled, old kernel); nothing else changes then.
    /// </summary>
    public static bool AdviseHugePages(nint address, long bytes) => Madvise(address, (nuint)bytes, MadviseHugePage) == 0;

    [LibraryImport("libc", EntryPoint = "madvise")]
    private static partial int Madvise(nint address, nuint length, int advice);

    [LibraryImport("libc", EntryPoint = "geteuid")]
    private static partial uint GetEffectiveUserId();

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Statx(int directoryFd, string path, int flags, uint mask, ref StatxBuffer buffer);
}
