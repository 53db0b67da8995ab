#!/usr/bin/python3
"""Benchmark of lmcache_native on CPU (run by ``./build.sh bench``; not a test).

1. Store and retrieve throughput for a Llama-3-8B-shaped paged KV cache (32 layers, 8 KV heads, head
   size 128, bfloat16, 16 tokens per block; one 8192-token request in random block order; chunk_size
   256) in FlashAttention NHD and HND, next to a plain memcpy (ctypes.memmove) of the same byte count
   and a parallel memcpy (one memmove per CPU on its own thread, as the engine uses every core)
   between two pre-touched buffers, measured in the same run with the same repetitions, the four
   timed in turn within each repetition. Store runs
   into an emptied cache (engine.clear() before each repetition); retrieve writes into a zeroed KV
   cache (zeroed before each repetition, outside the timed region).
2. Lookup latency of the 8192-token prompt (hit) through the Python binding with the tokens already
   in an int32 buffer, for sha256 and xxh3_128 chunk hashing; and the cost of converting a Python
   list of 8192 ints to that buffer.
3. Lower tiers, one 2048-token request of the same shape (256 MiB, eight 32 MiB chunks):
   - local disk: retrieve after store, flush and clear() (so every chunk comes from disk), cold
     (page cache dropped for the record files: fsync + posix_fadvise(DONTNEED), and
     /proc/sys/vm/drop_caches where allowed; the output says which worked and how much of the files
     stayed resident, measured with mincore) and warm, next to a plain sequential read of the same
     record files from the same directory in the same state;
   - Redis on loopback, one server and a 3-master cluster started for the bench (python-demo/
     bench_remote.py): retrieve after store, flush and clear() with one multiplexer and with a pool,
     next to GET loops of the same values over raw sockets (RESP written here; no redis-py), one
     socket per node and as many in parallel as the pool has, each reply read straight into a
     preallocated buffer; and store + flush (pipelined writes).
   Each also times prefetch(...).wait() alone (tier read and promotion, no KV write) as a breakdown.
   Set LMC_BENCH_DISK_DIR to put the disk tier on another file system (default: the temp dir).
4. The vLLM connector's own cost per request (scheduler and worker side), without the copy.

Every ratio, throughput and latency printed is also written to build/bench/bench.json (``--json PATH``
for another file), one flat object per kind of number, names stable between runs:

    {"schema": 1, "mode": "full" | "quick",
     "machine": {"cpus": 2, "cpu_model": ..., "kernel": ..., "python": ..., "torch": ..., "git_commit": ...,
                 "git_dirty": true | false},
     "run": {"date_utc": ..., "tokens": 8192, "copy_repetitions": 9, "total_seconds": ..., ...},
     "ratios": {"store_nhd_vs_memcpy_median": 0.92, "retrieve_hnd_vs_parallel_memcpy_best": 0.50,
                "disk_retrieve_cold_vs_read_cold_median": 1.24, "redis_retrieve_vs_get_loop_median": 1.05, ...},
     "throughput_gbps": {"memcpy_nhd_median": ..., "store_nhd_median": 15.9, "disk_read_cold_median": ...},
     "latencies_us": {"lookup_xxh3_raw_median": 4.0, "lookup_xxh3_median": 5.6, "lookup_sha256_p99": ...,
                      "list_to_int32_buffer_median": 43, "connector_scheduler_median": 104, ...},
     "scaling": {"lookup_sha256_slope_us_per_1k_tokens": ..., "memory_per_cached_chunk_bytes": ...,
                 "disk_index_rebuild_seconds": ..., "disk_index_bytes_per_record": ..., ...}}

The copies in every layout and the scaling section come from bench_perf.py (see its docstring): their
ratios and latencies go to the same sections under "layout_..." and "scaling_..." names, other figures
(slopes, bytes, seconds) to "scaling". The chart goes next to the JSON (build/bench/bench.png).

Ratios are engine / baseline of the same run ("_best": best over best; "_median": for the copies, the
median over repetitions of baseline time / engine time, the two timed in turn in each repetition, and
otherwise median over median);
GB are 10^9 bytes; latencies in microseconds; a number that could not be measured (no redis-server) is
absent. ``--check`` then compares the file with python-demo/bench_thresholds.json (scripts/bench_check.py,
one ok/FAIL line per metric; exit status 1 when one is missed; ``--thresholds PATH`` for another file).

``--quick``: a seconds-long form for the test suite (``./build.sh test bench``): the copies of a
1024-token request (128 MiB, 5 repetitions: its thresholds check the best, the number least moved by
other load) and the xxh3 lookup of the 8192-token prompt on a one-layer cache (a lookup's cost does not
depend on the KV shape); written to build/bench/bench-quick.json and checked, with --check, against
the loose python-demo/bench_thresholds_quick.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import datetime
import gc
import glob
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from lmcache_native import Engine, _bindings, as_int32_buffer, as_int64_buffer  # noqa: E402
import bench_perf  # noqa: E402  (copies in every layout, scaling, the chart)

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
NUM_TOKENS = 8192
NUM_BLOCKS = NUM_TOKENS // BLOCK_SIZE + 64  # a few spare blocks so the request's blocks are scattered
DTYPE = torch.bfloat16
COPY_REPETITIONS = 9
LOOKUP_CALLS = 2000
QUICK_TOKENS, QUICK_REPETITIONS, QUICK_LOOKUP_CALLS = 1024, 5, 1000  # --quick (its lookup: NUM_TOKENS)
CONVERSION_CALLS = 200
GB = 1e9  # throughput in GB/s of 10^9 bytes (sizes below are printed in GiB where noted)


def allocate_cache(layout: str, generator: torch.Generator, num_blocks: int = NUM_BLOCKS) -> list[torch.Tensor]:
    """One [2, B, N, H, D] tensor per layer; HND is the same logical shape over [2, B, H, N, D]."""
    layers = []
    pattern = torch.randint(-2**15, 2**15 - 1, (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE),
                            dtype=torch.int16, generator=generator)
    for index in range(NUM_LAYERS):
        if layout == "NHD":
            layer = torch.empty(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=DTYPE)
        else:
            layer = torch.empty(2, num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_SIZE, dtype=DTYPE).permute(0, 1, 3, 2, 4)
        layer.view(torch.int16).copy_(pattern).add_(index)  # distinct, non-trivial bits per layer
        layers.append(layer)
    return layers


def request(generator: torch.Generator, num_tokens: int = NUM_TOKENS, num_blocks: int = NUM_BLOCKS):
    tokens = torch.randint(0, 128000, (num_tokens,), dtype=torch.int32, generator=generator)
    blocks = torch.randperm(num_blocks, generator=generator)[:num_tokens // BLOCK_SIZE]
    positions = torch.arange(num_tokens)
    slots = blocks[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    return as_int32_buffer(tokens), as_int64_buffer(slots)


def summarize(seconds: list[float], num_bytes: int, baselines: dict | None = None) -> dict:
    """GB/s best and median; with baselines ({name: seconds of the same repetitions}), also
    "paired_<name>": the median over repetitions of baseline time / this time. Each repetition times
    the two in turn, so a load that comes and goes over seconds moves both and cancels in the pair,
    where a ratio of the two medians can pair a quiet baseline with a loaded copy."""
    summary = {"best": num_bytes / min(seconds) / GB, "median": num_bytes / statistics.median(seconds) / GB}
    for name, baseline in (baselines or {}).items():
        summary[f"paired_{name}"] = statistics.median(b / s for b, s in zip(baseline, seconds))
    return summary


def measure_copies(layout: str, num_tokens: int = NUM_TOKENS,
                   repetitions: int = COPY_REPETITIONS) -> tuple[dict, dict, dict, dict, int]:
    """Store, retrieve and the two baselines (memcpy on one thread, memcpy split over every CPU, of the
    same byte count between two touched buffers), timed in turn within each repetition so that load
    and clock drift hit all four alike. Returns (store, retrieve, memcpy, parallel memcpy, bytes)."""
    generator = torch.Generator().manual_seed(1)
    num_blocks = num_tokens // BLOCK_SIZE * 9 // 8  # spare blocks so the request's are scattered (NUM_BLOCKS)
    layers = allocate_cache(layout, generator, num_blocks)
    tokens, slots = request(generator, num_tokens, num_blocks)
    num_bytes = num_tokens * NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_SIZE * 2
    baseline = bench_perf.ParallelMemcpy(num_bytes)
    times = {"store": [], "retrieve": [], "memcpy": [], "parallel": []}
    # Keep two layers to verify the retrieved bytes afterwards.
    reference = {index: layers[index].clone() for index in (0, NUM_LAYERS - 1)}
    with Engine({"chunk_size": 256, "max_local_cpu_size": 3}, model_name="llama-3-8b-shape") as engine:
        engine.register_layers(layers, layout="flash_attn")
        stored_before, retrieved_before = engine.stats()["stored_bytes"], engine.stats()["retrieved_bytes"]
        for _ in range(repetitions):
            started = time.perf_counter()
            ctypes.memmove(baseline.destination.data_ptr(), baseline.source.data_ptr(), num_bytes)
            times["memcpy"].append(time.perf_counter() - started)
            times["parallel"].append(baseline.run())
            engine.clear()
            started = time.perf_counter()
            stored = engine.store(tokens, slots)
            times["store"].append(time.perf_counter() - started)
            assert stored == num_tokens, stored
            for layer in layers:
                layer.zero_()
            started = time.perf_counter()
            retrieved = engine.retrieve(tokens, slots)
            times["retrieve"].append(time.perf_counter() - started)
            assert retrieved == num_tokens, retrieved
        stored_bytes = (engine.stats()["stored_bytes"] - stored_before) // repetitions
        retrieved_bytes = (engine.stats()["retrieved_bytes"] - retrieved_before) // repetitions
    baseline.close()
    assert stored_bytes == retrieved_bytes == num_bytes, (stored_bytes, retrieved_bytes, num_bytes)
    slot_tensor = torch.tensor((ctypes.c_int64 * slots.length).from_address(slots.address))
    blocks, offsets = slot_tensor // BLOCK_SIZE, slot_tensor % BLOCK_SIZE
    for index, original in reference.items():
        assert torch.equal(layers[index][:, blocks, offsets].view(torch.int16),
                           original[:, blocks, offsets].view(torch.int16)), f"layer {index} differs"
    baselines = {"memcpy": times["memcpy"], "parallel_memcpy": times["parallel"]}
    return (summarize(times["store"], num_bytes, baselines), summarize(times["retrieve"], num_bytes, baselines),
            summarize(times["memcpy"], num_bytes), summarize(times["parallel"], num_bytes), num_bytes)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def measure_lookup(hash_algorithm: str, layers: list[torch.Tensor], tokens, slots, calls: int = LOOKUP_CALLS) -> dict:
    config = {"chunk_size": 256, "max_local_cpu_size": 3, "pre_caching_hash_algorithm": hash_algorithm}
    with Engine(config, model_name="llama-3-8b-shape") as engine:
        engine.register_layers(layers, layout="flash_attn")
        assert engine.store(tokens, slots) == tokens.length
        assert engine.lookup(tokens) == tokens.length  # hit case; also warms up
        # Engine.lookup and the raw binding (everything prepared, to show what the wrapper adds),
        # interleaved so that drifts in clock speed or background load hit both alike.
        wrapper_ns, raw_ns = [], []
        clock, lookup = time.perf_counter_ns, engine.lookup
        raw, hit, handle = _bindings.lmc_lookup, _bindings.LmcLookupResult(), engine.handle
        request = _bindings.LmcRequest(tokens=tokens.address, num_tokens=tokens.length)
        hit_ref, request_ref = ctypes.byref(hit), ctypes.byref(request)
        for _ in range(calls):
            started = clock()
            lookup(tokens)
            wrapper_ns.append(clock() - started)
            started = clock()
            raw(hit_ref, handle, request_ref)
            raw_ns.append(clock() - started)
        assert hit.hit_tokens == tokens.length
    return {"median": statistics.median(wrapper_ns) / 1e3, "p99": percentile(wrapper_ns, 0.99) / 1e3,
            "raw_median": statistics.median(raw_ns) / 1e3, "raw_p99": percentile(raw_ns, 0.99) / 1e3}


def measure_raw_sha256(num_tokens: int, chunk_size: int, calls: int) -> dict:
    """What a SHA-256 lookup of num_tokens cannot go below: the digests of the very bytes the key
    chain hashes (per chunk: the previous 32-byte key, the 4-byte token count and the tokens as
    int32), with the same OpenSSL the library uses. "one_call": all those bytes in one digest;
    "per_chunk": one digest per chunk, as the chain must (its floor; includes Python's call overhead)."""
    chunks = -(-num_tokens // chunk_size)
    chunk_input = bytes(32 + 4 + 4 * chunk_size)
    everything = chunk_input * chunks
    one_call, per_chunk = [], []
    clock, sha256 = time.perf_counter_ns, hashlib.sha256
    for _ in range(calls):
        started = clock()
        sha256(everything).digest()
        one_call.append(clock() - started)
        started = clock()
        for _ in range(chunks):
            sha256(chunk_input).digest()
        per_chunk.append(clock() - started)
    return {"one_call": statistics.median(one_call) / 1e3, "per_chunk": statistics.median(per_chunk) / 1e3}


def measure_list_conversion() -> float:
    values = list(range(100, 100 + NUM_TOKENS))
    seconds = []
    for _ in range(CONVERSION_CALLS):
        started = time.perf_counter_ns()
        as_int32_buffer(values)
        seconds.append(time.perf_counter_ns() - started)
    return statistics.median(seconds) / 1e3


# ------------------------------------------------------------------------------------------------
# 3. Lower tiers: local disk (cold and warm page cache) and Redis on loopback
# ------------------------------------------------------------------------------------------------

TIER_TOKENS = 2048  # 256 MiB of KV: eight 32 MiB chunks
TIER_BLOCKS = TIER_TOKENS // BLOCK_SIZE + 32
TIER_REPETITIONS = 3
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(paths: list[str]) -> float:
    """Fraction of the files' pages in the page cache (mincore on a read-only mapping)."""
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            address = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if address in (None, ctypes.c_void_p(-1).value):
                return float("nan")
            try:
                vector = (ctypes.c_ubyte * pages)()
                if _libc.mincore(address, size, vector) != 0:
                    return float("nan")
                resident += sum(v & 1 for v in vector)
                total += pages
            finally:
                _libc.munmap(address, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def drop_page_cache(paths: list[str]) -> dict:
    """Evicts the files from the page cache as far as this process may: fsync (dirty pages cannot
    be dropped) and posix_fadvise(DONTNEED) per file, then /proc/sys/vm/drop_caches."""
    fadvise = "ok"
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as error:
            fadvise = f"failed ({error.strerror})"
        finally:
            os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1\n")
        drop_caches = "ok"
    except OSError as error:
        drop_caches = f"failed ({type(error).__name__}: {error.strerror})"
    return {"posix_fadvise(DONTNEED)": fadvise, "/proc/sys/vm/drop_caches": drop_caches,
            "resident": resident_fraction(paths)}


def sequential_read(paths: list[str], buffer: memoryview) -> int:
    """Reads every file front to back into ``buffer`` (one large read() per call); returns bytes."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while True:
                count = file.readinto(buffer)
                if not count:
                    break
                total += count
    return total


def tier_counters(engine: Engine, name: str) -> dict:
    return next(t for t in engine.tier_stats() if t["name"] == name)


def wait_for_remote(engine: Engine, timeout: float = 10.0) -> None:
    """Waits until the Redis tier is connected: it connects in the background and, until then,
    skips writes and misses lookups. A lookup of an unknown chunk counts an error only then."""
    probe = as_int32_buffer(list(range(2_000_000_000, 2_000_000_256)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        errors = tier_counters(engine, "RemoteBackend")["errors"]
        engine.lookup(probe)
        if tier_counters(engine, "RemoteBackend")["errors"] == errors:
            return
        time.sleep(0.01)
    raise TimeoutError("the Redis tier did not connect")


def timed_tier_retrieve(engine: Engine, layers, tokens, slots, tier_name: str) -> float:
    """clear() the CPU tier, zero the KV cache (untimed), then time one retrieve that must read all
    chunks from ``tier_name``."""
    engine.clear()
    for layer in layers:
        layer.zero_()
    before = tier_counters(engine, tier_name)["hits"]
    started = time.perf_counter()
    retrieved = engine.retrieve(tokens, slots)
    seconds = time.perf_counter() - started
    assert retrieved == TIER_TOKENS, retrieved
    chunks = TIER_TOKENS // 256
    assert tier_counters(engine, tier_name)["hits"] - before == chunks, "every chunk must come from the tier"
    return seconds


def timed_tier_prefetch(engine: Engine, tokens, tier_name: str) -> float:
    """clear() the CPU tier, then time prefetch(...).wait(): the tier read and promotion alone,
    without writing the KV cache (the breakdown of a retrieve)."""
    engine.clear()
    before = tier_counters(engine, tier_name)["hits"]
    started = time.perf_counter()
    with engine.prefetch(tokens) as job:
        prefetched = job.wait()
    seconds = time.perf_counter() - started
    assert prefetched == TIER_TOKENS, prefetched
    assert tier_counters(engine, tier_name)["hits"] - before == TIER_TOKENS // 256
    return seconds


def check_tier_retrieve(layers, reference: dict, slots) -> None:
    slot_tensor = torch.tensor((ctypes.c_int64 * slots.length).from_address(slots.address))
    blocks, offsets = slot_tensor // BLOCK_SIZE, slot_tensor % BLOCK_SIZE
    for index, original in reference.items():
        assert torch.equal(layers[index][:, blocks, offsets].view(torch.int16),
                           original[:, blocks, offsets].view(torch.int16)), f"layer {index} differs"


def measure_disk_tier() -> dict:
    generator = torch.Generator().manual_seed(3)
    layers = allocate_cache("NHD", generator, TIER_BLOCKS)
    tokens, slots = request(generator, TIER_TOKENS, TIER_BLOCKS)
    reference = {index: layers[index].clone() for index in (0, NUM_LAYERS - 1)}
    directory = tempfile.mkdtemp(prefix="lmcache-bench-disk-", dir=os.environ.get("LMC_BENCH_DISK_DIR"))
    config = {"chunk_size": 256, "max_local_cpu_size": 2, "local_disk": directory, "max_local_disk_size": 2}
    result = {"engine_cold": [], "read_cold": [], "engine_warm": [], "read_warm": [], "prefetch_cold": [],
              "prefetch_warm": [], "drops": []}
    try:
        with Engine(config, model_name="llama-3-8b-shape") as engine:
            engine.register_layers(layers, layout="flash_attn")
            assert engine.store(tokens, slots) == TIER_TOKENS
            engine.flush(300)
            disk = tier_counters(engine, "LocalDiskBackend")
            assert disk["writes"] == TIER_TOKENS // 256 and disk["write_queue_drops"] == 0, disk
            paths = sorted(glob.glob(os.path.join(directory, "*.lmcc")))
            file_bytes = sum(os.path.getsize(path) for path in paths)
            buffer = memoryview(bytearray(max(os.path.getsize(path) for path in paths)))
            sequential_read(paths[:1], buffer)  # touch the buffer's pages
            for _ in range(TIER_REPETITIONS):  # cold, engine and plain read interleaved
                result["drops"].append(drop_page_cache(paths))
                result["engine_cold"].append(timed_tier_retrieve(engine, layers, tokens, slots, "LocalDiskBackend"))
                check_tier_retrieve(layers, reference, slots)
                result["drops"].append(drop_page_cache(paths))
                started = time.perf_counter()
                assert sequential_read(paths, buffer) == file_bytes
                result["read_cold"].append(time.perf_counter() - started)
                result["drops"].append(drop_page_cache(paths))
                result["prefetch_cold"].append(timed_tier_prefetch(engine, tokens, "LocalDiskBackend"))
            for _ in range(TIER_REPETITIONS):  # warm: the files are in the page cache now
                result["engine_warm"].append(timed_tier_retrieve(engine, layers, tokens, slots, "LocalDiskBackend"))
                started = time.perf_counter()
                sequential_read(paths, buffer)
                result["read_warm"].append(time.perf_counter() - started)
                result["prefetch_warm"].append(timed_tier_prefetch(engine, tokens, "LocalDiskBackend"))
            check_tier_retrieve(layers, reference, slots)
            result["kv_bytes"] = tier_counters(engine, "LocalDiskBackend")["bytes_read"] // (4 * TIER_REPETITIONS)
            result["file_bytes"] = file_bytes
            result["directory"] = directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return result


class RawRedis:
    """The baseline client: RESP over a plain TCP socket, replies read straight into a buffer."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, *args: bytes) -> None:
        self.sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))

    def read_into(self, buffer: memoryview) -> tuple[int, int]:
        """Reads one reply into ``buffer``; returns (start of the payload, payload length or -1)."""
        received = 0
        header_end = -1
        while header_end < 0:
            count = self.sock.recv_into(buffer[received:])
            if not count:
                raise ConnectionError("closed")
            received += count
            header_end = bytes(buffer[:min(received, 64)]).find(b"\r\n")
        kind, header = buffer[0:1].tobytes(), bytes(buffer[1:header_end])
        if kind == b"-":
            raise RuntimeError(header.decode())
        if kind != b"$":
            return header_end + 2, int(header) if kind == b":" else len(header)
        length = int(header)
        if length < 0:
            return header_end + 2, -1
        needed = header_end + 2 + length + 2
        while received < needed:
            count = self.sock.recv_into(buffer[received:needed])
            if not count:
                raise ConnectionError("closed")
            received += count
        return header_end + 2, length

    def command(self, *args: bytes) -> bytes:
        """A reply that is small or an array of bulk strings (KEYS), parsed from a socket file."""
        self.send(*args)
        reader = self.sock.makefile("rb")
        line = reader.readline()
        if line[:1] == b"*":
            items = []
            for _ in range(int(line[1:-2])):
                length = int(reader.readline()[1:-2])
                items.append(reader.read(length + 2)[:-2])
            return items
        return line[:-2]

    def close(self) -> None:
        self.sock.close()


def measure_redis_tier() -> dict | None:
    """The remote tier on one server and on a 3-master cluster, with raw-socket baselines
    (python-demo/bench_remote.py); None without redis-server."""
    import bench_remote

    return bench_remote.measure_remote_tiers(TIER_REPETITIONS)


def print_tiers(disk: dict, redis: dict | None, metrics: dict) -> None:
    """Prints the lower tiers' table and records its numbers in ``metrics`` (see record_rates)."""
    def row(name, tier, what, seconds, num_bytes, baseline=None):
        """One line; records throughput_gbps[tier_what_*] and ratios[tier_what_vs_<baseline's what>_*]."""
        rates = summarize(seconds, num_bytes)
        text = f"{name:<30}{rates['best']:>9.2f}{rates['median']:>9.2f}"
        baseline_what, baseline_rates = baseline or (None, None)
        if baseline is not None:
            text += f"{rates['best'] / baseline_rates['best']:>14.2f}, {rates['median'] / baseline_rates['median']:.2f}"
        print(text)
        record_rates(metrics, f"{tier}_{what}", rates, baseline_what, baseline_rates)
        return what, rates

    print()
    print(f"lower tiers: one {TIER_TOKENS}-token request ({disk['kv_bytes'] / 2**20:.0f} MiB of KV, "
          f"{TIER_TOKENS // 256} chunks), CPU tier cleared before each retrieve, {TIER_REPETITIONS} repetitions")
    drop = disk["drops"][0]
    resident = ", ".join(f"{d['resident']:.0%}" for d in disk["drops"])
    print(f"page cache drop: posix_fadvise(DONTNEED) {drop['posix_fadvise(DONTNEED)']}; "
          f"/proc/sys/vm/drop_caches {drop['/proc/sys/vm/drop_caches']}; record files resident after each "
          f"drop (mincore): {resident}")
    print(f"disk tier directory: {os.path.dirname(disk['directory'])} "
          f"(record files {disk['file_bytes'] / 2**20:.1f} MiB incl. 128-byte headers)")
    print(f"{'GB/s (1e9 B/s)':<30}{'best':>9}{'median':>9}{'engine/baseline (best, median)':>32}")
    read_cold = row("read files, cold", "disk", "read_cold", disk["read_cold"], disk["file_bytes"])
    row("retrieve from disk, cold", "disk", "retrieve_cold", disk["engine_cold"], disk["kv_bytes"], read_cold)
    row("  prefetch only, cold", "disk", "prefetch_cold", disk["prefetch_cold"], disk["kv_bytes"], read_cold)
    read_warm = row("read files, page cache", "disk", "read_warm", disk["read_warm"], disk["file_bytes"])
    row("retrieve from disk, page cache", "disk", "retrieve_warm", disk["engine_warm"], disk["kv_bytes"], read_warm)
    row("  prefetch only, page cache", "disk", "prefetch_warm", disk["prefetch_warm"], disk["kv_bytes"], read_warm)
    residents = [d["resident"] for d in disk["drops"]]
    metrics["run"]["page_cache_drop"] = {"posix_fadvise": drop["posix_fadvise(DONTNEED)"],
                                         "drop_caches": drop["/proc/sys/vm/drop_caches"],
                                         "max_resident_after_drop": None if any(map(math.isnan, residents))
                                         else max(residents)}
    import bench_remote

    bench_remote.print_remote_tiers(redis, metrics)


def record_rates(metrics: dict, key: str, rates: dict, baseline_key: str | None = None,
                 baseline: dict | None = None) -> None:
    """throughput_gbps[key_best/_median] and, with a baseline, ratios[key_vs_baseline_best/_median]
    (the median: the paired median of summarize() where the rates have one)."""
    for statistic in ("best", "median"):
        metrics["throughput_gbps"][f"{key}_{statistic}"] = rates[statistic]
        if baseline is not None:
            ratio = rates[statistic] / baseline[statistic]
            if statistic == "median":
                ratio = rates.get(f"paired_{baseline_key}", ratio)
            metrics["ratios"][f"{key}_vs_{baseline_key}_{statistic}"] = ratio


CONNECTOR_REQUESTS = 300


def measure_connector(num_tokens: int = NUM_TOKENS) -> dict:
    """The vLLM connector's own cost per request for a num_tokens prompt that hits in full (an
    asynchronous load), without the copy: the engine has one tiny host layer (1 head x 4 fp16, 16 bytes
    per token) and the retrieve's own elapsed_ns is subtracted. Scheduler side: lookup call, hit
    accounting, update_state_after_alloc, build_connector_meta (and request_finished). Worker side:
    request set-up and job start (start_load_kv), the completion check and accounting (get_finished,
    called once the job is done). Runs on the stand-in vLLM modules of the connector tests."""
    import logging

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop-tests", "python",
                                    "connector"))
    os.environ["LMCACHE_LOG_LEVEL"] = "WARNING"  # the per-request INFO lines would go to the terminal
    import fakevllm

    fakevllm.install(fakevllm.V0_14)
    logging.getLogger("lmcache_native").setLevel(logging.WARNING)
    num_blocks = num_tokens // BLOCK_SIZE + 8
    vllm_config = fakevllm.make_vllm_config(extra_config={"lmcache.chunk_size": 256}, block_size=BLOCK_SIZE,
                                            num_layers=1, num_kv_heads=1, head_size=4, dtype="float16")
    kv_cache_config = fakevllm.make_kv_cache_config(num_blocks, ["layer.0"], BLOCK_SIZE, 1, 4)
    worker = fakevllm.create_connector(vllm_config, fakevllm.role("WORKER"), kv_cache_config)
    kv = torch.zeros(2, num_blocks, BLOCK_SIZE, 1, 4, dtype=torch.float16)
    worker.register_kv_caches({"layer.0": kv})
    scheduler = fakevllm.create_connector(vllm_config, fakevllm.role("SCHEDULER"), kv_cache_config)
    engine = worker._worker.engine
    prompt = [int(t) for t in torch.randint(1, 30000, (num_tokens,), generator=torch.Generator().manual_seed(5))]
    block_ids = list(range(1, num_tokens // BLOCK_SIZE + 1))
    engine.store(prompt, block_ids=block_ids, block_size=BLOCK_SIZE)
    lookup_ns = [engine.lookup(prompt).elapsed_ns for _ in range(50)]

    class Request:
        def __init__(self, request_id):
            self.request_id = request_id
            self.prompt_token_ids = prompt
            self.all_token_ids = prompt
            self.num_tokens = num_tokens
            self.kv_transfer_params = None
            self.priority = 0

    def scheduler_output(finished):
        cached = fakevllm.CachedRequestData(req_ids=[], new_token_ids=[], new_block_ids=[], num_computed_tokens=[],
                                            resumed_req_ids=set())
        return fakevllm.SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={},
                                        total_num_scheduled_tokens=0, scheduled_spec_decode_tokens={},
                                        scheduled_encoder_inputs={}, num_common_prefix_blocks=[0],
                                        finished_req_ids=set(finished), free_encoder_mm_hashes=[],
                                        preempted_req_ids=set())

    context = fakevllm.ForwardContext({}, None)
    blocks = fakevllm.KVCacheBlocks(block_ids)
    scheduler_us, worker_us, copy_us = [], [], []
    finished = []
    for index in range(CONVERSION_CALLS // 4 + CONNECTOR_REQUESTS):
        request = Request(f"req-{index}")
        output = scheduler_output(finished)
        start = time.perf_counter_ns()
        need, load_async = scheduler.get_num_new_matched_tokens(request, 0)
        scheduler.update_state_after_alloc(request, blocks, need)
        meta = scheduler.build_connector_meta(output)
        scheduler_ns = time.perf_counter_ns() - start
        assert need == num_tokens and load_async and len(meta.loads) == 1
        worker.bind_connector_metadata(meta)
        start = time.perf_counter_ns()
        worker.start_load_kv(context)
        worker_ns = time.perf_counter_ns() - start
        (_, _, job), = worker._worker.jobs_in_flight()
        result = job.wait(10)  # the copy: not the connector's cost
        start = time.perf_counter_ns()
        _, recving = worker.get_finished(set(finished))
        worker_ns += time.perf_counter_ns() - start
        worker.clear_connector_metadata()
        assert recving == {request.request_id} and result.tokens_matched == num_tokens
        start = time.perf_counter_ns()
        scheduler.request_finished(request, block_ids)
        scheduler_ns += time.perf_counter_ns() - start
        finished = [request.request_id]
        if index >= CONVERSION_CALLS // 4:  # warm-up done
            scheduler_us.append(scheduler_ns / 1000)
            worker_us.append(worker_ns / 1000)
            copy_us.append(result.elapsed_ns / 1000)
    worker.shutdown()
    scheduler.shutdown()
    return {"scheduler_us": statistics.median(scheduler_us), "scheduler_p99_us": percentile(scheduler_us, 0.99),
            "worker_us": statistics.median(worker_us), "worker_p99_us": percentile(worker_us, 0.99),
            "lookup_c_us": statistics.median(lookup_ns) / 1000, "tiny_copy_us": statistics.median(copy_us)}


def print_connector(connector: dict, copy_rows: list, metrics: dict) -> None:
    bytes_per_token = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_SIZE * 2
    retrieve = next(row[2] for row in copy_rows if row[0] == "NHD")
    copy_ms = NUM_TOKENS * bytes_per_token / (retrieve["median"] * GB) * 1000
    print()
    print(f"vLLM connector, per request of {NUM_TOKENS} tokens (full hit, asynchronous load), "
          f"{CONNECTOR_REQUESTS} requests, without the copy:")
    print(f"  scheduler side (lookup call + hit accounting + metadata): median {connector['scheduler_us']:.1f} us, "
          f"p99 {connector['scheduler_p99_us']:.1f} us (of which the library's lookup {connector['lookup_c_us']:.1f} us)")
    print(f"  worker side (set-up + job start + completion check):      median {connector['worker_us']:.1f} us, "
          f"p99 {connector['worker_p99_us']:.1f} us")
    print(f"  the copy itself (retrieve NHD above, Llama-3-8B shape):    {copy_ms:.1f} ms")
    metrics["latencies_us"].update({
        "connector_scheduler_median": connector["scheduler_us"],
        "connector_scheduler_p99": connector["scheduler_p99_us"],
        "connector_worker_median": connector["worker_us"],
        "connector_worker_p99": connector["worker_p99_us"],
        "connector_library_lookup_median": connector["lookup_c_us"],
        "connector_tiny_copy_median": connector["tiny_copy_us"],
        "retrieve_nhd_request_median": copy_ms * 1000,
    })


def measure_and_print_copies(num_tokens: int, repetitions: int, metrics: dict) -> list:
    copy_rows = []
    for layout in ("NHD", "HND"):
        store, retrieve, memcpy, parallel, num_bytes = measure_copies(layout, num_tokens, repetitions)
        copy_rows.append((layout, store, retrieve, memcpy, parallel))
        gc.collect()

    print()
    print(f"{'copy GB/s (1e9 B/s)':<22}{'best':>9}{'median':>9}{'engine/memcpy (best, median)':>32}"
          f"{'engine/parallel memcpy':>24}")
    for layout, store, retrieve, memcpy, parallel in copy_rows:
        print(f"{'memcpy ' + layout:<22}{memcpy['best']:>9.2f}{memcpy['median']:>9.2f}")
        print(f"{'parallel memcpy ' + layout:<22}{parallel['best']:>9.2f}{parallel['median']:>9.2f}"
              f"   ({os.cpu_count()} threads)")
        suffix = layout.lower()
        record_rates(metrics, f"memcpy_{suffix}", memcpy)
        record_rates(metrics, f"parallel_memcpy_{suffix}", parallel)
        for name, result in (("store", store), ("retrieve", retrieve)):
            ratio = f"{result['best'] / memcpy['best']:.2f}, {result['paired_memcpy']:.2f}"
            parallel_ratio = f"{result['best'] / parallel['best']:.2f}, {result['paired_parallel_memcpy']:.2f}"
            print(f"{name + ' ' + layout:<22}{result['best']:>9.2f}{result['median']:>9.2f}{ratio:>32}{parallel_ratio:>24}")
            record_rates(metrics, f"{name}_{suffix}", result, "memcpy", memcpy)
            record_rates(metrics, f"{name}_{suffix}", result, "parallel_memcpy", parallel)
    return copy_rows


def measure_and_print_lookups(algorithms: tuple, calls: int, metrics: dict, tiny: bool = False) -> None:
    """The NUM_TOKENS lookup. tiny (--quick): the cache is one layer of one 4-wide head (16 bytes per
    token) instead of the Llama shape; a lookup hashes tokens and probes keys, whatever the shape."""
    generator = torch.Generator().manual_seed(2)
    num_tokens = NUM_TOKENS
    if tiny:
        layers = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, 1, 4, dtype=torch.float16)]
    else:
        layers = allocate_cache("NHD", generator)
    tokens, slots = request(generator, num_tokens, NUM_BLOCKS)
    lookups = {algorithm: measure_lookup(algorithm, layers, tokens, slots, calls) for algorithm in algorithms}
    del layers
    print()
    print(f"lookup of {num_tokens} tokens (hit), int32 buffer, {calls} calls:")
    print(f"{'hash':<12}{'Engine.lookup median':>22}{'p99':>10}{'raw lmc_lookup median':>24}{'p99':>10}")
    for algorithm, result in lookups.items():
        print(f"{algorithm:<12}{result['median']:>19.1f} us{result['p99']:>7.1f} us"
              f"{result['raw_median']:>21.1f} us{result['raw_p99']:>7.1f} us")
        name = {"xxh3_128": "xxh3"}.get(algorithm, algorithm)
        for statistic in ("median", "p99", "raw_median", "raw_p99"):
            metrics["latencies_us"][f"lookup_{name}_{statistic}"] = result[statistic]
    if "sha256" in lookups:
        floor = measure_raw_sha256(num_tokens, 256, calls)
        ratio = lookups["sha256"]["raw_median"] / floor["one_call"]
        print(f"SHA-256 of the same bytes (hashlib, the same OpenSSL): one digest {floor['one_call']:.1f} us, one per "
              f"chunk {floor['per_chunk']:.1f} us; raw sha256 lookup / one digest: {ratio:.2f}")
        metrics["latencies_us"]["sha256_same_bytes_one_digest_median"] = floor["one_call"]
        metrics["latencies_us"]["sha256_same_bytes_per_chunk_median"] = floor["per_chunk"]
        metrics["ratios"]["lookup_sha256_raw_vs_sha256_same_bytes_median"] = ratio


