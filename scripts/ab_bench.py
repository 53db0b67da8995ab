#!/usr/bin/env python3
"""A/B: what counting metrics costs. Store and retrieve GB/s and lookup latency of two builds of
liblmcache_native.so, measured in one run: each round runs both builds, each in a fresh process of its
own (the order alternating between rounds, so drifts in clock speed and background load hit both
alike), and the report gives each build's median over the rounds and the ratio. Per process: store and retrieve GB/s are the median and the best of 7 requests after one
untimed warm-up, lookups the median of 2000 calls.

    /usr/bin/python3 scripts/ab_bench.py                       # this checkout vs main before metrics
    /usr/bin/python3 scripts/ab_bench.py --base-rev d335bf8 --rounds 7

The base build is built from ``git archive <base-rev>`` into build/ab/ (NativeAOT publish, a couple
of minutes the first time, reused afterwards); the new build is build/publish/liblmcache_native.so
(run ./build.sh first). Each build is driven by its own checkout's Python package, so the two need
not share a C ABI. The workload is bench.py's shape, smaller: Llama-3-8B-like layers (8 KV heads x
128, bf16) over 16 layers, 4096-token requests (256 MiB of KV), chunk_size 256, host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AB_DIR = os.path.join(ROOT, "build", "ab")

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_TOKENS = 16, 8, 128, 16, 4096
REPETITIONS, LOOKUP_CALLS = 7, 2000


def child() -> None:
    """One build's measurements (run in its own process); prints one JSON line."""
    import torch
    from lmcache_native import Engine, as_int32_buffer, as_int64_buffer

    generator = torch.Generator().manual_seed(1)
    num_blocks = NUM_TOKENS // BLOCK_SIZE * 9 // 8
    layers = [torch.empty(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, dtype=torch.bfloat16)
              for _ in range(NUM_LAYERS)]
    for index, layer in enumerate(layers):
        layer.view(torch.int16).copy_(torch.randint(-2**15, 2**15 - 1, layer.shape, dtype=torch.int16,
                                                    generator=generator)).add_(index)
    tokens = torch.randint(0, 128000, (NUM_TOKENS,), dtype=torch.int32, generator=generator)
    blocks = torch.randperm(num_blocks, generator=generator)[:NUM_TOKENS // BLOCK_SIZE]
    positions = torch.arange(NUM_TOKENS)
    slots = as_int64_buffer(blocks[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE)
    tokens = as_int32_buffer(tokens)
    one_chunk = as_int32_buffer(torch.arange(256, dtype=torch.int32))
    num_bytes = NUM_TOKENS * NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_SIZE * 2
    store_s, retrieve_s, lookup_ns, small_lookup_ns = [], [], [], []
    with Engine({"chunk_size": 256, "max_local_cpu_size": 1}, model_name="ab") as engine:
        engine.register_layers(layers, layout="flash_attn")
        # One untimed store and retrieve first: the pool's slabs are allocated (page faults) on first use.
        assert engine.store(tokens, slots) == NUM_TOKENS
        assert engine.retrieve(tokens, slots) == NUM_TOKENS
        for _ in range(REPETITIONS):
            engine.clear()
            started = time.perf_counter()
            assert engine.store(tokens, slots) == NUM_TOKENS
            store_s.append(time.perf_counter() - started)
        for _ in range(REPETITIONS):
            started = time.perf_counter()
            assert engine.retrieve(tokens, slots) == NUM_TOKENS
            retrieve_s.append(time.perf_counter() - started)
        clock = time.perf_counter_ns
        for _ in range(LOOKUP_CALLS):
            started = clock()
            engine.lookup(tokens)
            lookup_ns.append(clock() - started)
            started = clock()
            engine.lookup(one_chunk)
            small_lookup_ns.append(clock() - started)
    print(json.dumps({
        "store_gbps": num_bytes / statistics.median(store_s) / 1e9,
        "store_gbps_best": num_bytes / min(store_s) / 1e9,
        "retrieve_gbps": num_bytes / statistics.median(retrieve_s) / 1e9,
        "retrieve_gbps_best": num_bytes / min(retrieve_s) / 1e9,
        "lookup_4096_us": statistics.median(lookup_ns) / 1e3,
        "lookup_256_us": statistics.median(small_lookup_ns) / 1e3,
    }))


def build_base(rev: str) -> str:
    """The base revision's library, built once into build/ab/<rev>/ (source and publish)."""
    source = os.path.join(AB_DIR, rev, "src")
    publish = os.path.join(AB_DIR, rev, "publish")
    library = os.path.join(publish, "liblmcache_native.so")
    if os.path.isfile(library):
        return source
    os.makedirs(source, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", source], input=archive, check=True)
    print(f"building {rev} into {publish} (NativeAOT publish) ...", flush=True)
    subprocess.run(["dotnet", "publish", "src/LMCacheNative.Exports/LMCacheNative.Exports.csproj", "-r", "linux-x64",
                    "-c", "Release", "-o", publish], cwd=source, check=True, stdout=subprocess.DEVNULL)
    return source


def run_child(package_root: str, library: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(package_root, "python-demo"), LMC_LIB_PATH=library)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"child for {library} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-rev", default="d335bf8", help="the build before the change (default: d335bf8)")
    parser.add_argument("--base-lib", help="a prebuilt base library (its package: --base-root)")
    parser.add_argument("--base-root", help="the checkout whose python-demo drives --base-lib")
    parser.add_argument("--new-lib", default=os.path.join(ROOT, "build", "publish", "liblmcache_native.so"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return
    if args.base_lib:
        base_root, base_lib = args.base_root or ROOT, args.base_lib
    else:
        base_root = build_base(args.base_rev)
        base_lib = os.path.join(AB_DIR, args.base_rev, "publish", "liblmcache_native.so")
    builds = {"base": (base_root, base_lib), "new": (ROOT, args.new_lib)}
    results = {"base": [], "new": []}
    for round_index in range(args.rounds):
        order = ("base", "new") if round_index % 2 == 0 else ("new", "base")
        for name in order:
            results[name].append(run_child(*builds[name]))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} store {results[name][-1]['store_gbps']:.2f} GB/s" for name in ("base", "new")), flush=True)
    print(f"\nbase: {base_lib} ({args.base_rev if not args.base_lib else 'prebuilt'})\nnew:  {args.new_lib}")
    print(f"medians over {args.rounds} rounds, each build in its own process per round, order alternating")
    print(f"{'metric':<26}{'base':>10}{'new':>10}{'new/base':>10}")
    summary = {}
    for metric in ("store_gbps", "store_gbps_best", "retrieve_gbps", "retrieve_gbps_best", "lookup_4096_us",
                   "lookup_256_us"):
        base = statistics.median(r[metric] for r in results["base"])
        new = statistics.median(r[metric] for r in results["new"])
        summary[metric] = {"base": base, "new": new, "ratio": new / base}
        print(f"{metric:<26}{base:>10.3f}{new:>10.3f}{new / base:>10.3f}")
    os.makedirs(AB_DIR, exist_ok=True)
    with open(os.path.join(AB_DIR, "ab_bench.json"), "w") as out:
        json.dump({"rounds": args.rounds, "summary": summary, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
