"""Failures: exceptions carry the library's message, bad inputs return statuses instead of crashing,
failed calls change nothing, and the thread-local last-error message behaves as the header says."""

from __future__ import annotations

import ctypes
import json
import re
import threading
from ctypes import byref, c_int64, c_void_p

import pytest
import torch

import kv_oracle
import lmcache_native
import raw_requests as rr
from conftest import header_statuses, run_child_json
from lmcache_native import (
    Engine,
    LmcError,
    LmcInvalidArgument,
    LmcInvalidHandle,
    LmcKvLayerDesc,
    LmcUnsupported,
    _bindings as b,
)
from lmcache_native.torch_layout import layer_desc_from_tensor


# -- configuration -------------------------------------------------------------------------------
def test_unknown_config_key_is_named():
    with pytest.raises(LmcInvalidArgument) as caught:
        Engine({"chunk_size": 16, "no_such_option": 1})
    assert caught.value.status == b.LMC_E_INVALID_ARGUMENT
    assert caught.value.status_name == "LMC_E_INVALID_ARGUMENT"
    assert "no_such_option" in caught.value.message
    assert "no_such_option" in str(caught.value)


@pytest.mark.parametrize("key, value", [
    ("chunk_size", 0), ("chunk_size", "256"), ("chunk_size", 1.5), ("max_local_cpu_size", -1),
    ("save_unfull_chunk", "yes"), ("pre_caching_hash_algorithm", "md5"), ("local_cpu", 1),
])
def test_invalid_config_value_names_the_key(key, value):
    with pytest.raises(LmcInvalidArgument) as caught:
        Engine({key: value})
    assert key in caught.value.message


@pytest.mark.parametrize("text", ["{", "[1, 2]", "42", '{"chunk_size": 16,}'])
def test_config_that_is_not_a_json_object_is_refused(text):
    with pytest.raises(LmcInvalidArgument):
        Engine(text)


@pytest.mark.parametrize("config", [None, "", "{}"])
def test_empty_config_means_defaults(config):
    with Engine(config) as engine:
        resolved = engine.config()
    assert resolved["chunk_size"] == 256
    assert resolved["local_cpu"] is True
    assert resolved["max_local_cpu_size"] == 5.0
    assert resolved["save_unfull_chunk"] is False
    assert resolved["pre_caching_hash_algorithm"] == "sha256"


def test_config_round_trips_the_given_values():
    given = {"chunk_size": 48, "max_local_cpu_size": 0.25, "save_unfull_chunk": True,
             "pre_caching_hash_algorithm": "xxh3_128"}
    with Engine(given) as engine:
        resolved = engine.config()
    assert {key: resolved[key] for key in given} == given


def test_builtin_hash_resolves_to_sha256():
    with Engine({"pre_caching_hash_algorithm": "builtin"}) as engine:
        assert engine.config()["pre_caching_hash_algorithm"] == "sha256"


def test_known_key_for_a_missing_feature_is_unsupported():
    with pytest.raises(LmcUnsupported) as caught:
        Engine({"remote_url": "lm://127.0.0.1:65000"})
    assert isinstance(caught.value, NotImplementedError)
    assert "remote_url" in caught.value.message
    with pytest.raises(LmcUnsupported) as caught:
        Engine({"use_layerwise": True})
    assert "use_layerwise" in caught.value.message


@pytest.mark.parametrize("world_size, worker_id", [(0, 0), (-1, 0), (2, 2), (2, -1)])
def test_bad_parallel_ranks_are_refused(world_size, worker_id):
    with pytest.raises(LmcInvalidArgument):
        Engine(None, world_size=world_size, worker_id=worker_id)


