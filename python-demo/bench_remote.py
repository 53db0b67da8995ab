#!/usr/bin/python3
"""Remote-tier throughput: the Redis tier against raw-socket GET loops over the same values, in one run.

Run by ``./build.sh bench`` (bench.py calls ``measure_remote_tiers`` and ``print_remote_tiers``) or on
its own: ``/usr/bin/python3 python-demo/bench_remote.py [--repetitions N] [--json PATH]``.

One 2048-token request of a Llama-3-8B-shaped KV cache (32 layers, 8 KV heads, head size 128, bf16;
chunk_size 256: eight 32 MiB chunks, 256 MiB) is stored through the engine, flushed, then read back
with the CPU tier cleared before each read, on two topologies started for the run on loopback:

- one redis-server;
- a 3-master Redis Cluster (no replicas: replication would double the server work on a small machine),
  made by ``redis-cli --cluster create``; the chunks spread over the masters by key.

Clients, interleaved in each repetition so that machine load hits them alike:

- ``GET loop, 1 raw socket``: one connection per node, GETs one after the other, each reply read
  straight into a preallocated buffer (RESP written here, no redis-py);
- ``GET loops, N raw sockets``: N connections per node, the keys dealt round-robin over them, every
  connection its own thread doing its GET loop in parallel (the baseline of the pooled engine);
- ``retrieve, 1 multiplexer`` (extra_config.remote_connections = 1) and ``retrieve, pool of N``
  (remote_connections = N, the default 4): Engine.retrieve, checked against the source KV;
- ``prefetch only``: the tier read and promotion into the CPU tier without the KV write;
- ``store + flush``: pipelined writes of the 8 records (keys deleted before each repetition).

Ratios are engine / baseline of the same run (best over best, median over median).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "interop-tests", "python"))  # redis_topologies: servers for tests and bench

import bench  # noqa: E402
from lmcache_native import Engine  # noqa: E402

POOL = 4
REPETITIONS = 3
VALUE_BUFFER = 64 << 20  # one 32 MiB record and its RESP header fit


class Topology:
    """Servers of one topology: ``url``, the masters' (host, port), started and stopped here."""

    def __init__(self, kind: str, directory: Path):
        from redis_topologies import Cluster, Node

        self.kind = kind
        if kind == "single":
            self.servers = Node(directory / "single", []).start()
            self.masters = [("127.0.0.1", self.servers.port)]
            self.url = f"redis://127.0.0.1:{self.servers.port}/0"
        else:
            # A production-like node timeout: a busy benchmark machine must not look like a failed node.
            self.servers = Cluster(directory / "cluster", masters=3, replicas=0, node_timeout_ms=15000).start()
            self.masters = [("127.0.0.1", node.port) for node in self.servers.masters()]
            self.url = "redis://" + ",".join(f"{h}:{p}" for h, p in self.masters) + "/0"

    def keys_by_master(self) -> list[tuple[tuple[str, int], list[bytes]]]:
        result = []
        for address in self.masters:
            client = bench.RawRedis(address[1])
            try:
                result.append((address, sorted(client.command(b"KEYS", b"lmcn:*"))))
            finally:
                client.close()
        return result

    def delete_records(self) -> None:
        for _, port in self.masters:
            client = bench.RawRedis(port)
            try:
                client.command(b"FLUSHALL")
            finally:
                client.close()

    def stop(self) -> None:
        self.servers.stop()


class GetLoops:
    """``connections`` raw sockets per master, each with its share of the keys and its own buffer."""

    def __init__(self, keys_by_master, connections: int):
        self.loops = []  # (client, buffer, keys)
        for (_, port), keys in keys_by_master:
            for c in range(connections):
                share = keys[c::connections]
                if share:
                    buffer = memoryview(bytearray(VALUE_BUFFER)).cast("B")
                    buffer[:] = b"\x01" * len(buffer)  # pre-touch
                    self.loops.append((bench.RawRedis(port), buffer, share))
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, len(self.loops)))

    @staticmethod
    def _run(loop) -> int:
        client, buffer, keys = loop
        total = 0
        for key in keys:
            client.send(b"GET", key)
            start, length = client.read_into(buffer)
            assert bytes(buffer[start:start + 8]) == b"LMCNREC1", bytes(buffer[:16])
            total += length
        return total

    def sequential(self) -> tuple[float, int]:
        started = time.perf_counter()
        total = sum(self._run(loop) for loop in self.loops)
        return time.perf_counter() - started, total

    def parallel(self) -> tuple[float, int]:
        started = time.perf_counter()
        total = sum(self.pool.map(self._run, self.loops))  # recv_into releases the GIL
        return time.perf_counter() - started, total

    def close(self) -> None:
        self.pool.shutdown()
        for client, _, _ in self.loops:
            client.close()


