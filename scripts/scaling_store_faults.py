"""Store latency against cached chunks, split by the page faults each store took.

bench_perf.measure_chunk_count's store loop (fresh 4096-token prompts, 16-token chunks, 16 bytes of KV
per token; 100 stores with 1K and then 1M chunks cached), with the minor page faults of each store
(getrusage). On the 2-core dev VM a store whose GC allocations land on never-touched pages takes about
17 faults (its ~65 KB of allocations) and ~200 us more than one that reuses warm memory; which of the
two a run of 100 stores mostly sees depends on the GC's history, so the plain medians swing by 2x
between runs. The medians over the stores with at most 3 faults compare the index and copy work alone.

    LMC_LIB_PATH=build/publish/liblmcache_native.so /usr/bin/python3 scripts/scaling_store_faults.py .
"""
import json, os, resource, statistics as st, sys, time
sys.path.insert(0, os.path.join(sys.argv[1], "python-demo"))
import torch
from bench_perf import tiny_engine, BLOCK, median_us
from lmcache_native import as_int32_buffer, as_int64_buffer
chunk, prompt, fill_tokens = 16, 4096, 16384
counts = [1024, 1048576]; slab = chunk * 16
engine, _ = tiny_engine({"chunk_size": chunk, "max_local_cpu_size": max(counts) * slab * 1.05 / 2**30 + 0.01,
                         "pre_caching_hash_algorithm": "xxh3_128"}, fill_tokens // BLOCK + 8)
g = torch.Generator().manual_seed(7)
fill_slots = as_int64_buffer(torch.arange(fill_tokens))
probe = as_int32_buffer(torch.randint(0, 2**31 - 1, (prompt,), dtype=torch.int32, generator=g))
probe_slots = as_int64_buffer(torch.arange(prompt))
out = {}
with engine:
    engine.store(probe, probe_slots)
    cached, base = prompt // chunk, 0
    for count in counts:
        while cached < count:
            engine.store(as_int32_buffer(torch.arange(base, base + fill_tokens, dtype=torch.int32)), fill_slots)
            base += fill_tokens; cached += fill_tokens // chunk
        lookup = median_us(lambda: engine.lookup(probe), 1000)
        pairs = []
        for _ in range(100):
            tokens = as_int32_buffer(torch.arange(base, base + prompt, dtype=torch.int32)); base += prompt
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.perf_counter_ns()
            engine.store(tokens, probe_slots)
            t = (time.perf_counter_ns() - t0) / 1e3; pairs.append((t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
        cached = engine.stats()["cached_chunks"]
        warm = [t for t, f in pairs if f <= 3]
        out[count] = (st.median(t for t, _ in pairs), len(warm), st.median(warm) if warm else float("nan"), lookup)
lo, hi = out[1024], out[1048576]
print(f"{os.path.basename(os.environ['LMC_LIB_PATH']):>9}: store median 1K {lo[0]:5.0f} 1M {hi[0]:5.0f} us ratio {hi[0]/lo[0]:4.2f} | "
      f"stores with <=3 faults: 1K n={lo[1]:3d} {lo[2]:5.0f} us, 1M n={hi[1]:3d} {hi[2]:5.0f} us, ratio {hi[2]/lo[2]:4.2f} | lookup ratio {hi[3]/lo[3]:4.2f}")