def test_get_config_size_query_protocol():
    with Engine({"chunk_size": 32}) as engine:
        needed = c_int64(-1)
        status = b.lmc_engine_get_config(byref(needed), engine.handle, None, 0)
        assert status == b.LMC_E_BUFFER_TOO_SMALL
        assert needed.value > 2
        # One byte short: refused, size reported again, and the buffer is left alone.
        short = ctypes.create_string_buffer(b"\xee" * (needed.value - 1), needed.value - 1)
        needed_again = c_int64(-1)
        assert b.lmc_engine_get_config(byref(needed_again), engine.handle, short, len(short)) == \
            b.LMC_E_BUFFER_TOO_SMALL
        assert needed_again.value == needed.value
        assert short.raw == b"\xee" * (needed.value - 1)
        exact = ctypes.create_string_buffer(needed.value)
        assert b.lmc_engine_get_config(byref(needed_again), engine.handle, exact, len(exact)) == b.LMC_OK
        assert exact.raw[needed.value - 1] == 0 and len(exact.value) == needed.value - 1
        assert json.loads(exact.value)["chunk_size"] == 32
        # A buffer pointer of NULL with a non-zero capacity is an invalid argument.
        assert b.lmc_engine_get_config(byref(needed_again), engine.handle, None, 16) == \
            b.LMC_E_INVALID_ARGUMENT


# -- layer descriptions --------------------------------------------------------------------------
@pytest.fixture
def layer_tensor():
    return torch.zeros(2, 8, 16, 2, 8, dtype=torch.float16)  # flash_attn NHD


def _register(descs):
    with Engine({"chunk_size": 16}) as engine:
        engine.register_layers(descs)


LAYER_DEFECTS = [
    ("elem_size", lambda d: setattr(d, "elem_size", 3)),
    ("kv_count", lambda d: setattr(d, "kv_count", 3)),
    ("num_blocks", lambda d: setattr(d, "num_blocks", 0)),
    ("block_size", lambda d: setattr(d, "block_size", -1)),
    ("num_kv_heads", lambda d: setattr(d, "num_kv_heads", 0)),
    ("head_size", lambda d: setattr(d, "head_size", 0)),
    ("device_kind", lambda d: setattr(d, "device_kind", 7)),
    ("span_bytes", lambda d: setattr(d, "span_bytes", d.span_bytes - 2)),
    ("base_address", lambda d: setattr(d, "base_address", d.base_address + 1)),  # misaligned
    ("base_address", lambda d: setattr(d, "base_address", 0)),
    ("token_stride", lambda d: setattr(d, "token_stride", 4)),  # tokens overlap heads
    ("block_stride", lambda d: setattr(d, "block_stride", 0)),
]


@pytest.mark.parametrize("field, defect", LAYER_DEFECTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(LAYER_DEFECTS)])
def test_bad_layer_description_names_the_field(layer_tensor, field, defect):
    desc = layer_desc_from_tensor(layer_tensor)
    defect(desc)
    with pytest.raises(LmcInvalidArgument) as caught:
        _register([desc])
    assert field in caught.value.message, caught.value.message


def test_reserved_field_must_be_zero(layer_tensor):
    desc = layer_desc_from_tensor(layer_tensor)
    desc.reserved = 1
    with pytest.raises(LmcInvalidArgument) as caught:
        _register([desc])
    assert "reserved" in caught.value.message


def test_mismatching_layer_is_named_by_index_and_field(layer_tensor):
    other = torch.zeros(2, 8, 16, 2, 4, dtype=torch.float16)
    with pytest.raises(LmcInvalidArgument) as caught:
        _register([layer_desc_from_tensor(layer_tensor), layer_desc_from_tensor(other)])
    message = caught.value.message
    assert "head_size" in message and re.search(r"layers?\W{0,3}1\b", message), message


def test_partially_overlapping_layers_are_refused():
    memory = torch.zeros(3, 2, 8, 16, 2, 8, dtype=torch.float16)
    first = memory[0]
    shifted = memory.view(-1)[8:8 + first.numel()].view(first.shape)  # overlaps `first`, not equal
    with pytest.raises(LmcInvalidArgument) as caught:
        _register([layer_desc_from_tensor(first), layer_desc_from_tensor(shifted)])
    assert "overlap" in caught.value.message


def test_calls_before_register_layers_are_invalid():
    with Engine({"chunk_size": 16}) as engine:
        tokens = list(range(32))
        with pytest.raises(LmcInvalidArgument):
            engine.lookup(tokens)
        with pytest.raises(LmcInvalidArgument):
            engine.store(tokens, list(range(32)))
        with pytest.raises(LmcInvalidArgument):
            engine.retrieve(tokens, list(range(32)))


