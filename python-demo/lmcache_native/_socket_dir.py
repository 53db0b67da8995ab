"""The directory of the connector's lookup sockets when the operator names none.

A socket with a predictable name in the world-writable temporary directory can be taken by another
user before the worker binds it (the scheduler would then ask a stranger's server, or a stranger
could connect to ours). So the default is a directory only this user can enter, in this order:

1. ``$VLLM_RPC_BASE_PATH`` when set: the operator's choice, used as given (LMCache does the same);
2. ``$XDG_RUNTIME_DIR`` when set and private (the per-login directory systemd makes, mode 0700);
3. ``<tempdir>/lmcache-native-<uid>``, created with mode 0700 and then verified with ``lstat``: a
   real directory (not a symlink), owned by this user, with no group or other permission bits.
   Anything else -- e.g. another user created that name first -- is refused with
   :class:`UnsafeSocketDirectoryError`; the worker then serves no lookups and the scheduler's lookups
   count as misses, as when a server cannot start.

A Unix socket address holds 107 bytes; where the chosen directory is too long for the socket's name,
``/tmp/lmcache-native-<uid>`` (checked the same way) is used instead. Every process of one vLLM
instance has the same environment and user, so all ranks arrive at the same directory.
"""

from __future__ import annotations

import os
import stat
import tempfile

MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL
_SHORT_TEMP_DIR = "/tmp"


class UnsafeSocketDirectoryError(PermissionError):
    """The default socket directory exists but is not private to this user."""


def _private_dir_name() -> str:
    return f"lmcache-native-{os.geteuid()}"


def _fits(directory: str, name: str) -> bool:
    return len(os.fsencode(os.path.join(directory, name))) <= MAX_SOCKET_PATH_BYTES


def private_directory_problem(path: str) -> str | None:
    """Why ``path`` is not a directory private to this user (None when it is). ``lstat``: a symlink
    is refused even when it points to a good directory, since whoever owns the link can repoint it."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return f"cannot inspect it ({error.strerror or error})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    if info.st_mode & 0o077:
        return f"its mode is {stat.S_IMODE(info.st_mode):04o}; group and others must have no access (0700)"
    if not os.access(path, os.W_OK | os.X_OK):
        return "this user cannot create files in it"
    return None


def ensure_private_directory(path: str) -> str:
    """Creates ``path`` with mode 0700 unless it exists, then verifies it (see the module docstring);
    returns ``path`` or raises :class:`UnsafeSocketDirectoryError`."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # ours from an earlier run, or someone else's: the check below decides
    except OSError as error:
        raise UnsafeSocketDirectoryError(
            f"cannot create the lookup socket directory {path}: {error.strerror or error}") from None
    problem = private_directory_problem(path)
    if problem is not None:
        raise UnsafeSocketDirectoryError(
            f"refusing to put lookup sockets in {path}: {problem}. Remove it, or set VLLM_RPC_BASE_PATH to a "
            "directory only this user can write to.")
    return path


def default_socket_path(name: str) -> str:
    """Where the socket file ``name`` lives by default; raises :class:`UnsafeSocketDirectoryError` when
    the private directory is not safe to use."""
    operator_choice = os.environ.get("VLLM_RPC_BASE_PATH")
    if operator_choice and _fits(operator_choice, name):
        return os.path.join(operator_choice, name)
    if not operator_choice:
        runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
        if runtime_dir and os.path.isabs(runtime_dir) and _fits(runtime_dir, name) \
                and private_directory_problem(runtime_dir) is None:
            return os.path.join(runtime_dir, name)
        private = os.path.join(tempfile.gettempdir(), _private_dir_name())
        if _fits(private, name):
            return os.path.join(ensure_private_directory(private), name)
    short = os.path.join(_SHORT_TEMP_DIR, _private_dir_name())
    if not _fits(short, name):
        raise ValueError(f"socket name {name!r} is too long for a Unix socket address")
    return os.path.join(ensure_private_directory(short), name)
