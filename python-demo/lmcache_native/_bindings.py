"""Raw ctypes bindings of include/lmcache_native.h (ABI v2): one binding per C function, nothing more.

Every binding returns exactly what the C function returns (an ``int`` status for ``lmc_status``
functions, ``bytes`` for ``const char *``); none of them raises on a failed status. The typed wrappers
in ``engine.py`` turn statuses into exceptions via ``_errors.check``. Keeping the raw layer
non-raising lets tests observe the C contract itself (e.g. that a destroyed handle yields
``LMC_E_INVALID_HANDLE``).

Conventions of the argument types:
  * ``lmc_engine *`` is ``c_void_p``; handles travel as plain ``int`` addresses (``None`` is NULL).
  * ``const int32_t *tokens`` / ``const int64_t *slot_mapping`` are ``c_void_p`` so callers pass a
    buffer address (``int``) without ctypes building an array object on every call.
  * ``const uint8_t *extra_key`` / ``const char *`` inputs are ``c_char_p``: ``bytes`` are passed
    by address without a copy (the length travels separately, so embedded NULs are fine).
  * ``int64_t *`` out-parameters are ``POINTER(c_int64)``; pass ``ctypes.byref(c_int64())``.
  * Struct pointers (``lmc_request *``, ``lmc_transfer_result *`` ...) are ``c_void_p`` too, so
    callers pass ``ctypes.byref(struct)``, ``ctypes.addressof(struct)`` or ``None`` (NULL) alike.

Every signature is written once, in ``FUNCTION_SIGNATURES``; the bound functions (module attributes
named like the C functions) and ``ALL_FUNCTION_NAMES`` are derived from it.

Status codes are not written here: the header promises they run 0, -1, -2, ... without gaps, so the
bindings ask ``lmc_status_name`` for each until it answers "LMC_E_UNKNOWN" and publish every one as
a module attribute (``LMC_OK``, ``LMC_E_INVALID_ARGUMENT``, ...) and in ``STATUS_NAMES`` /
``STATUS_VALUES``.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char, c_char_p, c_int32, c_int64, c_uint32, c_uint64, c_void_p

from ._lib import LIB

# The ABI version these bindings were written against (LMC_ABI_VERSION in the header).
ABI_VERSION = 2

# Device kinds of lmc_kv_layer_desc.device_kind.
LMC_DEVICE_HOST = 0
LMC_DEVICE_CUDA = 1

# Destination kinds of lmc_request.destination_kind.
LMC_DESTINATION_SLOTS = 0
LMC_DESTINATION_BLOCK_TABLE = 1

# Entries of the per-tier arrays: [0] the CPU tier, [i] the lower tier i - 1.
LMC_MAX_TIERS = 4


# ------------------------------------------------------------------------------------------------
# Structs. Field order and types mirror the header exactly; the sizes are asserted below.
# ------------------------------------------------------------------------------------------------
class LmcKvLayerDesc(ctypes.Structure):
    """lmc_kv_layer_desc: one attention layer's paged KV cache. Strides are in ELEMENTS."""

    _fields_ = [
        ("struct_size", c_uint32),  # sizeof(lmc_kv_layer_desc) == 88
        ("device_kind", c_int32),  # LMC_DEVICE_HOST or LMC_DEVICE_CUDA
        ("device_index", c_int32),  # CUDA ordinal; 0 for host
        ("elem_size", c_int32),  # bytes per element: 1, 2 or 4
        ("kv_count", c_int32),  # 2 (K and V) or 1 (MLA)
        ("num_blocks", c_int32),
        ("block_size", c_int32),  # tokens per block
        ("num_kv_heads", c_int32),
        ("head_size", c_int32),  # elements per head
        ("reserved", c_int32),  # must be 0
        ("base_address", c_uint64),  # address of element (0,0,0,0,0)
        ("span_bytes", c_uint64),  # bytes addressable from base_address
        ("kv_stride", c_int64),
        ("block_stride", c_int64),
        ("token_stride", c_int64),
        ("head_stride", c_int64),
    ]

    def __init__(self, **fields):
        fields.setdefault("struct_size", ctypes.sizeof(LmcKvLayerDesc))
        super().__init__(**fields)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name, _ in self._fields_}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"LmcKvLayerDesc({inner})"


