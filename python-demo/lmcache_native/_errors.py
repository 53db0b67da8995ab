"""Exceptions for failed lmc_* calls, and ``check(status)`` that raises them.

Each ``LMC_E_*`` status maps to one ``LmcError`` subclass; where a builtin exception has the same
meaning the subclass also derives from it (``LmcInvalidArgument`` is a ``ValueError``, and so on), so
callers can catch either.
"""

from __future__ import annotations

from . import _bindings as _b
from ._redact import redact_text


class LmcError(Exception):
    """A failed lmc_* call. ``status`` is the raw lmc_status, ``status_name`` its header name and
    ``message`` the library's message for the failure (read on the failing thread), with URL
    passwords hidden: the library quotes configuration values such as remote_url in its messages,
    and these end up in logs and tracebacks."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.status_name = _b.status_name(status)
        message = redact_text(message) if message else message
        self.message = message
        super().__init__(f"{self.status_name} ({status}): {message}" if message else self.status_name)


class LmcInvalidArgument(LmcError, ValueError):
    """LMC_E_INVALID_ARGUMENT: NULL where not allowed, bad lengths, bad config or layout."""


class LmcInvalidHandle(LmcError):
    """LMC_E_INVALID_HANDLE: NULL, unknown, destroyed or other-kind handle (also: a closed ``Engine``
    or ``Job``)."""


class LmcUnsupported(LmcError, NotImplementedError):
    """LMC_E_UNSUPPORTED: valid but not supported by this build."""


class LmcOutOfMemory(LmcError, MemoryError):
    """LMC_E_OUT_OF_MEMORY: host memory for the pool could not be allocated."""


class LmcNotFound(LmcError):
    """LMC_E_NOT_FOUND: the requested item does not exist."""


class LmcIOError(LmcError, OSError):
    """LMC_E_IO: a storage tier failed."""

    # OSError.__init__ would reinterpret (status, message) as (errno, strerror); keep LmcError's.
    def __init__(self, status: int, message: str):
        LmcError.__init__(self, status, message)

    def __str__(self) -> str:
        return LmcError.__str__(self)


class LmcCudaError(LmcError):
    """LMC_E_CUDA: a CUDA driver call failed; the message names the CUresult."""


class LmcNoDevice(LmcError):
    """LMC_E_NO_DEVICE: CUDA requested but no driver or no GPU."""


class LmcBufferTooSmall(LmcError):
    """LMC_E_BUFFER_TOO_SMALL: an output buffer is too small."""


class LmcInternalError(LmcError):
    """LMC_E_INTERNAL: a bug in the library; the message carries the details."""


class LmcTimeout(LmcError, TimeoutError):
    """LMC_E_TIMEOUT: a wait ended before the work did; the work goes on."""


# Status NAME -> exception class. The values come from the library (``_bindings.STATUS_VALUES``);
# a status the library adds later and this table lacks raises plain ``LmcError``.
ERROR_CLASS_BY_NAME = {
    "LMC_E_INVALID_ARGUMENT": LmcInvalidArgument,
    "LMC_E_INVALID_HANDLE": LmcInvalidHandle,
    "LMC_E_UNSUPPORTED": LmcUnsupported,
    "LMC_E_OUT_OF_MEMORY": LmcOutOfMemory,
    "LMC_E_NOT_FOUND": LmcNotFound,
    "LMC_E_IO": LmcIOError,
    "LMC_E_CUDA": LmcCudaError,
    "LMC_E_NO_DEVICE": LmcNoDevice,
    "LMC_E_BUFFER_TOO_SMALL": LmcBufferTooSmall,
    "LMC_E_INTERNAL": LmcInternalError,
    "LMC_E_TIMEOUT": LmcTimeout,
}

# Status value -> exception class, for the statuses the loaded library reports.
_ERROR_CLASS_BY_STATUS = {
    value: ERROR_CLASS_BY_NAME[name]
    for value, name in _b.STATUS_NAMES.items()
    if name in ERROR_CLASS_BY_NAME
}


def error_for_status(status: int, message: str) -> LmcError:
    """The exception object for a failed status (LmcError itself for values without a class)."""
    return _ERROR_CLASS_BY_STATUS.get(status, LmcError)(status, message)


def last_error_message() -> str:
    """The calling thread's lmc_last_error_message(), decoded. Valid only until the next lmc_* call
    on this thread, which is why ``check`` reads it before doing anything else."""
    raw = _b.lmc_last_error_message()
    return raw.decode("utf-8", "replace") if raw else ""


def check(status: int) -> None:
    """Returns on LMC_OK; otherwise raises the mapped LmcError with the library's message. Must run
    on the thread that made the failing call, right after it (the message is thread-local)."""
    if status == _b.LMC_OK:
        return
    raise error_for_status(status, last_error_message())
