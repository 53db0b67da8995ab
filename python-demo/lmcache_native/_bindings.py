"""Raw ctypes bindings of include/lmcache_native.h: one binding per C function, nothing more.

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
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char, c_char_p, c_int32, c_int64, c_uint32, c_uint64, c_void_p

from ._lib import LIB

# The ABI version these bindings were written against (LMC_ABI_VERSION in the header).
ABI_VERSION = 1

# ------------------------------------------------------------------------------------------------
# Status codes (pinned values; see the header).
# ------------------------------------------------------------------------------------------------
LMC_OK = 0
LMC_E_INVALID_ARGUMENT = -1
LMC_E_INVALID_HANDLE = -2
LMC_E_UNSUPPORTED = -3
LMC_E_OUT_OF_MEMORY = -4
LMC_E_NOT_FOUND = -5
LMC_E_IO = -6
LMC_E_CUDA = -7
LMC_E_NO_DEVICE = -8
LMC_E_BUFFER_TOO_SMALL = -9
LMC_E_INTERNAL = -10
LMC_E_TIMEOUT = -11

STATUS_NAMES = {
    LMC_OK: "LMC_OK",
    LMC_E_INVALID_ARGUMENT: "LMC_E_INVALID_ARGUMENT",
    LMC_E_INVALID_HANDLE: "LMC_E_INVALID_HANDLE",
    LMC_E_UNSUPPORTED: "LMC_E_UNSUPPORTED",
    LMC_E_OUT_OF_MEMORY: "LMC_E_OUT_OF_MEMORY",
    LMC_E_NOT_FOUND: "LMC_E_NOT_FOUND",
    LMC_E_IO: "LMC_E_IO",
    LMC_E_CUDA: "LMC_E_CUDA",
    LMC_E_NO_DEVICE: "LMC_E_NO_DEVICE",
    LMC_E_BUFFER_TOO_SMALL: "LMC_E_BUFFER_TOO_SMALL",
    LMC_E_INTERNAL: "LMC_E_INTERNAL",
    LMC_E_TIMEOUT: "LMC_E_TIMEOUT",
}

# Device kinds of lmc_kv_layer_desc.device_kind.
LMC_DEVICE_HOST = 0
LMC_DEVICE_CUDA = 1


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


assert ctypes.sizeof(LmcKvLayerDesc) == 88, ctypes.sizeof(LmcKvLayerDesc)
assert ctypes.sizeof(LmcTierStats) == 136, ctypes.sizeof(LmcTierStats)
assert ctypes.sizeof(LmcStats) == 128, ctypes.sizeof(LmcStats)


def _bind(name: str, argtypes: list, restype):
    """Looks up one exported function and pins its signature. A missing restype would silently
    truncate returned pointers to a C int, so every binding states it."""
    function = getattr(LIB, name)
    function.argtypes = argtypes
    function.restype = restype
    return function


# ------------------------------------------------------------------------------------------------
# Versions
# ------------------------------------------------------------------------------------------------
# LMC_API int32_t lmc_version_number(void);
lmc_version_number = _bind("lmc_version_number", [], c_int32)

# LMC_API int32_t lmc_abi_version(void);
lmc_abi_version = _bind("lmc_abi_version", [], c_int32)

# The ABI gate runs before any other function is bound: a library of another ABI version may lack
# some of them, and a silent mismatch would corrupt memory.
_library_abi_version = lmc_abi_version()
if _library_abi_version != ABI_VERSION:
    from ._lib import LIB_PATH

    raise ImportError(
        f"lmcache_native: {LIB_PATH} has ABI version {_library_abi_version}, but these bindings need "
        f"ABI version {ABI_VERSION}. Rebuild the library and the package from the same checkout."
    )

# LMC_API const char *lmc_version_string(void);
lmc_version_string = _bind("lmc_version_string", [], c_char_p)

# ------------------------------------------------------------------------------------------------
# Status codes and errors
# ------------------------------------------------------------------------------------------------
# LMC_API const char *lmc_status_name(lmc_status status);
lmc_status_name = _bind("lmc_status_name", [c_int32], c_char_p)

# LMC_API const char *lmc_last_error_message(void);
lmc_last_error_message = _bind("lmc_last_error_message", [], c_char_p)

# ------------------------------------------------------------------------------------------------
# Engine
# ------------------------------------------------------------------------------------------------
# LMC_API lmc_status lmc_engine_create(lmc_engine **engine_out, const char *config_json,
#                                      const char *model_name, int32_t world_size, int32_t worker_id);
lmc_engine_create = _bind(
    "lmc_engine_create", [POINTER(c_void_p), c_char_p, c_char_p, c_int32, c_int32], c_int32
)

# LMC_API void lmc_engine_destroy(lmc_engine *engine);
lmc_engine_destroy = _bind("lmc_engine_destroy", [c_void_p], None)

# LMC_API lmc_status lmc_engine_get_config(int64_t *needed_out, lmc_engine *engine, char *buffer,
#                                          int64_t capacity);
lmc_engine_get_config = _bind(
    "lmc_engine_get_config", [POINTER(c_int64), c_void_p, POINTER(c_char), c_int64], c_int32
)

# ------------------------------------------------------------------------------------------------
# KV layer registration
# ------------------------------------------------------------------------------------------------
# LMC_API lmc_status lmc_engine_register_layers(lmc_engine *engine, const lmc_kv_layer_desc *layers,
#                                               int32_t num_layers);
lmc_engine_register_layers = _bind(
    "lmc_engine_register_layers", [c_void_p, POINTER(LmcKvLayerDesc), c_int32], c_int32
)

# ------------------------------------------------------------------------------------------------
# Lookup, store, retrieve
# ------------------------------------------------------------------------------------------------
# LMC_API lmc_status lmc_lookup(int64_t *hit_tokens_out, lmc_engine *engine, const int32_t *tokens,
#                               int64_t num_tokens, const uint8_t *extra_key, int64_t extra_key_len);
lmc_lookup = _bind(
    "lmc_lookup", [POINTER(c_int64), c_void_p, c_void_p, c_int64, c_char_p, c_int64], c_int32
)

# LMC_API lmc_status lmc_store(int64_t *stored_tokens_out, lmc_engine *engine, const int32_t *tokens,
#                              const int64_t *slot_mapping, int64_t num_tokens,
#                              int64_t skip_leading_tokens, const uint8_t *extra_key,
#                              int64_t extra_key_len);
lmc_store = _bind(
    "lmc_store",
    [POINTER(c_int64), c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_char_p, c_int64],
    c_int32,
)

# LMC_API lmc_status lmc_retrieve(int64_t *retrieved_tokens_out, lmc_engine *engine,
#                                 const int32_t *tokens, const int64_t *slot_mapping,
#                                 int64_t num_tokens, int64_t first_token_to_write,
#                                 const uint8_t *extra_key, int64_t extra_key_len);
lmc_retrieve = _bind(
    "lmc_retrieve",
    [POINTER(c_int64), c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_char_p, c_int64],
    c_int32,
)

# ------------------------------------------------------------------------------------------------
# Lookups across processes
# ------------------------------------------------------------------------------------------------
# LMC_API lmc_status lmc_lookup_server_start(lmc_engine *engine, const char *socket_path);
lmc_lookup_server_start = _bind("lmc_lookup_server_start", [c_void_p, c_char_p], c_int32)

# LMC_API lmc_status lmc_lookup_server_stop(lmc_engine *engine);
lmc_lookup_server_stop = _bind("lmc_lookup_server_stop", [c_void_p], c_int32)

# LMC_API lmc_status lmc_remote_lookup(int64_t *hit_tokens_out, const char *socket_path,
#                                      const int32_t *tokens, int64_t num_tokens,
#                                      const uint8_t *extra_key, int64_t extra_key_len,
#                                      int64_t timeout_ms);
lmc_remote_lookup = _bind(
    "lmc_remote_lookup",
    [POINTER(c_int64), c_char_p, c_void_p, c_int64, c_char_p, c_int64, c_int64],
    c_int32,
)

# ------------------------------------------------------------------------------------------------
# Asynchronous operations
# ------------------------------------------------------------------------------------------------
# LMC_API lmc_status lmc_prefetch_start(lmc_job **job_out, lmc_engine *engine, const int32_t *tokens,
#                                       int64_t num_tokens, const uint8_t *extra_key,
#                                       int64_t extra_key_len);
lmc_prefetch_start = _bind(
    "lmc_prefetch_start", [POINTER(c_void_p), c_void_p, c_void_p, c_int64, c_char_p, c_int64], c_int32
)

# LMC_API lmc_status lmc_job_wait(int64_t *result_out, lmc_job *job, int64_t timeout_ms);
lmc_job_wait = _bind("lmc_job_wait", [POINTER(c_int64), c_void_p, c_int64], c_int32)

# LMC_API void lmc_job_destroy(lmc_job *job);
lmc_job_destroy = _bind("lmc_job_destroy", [c_void_p], None)

# ------------------------------------------------------------------------------------------------
# CUDA (stream = torch.cuda.current_stream().cuda_stream, or None for the legacy default stream)
# ------------------------------------------------------------------------------------------------
# LMC_API lmc_status lmc_cuda_device_count(int32_t *count_out);
lmc_cuda_device_count = _bind("lmc_cuda_device_count", [POINTER(c_int32)], c_int32)

# LMC_API lmc_status lmc_store_async(lmc_job **job_out, int64_t *stored_tokens_out, lmc_engine *engine,
#                                    const int32_t *tokens, const int64_t *slot_mapping,
#                                    int64_t num_tokens, int64_t skip_leading_tokens,
#                                    const uint8_t *extra_key, int64_t extra_key_len, void *stream);
lmc_store_async = _bind(
    "lmc_store_async",
    [POINTER(c_void_p), POINTER(c_int64), c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_char_p, c_int64, c_void_p],
    c_int32,
)

# LMC_API lmc_status lmc_retrieve_async(lmc_job **job_out, int64_t *retrieved_tokens_out,
#                                       lmc_engine *engine, const int32_t *tokens,
#                                       const int64_t *slot_mapping, int64_t num_tokens,
#                                       int64_t first_token_to_write, const uint8_t *extra_key,
#                                       int64_t extra_key_len, void *stream);
lmc_retrieve_async = _bind(
    "lmc_retrieve_async",
    [POINTER(c_void_p), POINTER(c_int64), c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_char_p, c_int64, c_void_p],
    c_int32,
)

# ------------------------------------------------------------------------------------------------
# Statistics and maintenance
# ------------------------------------------------------------------------------------------------
# LMC_API lmc_status lmc_engine_get_stats(lmc_engine *engine, lmc_stats *stats);
lmc_engine_get_stats = _bind("lmc_engine_get_stats", [c_void_p, POINTER(LmcStats)], c_int32)

# LMC_API lmc_status lmc_engine_tier_count(int32_t *count_out, lmc_engine *engine);
lmc_engine_tier_count = _bind("lmc_engine_tier_count", [POINTER(c_int32), c_void_p], c_int32)

# LMC_API lmc_status lmc_engine_get_tier_stats(lmc_engine *engine, int32_t tier_index,
#                                              lmc_tier_stats *stats);
lmc_engine_get_tier_stats = _bind(
    "lmc_engine_get_tier_stats", [c_void_p, c_int32, POINTER(LmcTierStats)], c_int32
)

# LMC_API lmc_status lmc_engine_flush(lmc_engine *engine, int64_t timeout_ms);
lmc_engine_flush = _bind("lmc_engine_flush", [c_void_p, c_int64], c_int32)

# LMC_API lmc_status lmc_engine_clear(lmc_engine *engine);
lmc_engine_clear = _bind("lmc_engine_clear", [c_void_p], c_int32)

# Every C function of the header, for parity checks against the library's exports.
ALL_FUNCTION_NAMES = (
    "lmc_version_number",
    "lmc_abi_version",
    "lmc_version_string",
    "lmc_status_name",
    "lmc_last_error_message",
    "lmc_engine_create",
    "lmc_engine_destroy",
    "lmc_engine_get_config",
    "lmc_engine_register_layers",
    "lmc_lookup",
    "lmc_store",
    "lmc_retrieve",
    "lmc_lookup_server_start",
    "lmc_lookup_server_stop",
    "lmc_remote_lookup",
    "lmc_prefetch_start",
    "lmc_job_wait",
    "lmc_job_destroy",
    "lmc_cuda_device_count",
    "lmc_store_async",
    "lmc_retrieve_async",
    "lmc_engine_get_stats",
    "lmc_engine_tier_count",
    "lmc_engine_get_tier_stats",
    "lmc_engine_flush",
    "lmc_engine_clear",
)