def measure_topology(kind: str, repetitions: int = REPETITIONS, pool: int = POOL) -> dict:
    generator = torch.Generator().manual_seed(5)
    layers = bench.allocate_cache("NHD", generator, bench.TIER_BLOCKS)
    tokens, slots = bench.request(generator, bench.TIER_TOKENS, bench.TIER_BLOCKS)
    reference = {index: layers[index].clone() for index in (0, bench.NUM_LAYERS - 1)}
    chunks = bench.TIER_TOKENS // 256
    directory = Path(tempfile.mkdtemp(prefix=f"lmcache-bench-{kind}-"))
    topology = Topology(kind, directory)
    result = {name: [] for name in ("get_single", "get_parallel", "retrieve_single", "retrieve_pooled",
                                    "prefetch_pooled", "store_single", "store_pooled")}
    try:
        def config(connections):
            return {"chunk_size": 256, "max_local_cpu_size": 2, "remote_url": topology.url, "blocking_timeout_secs": 30,
                    "extra_config": {"remote_connections": connections}}

        with Engine(config(pool), model_name="llama-3-8b-shape") as pooled, \
                Engine(config(1), model_name="llama-3-8b-shape") as single:
            for engine in (pooled, single):
                engine.register_layers(layers, layout="flash_attn")
                bench.wait_for_remote(engine)

            def timed_store(engine, name):
                topology.delete_records()
                engine.clear()
                before = bench.tier_counters(engine, "RemoteBackend")["writes"]
                started = time.perf_counter()
                assert engine.store(tokens, slots) == bench.TIER_TOKENS
                engine.flush(300)
                result[name].append(time.perf_counter() - started)
                assert bench.tier_counters(engine, "RemoteBackend")["writes"] - before == chunks

            timed_store(pooled, "store_pooled")
            by_master = topology.keys_by_master()
            assert sum(len(keys) for _, keys in by_master) == chunks, by_master
            single_loops, parallel_loops = GetLoops(by_master, 1), GetLoops(by_master, pool)
            value_bytes = 0
            for _ in range(repetitions):
                seconds, value_bytes = single_loops.sequential()
                result["get_single"].append(seconds)
                seconds, parallel_bytes = parallel_loops.parallel()
                assert parallel_bytes == value_bytes
                result["get_parallel"].append(seconds)
                result["retrieve_pooled"].append(bench.timed_tier_retrieve(pooled, layers, tokens, slots, "RemoteBackend"))
                bench.check_tier_retrieve(layers, reference, slots)
                result["retrieve_single"].append(bench.timed_tier_retrieve(single, layers, tokens, slots, "RemoteBackend"))
                bench.check_tier_retrieve(layers, reference, slots)
                result["prefetch_pooled"].append(bench.timed_tier_prefetch(pooled, tokens, "RemoteBackend"))
            single_loops.close()
            parallel_loops.close()
            for _ in range(repetitions - 1):
                timed_store(pooled, "store_pooled")
            for _ in range(repetitions):
                timed_store(single, "store_single")
            result["kv_bytes"] = chunks * 256 * bench.NUM_LAYERS * 2 * bench.NUM_KV_HEADS * bench.HEAD_SIZE * 2
            result["value_bytes"] = value_bytes
            result["masters"] = len(topology.masters)
            result["keys_per_master"] = [len(keys) for _, keys in by_master]
            result["nodes"] = [{k: n[k] for k in ("endpoint", "role", "bytes_read", "bytes_written", "errors")}
                               for n in pooled.tier_nodes(0)]
    finally:
        topology.stop()
        shutil.rmtree(directory, ignore_errors=True)
    result["pool"] = pool
    return result