class LmcStats(ctypes.Structure):
    """lmc_stats: cumulative counters since creation and current pool gauges."""

    _fields_ = [
        ("struct_size", c_uint32),  # sizeof(lmc_stats) == 128, set by the caller
        ("reserved", c_uint32),
        ("lookup_requests", c_uint64),
        ("lookup_tokens", c_uint64),
        ("lookup_hit_tokens", c_uint64),
        ("store_requests", c_uint64),
        ("stored_tokens", c_uint64),
        ("stored_bytes", c_uint64),
        ("retrieve_requests", c_uint64),
        ("retrieve_requested_tokens", c_uint64),
        ("retrieved_tokens", c_uint64),
        ("retrieved_bytes", c_uint64),
        ("evicted_chunks", c_uint64),
        ("store_skipped_chunks", c_uint64),
        ("cached_chunks", c_uint64),
        ("pool_used_bytes", c_uint64),
        ("pool_capacity_bytes", c_uint64),
    ]

    def __init__(self, **fields):
        fields.setdefault("struct_size", ctypes.sizeof(LmcStats))
        super().__init__(**fields)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name, _ in self._fields_[2:]}


class LmcTierStats(ctypes.Structure):
    """lmc_tier_stats: one lower tier's counters (cumulative) and its current size."""

    _fields_ = [
        ("struct_size", c_uint32),  # sizeof(lmc_tier_stats) == 136, set by the caller
        ("reserved", c_uint32),
        ("name", c_char * 32),  # "LocalDiskBackend", "RemoteBackend"
        ("hits", c_uint64),
        ("misses", c_uint64),
        ("bytes_read", c_uint64),
        ("bytes_written", c_uint64),
        ("writes", c_uint64),
        ("evictions", c_uint64),
        ("write_queue_drops", c_uint64),
        ("corrupt_records", c_uint64),
        ("errors", c_uint64),
        ("reconnects", c_uint64),
        ("used_bytes", c_uint64),
        ("capacity_bytes", c_uint64),
    ]

    def __init__(self, **fields):
        fields.setdefault("struct_size", ctypes.sizeof(LmcTierStats))
        super().__init__(**fields)

    def as_dict(self) -> dict:
        values = {name: getattr(self, name) for name, _ in self._fields_[2:]}
        values["name"] = self.name.decode("utf-8")
        return values




class LmcRequest(ctypes.Structure):
    """lmc_request: tokens, extra key, first token, destination (slots or block table), stream.

    Pointer fields are ``c_void_p`` (assign an ``int`` address or None), except ``extra_key``, a
    ``c_char_p`` that takes ``bytes`` directly (the struct keeps the object alive) or an address."""

    _fields_ = [
        ("struct_size", c_uint32),  # sizeof(lmc_request) == 88
        ("destination_kind", c_int32),  # LMC_DESTINATION_SLOTS or LMC_DESTINATION_BLOCK_TABLE
        ("tokens", c_void_p),  # const int32_t *
        ("num_tokens", c_int64),
        ("extra_key", c_char_p),  # const uint8_t *
        ("extra_key_len", c_int64),
        ("first_token", c_int64),  # store: skip_leading_tokens; retrieve: first_token_to_write
        ("slot_mapping", c_void_p),  # const int64_t *
        ("block_ids", c_void_p),  # const int32_t *
        ("num_block_ids", c_int64),
        ("table_block_size", c_int32),
        ("reserved", c_int32),  # must be 0
        ("stream", c_void_p),  # CUstream; NULL = the library's own
    ]

    def __init__(self, **fields):
        fields.setdefault("struct_size", ctypes.sizeof(LmcRequest))
        super().__init__(**fields)


