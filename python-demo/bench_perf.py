"""Parts of the benchmark (python-demo/bench.py) about copies in every layout, how costs grow, and the
chart: imported by bench.py, which owns the command line, bench.json and the checks.

1. Copies in every layout (``measure_layout_matrix``): store and retrieve of one request of
   LAYOUT_TOKENS tokens, Llama-3-8B-shaped (32 layers, 8 KV heads of 128; MLA: one 576-wide latent,
   DeepSeek's), for FlashAttention NHD and HND, blocks-first, packed and MLA, 2-byte (bf16) and
   1-byte (fp8: torch 1.13 has no float8, and the engine only sees the element size) elements, chunk
   sizes 16 and 256; each next to a memcpy of the same bytes split over every core, the three timed
   in turn in every repetition so that load and clock drift hit them alike.
2. Scaling (``measure_scaling``), each row a ratio or a slope:
   - lookup latency against prompt length (1K, 8K, 32K, 128K tokens; sha256 and xxh3_128), next to a
     raw SHA-256 of the same bytes at each length: slopes (us per 1K tokens) and their ratio;
   - lookup and store latency against the number of cached chunks (1K to 1M chunks of 16 tokens of a
     16-byte-per-token model), and the memory per cached chunk beyond its slab (index, LRU, record);
   - store throughput with an empty pool against a full pool that evicts on every store;
   - store + retrieve throughput with 1, 2 and 4 calling threads, and the lock wait seen from outside:
     the latency of a one-chunk lookup (which takes the CPU tier's lock) on another thread while the
     callers run, against the same lookup on an idle engine;
   - the disk tier with 100K records: the time a new engine takes to register (the directory scan
     that rebuilds the index) and the memory that index takes per record.
3. ``write_chart``: build/bench/bench.png (matplotlib, Agg): GB/s per layout and tier next to the
   baselines, lookup latency per hash and against prompt length.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

from lmcache_native import Engine, as_int32_buffer, as_int64_buffer

GB = 1e9
LAYERS, HEADS, HEAD_SIZE, BLOCK = 32, 8, 128, 16
MLA_WIDTH = 576  # DeepSeek-V3: 512-wide latent + 64 rope dims, one vector per token
LAYOUT_TOKENS, LAYOUT_REPETITIONS = 2048, 9
LAYOUTS = ("NHD", "HND", "blocks_first", "packed", "MLA")


def progress(message: str) -> None:
    """One line per phase that takes more than a few seconds, so a long run shows where it is."""
    print(f"... {message}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ParallelMemcpy:
    """A memcpy of num_bytes split over every CPU (one memmove per thread; ctypes drops the GIL),
    between two buffers touched beforehand."""

    def __init__(self, num_bytes: int):
        self.num_bytes = num_bytes
        self.source = torch.empty(num_bytes, dtype=torch.uint8).fill_(1)
        self.destination = torch.empty(num_bytes, dtype=torch.uint8).fill_(2)
        self.workers = os.cpu_count() or 1
        share = -(-num_bytes // self.workers)
        self.pieces = [(offset, min(share, num_bytes - offset)) for offset in range(0, num_bytes, share)]
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers)

    def _piece(self, piece):
        offset, length = piece
        ctypes.memmove(self.destination.data_ptr() + offset, self.source.data_ptr() + offset, length)

    def run(self) -> float:
        started = time.perf_counter()
        list(self.pool.map(self._piece, self.pieces))
        return time.perf_counter() - started

    def close(self):
        self.pool.shutdown()


def layout_layers(layout: str, elem_size: int, num_blocks: int, seed: int) -> tuple[list, str]:
    """32 layers of ``layout`` (bf16 for 2-byte elements, uint8 standing in for fp8) filled with a
    distinct pattern per layer; returns (tensors, layout name for register_layers)."""
    dtype = torch.bfloat16 if elem_size == 2 else torch.uint8
    if layout == "MLA":
        physical, name = (num_blocks, BLOCK, MLA_WIDTH), "mla"
    elif layout == "blocks_first":
        physical, name = (num_blocks, 2, BLOCK, HEADS, HEAD_SIZE), "blocks_first"
    elif layout == "packed":
        physical, name = (num_blocks, HEADS, BLOCK, 2 * HEAD_SIZE), "packed"
    elif layout == "HND":
        physical, name = (2, num_blocks, HEADS, BLOCK, HEAD_SIZE), "flash_attn"
    else:
        physical, name = (2, num_blocks, BLOCK, HEADS, HEAD_SIZE), "flash_attn"
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for size in physical:
        numel *= size
    pattern = torch.randint(0, 255, (numel * elem_size,), dtype=torch.uint8, generator=generator)
    layers = []
    for index in range(LAYERS):
        layer = torch.empty(physical, dtype=dtype)
        layer.view(-1).view(torch.uint8).copy_(pattern).add_(index)
        if layout == "HND":
            layer = layer.permute(0, 1, 3, 2, 4)  # logical [2, B, N, H, D] over physical [2, B, H, N, D]
        layers.append(layer)
    return layers, name


def vllm_request(num_tokens: int, num_blocks: int, seed: int):
    """Random tokens; whole blocks in random order, as vLLM's block table hands them out."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128000, (num_tokens,), dtype=torch.int32, generator=generator)
    blocks = torch.randperm(num_blocks, generator=generator)[:-(-num_tokens // BLOCK)]
    positions = torch.arange(num_tokens)
    slots = blocks[positions // BLOCK] * BLOCK + positions % BLOCK
    return as_int32_buffer(tokens), as_int64_buffer(slots), slots


def measure_layout(layout: str, elem_size: int, chunk_size: int, num_tokens: int, repetitions: int,
                   baselines: dict) -> dict:
    num_blocks = num_tokens // BLOCK * 9 // 8
    layers, name = layout_layers(layout, elem_size, num_blocks, seed=len(layout) * 10 + elem_size)
    tokens, slots, slot_tensor = vllm_request(num_tokens, num_blocks, seed=chunk_size)
    row = MLA_WIDTH if layout == "MLA" else 2 * HEADS * HEAD_SIZE
    num_bytes = num_tokens * LAYERS * row * elem_size
    baseline = baselines.get(num_bytes) or baselines.setdefault(num_bytes, ParallelMemcpy(num_bytes))
    checked = (0, LAYERS - 1)
    reference = {index: layers[index].clone() for index in checked}
    times = {"memcpy": [], "store": [], "retrieve": []}
    config = {"chunk_size": chunk_size, "max_local_cpu_size": 2 * num_bytes / 2**30 + 0.1}
    with Engine(config, model_name=f"layout-{layout}-{elem_size}") as engine:
        engine.register_layers(layers, layout=name)
        for _ in range(repetitions):
            times["memcpy"].append(baseline.run())
            engine.clear()
            started = time.perf_counter()
            stored = engine.store(tokens, slots)
            times["store"].append(time.perf_counter() - started)
            for index in checked:
                layers[index].zero_()
            started = time.perf_counter()
            retrieved = engine.retrieve(tokens, slots)
            times["retrieve"].append(time.perf_counter() - started)
            assert stored == retrieved == num_tokens, (stored, retrieved)
        assert engine.stats()["stored_bytes"] == repetitions * num_bytes
    # The retrieved KV must be the stored KV, bit for bit (two layers checked).
    blocks, offsets = slot_tensor // BLOCK, slot_tensor % BLOCK
    for index in checked:
        got, want = layers[index], reference[index]
        if layout == "MLA":
            same = torch.equal(got[blocks, offsets].view(torch.uint8), want[blocks, offsets].view(torch.uint8))
        elif layout in ("blocks_first", "packed"):
            same = torch.equal(got[blocks].view(torch.uint8), want[blocks].view(torch.uint8))
        else:
            same = torch.equal(got[:, blocks, offsets].contiguous().view(torch.uint8),
                               want[:, blocks, offsets].contiguous().view(torch.uint8))
        assert same, f"{layout} {elem_size}-byte chunk {chunk_size}: layer {index} differs after the round trip"
    result = {"bytes": num_bytes}
    for kind, seconds in times.items():
        result[kind] = {"best": num_bytes / min(seconds) / GB, "median": num_bytes / statistics.median(seconds) / GB}
        # Median over repetitions of memcpy time / this time: the two were timed in turn, so load
        # that comes and goes cancels in each pair (bench.summarize).
        result[kind]["paired"] = statistics.median(m / s for m, s in zip(times["memcpy"], seconds))
    return result


def measure_layout_matrix(metrics: dict, num_tokens: int = LAYOUT_TOKENS,
                          repetitions: int = LAYOUT_REPETITIONS) -> list:
    """Every layout x element size x chunk size; prints the table, records ratios and GB/s."""
    progress(f"copies in every layout: {len(LAYOUTS)} layouts x 2 element sizes x 2 chunk sizes, "
             f"{num_tokens} tokens, {repetitions} repetitions")
    rows, baselines = [], {}
    for layout in LAYOUTS:
        for elem_size in (2, 1):
            for chunk_size in (256, 16):
                rows.append((layout, elem_size, chunk_size,
                             measure_layout(layout, elem_size, chunk_size, num_tokens, repetitions, baselines)))
                gc.collect()
    for baseline in baselines.values():
        baseline.close()
    print()
    print(f"copies in every layout: {num_tokens} tokens, Llama-3-8B shape (MLA: 1 x {MLA_WIDTH}), "
          f"vLLM block order; GB/s best/median; ratio = engine / a memcpy of the same bytes on "
          f"{os.cpu_count()} threads, timed in turn (median of the per-repetition ratios, best / best)")
    print(f"{'layout':<14}{'dtype':>6}{'chunk':>6}{'MiB':>6}{'memcpy':>14}{'store':>14}{'retrieve':>14}"
          f"{'store/memcpy':>16}{'retrieve/memcpy':>18}")
    for layout, elem_size, chunk_size, r in rows:
        dtype = "bf16" if elem_size == 2 else "fp8"
        key = f"{layout.lower()}_{dtype}_c{chunk_size}"
        cells = "".join(f"{r[k]['best']:>7.1f}/{r[k]['median']:<6.1f}" for k in ("memcpy", "store", "retrieve"))
        ratios = []
        for kind in ("store", "retrieve"):
            metrics["ratios"][f"layout_{key}_{kind}_vs_parallel_memcpy_median"] = r[kind]["paired"]
            metrics["ratios"][f"layout_{key}_{kind}_vs_parallel_memcpy_best"] = r[kind]["best"] / r["memcpy"]["best"]
            metrics["throughput_gbps"][f"layout_{key}_{kind}_median"] = r[kind]["median"]
            ratios.append(f"{r[kind]['paired']:.2f}, {r[kind]['best'] / r['memcpy']['best']:.2f}")
        metrics["throughput_gbps"][f"layout_{key}_parallel_memcpy_median"] = r["memcpy"]["median"]
        print(f"{layout:<14}{dtype:>6}{chunk_size:>6}{r['bytes'] / 2**20:>6.0f}  {cells}{ratios[0]:>16}{ratios[1]:>18}")
    worst = min(metrics["ratios"][f"layout_{layout.lower()}_{'bf16' if e == 2 else 'fp8'}_c{c}_{kind}_vs_parallel_memcpy_median"]
                for layout, e, c, _ in rows for kind in ("store", "retrieve"))
    metrics["ratios"]["layout_worst_vs_parallel_memcpy_median"] = worst
    print(f"worst engine / memcpy over the table (median): {worst:.2f}")
    return rows


# ------------------------------------------------------------------------------------------------
# Scaling
# ------------------------------------------------------------------------------------------------

def tiny_engine(config: dict, num_blocks: int, model: str = "scaling") -> tuple[Engine, torch.Tensor]:
    """An engine over one layer of one 4-wide fp16 head: 16 bytes of KV per token, so the index and
    the hashing, not the copies, dominate."""
    engine = Engine(config, model_name=model)
    kv = torch.zeros(2, num_blocks, BLOCK, 1, 4, dtype=torch.float16)
    engine.register_layers([kv], layout="flash_attn")
    return engine, kv


def median_us(function, calls: int) -> float:
    samples = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        function()
        samples.append(time.perf_counter_ns() - started)
    return statistics.median(samples) / 1e3


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def measure_lookup_vs_length(lengths: list[int], calls: int) -> dict:
    """Median lookup latency (a hit, through Engine.lookup) per prompt length and hash, and one
    SHA-256 digest of the bytes such a lookup hashes; the three timed in turn, call by call, so that
    load and clock drift hit them alike."""
    import hashlib

    progress(f"scaling: lookup latency against prompt length {lengths}")
    longest = max(lengths)
    tokens = torch.randint(0, 128000, (longest,), dtype=torch.int32, generator=torch.Generator().manual_seed(6))
    slots = as_int64_buffer(torch.arange(longest))
    engines = {}
    try:
        for algorithm in ("sha256", "xxh3_128"):
            config = {"chunk_size": 256, "max_local_cpu_size": 1, "pre_caching_hash_algorithm": algorithm}
            engines[algorithm], _ = tiny_engine(config, longest // BLOCK + 8)
            assert engines[algorithm].store(as_int32_buffer(tokens), slots) == longest
        result = {}
        clock = time.perf_counter_ns
        for length in lengths:
            buffer = as_int32_buffer(tokens[:length])
            data = bytes((32 + 4 + 4 * 256) * (length // 256))
            samples = {"sha256": [], "xxh3_128": [], "raw_sha256": []}
            lookups = [(name, engine.lookup) for name, engine in engines.items()]
            for name, lookup in lookups:
                assert lookup(buffer) == length
            for _ in range(max(100, calls * 8192 // length)):
                for name, lookup in lookups:
                    started = clock()
                    lookup(buffer)
                    samples[name].append(clock() - started)
                started = clock()
                hashlib.sha256(data).digest()
                samples["raw_sha256"].append(clock() - started)
            for name, values in samples.items():
                result[(name, length)] = statistics.median(values) / 1e3
        return result
    finally:
        for engine in engines.values():
            engine.close()


# A store that took at most this many minor page faults reused warm memory (see measure_chunk_count).
STORE_WARM_FAULTS = 3


def measure_chunk_count(counts: list[int], calls: int) -> dict:
    """Lookup (a 4096-token hit) and store (a fresh 4096-token prompt) latency with ``counts`` chunks
    of 16 tokens cached; memory per chunk from the process's resident size.

    Each store's minor page faults are counted too (getrusage of the calling thread, which runs a
    store this small). A store allocates about 48 KB of managed objects (a record per chunk, the
    plan); depending on the GC's history those land on memory already touched or on fresh pages (a
    dozen page faults or more, up to +200 us on the dev VM), and the state lasts over many stores,
    so which one a run of stores mostly sees moves the plain median by up to 2x at any cache size.
    The median over the stores that took at most STORE_WARM_FAULTS faults is the index and copy work
    alone: that is what must stay flat as the cache grows; both are reported."""
    progress(f"scaling: lookup and store latency against cached chunks {counts}")
    chunk, prompt = 16, 4096
    fill_tokens = 16384  # tokens per filling store: 1024 chunks
    num_blocks = fill_tokens // BLOCK + 8
    largest = max(counts)
    slab = chunk * 16  # 16 bytes of KV per token
    config = {"chunk_size": chunk, "max_local_cpu_size": largest * slab * 1.05 / 2**30 + 0.01,
              "pre_caching_hash_algorithm": "xxh3_128"}
    gc.collect()
    before = rss_bytes()
    engine, _ = tiny_engine(config, num_blocks)
    generator = torch.Generator().manual_seed(7)
    fill_slots = as_int64_buffer(torch.arange(fill_tokens))
    probe = as_int32_buffer(torch.randint(0, 2**31 - 1, (prompt,), dtype=torch.int32, generator=generator))
    probe_slots = as_int64_buffer(torch.arange(prompt))
    result = {}
    with engine:
        assert engine.store(probe, probe_slots) == prompt
        cached = prompt // chunk
        base = 0
        for count in counts:
            while cached < count:
                # Distinct prompts (a running counter as tokens) so that every chunk is new.
                tokens = torch.arange(base, base + fill_tokens, dtype=torch.int32)
                base += fill_tokens
                engine.store(as_int32_buffer(tokens), fill_slots)
                cached += fill_tokens // chunk
            stats = engine.stats()
            lookup_us = median_us(lambda: engine.lookup(probe), calls)
            store_samples, warm_samples, faults = [], [], []
            for _ in range(max(5, calls * 3 // 10)):
                tokens = as_int32_buffer(torch.arange(base, base + prompt, dtype=torch.int32))
                base += prompt
                faults_before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                started = time.perf_counter_ns()
                engine.store(tokens, probe_slots)
                elapsed = time.perf_counter_ns() - started
                faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults_before)
                store_samples.append(elapsed)
                if faults[-1] <= STORE_WARM_FAULTS:
                    warm_samples.append(elapsed)
            cached = engine.stats()["cached_chunks"]
            memory = rss_bytes() - before
            result[count] = {"chunks": stats["cached_chunks"], "lookup_us": lookup_us,
                             "store_us": statistics.median(store_samples) / 1e3,
                             "store_warm_us": statistics.median(warm_samples) / 1e3 if len(warm_samples) >= 10 else None,
                             "stores": len(store_samples), "stores_warm": len(warm_samples),
                             "store_faults_median": statistics.median(faults),
                             "bytes_per_chunk": memory / max(1, cached),
                             "overhead_per_chunk": (memory - cached * slab) / max(1, cached)}
    return result


def measure_full_pool(repetitions: int) -> dict:
    """Store GB/s into an emptied pool against a pool that is full, so every store evicts."""
    progress("scaling: store into an empty pool against a full one that evicts on every store")
    num_tokens, chunk = 1024, 256
    num_blocks = num_tokens // BLOCK * 9 // 8
    layers, name = layout_layers("NHD", 2, num_blocks, seed=8)
    num_bytes = num_tokens * LAYERS * 2 * HEADS * HEAD_SIZE * 2
    capacity_gib = 4 * num_bytes / 2**30  # four requests' worth
    times = {"empty": [], "full": []}
    with Engine({"chunk_size": chunk, "max_local_cpu_size": capacity_gib}, model_name="pool") as engine:
        engine.register_layers(layers, layout=name)
        _, slots, _ = vllm_request(num_tokens, num_blocks, seed=9)
        serial = 0

        def fresh():
            nonlocal serial
            serial += 1
            return as_int32_buffer(torch.arange(serial * num_tokens, (serial + 1) * num_tokens, dtype=torch.int32))

        for _ in range(6):  # fill the pool, touch every slab
            engine.store(fresh(), slots)
        for _ in range(repetitions):
            engine.clear()
            tokens = fresh()
            started = time.perf_counter()
            engine.store(tokens, slots)
            times["empty"].append(time.perf_counter() - started)
            for _ in range(4):  # full again
                engine.store(fresh(), slots)
            evicted = engine.stats()["evicted_chunks"]
            tokens = fresh()
            started = time.perf_counter()
            engine.store(tokens, slots)
            times["full"].append(time.perf_counter() - started)
            assert engine.stats()["evicted_chunks"] - evicted == num_tokens // chunk, "the store must evict"
    result = {kind: num_bytes / statistics.median(seconds) / GB for kind, seconds in times.items()}
    # Median over repetitions of empty-pool time / full-pool time (timed in turn: load cancels in a pair).
    result["full_vs_empty_paired"] = statistics.median(e / f for e, f in zip(times["empty"], times["full"]))
    return result


def measure_threads(thread_counts: list[int], seconds_each: float) -> dict:
    """Aggregate store+retrieve GB/s with N callers (each its own prompt and slots), and the latency
    of a one-chunk lookup on one more thread meanwhile (it takes the CPU tier's lock: its rise over
    the idle latency is the lock wait)."""
    progress(f"scaling: store + retrieve with {thread_counts} calling threads")
    num_tokens, chunk = 256, 256
    callers = max(thread_counts)
    num_blocks = callers * num_tokens // BLOCK + 8
    layers, name = layout_layers("NHD", 2, num_blocks, seed=10)
    num_bytes = num_tokens * LAYERS * 2 * HEADS * HEAD_SIZE * 2
    result = {}
    with Engine({"chunk_size": chunk, "max_local_cpu_size": 2 * callers * num_bytes / 2**30 + 0.1},
                model_name="threads") as engine:
        engine.register_layers(layers, layout=name)
        requests = []
        for index in range(callers):
            tokens = as_int32_buffer(torch.arange(index * 10**6, index * 10**6 + num_tokens, dtype=torch.int32))
            slots = as_int64_buffer(torch.arange(index * num_tokens, (index + 1) * num_tokens))
            requests.append((tokens, slots))
        probe = as_int32_buffer(torch.arange(5 * 10**8, 5 * 10**8 + chunk, dtype=torch.int32))
        engine.store(probe, as_int64_buffer(torch.arange(chunk)))  # the probe's own chunk
        idle = []
        for _ in range(300):
            started = time.perf_counter_ns()
            engine.lookup(probe)
            idle.append(time.perf_counter_ns() - started)
        for count in thread_counts:
            stop = threading.Event()
            done = [0] * count

            def caller(index):
                tokens, slots = requests[index]
                while not stop.is_set():
                    engine.store(tokens, slots)
                    engine.retrieve(tokens, slots)
                    done[index] += 1

            threads = [threading.Thread(target=caller, args=(i,)) for i in range(count)]
            for thread in threads:
                thread.start()
            time.sleep(0.05)
            waits = []
            start_done = sum(done)
            started = time.perf_counter()
            while time.perf_counter() - started < seconds_each:
                t0 = time.perf_counter_ns()
                engine.lookup(probe)
                waits.append(time.perf_counter_ns() - t0)
                time.sleep(0.0005)
            elapsed = time.perf_counter() - started
            finished = sum(done) - start_done
            stop.set()
            for thread in threads:
                thread.join()
            ordered = sorted(waits)
            result[count] = {"gbps": finished * 2 * num_bytes / elapsed / GB, "operations": finished,
                             "lookup_p50_us": ordered[len(ordered) // 2] / 1e3,
                             "lookup_p99_us": ordered[int(0.99 * (len(ordered) - 1))] / 1e3}
        result["idle_lookup_us"] = statistics.median(idle) / 1e3
    return result


def measure_disk_index(records: int) -> dict:
    """Writes ``records`` one-chunk records (16 tokens of 16 bytes) through the disk tier, then times
    a new engine's registration, which scans the directory and rebuilds the index, and its memory."""
    progress(f"scaling: disk tier with {records} records (writing them, then rebuilding the index)")
    chunk, batch = 16, 16384
    directory = tempfile.mkdtemp(prefix="lmcache-bench-index-", dir=os.environ.get("LMC_BENCH_DISK_DIR"))
    config = {"chunk_size": chunk, "max_local_cpu_size": 0.05, "local_disk": directory,
              "max_local_disk_size": records * 4096 * 2 / 2**30 + 0.1, "pre_caching_hash_algorithm": "xxh3_128"}
    try:
        engine, _ = tiny_engine(config, batch // BLOCK + 8, model="disk-index")
        with engine:
            written, base = 0, 0
            while written < records:
                count = min(batch, (records - written) * chunk)
                engine.store(as_int32_buffer(torch.arange(base, base + count, dtype=torch.int32)),
                             as_int64_buffer(torch.arange(count)))
                base += count
                written += count // chunk
                engine.flush(300)  # raises LmcTimeout when the tier does not drain
            disk = next(t for t in engine.tier_stats() if t["name"] == "LocalDiskBackend")
            assert disk["write_queue_drops"] == 0, disk
        files = sum(1 for name in os.listdir(directory) if name.endswith(".lmcc"))
        # Start-up measured in fresh processes (this one's heap moves as earlier phases free memory):
        # registration over an empty directory, then over the one with the records.
        empty = tempfile.mkdtemp(prefix="lmcache-bench-index-empty-", dir=os.environ.get("LMC_BENCH_DISK_DIR"))
        try:
            baseline = startup_in_subprocess(dict(config, local_disk=empty), batch // BLOCK + 8)
        finally:
            shutil.rmtree(empty, ignore_errors=True)
        loaded = startup_in_subprocess(config, batch // BLOCK + 8)
        assert loaded["hit"] == 4096, "the rebuilt index must find the first records"
        return {"records": files, "written": disk["writes"], "seconds": loaded["seconds"],
                "seconds_empty": baseline["seconds"],
                "bytes_per_record": (loaded["rss_delta"] - baseline["rss_delta"]) / max(1, files)}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


STARTUP_SCRIPT = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from lmcache_native import Engine, as_int32_buffer
import bench_perf
config, num_blocks = json.loads(sys.argv[2]), int(sys.argv[3])
kv = torch.zeros(2, num_blocks, 16, 1, 4, dtype=torch.float16)
engine = Engine(config, model_name="disk-index")
before = bench_perf.rss_bytes()
started = time.perf_counter()
engine.register_layers([kv], layout="flash_attn")
seconds = time.perf_counter() - started
rss_delta = bench_perf.rss_bytes() - before
hit = engine.lookup(as_int32_buffer(torch.arange(0, 4096, dtype=torch.int32)))
engine.close()
print(json.dumps({"seconds": seconds, "rss_delta": rss_delta, "hit": hit}))
"""


def startup_in_subprocess(config: dict, num_blocks: int) -> dict:
    """Registration (which binds the disk tier: directory scan, index rebuild) timed in a new process."""
    import json
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    output = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, here, json.dumps(config), str(num_blocks)],
                            capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_scaling(metrics: dict, quick: bool) -> dict:
    lengths = [1024, 8192, 32768] if quick else [1024, 8192, 32768, 131072]
    counts = [1024, 16384] if quick else [1024, 16384, 131072, 1048576]
    calls = 200 if quick else 1000
    scaling = {"lengths": measure_lookup_vs_length(lengths, calls)}
    scaling["chunks"] = measure_chunk_count(counts, calls)
    if not quick:
        scaling["pool"] = measure_full_pool(25)  # 5 ms stores: 25 pairs for a steady median
        scaling["threads"] = measure_threads([1, 2, 4], 2.0)
        scaling["disk"] = measure_disk_index(100_000)
    print_scaling(scaling, metrics)
    return scaling


def print_scaling(scaling: dict, metrics: dict) -> None:
    ratios, latencies, values = metrics["ratios"], metrics["latencies_us"], metrics.setdefault("scaling", {})
    lengths = sorted({length for _, length in scaling["lengths"]})
    print()
    print("scaling: lookup latency (us, median) against prompt length, chunk_size 256 (hit)")
    print(f"{'tokens':>8}" + "".join(f"{name:>14}" for name in ("sha256", "xxh3_128", "raw SHA-256")))
    for length in lengths:
        cells = [scaling["lengths"][(name, length)] for name in ("sha256", "xxh3_128", "raw_sha256")]
        print(f"{length:>8}" + "".join(f"{cell:>14.1f}" for cell in cells))
        for name, cell in zip(("sha256", "xxh3", "raw_sha256"), cells):
            latencies[f"scaling_lookup_{name}_{length // 1024}k_median"] = cell
    slopes = {name: slope([(length / 1024, scaling["lengths"][(name, length)]) for length in lengths]) * 1
              for name in ("sha256", "xxh3_128", "raw_sha256")}
    short, long_ = lengths[1], lengths[-1]  # from 8K on: the fixed cost of a call no longer matters
    for name, key in (("sha256", "sha256"), ("xxh3_128", "xxh3")):
        linearity = (scaling["lengths"][(name, long_)] / long_) / (scaling["lengths"][(name, short)] / short)
        ratios[f"scaling_lookup_{key}_per_token_{long_ // 1024}k_vs_{short // 1024}k"] = linearity
        values[f"lookup_{key}_slope_us_per_1k_tokens"] = slopes[name]
    values["raw_sha256_slope_us_per_1k_tokens"] = slopes["raw_sha256"]
    ratios["scaling_lookup_sha256_slope_vs_raw_sha256_slope"] = slopes["sha256"] / slopes["raw_sha256"]
    print(f"slopes (us per 1K tokens): sha256 lookup {slopes['sha256']:.2f}, raw SHA-256 {slopes['raw_sha256']:.2f} "
          f"(ratio {slopes['sha256'] / slopes['raw_sha256']:.2f}), xxh3_128 lookup {slopes['xxh3_128']:.3f}; per-token cost "
          f"at {long_ // 1024}K / at {short // 1024}K: sha256 "
          f"{ratios[f'scaling_lookup_sha256_per_token_{long_ // 1024}k_vs_{short // 1024}k']:.2f}, xxh3 "
          f"{ratios[f'scaling_lookup_xxh3_per_token_{long_ // 1024}k_vs_{short // 1024}k']:.2f}")

    chunks = scaling["chunks"]
    counts = sorted(chunks)
    print()
    print("scaling: against cached chunks (16-token chunks, 16 bytes of KV per token, xxh3_128)")
    print(f"{'chunks':>9}{'lookup 4096 tok':>17}{'store 4096 tok':>16}{'store, no faults':>22}{'bytes/chunk':>13}{'beyond slab':>13}")
    for count in counts:
        row = chunks[count]
        warm = f"{row['store_warm_us']:.1f} us ({row['stores_warm']}/{row['stores']})" if row["store_warm_us"] else f"n/a ({row['stores_warm']}/{row['stores']})"
        print(f"{row['chunks']:>9}{row['lookup_us']:>14.1f} us{row['store_us']:>13.1f} us{warm:>22}{row['bytes_per_chunk']:>13.0f}"
              f"{row['overhead_per_chunk']:>13.0f}")
    smallest, largest = chunks[counts[0]], chunks[counts[-1]]
    ratios[f"scaling_lookup_{counts[-1] // 1024}k_chunks_vs_{counts[0] // 1024}k_chunks"] = largest["lookup_us"] / smallest["lookup_us"]
    ratios[f"scaling_store_{counts[-1] // 1024}k_chunks_vs_{counts[0] // 1024}k_chunks"] = largest["store_us"] / smallest["store_us"]
    if largest["store_warm_us"] and smallest["store_warm_us"]:
        ratios[f"scaling_store_warm_{counts[-1] // 1024}k_chunks_vs_{counts[0] // 1024}k_chunks"] = largest["store_warm_us"] / smallest["store_warm_us"]
    values["memory_per_cached_chunk_bytes"] = largest["bytes_per_chunk"]
    values["memory_per_cached_chunk_beyond_slab_bytes"] = largest["overhead_per_chunk"]
    for count in counts:
        latencies[f"scaling_lookup_at_{count}_chunks_median"] = chunks[count]["lookup_us"]
        latencies[f"scaling_store_at_{count}_chunks_median"] = chunks[count]["store_us"]
        if chunks[count]["store_warm_us"]:
            latencies[f"scaling_store_warm_at_{count}_chunks_median"] = chunks[count]["store_warm_us"]
        values[f"store_warm_share_at_{count}_chunks"] = chunks[count]["stores_warm"] / chunks[count]["stores"]
    print(f"lookup at {counts[-1]} / at {counts[0]} chunks: {largest['lookup_us'] / smallest['lookup_us']:.2f}; "
          f"store: {largest['store_us'] / smallest['store_us']:.2f} (stores without page faults: "
          f"{ratios.get(f'scaling_store_warm_{counts[-1] // 1024}k_chunks_vs_{counts[0] // 1024}k_chunks', float('nan')):.2f}); memory per cached chunk "
          f"{largest['bytes_per_chunk']:.0f} B, of which {largest['overhead_per_chunk']:.0f} B beyond its "
          f"256-byte slab")

    if "pool" in scaling:
        pool = scaling["pool"]
        ratios["scaling_store_full_pool_vs_empty_pool_median"] = pool["full_vs_empty_paired"]
        metrics["throughput_gbps"]["scaling_store_empty_pool_median"] = pool["empty"]
        metrics["throughput_gbps"]["scaling_store_full_pool_median"] = pool["full"]
        print()
        print(f"scaling: store of 1024 tokens (128 MiB), empty pool {pool['empty']:.1f} GB/s, full pool evicting on "
              f"every store {pool['full']:.1f} GB/s: ratio {pool['full_vs_empty_paired']:.2f} (median of the pairs)")
    if "threads" in scaling:
        threads = scaling["threads"]
        counts = sorted(k for k in threads if isinstance(k, int))
        print()
        print(f"scaling: store + retrieve of 256-token requests (32 MiB) by N threads at once; a one-chunk lookup "
              f"on one more thread meanwhile (idle: {threads['idle_lookup_us']:.1f} us)")
        print(f"{'threads':>8}{'GB/s':>8}{'vs 1':>7}{'lookup p50':>13}{'p99':>11}")
        for count in counts:
            row = threads[count]
            print(f"{count:>8}{row['gbps']:>8.1f}{row['gbps'] / threads[counts[0]]['gbps']:>7.2f}"
                  f"{row['lookup_p50_us']:>10.1f} us{row['lookup_p99_us']:>8.1f} us")
            metrics["throughput_gbps"][f"scaling_store_retrieve_{count}_threads"] = row["gbps"]
            latencies[f"scaling_lookup_during_{count}_threads_p50"] = row["lookup_p50_us"]
            latencies[f"scaling_lookup_during_{count}_threads_p99"] = row["lookup_p99_us"]
            if count != counts[0]:
                ratios[f"scaling_store_retrieve_{count}_threads_vs_1"] = row["gbps"] / threads[counts[0]]["gbps"]
        latencies["scaling_lookup_idle_median"] = threads["idle_lookup_us"]
    if "disk" in scaling:
        disk = scaling["disk"]
        values["disk_index_records"] = disk["records"]
        values["disk_index_rebuild_seconds"] = disk["seconds"]
        values["disk_index_empty_registration_seconds"] = disk["seconds_empty"]
        values["disk_index_bytes_per_record"] = disk["bytes_per_record"]
        print()
        print(f"scaling: disk tier with {disk['records']} records: a new engine (new process) registers (scans the "
              f"directory and rebuilds the index) in {disk['seconds']:.2f} s (empty directory: {disk['seconds_empty'] * 1e3:.0f} ms) ({disk['seconds'] / max(1, disk['records']) * 1e6:.1f} us "
              f"per record); the index takes {disk['bytes_per_record']:.0f} B per record")


# ------------------------------------------------------------------------------------------------
# The chart
# ------------------------------------------------------------------------------------------------

def write_chart(metrics: dict, path: str) -> str | None:
    """build/bench/bench.png; returns None (and says why) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        print(f"no chart: matplotlib is not available ({error})")
        return None
    throughput, latencies = metrics["throughput_gbps"], metrics["latencies_us"]
    panels = []

    # GB/s of every copy next to its baseline: the 8192-token NHD/HND rows, the layout table, the tiers.
    bars = []
    tokens = metrics.get("run", {}).get("tokens")
    for layout in ("nhd", "hnd"):
        if f"store_{layout}_median" in throughput:
            bars.append((f"{layout.upper()} bf16 c256, {tokens} tokens", throughput.get(f"parallel_memcpy_{layout}_median"),
                         throughput[f"store_{layout}_median"], throughput[f"retrieve_{layout}_median"]))
    for key in [k[len("layout_"):-len("_store_median")] for k in throughput if k.startswith("layout_") and k.endswith("_store_median")]:
        bars.append((key.replace("_", " ").replace(" c", " c").replace("blocks first", "blocks_first"), throughput.get(f"layout_{key}_parallel_memcpy_median"),
                     throughput[f"layout_{key}_store_median"], throughput[f"layout_{key}_retrieve_median"]))
    if bars:
        panels.append(("copies", bars))
    tiers = [(name, throughput[key]) for name, key in (
        ("disk cold: read", "disk_read_cold_median"), ("disk cold: engine", "disk_retrieve_cold_median"),
        ("disk warm: read", "disk_read_warm_median"), ("disk warm: engine", "disk_retrieve_warm_median"),
        ("redis: GET loop", "redis_get_loop_median"), ("redis: engine", "redis_retrieve_median"),
        ("empty pool store", "scaling_store_empty_pool_median"), ("full pool store", "scaling_store_full_pool_median"))
        if key in throughput]
    lookups = [(name, latencies[key]) for name, key in (
        ("xxh3_128", "lookup_xxh3_raw_median"), ("sha256", "lookup_sha256_raw_median"),
        ("SHA-256 one digest", "sha256_same_bytes_one_digest_median")) if key in latencies]
    lengths = sorted({int(k.split("_")[-2][:-1]) for k in latencies if k.startswith("scaling_lookup_") and k.endswith("k_median")})

    rows = (1 if bars else 0) + 1
    figure = plt.figure(figsize=(16, 5 * rows))
    grid = figure.add_gridspec(rows, 3)
    if bars:
        axis = figure.add_subplot(grid[0, :])
        positions = range(len(bars))
        width = 0.27
        axis.bar([p - width for p in positions], [b[1] or 0 for b in bars], width, label="memcpy on every core", color="#bbbbbb")
        axis.bar(list(positions), [b[2] for b in bars], width, label="store", color="#1f77b4")
        axis.bar([p + width for p in positions], [b[3] for b in bars], width, label="retrieve", color="#ff7f0e")
        axis.set_xticks(list(positions))
        axis.set_xticklabels([b[0] for b in bars], rotation=45, ha="right", fontsize=8)
        axis.set_ylabel("GB/s (median)")
        axis.set_title("copies: engine next to a memcpy of the same bytes (same run)")
        axis.legend()
    row = rows - 1
    axis = figure.add_subplot(grid[row, 0])
    if tiers:
        axis.barh([t[0] for t in tiers], [t[1] for t in tiers], color="#2ca02c")
        axis.set_xlabel("GB/s (median)")
        axis.set_title("tiers and pool")
    else:
        axis.text(0.5, 0.5, "no tier figures in this run (--quick)", ha="center")
        axis.axis("off")
    axis = figure.add_subplot(grid[row, 1])
    if lookups:
        axis.bar([n for n, _ in lookups], [v for _, v in lookups], color=["#9467bd", "#8c564b", "#bbbbbb"][:len(lookups)])
        axis.set_ylabel("us (median)")
        axis.set_title("lookup of 8192 tokens per hash")
    axis = figure.add_subplot(grid[row, 2])
    for name, label in (("sha256", "sha256 lookup"), ("xxh3", "xxh3_128 lookup"), ("raw_sha256", "raw SHA-256")):
        points = [(length, latencies.get(f"scaling_lookup_{name}_{length}k_median")) for length in lengths]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if lengths:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("prompt length (K tokens)")
        axis.set_ylabel("us (median)")
        axis.set_title("lookup against prompt length")
        axis.legend()
    machine = metrics.get("machine", {})
    figure.suptitle(f"lmcache_native bench ({metrics.get('mode')}): {machine.get('cpu_model')}, {machine.get('cpus')} CPUs, "
                    f"commit {str(machine.get('git_commit'))[:10]}, {metrics.get('run', {}).get('date_utc')}")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------
# The README's benchmark figures, generated from a bench.json (never edited by hand)
# ------------------------------------------------------------------------------------------------

README_BEGIN = "<!-- bench figures: generated by `python-demo/bench_perf.py --readme build/bench/bench.json` -->"
README_END = "<!-- end of generated bench figures -->"


def readme_markdown(metrics: dict) -> str:
    """The copies, lookup, layout and scaling figures of one run as Markdown."""
    ratios, throughput, latencies = metrics["ratios"], metrics["throughput_gbps"], metrics["latencies_us"]
    values = metrics.get("scaling", {})
    machine, run = metrics.get("machine", {}), metrics.get("run", {})
    lines = [README_BEGIN, ""]
    memory = machine.get("memory_bytes")
    lines.append(f"Run of commit `{str(machine.get('git_commit'))[:10]}`{' (with local changes)' if machine.get('git_dirty') else ''} "
                 f"on {run.get('date_utc')}: {machine.get('cpu_model')}, {machine.get('cpus')} CPUs, "
                 f"{memory / 2**30:.0f} GiB, Linux {machine.get('kernel')}, .NET SDK {machine.get('dotnet_sdk')}; "
                 f"1-minute load average {run.get('load_average_before', float('nan')):.1f} before and "
                 f"{run.get('load_average_after', float('nan')):.1f} after (2 means both cores busy with other work).")
    lines += ["", "Ratios: best ÷ best, and the median of the per-repetition ratios (each repetition times the copy and "
              "its baseline in turn, so load that comes and goes cancels in the pair).", "",
              "| copy | GB/s best, median | ÷ memcpy (best, median) | ÷ memcpy on every core (best, median) |",
              "|---|---|---|---|"]
    for layout in ("nhd", "hnd"):
        for kind in ("store", "retrieve"):
            key = f"{kind}_{layout}"
            if f"{key}_best" not in throughput:
                continue
            lines.append(f"| {kind}, {layout.upper()} | {throughput[f'{key}_best']:.1f}, {throughput[f'{key}_median']:.1f} | "
                         f"{ratios[f'{key}_vs_memcpy_best']:.2f}, {ratios[f'{key}_vs_memcpy_median']:.2f} | "
                         f"{ratios[f'{key}_vs_parallel_memcpy_best']:.2f}, {ratios[f'{key}_vs_parallel_memcpy_median']:.2f} |")
    if "lookup_sha256_raw_median" in latencies:
        lines += ["", f"Lookup of the 8192-token prompt (int32 buffer, raw `lmc_lookup`, median): xxh3_128 "
                  f"{latencies['lookup_xxh3_raw_median']:.1f} µs, sha256 {latencies['lookup_sha256_raw_median']:.1f} µs; "
                  f"through `Engine.lookup` {latencies['lookup_xxh3_median']:.1f} and {latencies['lookup_sha256_median']:.1f} µs. "
                  f"One SHA-256 digest of the very bytes the key chain hashes takes "
                  f"{latencies['sha256_same_bytes_one_digest_median']:.1f} µs (hashlib, the same OpenSSL), so the sha256 "
                  f"lookup is **{ratios['lookup_sha256_raw_vs_sha256_same_bytes_median']:.2f}×** a single digest (target ≤ 1.3×)."]
    layout_keys = [k[len("layout_"):-len("_store_vs_parallel_memcpy_median")] for k in ratios
                   if k.startswith("layout_") and k.endswith("_store_vs_parallel_memcpy_median")]
    if layout_keys:
        lines += ["", f"Every layout, one {LAYOUT_TOKENS}-token request (Llama-3-8B shape; MLA one 576-wide latent), "
                  "engine ÷ a memcpy of the same bytes on every core timed in turn with it (median of the "
                  "per-repetition ratios, best ÷ best):", "",
                  "| layout | dtype | chunk | memcpy GB/s | store GB/s | retrieve GB/s | store ÷ memcpy | retrieve ÷ memcpy |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in layout_keys:
            layout, dtype, chunk = key.rsplit("_", 2)
            cells = [throughput[f"layout_{key}_{k}_median"] for k in ("parallel_memcpy", "store", "retrieve")]
            store = f"{ratios[f'layout_{key}_store_vs_parallel_memcpy_median']:.2f}, {ratios[f'layout_{key}_store_vs_parallel_memcpy_best']:.2f}"
            retrieve = f"{ratios[f'layout_{key}_retrieve_vs_parallel_memcpy_median']:.2f}, {ratios[f'layout_{key}_retrieve_vs_parallel_memcpy_best']:.2f}"
            lines.append(f"| {layout.upper() if layout in ('nhd', 'hnd', 'mla') else layout} | {dtype} | {chunk[1:]} | "
                         f"{cells[0]:.1f} | {cells[1]:.1f} | {cells[2]:.1f} | {store} | {retrieve} |")
        for kind in ("store", "retrieve"):
            below = sorted((ratios[f"layout_{key}_{kind}_vs_parallel_memcpy_median"], key) for key in layout_keys
                           if ratios[f"layout_{key}_{kind}_vs_parallel_memcpy_median"] < 0.9)
            text = (f"{len(below)} of {len(layout_keys)} rows below 0.9× at the median"
                    + (f", lowest {below[0][1].replace('_c', ' chunk ').replace('_', ' ')} at {below[0][0]:.2f}×" if below else ""))
            lines.append(f"{'' if kind == 'store' else '; '}{kind}: {text}" + ("" if kind == "store" else "."))
        lines[-2:] = ["", "Goal 0.9× (median): " + lines[-2] + lines[-1]]
    scaling_lines = []
    length_keys = sorted((int(k.split("_")[-2][:-1]), k) for k in latencies if k.startswith("scaling_lookup_sha256_") and k.endswith("k_median"))
    if length_keys:
        scaling_lines.append("| prompt tokens | " + " | ".join(f"{n}K" for n, _ in length_keys) + " |")
        scaling_lines.append("|---|" + "---|" * len(length_keys))
        for name, label in (("sha256", "sha256 lookup, µs"), ("xxh3", "xxh3_128 lookup, µs"), ("raw_sha256", "one SHA-256 digest of the same bytes, µs")):
            scaling_lines.append(f"| {label} | " + " | ".join(f"{latencies[f'scaling_lookup_{name}_{n}k_median']:.1f}" for n, _ in length_keys) + " |")
        sha_linear = next((v for k, v in ratios.items() if k.startswith("scaling_lookup_sha256_per_token_")), float("nan"))
        xxh_linear = next((v for k, v in ratios.items() if k.startswith("scaling_lookup_xxh3_per_token_")), float("nan"))
        scaling_lines += ["", f"Slopes: sha256 lookup {values.get('lookup_sha256_slope_us_per_1k_tokens', float('nan')):.2f} µs per 1K tokens, "
                          f"the digest alone {values.get('raw_sha256_slope_us_per_1k_tokens', float('nan')):.2f} "
                          f"(**{ratios.get('scaling_lookup_sha256_slope_vs_raw_sha256_slope', float('nan')):.2f}×**); xxh3_128 "
                          f"{values.get('lookup_xxh3_slope_us_per_1k_tokens', float('nan')):.2f}. Cost per token at the longest "
                          f"prompt ÷ at 8K: sha256 {sha_linear:.2f}, xxh3_128 {xxh_linear:.2f} (1 = linear)."]
    count_keys = sorted(int(k.split("_")[3]) for k in latencies if k.startswith("scaling_lookup_at_") and k.endswith("_chunks_median"))
    if count_keys:
        scaling_lines += ["", "| cached chunks (16 tokens each) | " + " | ".join(f"{c:,}" for c in count_keys) + " |",
                          "|---|" + "---|" * len(count_keys),
                          "| lookup of 4096 tokens, µs | " + " | ".join(f"{latencies[f'scaling_lookup_at_{c}_chunks_median']:.1f}" for c in count_keys) + " |",
                          "| store of 4096 new tokens, µs | " + " | ".join(f"{latencies[f'scaling_store_at_{c}_chunks_median']:.1f}" for c in count_keys) + " |",
                          "| the same, stores that took no page fault, µs (share of stores) | " + " | ".join(
                              f"{latencies[f'scaling_store_warm_at_{c}_chunks_median']:.1f} ({values.get(f'store_warm_share_at_{c}_chunks', 0):.0%})"
                              if f"scaling_store_warm_at_{c}_chunks_median" in latencies else "n/a" for c in count_keys) + " |",
                          "", f"Memory per cached chunk at {count_keys[-1]:,} chunks: {values.get('memory_per_cached_chunk_bytes', float('nan')):.0f} B "
                          + (f"of resident size, of which {beyond:.0f} B beyond its 256-byte slab (index entry, LRU node, chunk record, allocator overhead). "
                             if (beyond := values.get('memory_per_cached_chunk_beyond_slab_bytes', float('nan'))) >= 0 else
                             "of resident size, less than its 256-byte slab: memory the process held when the measure began (the GC's, "
                             "torch's) was returned while it ran, so this is a lower bound. ")
                          + "A store of 256 chunks allocates about 48 KB of "
                          "managed objects; whether they land on memory the GC already touched or on fresh pages "
                          "(a dozen page faults or more, up to +200 µs here) depends on the GC's history and lasts over many stores, so the "
                          "plain medians move by up to 2× at any cache size; the stores without faults show the index "
                          f"and copy work alone: 1M ÷ 1K = **{ratios.get(f'scaling_store_warm_{count_keys[-1] // 1024}k_chunks_vs_{count_keys[0] // 1024}k_chunks', float('nan')):.2f}×** "
                          "(target ≤ 1.25)."]
    if "scaling_store_full_pool_vs_empty_pool_median" in ratios:
        scaling_lines += ["", f"Store of 1024 tokens (128 MiB): empty pool {throughput['scaling_store_empty_pool_median']:.1f} GB/s, "
                          f"full pool evicting on every store {throughput['scaling_store_full_pool_median']:.1f} GB/s "
                          f"(**{ratios['scaling_store_full_pool_vs_empty_pool_median']:.2f}×** the median of the pairs timed in turn, target ≥ 0.9)."]
    thread_counts = sorted(int(k.split("_")[3]) for k in throughput if k.startswith("scaling_store_retrieve_") and k.endswith("_threads"))
    if thread_counts:
        scaling_lines += ["", "| callers (store + retrieve of 32 MiB each) | " + " | ".join(str(c) for c in thread_counts) + " |",
                          "|---|" + "---|" * len(thread_counts),
                          "| GB/s, all callers | " + " | ".join(f"{throughput[f'scaling_store_retrieve_{c}_threads']:.1f}" for c in thread_counts) + " |",
                          "| one-chunk lookup meanwhile, p50 / p99 µs | " + " | ".join(
                              f"{latencies[f'scaling_lookup_during_{c}_threads_p50']:.0f} / {latencies[f'scaling_lookup_during_{c}_threads_p99']:.0f}"
                              for c in thread_counts) + " |",
                          "", f"The same lookup on an idle engine: {latencies.get('scaling_lookup_idle_median', float('nan')):.1f} µs; "
                          "its rise while callers run is the CPU tier's lock wait plus the CPU time the callers take. "
                          "(32 MiB requests stay partly in the CPU's caches, hence more GB/s than the 1 GiB copies.)"]
    if "disk_index_records" in values:
        scaling_lines += ["", f"Disk tier with {values['disk_index_records']:,} records: a new engine rebuilds the index "
                          f"(directory scan, every record's header read) in {values['disk_index_rebuild_seconds']:.2f} s; the index "
                          f"takes {values['disk_index_bytes_per_record']:.0f} B per record."]
    if scaling_lines:
        lines += ["", "How costs grow (the scaling section):", ""] + scaling_lines
    lines += ["", README_END]
    return "\n".join(lines)


def update_readme(bench_json: str, readme: str) -> None:
    """Replaces the generated part of ``readme`` (between the markers) with the figures of ``bench_json``."""
    import json

    with open(bench_json) as source:
        metrics = json.load(source)
    with open(readme) as source:
        text = source.read()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme} has no generated bench section (markers {README_BEGIN!r} ... {README_END!r})")
    text = text[:start] + readme_markdown(metrics) + text[end + len(README_END):]
    with open(readme, "w") as out:
        out.write(text)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Writes a bench.json's figures into the README's generated section.")
    parser.add_argument("--readme", metavar="BENCH_JSON", required=True, help="a bench.json written by bench.py (full run)")
    parser.add_argument("--file", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
    arguments = parser.parse_args()
    update_readme(arguments.readme, arguments.file)
    print(f"{arguments.file}: bench figures from {arguments.readme}")
