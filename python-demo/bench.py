#!/usr/bin/python3
"""Benchmark of lmcache_native on CPU (run by ``./build.sh bench``; not a test).

1. Store and retrieve throughput for a Llama-3-8B-shaped paged KV cache (32 layers, 8 KV heads, head
   size 128, bfloat16, 16 tokens per block; one 8192-token request in random block order; chunk_size
   256) in FlashAttention NHD and HND, next to a plain memcpy (ctypes.memmove) of the same byte count
   between two pre-touched buffers, measured in the same run with the same repetitions. Store runs
   into an emptied cache (engine.clear() before each repetition); retrieve writes into a zeroed KV
   cache (zeroed before each repetition, outside the timed region).
2. Lookup latency of the 8192-token prompt (hit) through the Python binding with the tokens already
   in an int32 buffer, for sha256 and xxh3_128 chunk hashing; and the cost of converting a Python
   list of 8192 ints to that buffer.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lmcache_native import Engine, _bindings, as_int32_buffer, as_int64_buffer  # noqa: E402

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
NUM_TOKENS = 8192
NUM_BLOCKS = NUM_TOKENS // BLOCK_SIZE + 64  # a few spare blocks so the request's blocks are scattered
DTYPE = torch.bfloat16
COPY_REPETITIONS = 5
LOOKUP_CALLS = 2000
CONVERSION_CALLS = 200
GB = 1e9  # throughput in GB/s of 10^9 bytes (sizes below are printed in GiB where noted)


def allocate_cache(layout: str, generator: torch.Generator) -> list[torch.Tensor]:
    """One [2, B, N, H, D] tensor per layer; HND is the same logical shape over [2, B, H, N, D]."""
    layers = []
    pattern = torch.randint(-2**15, 2**15 - 1, (2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE),
                            dtype=torch.int16, generator=generator)
    for index in range(NUM_LAYERS):
        if layout == "NHD":
            layer = torch.empty(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=DTYPE)
        else:
            layer = torch.empty(2, NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, HEAD_SIZE, dtype=DTYPE).permute(0, 1, 3, 2, 4)
        layer.view(torch.int16).copy_(pattern).add_(index)  # distinct, non-trivial bits per layer
        layers.append(layer)
    return layers


def request(generator: torch.Generator):
    tokens = torch.randint(0, 128000, (NUM_TOKENS,), dtype=torch.int32, generator=generator)
    blocks = torch.randperm(NUM_BLOCKS, generator=generator)[:NUM_TOKENS // BLOCK_SIZE]
    positions = torch.arange(NUM_TOKENS)
    slots = blocks[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    return as_int32_buffer(tokens), as_int64_buffer(slots)


def summarize(seconds: list[float], num_bytes: int) -> dict:
    return {"best": num_bytes / min(seconds) / GB, "median": num_bytes / statistics.median(seconds) / GB}


def measure_memcpy(num_bytes: int) -> dict:
    source = torch.empty(num_bytes, dtype=torch.uint8).fill_(1)  # fill_ touches every page
    destination = torch.empty(num_bytes, dtype=torch.uint8).fill_(2)
    seconds = []
    for _ in range(COPY_REPETITIONS):
        started = time.perf_counter()
        ctypes.memmove(destination.data_ptr(), source.data_ptr(), num_bytes)
        seconds.append(time.perf_counter() - started)
    return summarize(seconds, num_bytes)


def measure_copies(layout: str) -> tuple[dict, dict, int]:
    generator = torch.Generator().manual_seed(1)
    layers = allocate_cache(layout, generator)
    tokens, slots = request(generator)
    store_seconds, retrieve_seconds = [], []
    with Engine({"chunk_size": 256, "max_local_cpu_size": 3}, model_name="llama-3-8b-shape") as engine:
        engine.register_layers(layers, layout="flash_attn")
        for _ in range(COPY_REPETITIONS):
            engine.clear()
            before = engine.stats()["stored_bytes"]
            started = time.perf_counter()
            stored = engine.store(tokens, slots)
            store_seconds.append(time.perf_counter() - started)
            assert stored == NUM_TOKENS, stored
        stored_bytes = engine.stats()["stored_bytes"] - before
        # Keep two layers to verify the retrieved bytes afterwards.
        reference = {index: layers[index].clone() for index in (0, NUM_LAYERS - 1)}
        for _ in range(COPY_REPETITIONS):
            for layer in layers:
                layer.zero_()
            before = engine.stats()["retrieved_bytes"]
            started = time.perf_counter()
            retrieved = engine.retrieve(tokens, slots)
            retrieve_seconds.append(time.perf_counter() - started)
            assert retrieved == NUM_TOKENS, retrieved
        retrieved_bytes = engine.stats()["retrieved_bytes"] - before
    assert stored_bytes == retrieved_bytes == NUM_TOKENS * NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_SIZE * 2
    slot_tensor = torch.tensor((ctypes.c_int64 * slots.length).from_address(slots.address))
    blocks, offsets = slot_tensor // BLOCK_SIZE, slot_tensor % BLOCK_SIZE
    for index, original in reference.items():
        assert torch.equal(layers[index][:, blocks, offsets].view(torch.int16),
                           original[:, blocks, offsets].view(torch.int16)), f"layer {index} differs"
    return summarize(store_seconds, stored_bytes), summarize(retrieve_seconds, retrieved_bytes), stored_bytes


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def measure_lookup(hash_algorithm: str, layers: list[torch.Tensor], tokens, slots) -> dict:
    config = {"chunk_size": 256, "max_local_cpu_size": 3, "pre_caching_hash_algorithm": hash_algorithm}
    with Engine(config, model_name="llama-3-8b-shape") as engine:
        engine.register_layers(layers, layout="flash_attn")
        assert engine.store(tokens, slots) == NUM_TOKENS
        assert engine.lookup(tokens) == NUM_TOKENS  # hit case; also warms up
        # Engine.lookup and the raw binding (everything prepared, to show what the wrapper adds),
        # interleaved so that drifts in clock speed or background load hit both alike.
        wrapper_ns, raw_ns = [], []
        clock, lookup = time.perf_counter_ns, engine.lookup
        raw, hit, handle = _bindings.lmc_lookup, ctypes.c_int64(), engine.handle
        hit_ref, address, length = ctypes.byref(hit), tokens.address, tokens.length
        for _ in range(LOOKUP_CALLS):
            started = clock()
            lookup(tokens)
            wrapper_ns.append(clock() - started)
            started = clock()
            raw(hit_ref, handle, address, length, None, 0)
            raw_ns.append(clock() - started)
        assert hit.value == NUM_TOKENS
    return {"median": statistics.median(wrapper_ns) / 1e3, "p99": percentile(wrapper_ns, 0.99) / 1e3,
            "raw_median": statistics.median(raw_ns) / 1e3, "raw_p99": percentile(raw_ns, 0.99) / 1e3}


def measure_list_conversion() -> float:
    values = list(range(100, 100 + NUM_TOKENS))
    seconds = []
    for _ in range(CONVERSION_CALLS):
        started = time.perf_counter_ns()
        as_int32_buffer(values)
        seconds.append(time.perf_counter_ns() - started)
    return statistics.median(seconds) / 1e3


def main() -> int:
    started = time.perf_counter()
    bytes_per_token = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_SIZE * 2
    print(f"lmcache_native bench: {NUM_LAYERS} layers x {NUM_KV_HEADS} KV heads x {HEAD_SIZE}, bf16, "
          f"block {BLOCK_SIZE}, {NUM_TOKENS} tokens = {NUM_TOKENS * bytes_per_token / 2**30:.2f} GiB per request, "
          f"chunk_size 256; {os.cpu_count()} CPUs; {COPY_REPETITIONS} repetitions")
    copy_rows = []
    for layout in ("NHD", "HND"):
        store, retrieve, num_bytes = measure_copies(layout)
        memcpy = measure_memcpy(num_bytes)
        copy_rows.append((layout, store, retrieve, memcpy))
        gc.collect()

    print()
    print(f"{'copy GB/s (1e9 B/s)':<22}{'best':>9}{'median':>9}{'engine/memcpy (best, median)':>32}")
    for layout, store, retrieve, memcpy in copy_rows:
        print(f"{'memcpy ' + layout:<22}{memcpy['best']:>9.2f}{memcpy['median']:>9.2f}")
        for name, result in (("store", store), ("retrieve", retrieve)):
            ratio = f"{result['best'] / memcpy['best']:.2f}, {result['median'] / memcpy['median']:.2f}"
            print(f"{name + ' ' + layout:<22}{result['best']:>9.2f}{result['median']:>9.2f}{ratio:>32}")

    generator = torch.Generator().manual_seed(2)
    layers = allocate_cache("NHD", generator)
    tokens, slots = request(generator)
    lookups = {algorithm: measure_lookup(algorithm, layers, tokens, slots) for algorithm in ("sha256", "xxh3_128")}
    del layers
    conversion_us = measure_list_conversion()

    print()
    print(f"lookup of {NUM_TOKENS} tokens (hit), int32 buffer, {LOOKUP_CALLS} calls:")
    print(f"{'hash':<12}{'Engine.lookup median':>22}{'p99':>10}{'raw lmc_lookup median':>24}{'p99':>10}")
    for algorithm, result in lookups.items():
        print(f"{algorithm:<12}{result['median']:>19.1f} us{result['p99']:>7.1f} us"
              f"{result['raw_median']:>21.1f} us{result['raw_p99']:>7.1f} us")
    print(f"list of {NUM_TOKENS} ints -> int32 buffer (as_int32_buffer), median: {conversion_us:.1f} us")
    print(f"\ntotal bench time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
