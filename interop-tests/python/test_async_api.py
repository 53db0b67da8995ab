"""Jobs: store/retrieve with job_out (host layers run them on the engine's worker threads), prefetch,
Job.done()/wait()/result()/close(), and the CUDA device query on a machine without a GPU."""

from __future__ import annotations

import time

import torch

import pytest

from conftest import run_child
from lmcache_native import (Engine, Job, LmcInvalidHandle, LmcNoDevice, LmcTimeout, TransferResult,
                            cuda_device_count)


def flash_attn_layers(num_layers=2, blocks=8, block_size=4, heads=2, head_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, blocks, block_size, heads, head_size, generator=generator) for _ in range(num_layers)]


def _same_result(a: TransferResult, b: TransferResult) -> bool:
    """Equal in every field but the time taken."""
    fields = dict(a.as_dict()), dict(b.as_dict())
    for values in fields:
        values.pop("elapsed_ns")
    return fields[0] == fields[1]


def test_async_store_and_retrieve_on_host_layers_finish_and_are_bit_exact():
    source = flash_attn_layers(seed=1)
    destination = [torch.full_like(layer, 7.0) for layer in source]
    tokens = list(range(100, 120))
    source_slots = torch.randperm(32, generator=torch.Generator().manual_seed(2))[:20]
    destination_slots = torch.randperm(32, generator=torch.Generator().manual_seed(3))[:20]
    with Engine({"chunk_size": 8, "save_unfull_chunk": True}) as engine:
        engine.register_layers(source, layout="flash_attn")
        with engine.store_async(tokens, source_slots) as job:
            assert isinstance(job, Job)
            stored = job.wait()
            assert job.done()
            assert isinstance(stored, TransferResult)
            assert stored == stored.tokens_matched == stored.tokens_copied == 20
            assert stored.bytes_copied == 20 * engine.bytes_per_token
            assert _same_result(job.result(), stored)
            assert _same_result(job.wait(0), stored)
        engine.register_layers(destination, layout="flash_attn")
        with engine.retrieve_async(tokens, destination_slots, first_token_to_write=5) as job:
            retrieved = job.wait()
            assert retrieved == 20 and retrieved.tokens_copied == 15
            assert retrieved.bytes_copied == 15 * engine.bytes_per_token
            assert retrieved.chunks_by_tier == (3, 0, 0, 0)
    for src, dst in zip(source, destination):
        expected = torch.full_like(dst, 7.0)
        for t in range(5, 20):
            s, d = int(source_slots[t]), int(destination_slots[t])
            expected[:, d // 4, d % 4] = src[:, s // 4, s % 4]
        assert torch.equal(dst, expected)


@pytest.mark.parametrize("destination", ["slots", "block_table"])
def test_a_job_result_equals_the_synchronous_result(destination):
    # Two engines with the same contents: one does each operation synchronously, the other as a job.
    layers = [flash_attn_layers(blocks=16, seed=4), flash_attn_layers(blocks=16, seed=4)]
    tokens = list(range(500, 560))
    slots = torch.arange(60)
    block_ids = list(range(15))
    where = dict(slot_mapping=slots) if destination == "slots" else dict(block_ids=block_ids, block_size=4)
    engines = [Engine({"chunk_size": 8, "save_unfull_chunk": True}) for _ in range(2)]
    try:
        for engine, engine_layers in zip(engines, layers):
            engine.register_layers(engine_layers, layout="flash_attn")
        sync_engine, job_engine = engines
        for skip in (0, 16):
            expected = sync_engine.store(tokens, skip_leading_tokens=skip, **where)
            with job_engine.store_async(tokens, skip_leading_tokens=skip, **where) as job:
                assert _same_result(job.wait(), expected), (job.result(), expected)
        for first in (0, 9, 60):
            expected = sync_engine.retrieve(tokens, first_token_to_write=first, **where)
            with job_engine.retrieve_async(tokens, first_token_to_write=first, **where) as job:
                assert _same_result(job.wait(), expected), (job.result(), expected)
        assert all(torch.equal(a, b) for a, b in zip(*layers))
        expected_prefetch = sync_engine.prefetch(tokens).wait()
        with job_engine.prefetch(tokens) as job:
            assert _same_result(job.wait(), expected_prefetch)
        assert expected_prefetch == 60 and expected_prefetch.chunks_by_tier[0] == 8
    finally:
        for engine in engines:
            engine.close()


def test_job_done_flips_and_result_times_out_while_running():
    # A store big enough to take a while on the worker (64 layers x 16k tokens x 1 KiB per token).
    layers = [torch.randn(2, 1024, 16, 4, 32) for _ in range(8)]
    tokens = list(range(16384))
    slots = torch.arange(16384)
    seen_running = False
    with Engine({"chunk_size": 256, "max_local_cpu_size": 2.0}) as engine:
        engine.register_layers(layers, layout="flash_attn")
        for attempt in range(3):
            with engine.store_async(tokens, slots, extra_key=f"attempt {attempt}") as job:
                running = not job.done()
                if running:
                    seen_running = True
                    try:
                        job.result()
                    except LmcTimeout:
                        pass  # what result() says while the job runs
                    else:
                        assert job.done(), "result() returned while done() said running"
                deadline = time.monotonic() + 60
                while not job.done():
                    assert time.monotonic() < deadline, "the job never finished"
                    time.sleep(0.001)
                assert job.done() and job.done(), "done() stays True"
                assert job.result() == 16384
                assert job.wait(0) == 16384
            if seen_running:
                break
    assert seen_running, "three large stores all finished before the first poll"


def test_wait_with_a_timeout_on_a_running_job_raises_timeout():
    layers = [torch.randn(2, 1024, 16, 4, 32) for _ in range(8)]
    tokens, slots = list(range(16384)), torch.arange(16384)
    with Engine({"chunk_size": 256, "max_local_cpu_size": 2.0}) as engine:
        engine.register_layers(layers, layout="flash_attn")
        for attempt in range(3):
            with engine.store_async(tokens, slots, extra_key=f"attempt {attempt}") as job:
                try:
                    job.wait(0)
                except LmcTimeout as error:
                    assert error.status_name == "LMC_E_TIMEOUT"
                    assert job.wait() == 16384  # the work went on
                    return
        pytest.skip("three large stores all finished before wait(0)")


def test_closed_job():
    layers = flash_attn_layers()
    with Engine({"chunk_size": 8}) as engine:
        engine.register_layers(layers, layout="flash_attn")
        job = engine.store_async(list(range(16)), list(range(16)))
        assert repr(job).startswith("<lmcache_native.Job 0x")
        handle = job.handle
        job.close()
        job.close()  # idempotent
        assert job.closed and job.done(), "a closed job counts as done"
        assert repr(job) == "<lmcache_native.Job closed>"
        for call in (job.wait, job.result, lambda: job.handle):
            with pytest.raises(LmcInvalidHandle):
                call()
        from lmcache_native import _bindings as b
        assert b.lmc_job_poll(__import__("ctypes").byref(__import__("ctypes").c_int32()), handle) == \
            b.LMC_E_INVALID_HANDLE, "the handle was destroyed"
        # The store still completed: its chunks are visible.
        deadline = time.monotonic() + 10
        while engine.lookup(list(range(16))) != 16:
            assert time.monotonic() < deadline
            time.sleep(0.001)


def test_a_job_keeps_running_after_its_engine_object_is_dropped():
    layers = flash_attn_layers()
    engine = Engine({"chunk_size": 8})
    engine.register_layers(layers, layout="flash_attn")
    job = engine.store_async(list(range(16)), list(range(16)))
    del engine  # the job holds the engine object: no destroy yet
    assert job.wait() == 16
    job.close()


def test_argument_errors_are_raised_by_the_call_not_the_job():
    from lmcache_native import LmcInvalidArgument

    with Engine({"chunk_size": 8}) as engine:
        engine.register_layers(flash_attn_layers(), layout="flash_attn")
        with pytest.raises(LmcInvalidArgument):
            engine.store_async(list(range(16)), [10_000] * 16)
        with pytest.raises(LmcInvalidArgument):
            engine.retrieve_async(list(range(16)), list(range(16)), first_token_to_write=17)
        with pytest.raises(TypeError):
            engine.store_async(list(range(16)))


def test_cuda_device_count_without_a_gpu_is_no_device():
    # This machine kind has no GPU: with Debian's libcuda installed cuInit fails, without it the
    # library is missing; both must read LMC_E_NO_DEVICE, never a crash.
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        pytest.skip("a GPU is present")
    with pytest.raises(LmcNoDevice):
        cuda_device_count()
    result = run_child("""
        from lmcache_native import cuda_device_count, LmcNoDevice
        try:
            cuda_device_count()
        except LmcNoDevice as error:
            print("no device:", error)
    """, env={"LMC_CUDA_LIBRARY": "/nonexistent/libcuda.so.1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no device:")
