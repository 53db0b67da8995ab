"""Extreme values of every numeric argument of every export (ABI v2: every numeric field of
lmc_request and the struct_size of the result structs included), and of every configuration key.

Each case calls one function of include/lmcache_native.h through the raw ctypes bindings with one
argument (or one layer-description field, one slot, one config value) set to an extreme value and the
others valid, and asserts the C contract for caller input:

  * the status is one of the header's pinned values (LMC_OK .. LMC_E_TIMEOUT);
  * it is never LMC_E_INTERNAL (-10): that status means a bug in the library, and no caller input may
    produce it;
  * the thread's last error message is not NULL.

Every input is its own test id (``pytest -k``-able), so a failure names the function, the argument
and the value. Memory: a length passed with a real pointer is never larger than the memory behind it
(lengths beyond it are passed with NULL, or over a read-only region of zero pages that really is that
long), and layer descriptions only ever describe memory this module owns.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
from ctypes import byref, c_int32, c_int64, c_void_p

import numpy as np
import pytest

import lmcache_native

import raw_requests as rr
from conftest import header_statuses
from lmcache_native import _bindings as b
from lmcache_native._bindings import LmcKvLayerDesc, LmcLookupResult, LmcRequest, LmcStats, LmcTierStats
from lmcache_native._bindings import LmcTransferResult

PINNED = set(header_statuses().values())  # the header's #defines: LMC_OK .. LMC_E_TIMEOUT

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
ARRAY_MAX_LENGTH = 0x7FFFFFC7  # .NET's Array.MaxLength

INT64_VALUES = [
    0, 1, -1, 2, -2, 16, 4096, INT32_MAX, INT32_MAX + 1, INT32_MIN, INT32_MIN - 1, ARRAY_MAX_LENGTH,
    ARRAY_MAX_LENGTH + 1, 2**32 - 1, 2**32, 2**53, 2**53 + 1, 3 * 10**14, 10**15, 922337203685477,
    922337203685478, 10**18, 2**62, INT64_MAX - 1, INT64_MAX, INT64_MIN + 1, INT64_MIN,
]
INT32_VALUES = [0, 1, -1, 2, -2, 3, 4, 16, 65535, 65536, INT32_MAX - 1, INT32_MAX, INT32_MIN + 1, INT32_MIN]
TIMEOUTS = [-1, 0, 1, -2, INT32_MAX, INT32_MAX + 1, 2**32, 3 * 10**14, 10**15, 922337203685477,
            922337203685478, 10**18, INT64_MAX - 1, INT64_MAX, INT64_MIN + 1, INT64_MIN]
UINT32_STRUCT_SIZES = [0, 1, 4, 7, 8, 9, 16, 40, 41, 100, 127, 128, 129, 135, 136, 137, 256, 4096]
# Numbers no engine or job of this process can have (a live handle that happens to equal one is
# skipped at run time): small integers, other kind bits, unaligned or far-future sequence numbers.
HANDLES = [1, 2, 16, 0x10000, 0x10010, 2**48, (1 << 48) | 0x10008, (2 << 48) | 0x10008, (3 << 48) | 0x10000,
           (1 << 48) | 0xFFFFFFFFFFF0, (2 << 48) | 0xFFFFFFFFFFF0, 2**63, 2**64 - 1, 2**64 - 16]

CHUNK = 16
N_TOKENS = 64  # tokens / slots arrays hold this many
EXTRA_KEY = b"extra key bytes"
BIG_REGION = 2**31 + 2**16  # read-only zero pages, for lengths near Array.MaxLength and 2^31


def _vid(value) -> str:
    """Short, stable test-id text for a value."""
    if isinstance(value, int):
        names = {INT64_MIN: "INT64_MIN", INT64_MAX: "INT64_MAX", INT32_MIN: "INT32_MIN", INT32_MAX: "INT32_MAX",
                 INT64_MIN + 1: "INT64_MIN+1", INT64_MAX - 1: "INT64_MAX-1", INT32_MIN + 1: "INT32_MIN+1",
                 INT32_MAX - 1: "INT32_MAX-1", ARRAY_MAX_LENGTH: "0x7FFFFFC7"}
        if value in names:
            return names[value]
        return hex(value) if abs(value) >= 2**20 else str(value)
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    return text if len(text) <= 40 else text[:37] + f"...({len(text)})"


def assert_contract(status: int, what: str) -> None:
    message = b.lmc_last_error_message()
    assert message is not None, f"{what}: lmc_last_error_message() returned NULL"
    text = message.decode("utf-8", "backslashreplace")
    assert status != b.LMC_E_INTERNAL, f"{what}: LMC_E_INTERNAL for caller input: {text}"
    assert status in PINNED, f"{what}: status {status} is not a pinned value ({text})"


# ------------------------------------------------------------------------------------------------
# Fixtures: an engine with one registered host layer, token/slot arrays, a finished job
# ------------------------------------------------------------------------------------------------
GEOMETRY = dict(elem_size=2, kv_count=2, num_blocks=8, block_size=8, num_kv_heads=2, head_size=4)
TOTAL_SLOTS = GEOMETRY["num_blocks"] * GEOMETRY["block_size"]


def _layer_memory():
    g = GEOMETRY
    return np.zeros((g["kv_count"], g["num_blocks"], g["block_size"], g["num_kv_heads"], g["head_size"]),
                    dtype=np.float16)


def _desc(array: np.ndarray, **overrides) -> LmcKvLayerDesc:
    g = GEOMETRY
    strides = [s // array.itemsize for s in array.strides]
    fields = dict(device_kind=b.LMC_DEVICE_HOST, device_index=0, **g, reserved=0,
                  base_address=array.ctypes.data, span_bytes=array.nbytes, kv_stride=strides[0],
                  block_stride=strides[1], token_stride=strides[2], head_stride=strides[3])
    fields.update(overrides)
    return LmcKvLayerDesc(**fields)


def _create(config: bytes | None, model: bytes | None = b"extreme", world: int = 1, worker: int = 0):
    handle = c_void_p()
    status = b.lmc_engine_create(byref(handle), config, model, world, worker)
    return status, handle.value


class Rig:
    def __init__(self):
        status, self.engine = _create(json.dumps({"chunk_size": CHUNK, "max_local_cpu_size": 0.01}).encode())
        assert status == b.LMC_OK, b.lmc_last_error_message()
        self.memory = _layer_memory()
        descs = (LmcKvLayerDesc * 1)(_desc(self.memory))
        assert b.lmc_engine_register_layers(self.engine, descs, 1) == b.LMC_OK, b.lmc_last_error_message()
        self.tokens = np.arange(1000, 1000 + N_TOKENS, dtype=np.int32)
        self.slots = np.arange(N_TOKENS, dtype=np.int64) % TOTAL_SLOTS
        self.block_ids = np.arange(GEOMETRY["num_blocks"], dtype=np.int32)
        status, _ = rr.store(self.engine, rr.request(self.tokens, slots=self.slots, extra_key=EXTRA_KEY))
        assert status == b.LMC_OK, b.lmc_last_error_message()
        status, self.job = rr.prefetch(self.engine, rr.request(self.tokens))
        assert status == b.LMC_OK, b.lmc_last_error_message()
        assert rr.job_wait(self.job)[0] == b.LMC_OK

    @property
    def tok(self) -> int:
        return self.tokens.ctypes.data

    @property
    def sl(self) -> int:
        return self.slots.ctypes.data

    @property
    def bl(self) -> int:
        return self.block_ids.ctypes.data

    def close(self):
        b.lmc_job_destroy(self.job)
        b.lmc_engine_destroy(self.engine)


@pytest.fixture(scope="module")
def rig():
    r = Rig()
    yield r
    r.close()


class _ZeroRegion:
    """BIG_REGION bytes of read-only anonymous memory (the zero page: costs no RAM)."""

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = c_void_p
        libc.mmap.argtypes = [c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [c_void_p, ctypes.c_size_t]
        PROT_READ, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 1, 2, 0x20, 0x4000
        address = libc.mmap(None, BIG_REGION, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            pytest.skip(f"mmap of {BIG_REGION} bytes failed: errno {ctypes.get_errno()}")
        self.address, self._libc = address, libc

    def close(self):
        self._libc.munmap(self.address, BIG_REGION)


@pytest.fixture(scope="module")
def zero_region():
    region = _ZeroRegion()
    yield region
    region.close()


def _key_arg(pointer_kind: str, zero_region=None):
    """extra_key pointer for a case: None, the real EXTRA_KEY bytes, or the big zero region."""
    if pointer_kind == "null":
        return None
    if pointer_kind == "real":
        return EXTRA_KEY
    return ctypes.cast(zero_region.address, ctypes.c_char_p)


# Lengths: with NULL any value; with the real buffer only values up to its size (or negative); over
# the zero region values up to BIG_REGION.
def _lengths(real_size: int):
    with_real = sorted({v for v in INT64_VALUES if v <= real_size} | {real_size, real_size - 1})
    big = [v for v in [ARRAY_MAX_LENGTH - 1, ARRAY_MAX_LENGTH, ARRAY_MAX_LENGTH + 1, INT32_MAX, 2**31, 2**31 + 1]
           if v <= BIG_REGION]
    return ([("null", v) for v in INT64_VALUES] + [("real", v) for v in with_real] + [("zeros", v) for v in big])


TOKEN_LENGTHS = [(p, v) for p, v in _lengths(N_TOKENS) if p != "zeros"]
KEY_LENGTHS = _lengths(len(EXTRA_KEY))


def _ids(cases):
    return [f"{p}-{_vid(v)}" for p, v in cases]


# ------------------------------------------------------------------------------------------------
# lmc_status_name, lmc_cuda_device_count
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", INT32_VALUES + [-10, -11, -12, -13, -100], ids=_vid)
def test_status_name(status):
    name = b.lmc_status_name(status)
    assert name is not None
    by_value = {value: name for name, value in header_statuses().items()}
    assert name.decode() == by_value.get(status, "LMC_E_UNKNOWN")


def test_cuda_device_count():
    count = c_int32(-7)
    assert_contract(b.lmc_cuda_device_count(byref(count)), "lmc_cuda_device_count")


# ------------------------------------------------------------------------------------------------
# lmc_engine_create: world_size, worker_id
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world, worker", [(w, 0) for w in INT32_VALUES] + [(1, r) for r in INT32_VALUES]
                         + [(INT32_MAX, INT32_MAX - 1), (INT32_MAX, INT32_MAX), (INT32_MIN, INT32_MIN)],
                         ids=lambda v: _vid(v))
def test_engine_create_ranks(world, worker):
    status, handle = _create(None, b"", world, worker)
    assert_contract(status, f"lmc_engine_create(world_size={world}, worker_id={worker})")
    if status == b.LMC_OK:
        b.lmc_engine_destroy(handle)


# ------------------------------------------------------------------------------------------------
# Handles: made-up numbers where an engine or a job is expected
# ------------------------------------------------------------------------------------------------
def _engine_calls(rig):
    out, count, stats, tier = c_int64(), c_int32(), LmcStats(), LmcTierStats()
    job = c_void_p()
    req = rr.request(rig.tok, 8, slots=rig.sl)
    lookup_result, transfer_result = LmcLookupResult(), LmcTransferResult()
    return {
        "lmc_engine_get_config": lambda h: b.lmc_engine_get_config(byref(out), h, None, 0),
        "lmc_engine_register_layers": lambda h: b.lmc_engine_register_layers(
            h, (LmcKvLayerDesc * 1)(_desc(rig.memory)), 1),
        "lmc_lookup": lambda h: b.lmc_lookup(byref(lookup_result), h, byref(req)),
        "lmc_store": lambda h: b.lmc_store(byref(transfer_result), h, byref(req), None),
        "lmc_retrieve": lambda h: b.lmc_retrieve(byref(transfer_result), h, byref(req), None),
        "lmc_store(job)": lambda h: b.lmc_store(None, h, byref(req), byref(job)),
        "lmc_retrieve(job)": lambda h: b.lmc_retrieve(None, h, byref(req), byref(job)),
        "lmc_lookup_server_start": lambda h: b.lmc_lookup_server_start(h, b"/nonexistent-dir/sock"),
        "lmc_lookup_server_stop": lambda h: b.lmc_lookup_server_stop(h),
        "lmc_prefetch_start": lambda h: b.lmc_prefetch_start(byref(job), h, byref(req)),
        "lmc_engine_get_stats": lambda h: b.lmc_engine_get_stats(h, byref(stats)),
        "lmc_engine_tier_count": lambda h: b.lmc_engine_tier_count(byref(count), h),
        "lmc_engine_get_tier_stats": lambda h: b.lmc_engine_get_tier_stats(h, 0, byref(tier)),
        "lmc_engine_get_tier_nodes": lambda h: b.lmc_engine_get_tier_nodes(byref(out), h, 0, None, 0),
        "lmc_engine_flush": lambda h: b.lmc_engine_flush(h, 0),
        "lmc_engine_clear": lambda h: b.lmc_engine_clear(h),
        "lmc_engine_get_metrics": lambda h: b.lmc_engine_get_metrics(byref(out), h, None, 0),
    }


ENGINE_FUNCTIONS = ["lmc_engine_get_config", "lmc_engine_register_layers", "lmc_lookup", "lmc_store", "lmc_retrieve",
                    "lmc_store(job)", "lmc_retrieve(job)", "lmc_lookup_server_start", "lmc_lookup_server_stop",
                    "lmc_prefetch_start", "lmc_engine_get_stats", "lmc_engine_tier_count",
                    "lmc_engine_get_tier_stats", "lmc_engine_get_tier_nodes", "lmc_engine_flush", "lmc_engine_clear",
                    "lmc_engine_get_metrics"]


@pytest.mark.parametrize("handle", HANDLES, ids=_vid)
@pytest.mark.parametrize("function", ENGINE_FUNCTIONS)
def test_made_up_engine_handle(rig, function, handle):
    if handle in (rig.engine, rig.job):
        pytest.skip("the made-up number is a live handle")
    status = _engine_calls(rig)[function](handle)
    assert_contract(status, f"{function}(engine={handle:#x})")
    assert status == b.LMC_E_INVALID_HANDLE, f"{function}(engine={handle:#x}) returned {b.status_name(status)}"


@pytest.mark.parametrize("handle", HANDLES, ids=_vid)
def test_made_up_job_handle(rig, handle):
    if handle in (rig.engine, rig.job):
        pytest.skip("the made-up number is a live handle")
    result = LmcTransferResult(tokens_matched=-7)
    finished = c_int32(-7)
    for name, call in [("lmc_job_wait", lambda: b.lmc_job_wait(byref(result), handle, 0)),
                       ("lmc_job_result", lambda: b.lmc_job_result(byref(result), handle)),
                       ("lmc_job_poll", lambda: b.lmc_job_poll(byref(finished), handle))]:
        status = call()
        assert_contract(status, f"{name}(job={handle:#x})")
        assert status == b.LMC_E_INVALID_HANDLE, f"{name}(job={handle:#x}) returned {b.status_name(status)}"
    assert result.tokens_matched == -7 and finished.value == -7, "a failed call wrote its out-parameter"
    b.lmc_job_destroy(handle)  # a no-op; must not crash
    b.lmc_engine_destroy(handle)
    assert b.lmc_engine_get_stats(rig.engine, byref(LmcStats())) == b.LMC_OK


# ------------------------------------------------------------------------------------------------
# lmc_engine_get_config: capacity
# ------------------------------------------------------------------------------------------------
CONFIG_BUFFER = 4096


@pytest.mark.parametrize("pointer, capacity", [("null", v) for v in INT64_VALUES]
                         + [("real", v) for v in INT64_VALUES if v <= CONFIG_BUFFER], ids=_ids(
    [("null", v) for v in INT64_VALUES] + [("real", v) for v in INT64_VALUES if v <= CONFIG_BUFFER]))
def test_get_config_capacity(rig, pointer, capacity):
    buffer = ctypes.create_string_buffer(CONFIG_BUFFER)
    needed = c_int64()
    status = b.lmc_engine_get_config(byref(needed), rig.engine, buffer if pointer == "real" else None, capacity)
    assert_contract(status, f"lmc_engine_get_config({pointer}, capacity={capacity})")


# ------------------------------------------------------------------------------------------------
# lmc_engine_register_layers: num_layers, struct_size and every field of the description
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_engine():
    status, handle = _create(json.dumps({"chunk_size": CHUNK, "max_local_cpu_size": 0.01}).encode())
    assert status == b.LMC_OK
    yield handle
    b.lmc_engine_destroy(handle)


NUM_LAYERS_CASES = [("null", v) for v in INT32_VALUES] + [("real", v) for v in INT32_VALUES if v <= 1]


@pytest.mark.parametrize("pointer, num_layers", NUM_LAYERS_CASES, ids=_ids(NUM_LAYERS_CASES))
def test_register_num_layers(fresh_engine, pointer, num_layers):
    memory = _layer_memory()
    layers = (LmcKvLayerDesc * 1)(_desc(memory)) if pointer == "real" else None
    status = b.lmc_engine_register_layers(fresh_engine, layers, num_layers)
    assert_contract(status, f"lmc_engine_register_layers({pointer}, num_layers={num_layers})")


INT32_FIELDS = ["device_kind", "device_index", "elem_size", "kv_count", "num_blocks", "block_size", "num_kv_heads",
                "head_size", "reserved"]
INT64_FIELDS = ["kv_stride", "block_stride", "token_stride", "head_stride"]
FIELD_CASES = ([(f, v) for f in INT32_FIELDS for v in INT32_VALUES]
               + [(f, v) for f in INT64_FIELDS for v in INT64_VALUES]
               + [("struct_size", v) for v in UINT32_STRUCT_SIZES + [2**32 - 1, 2**31, 4104]])


@pytest.mark.parametrize("field, value", FIELD_CASES, ids=[f"{f}={_vid(v)}" for f, v in FIELD_CASES])
def test_register_layer_field(fresh_engine, field, value):
    # One layer: the library reads only it, whatever struct_size says (it refuses more than 4096).
    memory = _layer_memory()
    if field == "device_kind" and value == b.LMC_DEVICE_CUDA:
        pytest.skip("a CUDA layer over host memory is the GPU suite's business")
    layers = (LmcKvLayerDesc * 1)(_desc(memory, **{field: value}))
    status = b.lmc_engine_register_layers(fresh_engine, layers, 1)
    assert_contract(status, f"lmc_engine_register_layers({field}={value})")


def _address_cases():
    # (name, base offset from the array, span): base/span never describe memory past the array,
    # except NULL bases (refused before anything is read).
    size = _layer_memory().nbytes
    return [("base=NULL,span=0", None, 0), ("base=NULL,span=size", None, size),
            ("base=NULL,span=UINT64_MAX", None, 2**64 - 1), ("base+1(misaligned)", 1, size - 1),
            ("span=0", 0, 0), ("span=1", 0, 1), ("span=size-1", 0, size - 1), ("span=size", 0, size),
            ("base=end-2,span=2", size - 2, 2), ("base=end,span=0", size, 0)]


ADDRESS_CASES = _address_cases()


@pytest.mark.parametrize("offset, span", [(o, s) for _, o, s in ADDRESS_CASES], ids=[n for n, _, _ in ADDRESS_CASES])
def test_register_base_and_span(fresh_engine, offset, span):
    memory = _layer_memory()
    base = 0 if offset is None else memory.ctypes.data + offset
    layers = (LmcKvLayerDesc * 1)(_desc(memory, base_address=base, span_bytes=span))
    status = b.lmc_engine_register_layers(fresh_engine, layers, 1)
    assert_contract(status, f"lmc_engine_register_layers(base offset {offset}, span {span})")
    if offset is not None and span < memory.nbytes - (offset or 0):
        assert status == b.LMC_E_INVALID_ARGUMENT  # the layout does not fit in the span


# ------------------------------------------------------------------------------------------------
# lmc_lookup / lmc_prefetch_start / lmc_store / lmc_retrieve (synchronous and as jobs): every
# numeric field of lmc_request, every length and position
# ------------------------------------------------------------------------------------------------
REQUEST_FUNCTIONS = ["lmc_lookup", "lmc_prefetch_start", "lmc_store", "lmc_retrieve", "lmc_store(job)",
                     "lmc_retrieve(job)"]
TRANSFER_FUNCTIONS = ["lmc_store", "lmc_retrieve", "lmc_store(job)", "lmc_retrieve(job)"]


def _key(pointer, zero_region):
    return _key_arg(pointer, zero_region if pointer == "zeros" else None)


@pytest.mark.parametrize("pointer, num_tokens", TOKEN_LENGTHS, ids=_ids(TOKEN_LENGTHS))
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS + ["lmc_remote_lookup"])
def test_num_tokens(rig, lookup_socket, function, pointer, num_tokens):
    tok = rig.tok if pointer == "real" else None
    sl = rig.sl if pointer == "real" else None
    status = _call_transfer(rig, lookup_socket, function, tok=tok, sl=sl, n=num_tokens)
    assert_contract(status, f"{function}(tokens={pointer}, num_tokens={num_tokens})")


@pytest.mark.parametrize("pointer, num_tokens", TOKEN_LENGTHS, ids=_ids(TOKEN_LENGTHS))
@pytest.mark.parametrize("function", TRANSFER_FUNCTIONS)
def test_num_tokens_with_a_block_table(rig, function, pointer, num_tokens):
    tok = rig.tok if pointer == "real" else None
    status = _call_transfer(rig, None, function, tok=tok, n=num_tokens, blocks="default")
    assert_contract(status, f"{function}(block table, tokens={pointer}, num_tokens={num_tokens})")


@pytest.mark.parametrize("pointer, extra_key_len", KEY_LENGTHS, ids=_ids(KEY_LENGTHS))
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS + ["lmc_remote_lookup"])
def test_extra_key_len(rig, lookup_socket, zero_region, function, pointer, extra_key_len):
    status = _call_transfer(rig, lookup_socket, function, key=_key(pointer, zero_region), key_len=extra_key_len)
    assert_contract(status, f"{function}(extra_key={pointer}, extra_key_len={extra_key_len})")


EXTRA_KEY_LIMIT = 1 << 20  # the header's bound on extra_key_len, the same for every function


@pytest.mark.parametrize("extra_key_len", [EXTRA_KEY_LIMIT + 1, 64 << 20], ids=_vid)
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_extra_key_over_the_limit_is_refused_by_the_call(rig, zero_region, function, extra_key_len):
    # Refused by the call itself (not by a job later): a caller's wrong length must not first cost a
    # copy of up to 2 GiB.
    status = _call_transfer(rig, None, function, key=_key("zeros", zero_region), key_len=extra_key_len)
    assert_contract(status, f"{function}(extra_key_len={extra_key_len})")
    assert status == b.LMC_E_INVALID_ARGUMENT, \
        f"{function}(extra_key_len={extra_key_len}) returned {b.status_name(status)}, not LMC_E_INVALID_ARGUMENT"


@pytest.mark.parametrize("value", INT64_VALUES, ids=_vid)
@pytest.mark.parametrize("destination", ["slots", "block-table"])
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_first_token(rig, function, destination, value):
    # store: skip_leading_tokens; retrieve: first_token_to_write; lookup and prefetch: must be 0.
    status = _call_transfer(rig, None, function, position=value,
                            blocks="default" if destination == "block-table" else None)
    assert_contract(status, f"{function}({destination}, first_token={value})")
    if function in ("lmc_lookup", "lmc_prefetch_start") and value != 0:
        assert status == b.LMC_E_INVALID_ARGUMENT, f"{function}(first_token={value}): {b.status_name(status)}"
    if not 0 <= value <= N_TOKENS:
        assert status == b.LMC_E_INVALID_ARGUMENT, f"{function}(first_token={value}): {b.status_name(status)}"


@pytest.mark.parametrize("kind", INT32_VALUES, ids=_vid)
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_destination_kind(rig, function, kind):
    # Both destinations are filled in validly, so only the kind itself decides.
    status = _call_transfer(rig, None, function, blocks="default", kind=kind)
    assert_contract(status, f"{function}(destination_kind={kind})")
    if function in TRANSFER_FUNCTIONS:
        expected_ok = kind in (b.LMC_DESTINATION_SLOTS, b.LMC_DESTINATION_BLOCK_TABLE)
        assert (status == b.LMC_OK) == expected_ok, f"{function}(destination_kind={kind}): {b.status_name(status)}"


NUM_BLOCK_IDS_CASES = [("null", v) for v in INT64_VALUES] + \
    [("real", v) for v in INT64_VALUES if v <= GEOMETRY["num_blocks"]] + [("real", GEOMETRY["num_blocks"] - 1)]


@pytest.mark.parametrize("pointer, num_block_ids", NUM_BLOCK_IDS_CASES, ids=_ids(NUM_BLOCK_IDS_CASES))
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_num_block_ids(rig, function, pointer, num_block_ids):
    blocks = rig.bl if pointer == "real" else None
    status = _call_transfer(rig, None, function, blocks=blocks, num_blocks=num_block_ids)
    assert_contract(status, f"{function}(block_ids={pointer}, num_block_ids={num_block_ids})")
    if function in TRANSFER_FUNCTIONS and (num_block_ids < 0 or (pointer == "null" and num_block_ids > 0)):
        assert status == b.LMC_E_INVALID_ARGUMENT, \
            f"{function}(block_ids={pointer}, num_block_ids={num_block_ids}): {b.status_name(status)}"


@pytest.mark.parametrize("block_size", INT32_VALUES, ids=_vid)
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_table_block_size(rig, function, block_size):
    status = _call_transfer(rig, None, function, blocks="default", block_size=block_size, tokens_fresh=True)
    assert_contract(status, f"{function}(table_block_size={block_size})")
    if function in TRANSFER_FUNCTIONS and block_size < 1:
        assert status == b.LMC_E_INVALID_ARGUMENT, f"{function}(table_block_size={block_size}): {b.status_name(status)}"


@pytest.mark.parametrize("reserved", [v for v in INT32_VALUES if v != 0], ids=_vid)
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_request_reserved_must_be_zero(rig, function, reserved):
    status = _call_transfer(rig, None, function, reserved=reserved)
    assert_contract(status, f"{function}(reserved={reserved})")
    assert status == b.LMC_E_INVALID_ARGUMENT, f"{function}(reserved={reserved}): {b.status_name(status)}"


REQUEST_STRUCT_SIZES = UINT32_STRUCT_SIZES + [87, 88, 89, 2**31, 2**32 - 1]


@pytest.mark.parametrize("struct_size", REQUEST_STRUCT_SIZES, ids=_vid)
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_request_struct_size(rig, function, struct_size):
    # The request lies at the start of 4096 zeroed bytes: a library that reads struct_size bytes of a
    # newer caller's struct (at most 4096 here, it must cap larger values) reads only this memory.
    status = _call_transfer(rig, None, function, request_struct_size=struct_size)
    assert_contract(status, f"{function}(request.struct_size={struct_size})")


RESULT_FUNCTIONS = ["lmc_lookup", "lmc_store", "lmc_retrieve", "lmc_job_wait", "lmc_job_result"]


@pytest.mark.parametrize("struct_size", UINT32_STRUCT_SIZES + [55, 56, 57, 79, 80, 81], ids=_vid)
@pytest.mark.parametrize("function", RESULT_FUNCTIONS)
def test_result_struct_size(rig, function, struct_size):
    buffer = (ctypes.c_uint8 * 4096)()
    ctypes.c_uint32.from_buffer(buffer).value = struct_size
    req = rr.request(rig.tok, N_TOKENS, slots=rig.sl, extra_key=EXTRA_KEY)
    if function == "lmc_lookup":
        status = b.lmc_lookup(buffer, rig.engine, byref(req))
    elif function == "lmc_store":
        status = b.lmc_store(buffer, rig.engine, byref(req), None)
    elif function == "lmc_retrieve":
        status = b.lmc_retrieve(buffer, rig.engine, byref(req), None)
    elif function == "lmc_job_wait":
        status = b.lmc_job_wait(buffer, rig.job, -1)
    else:
        status = b.lmc_job_result(buffer, rig.job)
    assert_contract(status, f"{function}(result.struct_size={struct_size})")
    assert bytes(buffer[max(struct_size, 4):]) == bytes(4096 - max(struct_size, 4)), "wrote past struct_size"
    if struct_size < 8:
        assert status == b.LMC_E_INVALID_ARGUMENT, f"{function}(result.struct_size={struct_size}): {b.status_name(status)}"


SLOT_VALUES = [-1, -2, 0, TOTAL_SLOTS - 1, TOTAL_SLOTS, TOTAL_SLOTS + 1, INT32_MAX, INT32_MAX + 1, 2**32, INT64_MAX,
               INT64_MIN, INT64_MIN + 1]


@pytest.mark.parametrize("slot", SLOT_VALUES, ids=_vid)
@pytest.mark.parametrize("position", [0, 17, N_TOKENS - 1])
@pytest.mark.parametrize("function", TRANSFER_FUNCTIONS)
def test_slot_value(rig, function, position, slot):
    slots = rig.slots.copy()
    slots[position] = slot
    status = _call_transfer(rig, None, function, sl=slots.ctypes.data, tokens_fresh=True)
    assert_contract(status, f"{function}(slot_mapping[{position}]={slot})")
    if slot < -1 or slot >= TOTAL_SLOTS:
        assert status == b.LMC_E_INVALID_ARGUMENT, f"{function}(slot_mapping[{position}]={slot}): {b.status_name(status)}"


BLOCK_ID_VALUES = [-1, -2, 0, GEOMETRY["num_blocks"] - 1, GEOMETRY["num_blocks"], GEOMETRY["num_blocks"] + 1,
                   2**28, INT32_MAX, INT32_MIN, INT32_MIN + 1]


@pytest.mark.parametrize("block_id", BLOCK_ID_VALUES, ids=_vid)
@pytest.mark.parametrize("position", [0, 2, GEOMETRY["num_blocks"] - 1])
@pytest.mark.parametrize("function", TRANSFER_FUNCTIONS)
def test_block_id_value(rig, function, position, block_id):
    blocks = rig.block_ids.copy()
    blocks[position] = block_id
    status = _call_transfer(rig, None, function, blocks=blocks.ctypes.data, tokens_fresh=True)
    assert_contract(status, f"{function}(block_ids[{position}]={block_id})")
    if block_id < -1 or block_id >= GEOMETRY["num_blocks"]:
        assert status == b.LMC_E_INVALID_ARGUMENT, f"{function}(block_ids[{position}]={block_id}): {b.status_name(status)}"


@pytest.mark.parametrize("token", INT32_VALUES, ids=_vid)
@pytest.mark.parametrize("function", ["lmc_lookup", "lmc_store", "lmc_retrieve", "lmc_prefetch_start"])
def test_token_value(rig, function, token):
    tokens = np.full(N_TOKENS, token, dtype=np.int32)
    status = _call_transfer(rig, None, function, tok=tokens.ctypes.data)
    assert_contract(status, f"{function}(tokens all {token})")


@pytest.mark.parametrize("stream", [1, 0xDEADBEEF, 2**64 - 1], ids=_vid)
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_stream_is_ignored_with_host_layers(rig, function, stream):
    status = _call_transfer(rig, None, function, stream=stream)
    assert_contract(status, f"{function}(stream={stream:#x})")
    assert status == b.LMC_OK, b.lmc_last_error_message()


def _call_transfer(rig, socket_path, function, tok="default", sl="default", n=N_TOKENS, key=EXTRA_KEY,
                   key_len=len(EXTRA_KEY), position=0, stream=None, tokens_fresh=False, blocks=None,
                   num_blocks=None, block_size=GEOMETRY["block_size"], kind=None, reserved=0,
                   request_struct_size=None):
    """Calls one of the request functions with the rig's valid arguments except those given
    ("lmc_store(job)": job_out != NULL). ``blocks`` is None (a slot mapping), "default" (the rig's
    block table, with its slot mapping filled in too) or an address. Jobs it gets are waited for
    (also through lmc_job_poll and lmc_job_result) and destroyed."""
    if tok == "default":
        tok = rig.tok
    if sl == "default":
        sl = rig.sl
    if tokens_fresh:  # tokens never stored: a store copies, a retrieve misses
        fresh = np.arange(5_000_000, 5_000_000 + N_TOKENS, dtype=np.int32)
        fresh[0] = np.int32(np.random.default_rng().integers(0, 2**31 - 1))
        tok = fresh.ctypes.data
        rig._keepalive = fresh
    if blocks == "default":
        blocks = rig.bl
    if blocks is not None and num_blocks is None:
        num_blocks = GEOMETRY["num_blocks"]
    if kind is None:
        kind = b.LMC_DESTINATION_SLOTS if blocks is None and num_blocks is None else b.LMC_DESTINATION_BLOCK_TABLE
    if isinstance(key, bytes):
        key = ctypes.cast(ctypes.c_char_p(key), c_void_p).value  # the caller's length, not len(key)
        rig._key_keepalive = EXTRA_KEY
    req = rr.request(tok, n, slots=sl, block_ids=blocks, num_block_ids=num_blocks or 0, block_size=block_size,
                     first_token=position, extra_key=key, extra_key_len=key_len, kind=kind, stream=stream,
                     reserved=reserved)
    request_arg = byref(req)
    if request_struct_size is not None:
        big = (ctypes.c_uint8 * 4096)()
        ctypes.memmove(big, byref(req), ctypes.sizeof(LmcRequest))
        ctypes.c_uint32.from_buffer(big).value = request_struct_size & 0xFFFFFFFF
        request_arg, rig._request_keepalive = big, big
    transfer, lookup_result, job = LmcTransferResult(), LmcLookupResult(), c_void_p()
    if function == "lmc_lookup":
        status = b.lmc_lookup(byref(lookup_result), rig.engine, request_arg)
    elif function == "lmc_prefetch_start":
        status = b.lmc_prefetch_start(byref(job), rig.engine, request_arg)
    elif function == "lmc_store":
        status = b.lmc_store(byref(transfer), rig.engine, request_arg, None)
    elif function == "lmc_retrieve":
        status = b.lmc_retrieve(byref(transfer), rig.engine, request_arg, None)
    elif function == "lmc_store(job)":
        status = b.lmc_store(None, rig.engine, request_arg, byref(job))
    elif function == "lmc_retrieve(job)":
        status = b.lmc_retrieve(None, rig.engine, request_arg, byref(job))
    elif function == "lmc_remote_lookup":
        out = c_int64()
        key_pointer = ctypes.cast(key, ctypes.c_char_p) if isinstance(key, int) else key
        status = b.lmc_remote_lookup(byref(out), socket_path, tok, n, key_pointer, key_len, 5000)
    else:
        raise AssertionError(function)
    if status == b.LMC_OK and job.value:
        wait_status, _ = rr.job_wait(job.value, -1)
        assert_contract(wait_status, f"lmc_job_wait after {function}")
        poll_status, finished = rr.job_poll(job.value)
        assert poll_status == b.LMC_OK and finished == 1, f"lmc_job_poll after {function}: {poll_status}, {finished}"
        result_status = b.lmc_job_result(byref(transfer), job.value)
        assert result_status == wait_status, f"lmc_job_result after {function}: {result_status} != {wait_status}"
        b.lmc_job_destroy(job.value)
    return status


# ------------------------------------------------------------------------------------------------
# Lookups across processes: socket path, timeouts
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lookup_socket(rig, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sock")
    path = str(directory / "s").encode()
    assert b.lmc_lookup_server_start(rig.engine, path) == b.LMC_OK, b.lmc_last_error_message()
    yield path
    b.lmc_lookup_server_stop(rig.engine)


@pytest.mark.parametrize("timeout", TIMEOUTS, ids=_vid)
@pytest.mark.parametrize("server", ["serving", "no-server"])
def test_remote_lookup_timeout(rig, lookup_socket, tmp_path, server, timeout):
    path = lookup_socket if server == "serving" else str(tmp_path / "nobody").encode()
    out = c_int64()
    status = b.lmc_remote_lookup(byref(out), path, rig.tok, N_TOKENS, EXTRA_KEY, len(EXTRA_KEY), timeout)
    assert_contract(status, f"lmc_remote_lookup({server}, timeout_ms={timeout})")


def _socket_paths():
    return [("NULL", None), ("empty", b""), ("107-bytes", None), ("108-bytes", None), ("300-bytes", None),
            ("lone-surrogate-cesu8", b"\xed\xa0\x80"), ("invalid-utf8", b"\xff\xfe"), ("missing-dir", None),
            ("a-directory", None), ("a-regular-file", None)]


SOCKET_PATHS = _socket_paths()


def _socket_path(kind, raw, tmp_path):
    base = str(tmp_path).encode()
    if kind in ("107-bytes", "108-bytes", "300-bytes"):
        size = int(kind.split("-")[0])
        return base + b"/" + b"x" * max(1, size - len(base) - 1)
    if kind in ("lone-surrogate-cesu8", "invalid-utf8"):
        return base + b"/" + raw
    if kind == "missing-dir":
        return base + b"/missing/s"
    if kind == "a-directory":
        return base
    if kind == "a-regular-file":
        (tmp_path / "regular").write_bytes(b"keep me")
        return base + b"/regular"
    return raw


@pytest.mark.parametrize("kind, raw", SOCKET_PATHS, ids=[k for k, _ in SOCKET_PATHS])
def test_remote_lookup_socket_path(rig, tmp_path, kind, raw):
    out = c_int64()
    path = _socket_path(kind, raw, tmp_path)
    status = b.lmc_remote_lookup(byref(out), path, rig.tok, N_TOKENS, None, 0, 1000)
    assert_contract(status, f"lmc_remote_lookup(socket_path={kind})")


@pytest.mark.parametrize("kind, raw", SOCKET_PATHS, ids=[k for k, _ in SOCKET_PATHS])
def test_lookup_server_start_socket_path(fresh_engine, tmp_path, kind, raw):
    path = _socket_path(kind, raw, tmp_path)
    status = b.lmc_lookup_server_start(fresh_engine, path)
    assert_contract(status, f"lmc_lookup_server_start(socket_path={kind})")
    b.lmc_lookup_server_stop(fresh_engine)


def test_lookup_server_start_never_deletes_a_regular_file(fresh_engine, tmp_path):
    # The header replaces "a socket file nobody listens on"; a regular file at the path is not one.
    regular = tmp_path / "regular"
    regular.write_bytes(b"keep me")
    status = b.lmc_lookup_server_start(fresh_engine, str(regular).encode())
    assert_contract(status, "lmc_lookup_server_start(socket_path=a regular file)")
    b.lmc_lookup_server_stop(fresh_engine)
    assert regular.exists() and regular.read_bytes() == b"keep me", \
        f"lmc_lookup_server_start deleted the regular file at socket_path (status {b.status_name(status)})"


# ------------------------------------------------------------------------------------------------
# Jobs, flush, stats
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", TIMEOUTS, ids=_vid)
def test_job_wait_timeout(rig, timeout):
    status, _ = rr.job_wait(rig.job, timeout)
    assert_contract(status, f"lmc_job_wait(timeout_ms={timeout})")


@pytest.mark.parametrize("timeout", TIMEOUTS, ids=_vid)
def test_job_wait_timeout_on_destroyed_job(rig, timeout):
    status, job = rr.prefetch(rig.engine, rr.request(rig.tok, 8))
    assert status == b.LMC_OK
    b.lmc_job_destroy(job)
    status, _ = rr.job_wait(job, timeout)
    assert_contract(status, f"lmc_job_wait(destroyed job, timeout_ms={timeout})")
    assert status == b.LMC_E_INVALID_HANDLE


@pytest.fixture(scope="module")
def disk_engine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("disk")
    status, handle = _create(json.dumps({"chunk_size": CHUNK, "max_local_cpu_size": 0.01,
                                         "local_disk": str(directory), "max_local_disk_size": 0.01}).encode())
    assert status == b.LMC_OK, b.lmc_last_error_message()
    yield handle
    b.lmc_engine_destroy(handle)


@pytest.mark.parametrize("timeout", TIMEOUTS, ids=_vid)
@pytest.mark.parametrize("engine_kind", ["cpu-only", "with-disk-tier"])
def test_flush_timeout(rig, disk_engine, engine_kind, timeout):
    engine = rig.engine if engine_kind == "cpu-only" else disk_engine
    status = b.lmc_engine_flush(engine, timeout)
    assert_contract(status, f"lmc_engine_flush({engine_kind}, timeout_ms={timeout})")


@pytest.mark.parametrize("struct_size", UINT32_STRUCT_SIZES, ids=_vid)
def test_get_stats_struct_size(rig, struct_size):
    buffer = (ctypes.c_uint8 * 4096)()
    ctypes.c_uint32.from_buffer(buffer).value = struct_size
    status = b.lmc_engine_get_stats(rig.engine, ctypes.cast(buffer, ctypes.POINTER(LmcStats)))
    assert_contract(status, f"lmc_engine_get_stats(struct_size={struct_size})")
    assert bytes(buffer[max(struct_size, 4):]) == bytes(4096 - max(struct_size, 4)), "wrote past struct_size"


@pytest.mark.parametrize("struct_size", UINT32_STRUCT_SIZES, ids=_vid)
@pytest.mark.parametrize("tier_index", INT32_VALUES, ids=_vid)
def test_get_tier_stats(disk_engine, tier_index, struct_size):
    buffer = (ctypes.c_uint8 * 4096)()
    ctypes.c_uint32.from_buffer(buffer).value = struct_size
    status = b.lmc_engine_get_tier_stats(disk_engine, tier_index, ctypes.cast(buffer, ctypes.POINTER(LmcTierStats)))
    assert_contract(status, f"lmc_engine_get_tier_stats(tier_index={tier_index}, struct_size={struct_size})")
    assert bytes(buffer[max(struct_size, 4):]) == bytes(4096 - max(struct_size, 4)), "wrote past struct_size"


# ------------------------------------------------------------------------------------------------
# Configuration: every key of EngineConfig.cs with extreme values (JSON number text included)
# ------------------------------------------------------------------------------------------------
# Every key of the library's schema, plus the connector-only keys the engine refuses as unknown.
CONNECTOR_ONLY_KEYS = ["save_decode_cache", "min_retrieve_tokens", "enable_async_loading", "lookup_timeout_ms",
                       "priority_limit"]
CONFIG_KEYS = [key["name"] for key in lmcache_native.config_schema()] + CONNECTOR_ONLY_KEYS

# JSON value texts, spliced in verbatim (so 1e400 and 9223372036854775808 stay number text).
CONFIG_VALUES = [
    "0", "-0", "1", "-1", "0.5", "-0.5", "2147483647", "2147483648", "-2147483648", "-2147483649", "4294967296",
    "9223372036854775807", "9223372036854775808", "-9223372036854775809", "18446744073709551616",
    "123456789012345678901234567890", "1e300", "-1e300", "1e308", "1.7976931348623157e308", "1e400", "-1e400",
    "1e-400", "5e-324", "3600000.0000001", "1048577", "1073741825", "NaN", "Infinity", "-Infinity", '"NaN"',
    '"Infinity"', "true", "false", "null", '""', '"\\ud800"', '"\\udfff"', '"a\\ud800b"', '"\\udc00\\ud800"',
    '"\\u0000"', "[]", "{}", "[1]", '{"a": 1}', "[" * 2000 + "]" * 2000, '{"a":' * 2000 + "1" + "}" * 2000,
    '{"\\ud800": 1}', '{"remote_ttl_secs": 1e300}',
]


def _config_id(value: str) -> str:
    return _vid(value) if len(value) <= 40 else f"{value[:6]}...({len(value)})"


def _create_status(text: bytes) -> int:
    status, handle = _create(text)
    if status == b.LMC_OK:
        b.lmc_engine_destroy(handle)
    return status


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    # A local_disk value that is a relative path (e.g. "\ud800" once decoded) lands here.
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("value", CONFIG_VALUES, ids=_config_id)
@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_config_value(in_tmp_cwd, key, value):
    text = f'{{"{key}": {value}}}'.encode()
    status = _create_status(text)
    assert_contract(status, f"lmc_engine_create(config={text[:120]!r})")


REMOTE_TTL_VALUES = ["1", "0.001", "0", "-1", "1e300", "-1e300", "1e308", "1e400", "5e-324", "9223372036854775807",
                     "9223372036854775808", "922337203685.4775", "922337203686", "NaN", "Infinity", '"1"',
                     '"\\ud800"', "true", "null", "[]", "{}"]


@pytest.mark.parametrize("value", REMOTE_TTL_VALUES, ids=_config_id)
def test_config_remote_ttl_secs(in_tmp_cwd, value):
    text = f'{{"remote_url": "redis://127.0.0.1:1/0", "blocking_timeout_secs": 0.1, ' \
           f'"extra_config": {{"remote_ttl_secs": {value}}}}}'.encode()
    status = _create_status(text)
    assert_contract(status, f"lmc_engine_create(config={text!r})")


RAW_CONFIGS = [
    ("lone-surrogate-key", b'{"\\ud800": 1}'),
    ("lone-low-surrogate-key", b'{"\\udfff": 1}'),
    ("lone-surrogate-in-extra_config-key", b'{"extra_config": {"\\ud800": 1}}'),
    ("lone-surrogate-in-extra_config-value", b'{"extra_config": {"a": "\\ud800"}}'),
    ("invalid-utf8-key", b'{"\xff\xfe": 1}'),
    ("invalid-utf8-value", b'{"cache_policy": "\xff\xfe"}'),
    ("cesu8-surrogate-value", b'{"cache_policy": "\xed\xa0\x80"}'),
    ("escaped-key-spelling", b'{"chunk_\\u0073ize": 16}'),
    ("deep-array", b"[" * 100000),
    ("deep-object-in-extra_config", b'{"extra_config": ' + b'{"a":' * 100000 + b"1" + b"}" * 100001),
    ("huge-number-text", b'{"chunk_size": 1' + b"0" * 10000 + b"}"),
    ("huge-exponent", b'{"max_local_cpu_size": 1e99999999999999999999}'),
    ("trailing-garbage", b'{"chunk_size": 16} x'),
    ("comment", b'{"chunk_size": 16 /* c */}'),
    ("duplicate-key", b'{"chunk_size": 16, "chunk_size": 16}'),
    ("not-an-object", b"42"),
    ("empty-text", b""),
    ("whitespace", b"   \n\t "),
]


@pytest.mark.parametrize("text", [t for _, t in RAW_CONFIGS], ids=[n for n, _ in RAW_CONFIGS])
def test_config_text(in_tmp_cwd, text):
    status = _create_status(text)
    assert_contract(status, f"lmc_engine_create(config={text[:80]!r})")


MODEL_NAMES = [("empty", b""), ("invalid-utf8", b"\xff\xfe"), ("cesu8-surrogate", b"\xed\xa0\x80"),
               ("long-64k", b"m" * 65536), ("NULL", None)]


@pytest.mark.parametrize("model", [m for _, m in MODEL_NAMES], ids=[n for n, _ in MODEL_NAMES])
def test_model_name(model):
    status, handle = _create(None, model)
    assert_contract(status, f"lmc_engine_create(model_name={model[:20] if model else model!r})")
    if status == b.LMC_OK:
        b.lmc_engine_destroy(handle)


# ------------------------------------------------------------------------------------------------
# Every export as the very first call of a process into the library (the runtime starts up in it)
# ------------------------------------------------------------------------------------------------
# Each snippet runs in a fresh interpreter that loads the library with ctypes alone (importing
# lmcache_native would call lmc_abi_version first). Arguments are NULL handles, NULL buffers or
# small out-parameters: every call must return a status, not kill the process.
FIRST_CALLS = {
    "lmc_version_number": "lib.lmc_version_number()",
    "lmc_abi_version": "lib.lmc_abi_version()",
    "lmc_version_string": "0 if lib.lmc_version_string() is not None else -99",
    "lmc_status_name": "0 if lib.lmc_status_name(-10) is not None else -99",
    "lmc_last_error_message": "0 if lib.lmc_last_error_message() is not None else -99",
    "lmc_engine_create": "lib.lmc_engine_create(byref(ptr), None, b'', 1, 0)",
    "lmc_engine_destroy": "lib.lmc_engine_destroy(None) or 0",
    "lmc_engine_get_config": "lib.lmc_engine_get_config(byref(i64), None, None, 0)",
    "lmc_config_schema": "lib.lmc_config_schema(byref(i64), None, 0)",
    "lmc_engine_register_layers": "lib.lmc_engine_register_layers(None, None, 1)",
    "lmc_lookup": "lib.lmc_lookup(byref(lookup_result), None, byref(request))",
    "lmc_store": "lib.lmc_store(byref(transfer_result), None, byref(request), None)",
    "lmc_retrieve": "lib.lmc_retrieve(byref(transfer_result), None, byref(request), None)",
    "lmc_lookup_server_start": "lib.lmc_lookup_server_start(None, b'/nonexistent/s')",
    "lmc_lookup_server_stop": "lib.lmc_lookup_server_stop(None)",
    "lmc_remote_lookup": "lib.lmc_remote_lookup(byref(i64), b'/nonexistent/s', None, 0, None, 0, 100)",
    "lmc_prefetch_start": "lib.lmc_prefetch_start(byref(ptr), None, byref(request))",
    "lmc_job_wait": "lib.lmc_job_wait(byref(transfer_result), None, 0)",
    "lmc_job_poll": "lib.lmc_job_poll(byref(i32), None)",
    "lmc_job_result": "lib.lmc_job_result(byref(transfer_result), None)",
    "lmc_job_destroy": "lib.lmc_job_destroy(None) or 0",
    "lmc_cuda_device_count": "lib.lmc_cuda_device_count(byref(i32))",
    "lmc_engine_get_stats": "lib.lmc_engine_get_stats(None, byref(stats))",
    "lmc_engine_tier_count": "lib.lmc_engine_tier_count(byref(i32), None)",
    "lmc_engine_get_tier_stats": "lib.lmc_engine_get_tier_stats(None, 0, byref(tier))",
    "lmc_engine_get_tier_nodes": "lib.lmc_engine_get_tier_nodes(byref(i64), None, 0, None, 0)",
    "lmc_engine_flush": "lib.lmc_engine_flush(None, 0)",
    "lmc_engine_clear": "lib.lmc_engine_clear(None)",
    "lmc_engine_poll_events": "lib.lmc_engine_poll_events(byref(i64), byref(i64), byref(i64), None, None, 104, 0, None, 0)",
    "lmc_engine_get_metrics": "lib.lmc_engine_get_metrics(byref(i64), None, None, 0)",
}


def test_first_calls_cover_every_export():
    assert set(FIRST_CALLS) == set(b.ALL_FUNCTION_NAMES)


@pytest.mark.parametrize("function", sorted(FIRST_CALLS))
def test_first_call_of_the_process(function):
    from conftest import run_child
    from lmcache_native._lib import LIB_PATH

    code = f"""