def test_struct_size_that_is_too_small_is_refused(layer_tensor):
    desc = layer_desc_from_tensor(layer_tensor)
    desc.struct_size = 8
    with Engine({"chunk_size": 16}) as engine:
        status = b.lmc_engine_register_layers(engine.handle, (LmcKvLayerDesc * 1)(desc), 1)
        assert status == b.LMC_E_INVALID_ARGUMENT
        assert "struct_size" in lmcache_native._errors.last_error_message()


# -- slots past the cache ------------------------------------------------------------------------
@pytest.mark.parametrize("bad_slot", ["past_end", "minus_two"])
def test_bad_slot_fails_the_whole_call_and_changes_nothing(make_rig, bad_slot):
    rig = make_rig(fill="sentinel")
    capacity = rig.num_blocks * rig.block_size
    bad_value = capacity if bad_slot == "past_end" else -2
    tokens = rig.tokens(64)
    good_slots = rig.slots(64)

    # Store with one bad slot at the end: nothing may be stored, not even the chunks before it.
    bad_slots = good_slots.clone()
    bad_slots[-1] = bad_value
    with pytest.raises(LmcInvalidArgument) as caught:
        rig.engine.store(tokens, bad_slots)
    assert caught.value.message
    assert rig.engine.lookup(tokens) == 0
    assert rig.engine.stats()["stored_tokens"] == 0

    # Retrieve with one bad slot: fails before anything is copied, the cache keeps its sentinel.
    for layer in rig.layers:  # put recognisable data at the good slots and cache it
        kv_oracle.write_tokens(layer, good_slots, rig.block_size,
                               torch.ones(64, 2, rig.num_heads, rig.head_size, dtype=rig.dtype))
    assert rig.engine.store(tokens, good_slots) == 64
    destination_bad = rig.slots(64)
    destination_bad[-1] = bad_value
    before = rig.snapshot()
    with pytest.raises(LmcInvalidArgument):
        rig.engine.retrieve(tokens, destination_bad)
    assert all(kv_oracle.bit_equal(layer.physical, old) for layer, old in zip(rig.layers, before)), \
        "a failed retrieve wrote into the KV cache"


def test_python_side_refuses_mismatched_lengths(make_rig):
    rig = make_rig()
    with pytest.raises(LmcInvalidArgument):
        rig.engine.store(rig.tokens(32), rig.slots(31))
    with pytest.raises(LmcInvalidArgument):
        rig.engine.retrieve(rig.tokens(32), rig.slots(33))


@pytest.mark.parametrize("first_token_to_write", [-1, 33])
def test_first_token_to_write_out_of_range(make_rig, first_token_to_write):
    rig = make_rig()
    with pytest.raises(LmcInvalidArgument):
        rig.engine.retrieve(rig.tokens(32), rig.slots(32), first_token_to_write=first_token_to_write)


# -- handles -------------------------------------------------------------------------------------
def test_closed_engine_raises_and_close_is_idempotent(make_rig):
    rig = make_rig()
    tokens, slots = rig.tokens(16), rig.slots(16)
    rig.engine.close()
    rig.engine.close()
    assert rig.engine.closed
    for call in (lambda e: e.lookup(tokens), lambda e: e.store(tokens, slots), lambda e: e.retrieve(tokens, slots),
                 lambda e: e.stats(), lambda e: e.clear(), lambda e: e.config(),
                 lambda e: e.register_layers([layer.logical for layer in rig.layers])):
        with pytest.raises(LmcInvalidHandle) as caught:
            call(rig.engine)
        assert isinstance(caught.value, LmcError)
        assert caught.value.status == b.LMC_E_INVALID_HANDLE


def test_context_manager_closes():
    with Engine() as engine:
        assert not engine.closed
    assert engine.closed


