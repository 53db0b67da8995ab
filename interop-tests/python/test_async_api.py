"""The asynchronous store/retrieve wrappers on host layers (where they finish before returning) and
the CUDA device query on a machine without a GPU."""

from __future__ import annotations

import torch

import pytest

from conftest import run_child
from lmcache_native import Engine, LmcNoDevice, cuda_device_count


def flash_attn_layers(num_layers=2, blocks=8, block_size=4, heads=2, head_size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, blocks, block_size, heads, head_size, generator=generator) for _ in range(num_layers)]


def test_async_store_and_retrieve_on_host_layers_finish_and_are_bit_exact():
    source = flash_attn_layers(seed=1)
    destination = [torch.full_like(layer, 7.0) for layer in source]
    tokens = list(range(100, 120))
    source_slots = torch.randperm(32, generator=torch.Generator().manual_seed(2))[:20]
    destination_slots = torch.randperm(32, generator=torch.Generator().manual_seed(3))[:20]
    with Engine({"chunk_size": 8, "save_unfull_chunk": True}) as engine:
        engine.register_layers(source, layout="flash_attn")
        job, will_store = engine.store_async(tokens, source_slots)
        with job:
            assert job.done()
            assert job.wait(0) == will_store == 20
        engine.register_layers(destination, layout="flash_attn")
        job, will_retrieve = engine.retrieve_async(tokens, destination_slots, first_token_to_write=5)
        with job:
            assert job.wait() == will_retrieve == 20
    for src, dst in zip(source, destination):
        expected = torch.full_like(dst, 7.0)
        for t in range(5, 20):
            s, d = int(source_slots[t]), int(destination_slots[t])
            expected[:, d // 4, d % 4] = src[:, s // 4, s % 4]
        assert torch.equal(dst, expected)


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