class LmcTransferResult(ctypes.Structure):
    """lmc_transfer_result: what a store, retrieve or prefetch did."""

    _fields_ = [
        ("struct_size", c_uint32),  # sizeof(lmc_transfer_result) == 80, set by the caller
        ("reserved", c_uint32),
        ("tokens_matched", c_int64),
        ("tokens_copied", c_int64),
        ("bytes_copied", c_int64),
        ("chunks_skipped_for_space", c_int64),
        ("chunks_by_tier", c_int64 * LMC_MAX_TIERS),
        ("elapsed_ns", c_int64),
    ]

    def __init__(self, **fields):
        fields.setdefault("struct_size", ctypes.sizeof(LmcTransferResult))
        super().__init__(**fields)

    def as_dict(self) -> dict:
        values = {name: getattr(self, name) for name, _ in self._fields_[2:]}
        values["chunks_by_tier"] = tuple(self.chunks_by_tier)
        return values


class LmcLookupResult(ctypes.Structure):
    """lmc_lookup_result: what a lookup found, and in which tier."""

    _fields_ = [
        ("struct_size", c_uint32),  # sizeof(lmc_lookup_result) == 56, set by the caller
        ("reserved", c_uint32),
        ("hit_tokens", c_int64),
        ("tokens_by_tier", c_int64 * LMC_MAX_TIERS),
        ("elapsed_ns", c_int64),
    ]

    def __init__(self, **fields):
        fields.setdefault("struct_size", ctypes.sizeof(LmcLookupResult))
        super().__init__(**fields)

    def as_dict(self) -> dict:
        values = {name: getattr(self, name) for name, _ in self._fields_[2:]}
        values["tokens_by_tier"] = tuple(self.tokens_by_tier)
        return values


# KV events (lmc_kv_event.kind / .medium), pinned by the header.
LMC_KV_EVENT_BLOCK_STORED = 1
LMC_KV_EVENT_BLOCK_REMOVED = 2
LMC_KV_EVENT_ALL_BLOCKS_CLEARED = 3
LMC_KV_MEDIUM_CPU = 1
LMC_KV_MEDIUM_DISK = 2
LMC_KV_MEDIUM_REMOTE = 3
LMC_KV_HASH_MAX_BYTES = 32


class LmcKvEvent(ctypes.Structure):
    """lmc_kv_event: one KV event written by lmc_engine_poll_events (token ids in a separate buffer)."""

    _fields_ = [
        ("struct_size", c_uint32),  # bytes the library wrote (sizeof(lmc_kv_event) == 104)
        ("kind", c_uint32),  # LMC_KV_EVENT_*
        ("medium", c_uint32),  # LMC_KV_MEDIUM_*
        ("hash_len", c_uint32),  # bytes of block_hash in use: 32 sha256, 16 xxh3_128, 0 for a clear
        ("block_hash", ctypes.c_uint8 * LMC_KV_HASH_MAX_BYTES),
        ("parent_hash", ctypes.c_uint8 * LMC_KV_HASH_MAX_BYTES),
        ("parent_hash_len", c_uint32),  # 0: no parent (a prefix's first chunk) or not carried
        ("token_count", c_uint32),
        ("token_ids_offset", c_int64),  # BLOCK_STORED: first token id's index in the token buffer
        ("token_ids_count", c_int64),
    ]


# Sizes of the header's structs on LP64 (the only data model NativeAOT targets here).
STRUCT_SIZES = {
    LmcKvLayerDesc: 88,
    LmcStats: 128,
    LmcTierStats: 136,
    LmcRequest: 88,
    LmcTransferResult: 80,
    LmcLookupResult: 56,
    LmcKvEvent: 104,
}
for _struct, _size in STRUCT_SIZES.items():
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct), _size)
del _struct, _size


# ------------------------------------------------------------------------------------------------
# Every C function of the header, in header order: name -> (argtypes, restype). THE one list of
# signatures; the bindings and ALL_FUNCTION_NAMES come from it.
# ------------------------------------------------------------------------------------------------
_STATUS = c_int32  # lmc_status
_HANDLE = c_void_p  # lmc_engine * / lmc_job *
_IN_PTR = c_void_p  # const int32_t * / const int64_t * / const struct *: an int address
_OUT_PTR = c_void_p  # struct out-parameters: byref(struct) or an address