# The raw-handle checks run in a child interpreter: if the library dereferenced a stale handle, the
# crash ends the child and fails this test instead of killing the whole pytest run.
RAW_HANDLE_SCRIPT = r"""
import ctypes, json, torch
from ctypes import byref, c_int64, c_void_p
from lmcache_native import Engine, _bindings as b
from lmcache_native.torch_layout import layer_desc_from_tensor

import raw_requests as rr

kv = torch.zeros(2, 4, 16, 2, 8)
engine = Engine({"chunk_size": 16})
engine.register_layers([kv], layout="flash_attn")
tokens = (ctypes.c_int32 * 16)(*range(16))
slots = (c_int64 * 16)(*range(16))
block_ids = (ctypes.c_int32 * 1)(0)
assert engine.store(list(range(16)), list(range(16))) == 16
request = rr.request(tokens, 16, slots=slots)
table_request = rr.request(tokens, 16, block_ids=block_ids, block_size=16)
handle = {handle_expression}
if {destroy_first}:
    b.lmc_engine_destroy(engine.handle)
    engine._handle = None  # the wrapper must not destroy it a second time at exit
desc = (b.LmcKvLayerDesc * 1)(layer_desc_from_tensor(kv, "flash_attn"))
out = c_int64(-7)
stats = b.LmcStats()
lookup_result = b.LmcLookupResult(hit_tokens=-7)
transfer_result = b.LmcTransferResult(tokens_matched=-7)
job = c_void_p()
results = dict(
    lookup=b.lmc_lookup(byref(lookup_result), handle, byref(request)),
    store=b.lmc_store(byref(transfer_result), handle, byref(request), None),
    retrieve=b.lmc_retrieve(byref(transfer_result), handle, byref(request), None),
    store_block_table=b.lmc_store(byref(transfer_result), handle, byref(table_request), None),
    retrieve_block_table=b.lmc_retrieve(byref(transfer_result), handle, byref(table_request), None),
    store_job=b.lmc_store(None, handle, byref(request), byref(job)),
    retrieve_job=b.lmc_retrieve(None, handle, byref(request), byref(job)),
    prefetch=b.lmc_prefetch_start(byref(job), handle, byref(request)),
    get_stats=b.lmc_engine_get_stats(handle, byref(stats)),
    clear=b.lmc_engine_clear(handle),
    get_config=b.lmc_engine_get_config(byref(out), handle, None, 0),
    register_layers=b.lmc_engine_register_layers(handle, desc, 1),
)
message = b.lmc_last_error_message().decode()
b.lmc_engine_destroy(handle)  # destroying again must be a no-op
b.lmc_engine_destroy(None)
print(json.dumps(dict(results=results, out=out.value, stats_untouched=stats.lookup_requests == 0,
                      results_untouched=(lookup_result.hit_tokens, transfer_result.tokens_matched, job.value),
                      message=message)))
"""


@pytest.mark.parametrize("handle_kind", ["destroyed", "null", "garbage"])
def test_raw_calls_with_a_bad_handle_return_invalid_handle(handle_kind):
    handle_expression, destroy_first = {
        "destroyed": ("engine.handle", True),
        "null": ("None", False),
        # a real, readable heap address that is not an engine: must be recognised as unknown
        "garbage": ("ctypes.addressof(ctypes.create_string_buffer(b'\\x11' * 4096))", False),
    }[handle_kind]
    report = run_child_json(RAW_HANDLE_SCRIPT.replace("{handle_expression}", handle_expression)
                            .replace("{destroy_first}", str(destroy_first)))
    assert report["results"] == {name: b.LMC_E_INVALID_HANDLE for name in report["results"]}, report
    assert report["out"] == -7, "an out-parameter was written by a failed call"
    assert report["stats_untouched"]
    assert report["results_untouched"] == [-7, -7, None], "an out-parameter was written by a failed call"
    assert report["message"], "a failed call must leave a message"


