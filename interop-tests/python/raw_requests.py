"""Raw ``lmc_request`` structs for tests that call the C functions through ``_bindings`` directly.

The raw ctypes bindings take struct pointers (``byref(request)``); these helpers fill an
``LmcRequest`` from whatever a test holds (addresses, numpy arrays, torch tensors, ctypes arrays)
and make the three request calls with their v2 out-parameters:

    status, result = lookup(engine, request(tokens, 16))
    status, result = store(engine, request(tokens, 16, slots=slots))          # synchronous
    status, job = store(engine, request(...), job=True)                       # job_out != NULL

Caution: ctypes accepts MORE arguments than ``argtypes`` names, so a v1-style call such as
``b.lmc_lookup(byref(out), handle, tokens, 16, None, 0)`` would not fail in Python; always build a
request.
"""

from __future__ import annotations

import ctypes
from ctypes import byref, c_int32, c_void_p

from lmcache_native import _bindings as b


def address(value):
    """An int address (or None) for a buffer: int, None, numpy array, torch tensor, ctypes object."""
    if value is None or isinstance(value, int):
        return value
    if hasattr(value, "__array_interface__"):
        return value.__array_interface__["data"][0]
    if hasattr(value, "data_ptr"):
        return value.data_ptr()
    if isinstance(value, ctypes.c_char_p):
        return ctypes.cast(value, c_void_p).value
    if isinstance(value, (ctypes.Array, ctypes.Structure)):
        return ctypes.addressof(value)
    raise TypeError(f"no address for {type(value).__name__}")


def _length(value):
    return len(value) if value is not None and not isinstance(value, int) else 0


def request(tokens=None, num_tokens=None, *, slots=None, block_ids=None, num_block_ids=None,
            block_size=0, first_token=0, extra_key=None, extra_key_len=None, kind=None, stream=None,
            struct_size=None, reserved=0) -> b.LmcRequest:
    """An lmc_request. Lengths default to the lengths of the given arrays; ``kind`` defaults to
    BLOCK_TABLE when block_ids are given, else SLOTS. ``extra_key`` may be bytes (kept alive by the
    struct), an address or a c_char_p."""
    req = b.LmcRequest()
    if struct_size is not None:
        req.struct_size = struct_size
    if kind is None:
        kind = b.LMC_DESTINATION_BLOCK_TABLE if block_ids is not None else b.LMC_DESTINATION_SLOTS
    req.destination_kind = kind
    req.tokens = address(tokens)
    req.num_tokens = _length(tokens) if num_tokens is None else num_tokens
    if isinstance(extra_key, bytes):
        req.extra_key = extra_key
        req.extra_key_len = len(extra_key) if extra_key_len is None else extra_key_len
    else:
        req.extra_key = address(extra_key)
        req.extra_key_len = 0 if extra_key_len is None else extra_key_len
    req.first_token = first_token
    req.slot_mapping = address(slots)
    req.block_ids = address(block_ids)
    req.num_block_ids = _length(block_ids) if num_block_ids is None else num_block_ids
    req.table_block_size = block_size
    req.reserved = reserved
    req.stream = stream
    # Keep the Python objects the struct points into alive with it.
    req._owners = (tokens, slots, block_ids, extra_key)
    return req


def lookup(engine, req, result=None):
    """(status, LmcLookupResult) of lmc_lookup."""
    result = b.LmcLookupResult() if result is None else result
    return b.lmc_lookup(byref(result), engine, byref(req)), result


def _transfer(function, engine, req, job):
    if job:
        handle = c_void_p()
        status = function(None, engine, byref(req), byref(handle))
        return status, handle.value
    result = b.LmcTransferResult()
    return function(byref(result), engine, byref(req), None), result


def store(engine, req, job: bool = False):
    """Synchronous: (status, LmcTransferResult). ``job=True``: (status, job handle or None)."""
    return _transfer(b.lmc_store, engine, req, job)


def retrieve(engine, req, job: bool = False):
    """Synchronous: (status, LmcTransferResult). ``job=True``: (status, job handle or None)."""
    return _transfer(b.lmc_retrieve, engine, req, job)


def prefetch(engine, req):
    """(status, job handle or None) of lmc_prefetch_start."""
    handle = c_void_p()
    status = b.lmc_prefetch_start(byref(handle), engine, byref(req))
    return status, handle.value


def job_wait(job, timeout_ms: int = -1):
    """(status, LmcTransferResult) of lmc_job_wait."""
    result = b.LmcTransferResult()
    return b.lmc_job_wait(byref(result), job, timeout_ms), result


def job_poll(job):
    """(status, finished) of lmc_job_poll."""
    finished = c_int32(-7)
    return b.lmc_job_poll(byref(finished), job), finished.value