FUNCTION_SIGNATURES: dict[str, tuple[list, object]] = {
    # Versions
    "lmc_version_number": ([], c_int32),
    "lmc_abi_version": ([], c_int32),
    "lmc_version_string": ([], c_char_p),
    # Status codes and errors
    "lmc_status_name": ([c_int32], c_char_p),
    "lmc_last_error_message": ([], c_char_p),
    # Engine
    # (lmc_engine **engine_out, const char *config_json, const char *model_name, int32_t world_size,
    #  int32_t worker_id)
    "lmc_engine_create": ([POINTER(c_void_p), c_char_p, c_char_p, c_int32, c_int32], _STATUS),
    "lmc_engine_destroy": ([_HANDLE], None),
    # (int64_t *needed_out, lmc_engine *engine, char *buffer, int64_t capacity)
    "lmc_engine_get_config": ([POINTER(c_int64), _HANDLE, POINTER(c_char), c_int64], _STATUS),
    # (int64_t *needed_out, char *buffer, int64_t capacity)
    "lmc_config_schema": ([POINTER(c_int64), POINTER(c_char), c_int64], _STATUS),
    # KV layer registration: (lmc_engine *engine, const lmc_kv_layer_desc *layers, int32_t num_layers)
    "lmc_engine_register_layers": ([_HANDLE, POINTER(LmcKvLayerDesc), c_int32], _STATUS),
    # Requests
    # (lmc_lookup_result *result_out, lmc_engine *engine, const lmc_request *request)
    "lmc_lookup": ([_OUT_PTR, _HANDLE, _IN_PTR], _STATUS),
    # (lmc_transfer_result *result_out, lmc_engine *engine, const lmc_request *request,
    #  lmc_job **job_out)
    "lmc_store": ([_OUT_PTR, _HANDLE, _IN_PTR, POINTER(c_void_p)], _STATUS),
    "lmc_retrieve": ([_OUT_PTR, _HANDLE, _IN_PTR, POINTER(c_void_p)], _STATUS),
    # Lookups across processes
    "lmc_lookup_server_start": ([_HANDLE, c_char_p], _STATUS),
    "lmc_lookup_server_stop": ([_HANDLE], _STATUS),
    # (int64_t *hit_tokens_out, const char *socket_path, const int32_t *tokens, int64_t num_tokens,
    #  const uint8_t *extra_key, int64_t extra_key_len, int64_t timeout_ms)
    "lmc_remote_lookup": (
        [POINTER(c_int64), c_char_p, _IN_PTR, c_int64, c_char_p, c_int64, c_int64], _STATUS
    ),
    # Asynchronous operations
    # (lmc_job **job_out, lmc_engine *engine, const lmc_request *request)
    "lmc_prefetch_start": ([POINTER(c_void_p), _HANDLE, _IN_PTR], _STATUS),
    # (lmc_transfer_result *result_out, lmc_job *job, int64_t timeout_ms)
    "lmc_job_wait": ([_OUT_PTR, _HANDLE, c_int64], _STATUS),
    # (int32_t *finished_out, lmc_job *job)
    "lmc_job_poll": ([POINTER(c_int32), _HANDLE], _STATUS),
    # (lmc_transfer_result *result_out, lmc_job *job)
    "lmc_job_result": ([_OUT_PTR, _HANDLE], _STATUS),
    "lmc_job_destroy": ([_HANDLE], None),
    # CUDA
    "lmc_cuda_device_count": ([POINTER(c_int32)], _STATUS),
    # Statistics and maintenance
    "lmc_engine_get_stats": ([_HANDLE, POINTER(LmcStats)], _STATUS),
    "lmc_engine_tier_count": ([POINTER(c_int32), _HANDLE], _STATUS),
    "lmc_engine_get_tier_stats": ([_HANDLE, c_int32, POINTER(LmcTierStats)], _STATUS),
    # Metrics: (int64_t *needed_out, lmc_engine *engine, char *buffer, int64_t capacity)
    "lmc_engine_get_metrics": ([POINTER(c_int64), _HANDLE, POINTER(c_char), c_int64], _STATUS),
    # (int64_t *needed_out, lmc_engine *engine, int32_t tier_index, char *buffer, int64_t capacity)
    "lmc_engine_get_tier_nodes": ([POINTER(c_int64), _HANDLE, c_int32, POINTER(c_char), c_int64], _STATUS),
    "lmc_engine_flush": ([_HANDLE, c_int64], _STATUS),
    "lmc_engine_clear": ([_HANDLE], _STATUS),
    # KV events
    "lmc_engine_poll_events": (
        [POINTER(c_int64), POINTER(c_int64), POINTER(c_uint64), _HANDLE, _OUT_PTR, c_uint32, c_int64, _OUT_PTR, c_int64],
        _STATUS,
    ),
}