# -- NULL pointers and bad lengths through the raw bindings --------------------------------------
def test_null_pointers_return_statuses(make_rig):
    rig = make_rig()
    handle = rig.engine.handle
    tokens = (ctypes.c_int32 * 16)(*range(16))
    slots = (ctypes.c_int64 * 16)(*range(16))
    block_ids = (ctypes.c_int32 * 1)(0)
    out = c_int64(-7)
    lookup_result = b.LmcLookupResult(hit_tokens=-7)
    transfer_result = b.LmcTransferResult(tokens_matched=-7)
    invalid = b.LMC_E_INVALID_ARGUMENT
    engine_out, job = c_void_p(), c_void_p()
    good = rr.request(tokens, 16, slots=slots)
    assert b.lmc_engine_create(None, None, b"", 1, 0) == invalid
    assert b.lmc_engine_create(byref(engine_out), None, None, 1, 0) == invalid
    assert engine_out.value is None
    # lmc_lookup: NULL result, NULL request, NULL tokens, negative length, NULL key with a length.
    assert b.lmc_lookup(None, handle, byref(good)) == invalid
    assert b.lmc_lookup(byref(lookup_result), handle, None) == invalid
    assert rr.lookup(handle, rr.request(None, 16), lookup_result)[0] == invalid
    assert rr.lookup(handle, rr.request(tokens, -1), lookup_result)[0] == invalid
    assert rr.lookup(handle, rr.request(tokens, 16, extra_key=None, extra_key_len=4), lookup_result)[0] == invalid
    assert rr.lookup(handle, rr.request(tokens, 16, extra_key=b"abc", extra_key_len=-1), lookup_result)[0] == invalid
    assert rr.lookup(handle, rr.request(tokens, 16, first_token=1), lookup_result)[0] == invalid  # must be 0
    for function in (b.lmc_store, b.lmc_retrieve):
        # NULL result with job_out NULL (a synchronous call needs it), NULL request.
        assert function(None, handle, byref(good), None) == invalid
        assert function(byref(transfer_result), handle, None, None) == invalid
        assert function(None, handle, None, byref(job)) == invalid
        # NULL slot mapping, NULL tokens, NULL block table, bad table block size.
        assert function(byref(transfer_result), handle, byref(rr.request(tokens, 16)), None) == invalid
        assert function(byref(transfer_result), handle, byref(rr.request(None, 16, slots=slots)), None) == invalid
        assert function(byref(transfer_result), handle,
                        byref(rr.request(tokens, 16, block_ids=None, num_block_ids=1, block_size=16)), None) == invalid
        assert function(byref(transfer_result), handle,
                        byref(rr.request(tokens, 16, block_ids=block_ids, block_size=0)), None) == invalid
        assert function(None, handle, byref(rr.request(tokens, 16)), byref(job)) == invalid  # also as a job
    assert b.lmc_prefetch_start(None, handle, byref(good)) == invalid
    assert b.lmc_prefetch_start(byref(job), handle, None) == invalid
    assert job.value is None, "a failed call returned a job"
    assert b.lmc_job_poll(None, handle) in (invalid, b.LMC_E_INVALID_HANDLE)
    assert b.lmc_engine_get_stats(handle, None) == invalid
    assert b.lmc_engine_get_config(None, handle, None, 0) == invalid
    assert b.lmc_config_schema(None, None, 0) == invalid
    assert b.lmc_engine_register_layers(handle, None, 1) == invalid
    assert b.lmc_engine_register_layers(handle, None, 0) == invalid  # at least one layer
    assert out.value == -7, "an out-parameter was written by a failed call"
    assert lookup_result.hit_tokens == -7 and transfer_result.tokens_matched == -7, \
        "a result was written by a failed call"
    # Zero tokens with NULL pointers are fine and hit nothing.
    status, lookup_result = rr.lookup(handle, rr.request(None, 0))
    assert status == b.LMC_OK
    assert lookup_result.hit_tokens == 0 and tuple(lookup_result.tokens_by_tier) == (0, 0, 0, 0)


def test_null_out_parameters_of_jobs_are_invalid(make_rig):
    rig = make_rig()
    with rig.engine.prefetch(rig.tokens(16)) as job:
        job.wait()
        assert b.lmc_job_poll(None, job.handle) == b.LMC_E_INVALID_ARGUMENT
        assert b.lmc_job_result(None, job.handle) == b.LMC_E_INVALID_ARGUMENT
        assert b.lmc_job_wait(None, job.handle, 0) == b.LMC_E_INVALID_ARGUMENT
        assert job.done() and job.result() == 0


def test_stats_struct_size_below_eight_is_invalid(make_rig):
    rig = make_rig()
    stats = b.LmcStats(struct_size=4)
    assert b.lmc_engine_get_stats(rig.engine.handle, byref(stats)) == b.LMC_E_INVALID_ARGUMENT


# -- messages and status names -------------------------------------------------------------------
def test_last_error_message_is_empty_after_success(make_rig):
    rig = make_rig()
    empty = rr.request(None, 0)
    assert b.lmc_lookup(None, rig.engine.handle, byref(empty)) == b.LMC_E_INVALID_ARGUMENT
    assert b.lmc_last_error_message() != b""
    assert rr.lookup(rig.engine.handle, empty)[0] == b.LMC_OK
    assert b.lmc_last_error_message() == b""