def machine_info() -> dict:
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    except OSError:
        pass

    def git(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    memory_bytes = None
    try:
        with open("/proc/meminfo") as meminfo:
            memory_bytes = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:")), None)
    except OSError:
        pass
    try:
        dotnet = subprocess.run(["dotnet", "--version"], capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        dotnet = None
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "memory_bytes": memory_bytes, "kernel": platform.release(),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "dotnet_sdk": dotnet, "git_commit": commit, "git_dirty": None if status is None else bool(status)}


def write_json(path: str, metrics: dict) -> None:
    def finite(value):  # JSON has no NaN
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        return value

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as out:
        json.dump(finite(metrics), out, indent=2, sort_keys=False)
        out.write("\n")
    os.replace(temporary, path)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="lmcache_native CPU benchmark (see the module docstring).")
    parser.add_argument("--quick", action="store_true",
                        help=f"a seconds-long form: {QUICK_TOKENS} tokens, {QUICK_REPETITIONS} repetitions, "
                             "copy ratios and the xxh3 lookup only")
    parser.add_argument("--json", metavar="PATH",
                        help="where to write the numbers (default build/bench/bench.json, bench-quick.json with --quick)")
    parser.add_argument("--check", action="store_true",
                        help="compare the numbers with the committed thresholds (scripts/bench_check.py); "
                             "exit status 1 when one is missed")
    parser.add_argument("--thresholds", metavar="PATH",
                        help="thresholds for --check (default python-demo/bench_thresholds.json, "
                             "bench_thresholds_quick.json with --quick)")
    arguments = parser.parse_args(argv)
    arguments.json = arguments.json or os.path.join(ROOT, "build", "bench",
                                                    "bench-quick.json" if arguments.quick else "bench.json")
    arguments.thresholds = arguments.thresholds or os.path.join(
        HERE, "bench_thresholds_quick.json" if arguments.quick else "bench_thresholds.json")
    return arguments


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    started = time.perf_counter()
    quick = arguments.quick
    num_tokens = QUICK_TOKENS if quick else NUM_TOKENS
    repetitions = QUICK_REPETITIONS if quick else COPY_REPETITIONS
    lookup_calls = QUICK_LOOKUP_CALLS if quick else LOOKUP_CALLS
    metrics = {"schema": 1, "mode": "quick" if quick else "full", "machine": machine_info(),
               "run": {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "tokens": num_tokens, "copy_repetitions": repetitions, "lookup_tokens": NUM_TOKENS,
                       "lookup_calls": lookup_calls, "load_average_before": os.getloadavg()[0]},
               "ratios": {}, "throughput_gbps": {}, "latencies_us": {}}
    bytes_per_token = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_SIZE * 2
    print(f"lmcache_native bench{' --quick' if quick else ''}: {NUM_LAYERS} layers x {NUM_KV_HEADS} KV heads x "
          f"{HEAD_SIZE}, bf16, block {BLOCK_SIZE}, {num_tokens} tokens = {num_tokens * bytes_per_token / 2**30:.2f} "
          f"GiB per request, chunk_size 256; {os.cpu_count()} CPUs; {repetitions} repetitions")
    bench_perf.progress(f"copies of a {num_tokens}-token request, NHD and HND")
    copy_rows = measure_and_print_copies(num_tokens, repetitions, metrics)
    bench_perf.progress("lookups")
    measure_and_print_lookups(("xxh3_128",) if quick else ("sha256", "xxh3_128"), lookup_calls, metrics, tiny=quick)
    if not quick:
        gc.collect()
        bench_perf.measure_layout_matrix(metrics)
    gc.collect()
    bench_perf.measure_scaling(metrics, quick)

    if not quick:
        conversion_us = measure_list_conversion()
        print(f"list of {NUM_TOKENS} ints -> int32 buffer (as_int32_buffer), median: {conversion_us:.1f} us")
        metrics["latencies_us"]["list_to_int32_buffer_median"] = conversion_us

        gc.collect()
        bench_perf.progress("the vLLM connector's own cost")
        print_connector(measure_connector(), copy_rows, metrics)

        gc.collect()
        bench_perf.progress("lower tiers: disk, then Redis")
        disk = measure_disk_tier()
        gc.collect()
        redis = measure_redis_tier()
        metrics["run"].update({"tier_tokens": TIER_TOKENS, "tier_repetitions": TIER_REPETITIONS})
        print_tiers(disk, redis, metrics)
    total = time.perf_counter() - started
    metrics["run"]["total_seconds"] = total
    metrics["run"]["load_average_after"] = os.getloadavg()[0]
    write_json(arguments.json, metrics)
    print(f"\ntotal bench time: {total:.1f} s; numbers written to {os.path.relpath(arguments.json)}")
    chart = bench_perf.write_chart(metrics, os.path.splitext(arguments.json)[0] + ".png")
    if chart:
        print(f"chart written to {os.path.relpath(chart)}")
    if not arguments.check:
        return 0
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_check

    print()
    load = max(metrics["run"]["load_average_before"], metrics["run"]["load_average_after"])
    if load > (os.cpu_count() or 1) * 0.75:
        print(f"note: the machine was busy (1-minute load average {load:.1f} on {os.cpu_count()} CPUs); "
              f"a FAIL may be that load rather than the code")
    return bench_check.run(arguments.json, arguments.thresholds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