def measure_remote_tiers(repetitions: int = REPETITIONS) -> dict | None:
    """Both topologies, or None without redis-server / redis-cli."""
    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        return None
    return {kind: measure_topology(kind, repetitions) for kind in ("single", "cluster")}


def print_remote_tiers(remote: dict | None, metrics: dict) -> None:
    """Prints the table and records throughput_gbps[<prefix>_<what>_best/_median] and the ratios
    (prefix "redis" for the single server, "redis_cluster" for the cluster)."""
    metrics["run"]["redis_measured"] = remote is not None
    if remote is None:
        print("redis-server / redis-cli not installed: remote tier not measured")
        return
    any_result = next(iter(remote.values()))
    pool = any_result["pool"]
    print()
    print(f"remote tier (Redis on loopback): one {bench.TIER_TOKENS}-token request "
          f"({any_result['kv_bytes'] / 2**20:.0f} MiB of KV, {bench.TIER_TOKENS // 256} chunks of "
          f"{any_result['kv_bytes'] / (bench.TIER_TOKENS // 256) / 2**20:.0f} MiB), CPU tier cleared before each read, "
          f"{len(any_result['retrieve_pooled'])} repetitions")
    print(f"{'GB/s (1e9 B/s)':<50}{'best':>8}{'median':>8}{'engine/baseline (best, median)':>33}")
    for kind, r in remote.items():
        prefix = "redis" if kind == "single" else "redis_cluster"
        title = "one server" if kind == "single" else f"cluster of {r['masters']} masters (chunks per master {r['keys_per_master']})"
        print(f"-- {title}")

        def row(label, what, baseline=None, num_bytes=None):
            rates = bench.summarize(r[what], num_bytes or r["kv_bytes"])
            text = f"  {label:<48}{rates['best']:>8.2f}{rates['median']:>8.2f}"
            if baseline is not None:
                base_what, base = baseline
                text += f"{rates['best'] / base['best']:>20.2f}, {rates['median'] / base['median']:.2f}"
            print(text)
            bench.record_rates(metrics, f"{prefix}_{what}", rates, f"{baseline[0]}" if baseline else None,
                               baseline[1] if baseline else None)
            return what, rates

        get_single = row("GET loop, 1 raw socket per node", "get_single", num_bytes=r["value_bytes"])
        get_parallel = row(f"GET loops, {pool} raw sockets per node in parallel", "get_parallel", num_bytes=r["value_bytes"])
        row("retrieve, 1 multiplexer", "retrieve_single", get_single)
        row(f"retrieve, pool of {pool} multiplexers", "retrieve_pooled", get_parallel)
        row(f"  prefetch only, pool of {pool}", "prefetch_pooled", get_parallel)
        row("store + flush, 1 multiplexer", "store_single")
        row(f"store + flush, pool of {pool}", "store_pooled")
    # The name the thresholds have used since the single-connection tier: engine vs one GET loop.
    single = metrics["ratios"]
    for statistic in ("best", "median"):
        key = f"redis_retrieve_single_vs_get_single_{statistic}"
        if key in single:
            single[f"redis_retrieve_vs_get_loop_{statistic}"] = single[key]
    print("(prefetch only: the tier read and promotion into the CPU tier, without writing the KV cache; "
          "ratios: engine over the raw-socket baseline of the same row's connection count)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Remote-tier throughput (see the module docstring).")
    parser.add_argument("--repetitions", type=int, default=REPETITIONS)
    parser.add_argument("--json", default=os.path.join(ROOT, "build", "bench", "bench-remote.json"))
    arguments = parser.parse_args(argv)
    metrics = {"schema": 1, "mode": "remote", "machine": bench.machine_info(),
               "run": {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "load_average_before": os.getloadavg()[0]},
               "ratios": {}, "throughput_gbps": {}, "latencies_us": {}}
    started = time.perf_counter()
    remote = measure_remote_tiers(arguments.repetitions)
    print_remote_tiers(remote, metrics)
    metrics["run"]["total_seconds"] = time.perf_counter() - started
    metrics["run"]["load_average_after"] = os.getloadavg()[0]
    if remote is not None:
        metrics["run"]["remote_nodes"] = {kind: r["nodes"] for kind, r in remote.items()}
    bench.write_json(arguments.json, metrics)
    print(f"\nnumbers written to {os.path.relpath(arguments.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