# Every C function of the header, for parity checks against the library's exports.
ALL_FUNCTION_NAMES = tuple(FUNCTION_SIGNATURES)


def _bind(name: str):
    """Looks up one exported function and pins its signature from FUNCTION_SIGNATURES. A missing
    restype would silently truncate returned pointers to a C int, so every entry states it."""
    argtypes, restype = FUNCTION_SIGNATURES[name]
    function = getattr(LIB, name)
    function.argtypes = argtypes
    function.restype = restype
    return function


# The ABI gate runs before any other function is bound: a library of another ABI version may lack
# some of them, and a silent mismatch would corrupt memory.
lmc_abi_version = _bind("lmc_abi_version")
_library_abi_version = lmc_abi_version()
if _library_abi_version != ABI_VERSION:
    from ._lib import LIB_PATH

    raise ImportError(
        f"lmcache_native: {LIB_PATH} has ABI version {_library_abi_version}, but these bindings need "
        f"ABI version {ABI_VERSION}. Rebuild the library and the package from the same checkout."
    )

for _name in ALL_FUNCTION_NAMES:
    globals()[_name] = _bind(_name)
del _name


# ------------------------------------------------------------------------------------------------
# Status codes, read from the library: 0, -1, -2, ... until "LMC_E_UNKNOWN".
# ------------------------------------------------------------------------------------------------
UNKNOWN_STATUS_NAME = "LMC_E_UNKNOWN"
_STATUS_SCAN_LIMIT = 4096  # a library that never says LMC_E_UNKNOWN is broken, not endless


def _read_statuses() -> dict[int, str]:
    names = {}
    for value in range(0, -_STATUS_SCAN_LIMIT, -1):
        raw = lmc_status_name(value)  # noqa: F821 (bound from FUNCTION_SIGNATURES above)
        name = raw.decode("ascii") if raw else UNKNOWN_STATUS_NAME
        if name == UNKNOWN_STATUS_NAME:
            break
        names[value] = name
    else:
        raise ImportError(f"lmcache_native: lmc_status_name never answered {UNKNOWN_STATUS_NAME}")
    if names.get(0) != "LMC_OK":
        raise ImportError(f"lmcache_native: lmc_status_name(0) is {names.get(0)!r}, not 'LMC_OK'")
    return names


# value -> name and name -> value of every status the library knows.
STATUS_NAMES: dict[int, str] = _read_statuses()
STATUS_VALUES: dict[str, int] = {name: value for value, name in STATUS_NAMES.items()}
globals().update(STATUS_VALUES)  # LMC_OK, LMC_E_INVALID_ARGUMENT, ... as module attributes


def status_name(status: int) -> str:
    """The header name of a status; "LMC_E_UNKNOWN" for values the library does not know."""
    return STATUS_NAMES.get(status, UNKNOWN_STATUS_NAME)


def __getattr__(name: str):
    # Only reached for names not set above: a status the loaded library does not know.
    if name.startswith("LMC_E_") or name == "LMC_OK":
        raise AttributeError(
            f"the loaded library knows no status {name} (it knows {', '.join(STATUS_VALUES)})"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