def test_last_error_message_is_per_thread(make_rig):
    rig = make_rig()
    handle = rig.engine.handle
    empty = rr.request(None, 0)
    assert b.lmc_lookup(None, handle, byref(empty)) == b.LMC_E_INVALID_ARGUMENT
    message_here = b.lmc_last_error_message()
    seen_in_other_thread = {}

    def other_thread():
        seen_in_other_thread["before"] = b.lmc_last_error_message()
        seen_in_other_thread["status"] = b.lmc_engine_clear(None)
        seen_in_other_thread["after_failure"] = b.lmc_last_error_message()
        rr.lookup(handle, empty)
        seen_in_other_thread["after_success"] = b.lmc_last_error_message()

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert seen_in_other_thread["before"] == b""
    assert seen_in_other_thread["status"] == b.LMC_E_INVALID_HANDLE
    assert seen_in_other_thread["after_failure"] != b""
    assert seen_in_other_thread["after_success"] == b""
    assert b.lmc_last_error_message() == message_here  # untouched by the other thread's calls


def test_exception_carries_the_message_of_its_own_call(make_rig):
    rig = make_rig()
    with pytest.raises(LmcInvalidArgument) as caught:
        rig.engine.retrieve(rig.tokens(32), rig.slots(32), first_token_to_write=99)
    assert caught.value.message and caught.value.message in str(caught.value)


def test_status_names():
    for status, name in b.STATUS_NAMES.items():
        assert b.lmc_status_name(status).decode() == name
    assert set(b.STATUS_NAMES.values()) == set(header_statuses()) == {
        "LMC_OK", "LMC_E_INVALID_ARGUMENT", "LMC_E_INVALID_HANDLE", "LMC_E_UNSUPPORTED",
        "LMC_E_OUT_OF_MEMORY", "LMC_E_NOT_FOUND", "LMC_E_IO", "LMC_E_CUDA", "LMC_E_NO_DEVICE",
        "LMC_E_BUFFER_TOO_SMALL", "LMC_E_INTERNAL", "LMC_E_TIMEOUT"}
    for unknown in (1, 7, -12, -1000, 2**31 - 1, -2**31):
        assert b.lmc_status_name(unknown) == b"LMC_E_UNKNOWN"


def test_check_maps_every_status_to_its_exception_type():
    from lmcache_native import _errors as errors

    expected = {
        b.LMC_E_INVALID_ARGUMENT: (errors.LmcInvalidArgument, ValueError),
        b.LMC_E_INVALID_HANDLE: (errors.LmcInvalidHandle,),
        b.LMC_E_UNSUPPORTED: (errors.LmcUnsupported, NotImplementedError),
        b.LMC_E_OUT_OF_MEMORY: (errors.LmcOutOfMemory, MemoryError),
        b.LMC_E_NOT_FOUND: (errors.LmcNotFound,),
        b.LMC_E_IO: (errors.LmcIOError, OSError),
        b.LMC_E_CUDA: (errors.LmcCudaError,),
        b.LMC_E_NO_DEVICE: (errors.LmcNoDevice,),
        b.LMC_E_BUFFER_TOO_SMALL: (errors.LmcBufferTooSmall,),
        b.LMC_E_INTERNAL: (errors.LmcInternalError,),
        b.LMC_E_TIMEOUT: (errors.LmcTimeout, TimeoutError),
        -99: (errors.LmcError,),
    }
    errors.check(b.LMC_OK)
    for status, types in expected.items():
        with pytest.raises(types[0]) as caught:
            errors.check(status)
        assert all(isinstance(caught.value, t) for t in (*types, errors.LmcError))
        assert caught.value.status == status


def test_every_status_of_the_library_has_its_exception_class():
    from lmcache_native import _errors as errors

    for value, name in b.STATUS_NAMES.items():
        if value == b.LMC_OK:
            continue
        assert name in errors.ERROR_CLASS_BY_NAME, f"{name} has no exception class"
        error = errors.error_for_status(value, "m")
        assert type(error) is errors.ERROR_CLASS_BY_NAME[name]
        assert error.status_name == name and error.status == value
    unknown = errors.error_for_status(min(b.STATUS_NAMES) - 1, "m")
    assert type(unknown) is errors.LmcError and unknown.status_name == "LMC_E_UNKNOWN"