import ctypes
from ctypes import byref, c_int32, c_int64, c_void_p
lib = ctypes.CDLL({str(LIB_PATH)!r})
for name in ("lmc_status_name", "lmc_last_error_message", "lmc_version_string"):
    getattr(lib, name).restype = ctypes.c_char_p
ptr, i64, i32 = c_void_p(), c_int64(), c_int32()
stats = (ctypes.c_uint32 * 64)(128)
tier = (ctypes.c_uint32 * 64)(136)
request = (ctypes.c_uint32 * 22)(88)  # an lmc_request: struct_size 88, no tokens, slot destination
transfer_result = (ctypes.c_uint32 * 20)(80)
lookup_result = (ctypes.c_uint32 * 14)(56)
status = {FIRST_CALLS[function]}
print("STATUS", status)
"""
    result = run_child(code, timeout=60, env={"LMC_CUDA_LIBRARY": "/nonexistent/libcuda.so.1"})
    assert result.returncode == 0, (
        f"{function} as the first call of a process: exit status {result.returncode}"
        f"{' (killed by signal %d)' % -result.returncode if result.returncode < 0 else ''}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr[-2000:]}")
    status = int(result.stdout.split("STATUS")[-1])
    if function not in ("lmc_version_number", "lmc_abi_version", "lmc_version_string"):
        assert status != b.LMC_E_INTERNAL and status in PINNED, f"{function}: status {status}"
