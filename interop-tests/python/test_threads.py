"""Concurrent calls on one engine from several Python threads (ctypes releases the GIL during each
call): every thread's results must be exactly what it would get alone."""

from __future__ import annotations

import threading

import torch

import kv_oracle


def test_concurrent_store_lookup_retrieve(make_rig):
    rig = make_rig({"chunk_size": 16, "max_local_cpu_size": 0.05}, num_blocks=128, num_heads=4, head_size=32)
    num_threads, tokens_per_request = 4, 80
    # Each thread owns 32 blocks: 16 for its source slots, 16 for its destination slots.
    plans = []
    for index in range(num_threads):
        blocks = torch.arange(index * 32, (index + 1) * 32)
        positions = torch.arange(tokens_per_request)
        source = blocks[positions // 16] * 16 + positions % 16
        destination = blocks[16 + positions // 16] * 16 + positions % 16
        plans.append((rig.tokens(tokens_per_request), source, destination))
    expected = [rig.read(source) for _, source, _ in plans]
    failures = []

    def worker(tokens, source, destination, expected_values):
        try:
            for _ in range(25):
                assert rig.engine.store(tokens, source) == tokens_per_request
                assert rig.engine.lookup(tokens) == tokens_per_request
                assert rig.engine.lookup(tokens[:40]) == 32
                assert rig.engine.retrieve(tokens, destination) == tokens_per_request
                got = rig.read(destination)
                assert all(kv_oracle.bit_equal(g, e) for g, e in zip(got, expected_values))
        except Exception as error:  # collected and reported by the main thread
            failures.append(repr(error))

    threads = [threading.Thread(target=worker, args=(*plan, values)) for plan, values in zip(plans, expected)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    stats = rig.engine.stats()
    assert stats["store_requests"] == num_threads * 25
    assert stats["stored_tokens"] == num_threads * tokens_per_request  # each chunk copied once
    assert stats["retrieve_requests"] == num_threads * 25
    assert stats["lookup_requests"] == num_threads * 50


DESTROY_RACE_SCRIPT = r"""
import ctypes, json, threading
import torch
from lmcache_native import Engine, _bindings as b

kv = torch.randn(2, 64, 16, 4, 32)
engine = Engine({"chunk_size": 16})
engine.register_layers([kv])
tokens = torch.arange(512, dtype=torch.int32)
slots = torch.arange(512)
engine.store(tokens, slots)
handle = engine.handle
statuses = [[] for _ in range(3)]
running = [threading.Event() for _ in range(3)]

def hammer(index):
    # Calls until the handle is gone; signals after 20 successful calls so the destroy below
    # lands while every thread is busy.
    lookup_result, transfer_result = b.LmcLookupResult(), b.LmcTransferResult()
    request = b.LmcRequest(tokens=tokens.data_ptr(), num_tokens=512, slot_mapping=slots.data_ptr())
    job = ctypes.c_void_p()
    for call in range(200000):
        if index == 0:
            status = b.lmc_lookup(ctypes.byref(lookup_result), handle, ctypes.byref(request))
        elif index == 1:
            status = b.lmc_retrieve(ctypes.byref(transfer_result), handle, ctypes.byref(request), None)
        else:  # jobs: started, waited for and destroyed while the engine goes away
            status = b.lmc_retrieve(None, handle, ctypes.byref(request), ctypes.byref(job))
            if status == b.LMC_OK:
                wait_status = b.lmc_job_wait(ctypes.byref(transfer_result), job.value, -1)
                b.lmc_job_destroy(job.value)
                if wait_status != b.LMC_OK:  # a started job finishes even when the engine goes away
                    statuses[index].append(1000 + wait_status)
        statuses[index].append(status)
        if call == 20:
            running[index].set()
        if status == b.LMC_E_INVALID_HANDLE:
            break

threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
for event in running:
    event.wait()
engine.close()  # destroys while the other threads are calling
for t in threads:
    t.join()
print(json.dumps({"ok_calls": [per.count(b.LMC_OK) for per in statuses],
                  "seen": sorted({s for per in statuses for s in per}),
                  "last": [per[-1] for per in statuses]}))
"""


def test_destroy_while_other_threads_call():
    from conftest import run_child_json
    from lmcache_native import _bindings as b

    report = run_child_json(DESTROY_RACE_SCRIPT)
    assert set(report["seen"]) <= {b.LMC_OK, b.LMC_E_INVALID_HANDLE}, report
    assert report["last"] == [b.LMC_E_INVALID_HANDLE] * 3, report
    assert all(count > 20 for count in report["ok_calls"]), report


def _store_concurrently(engine, tokens, slots, num_threads: int = 4) -> list[int]:
    barrier = threading.Barrier(num_threads)
    results = []

    def store():
        barrier.wait()
        results.append(engine.store(tokens, slots))

    threads = [threading.Thread(target=store) for _ in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# Identical requests stored at the same moment (e.g. two TP-less workers finishing the same prompt):
# "chunks already cached are not copied again" and stored_tokens "excludes already cached", so after
# the race every chunk must have been counted once, whichever thread won.
CONCURRENT_TOKENS = 1024
CONCURRENT_CHUNK_BYTES = 16 * 2 * 4 * 64 * 4  # chunk 16 x K/V x 4 heads x 64 x float32, one layer


def _concurrent_rig():
    from lmcache_native import Engine, as_int32_buffer, as_int64_buffer

    kv = torch.randn(2, 64, 16, 4, 64)
    tokens = as_int32_buffer(torch.arange(CONCURRENT_TOKENS, dtype=torch.int32))
    slots = as_int64_buffer(torch.arange(CONCURRENT_TOKENS))
    return Engine, kv, tokens, slots


def test_concurrent_identical_stores_count_each_chunk_once():
    Engine, kv, tokens, slots = _concurrent_rig()
    with Engine({"chunk_size": 16}) as engine:
        engine.register_layers([kv])
        for attempt in range(20):
            engine.clear()
            before = engine.stats()
            results = _store_concurrently(engine, tokens, slots)
            after = engine.stats()
            assert results == [CONCURRENT_TOKENS] * 4, (attempt, results)
            assert after["cached_chunks"] == CONCURRENT_TOKENS // 16
            assert after["stored_tokens"] - before["stored_tokens"] == CONCURRENT_TOKENS, attempt
            assert after["stored_bytes"] - before["stored_bytes"] == 64 * CONCURRENT_CHUNK_BYTES, attempt


def test_concurrent_identical_stores_into_an_exactly_fitting_pool_all_succeed():
    # The pool holds exactly the request's 64 chunks. Each store must end with every chunk cached
    # (stored by itself or by another thread), so each returns the full length and nothing is
    # counted as skipped for lack of space.
    Engine, kv, tokens, slots = _concurrent_rig()
    config = {"chunk_size": 16, "max_local_cpu_size": 64 * CONCURRENT_CHUNK_BYTES / 2**30}
    with Engine(config) as engine:
        engine.register_layers([kv])
        assert engine.stats()["pool_capacity_bytes"] == 64 * CONCURRENT_CHUNK_BYTES
        for attempt in range(20):
            engine.clear()
            results = _store_concurrently(engine, tokens, slots)
            assert engine.lookup(tokens) == CONCURRENT_TOKENS
            assert results == [CONCURRENT_TOKENS] * 4, (attempt, results)
        assert engine.stats()["store_skipped_chunks"] == 0
