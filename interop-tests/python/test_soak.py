"""Bounded soak: many threads store, look up, retrieve and prefetch overlapping prompts with three
salts on one engine whose CPU pool evicts constantly (a few dozen chunks against a working set ten
times that) above a local disk tier, while its lookup server is abused by garbage clients and real
``remote_lookup`` calls must keep being answered. Every byte a retrieve writes is checked.

Run it alone with ``-m soak`` or by file; ``-s`` shows the one-line summary. ``LMC_SOAK_SECONDS``
sets the length of the load phase (default 30); the whole test is bounded by that plus 25 s
(``LMC_SOAK_WORKERS``: store/retrieve threads, default 8).

Invariants (each violation is recorded and fails the test; nothing is printed and skipped):
  * no library call fails (so in particular none returns LMC_E_INTERNAL);
  * a retrieve writes, for every token t in [first_token_to_write, retrieved) whose slot is not -1,
    exactly the bits ``soak_helpers.expected_kv`` gives for (tokens, salt); every other slot of the
    thread's destination region keeps its guard value; the store's source slots are left as written;
  * lookups (in-process, remote, raw wire clients), retrieves and prefetches report a value in
    [0, n] that is a multiple of the chunk size (save_unfull_chunk is off) and whose every chunk some
    store announced beforehand under the same salt (the Ledger): the engine cannot report a prefix
    nobody stored, and a cross-salt hit is a prefix nobody stored under that salt;
  * stores report at most the chunks they could store (from the rounded-down skip point up to the
    first chunk with an unmapped slot);
  * every remote_lookup is answered within REMOTE_TIMEOUT_S; raw valid requests too; prefetch jobs
    finish within PREFETCH_TIMEOUT_S;
  * at the end: every thread has stopped, the disk tier flushed, counters match what the threads did
    (requests, retrieved tokens and bytes), the pool evicted, the disk tier wrote and was read, the
    engine is destroyed within DESTROY_TIMEOUT_S with garbage connections still open, and its socket
    file is gone.

A remote lookup is not compared exactly with an in-process lookup (eviction races with it); the
summary counts how often it fell between the in-process lookups just before and after.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

import soak_helpers as sh
from lmcache_native import Engine, LmcError, LmcTimeout, remote_lookup

SOAK_SECONDS = float(os.environ.get("LMC_SOAK_SECONDS", "30"))
WORKERS = int(os.environ.get("LMC_SOAK_WORKERS", "8"))
REMOTE_THREADS = 2
POOL_CHUNKS = 48  # CPU pool: 48 chunks of 8 KiB; the working set is ~1500 chunks
DISK_BYTES = 6 << 20  # ~750 records: the disk tier evicts too
REMOTE_TIMEOUT_S = 2.0
PREFETCH_TIMEOUT_S = 8.0
FLUSH_TIMEOUT_S = 5.0
DESTROY_TIMEOUT_S = 5.0
JOIN_TIMEOUT_S = PREFETCH_TIMEOUT_S + REMOTE_TIMEOUT_S + 2  # the slowest legitimate op, and then some
TEARDOWN_BUDGET_S = 25.0  # after the load phase: joins, flush, destroy (12 + 5 + 5 s at most)
# Held at once: 48 idle + 12 half-open + 8 absurd + 4 drip (+ the short-lived ones) > 64, so a server
# that caps its connections must still make room for the real lookups.
GARBAGE = dict(idle_target=48, half_open_target=12, absurd_target=8, drip_target=4)
RSS_GROWTH_LIMIT_MIB = 256  # absurd headers announce up to 8 x 65 MiB; real use here is ~20 MiB

_KEEPALIVE = []  # KV memory of an engine whose destroy hung: must outlive the process's use of it


class Worker:
    """One soak thread: owns a source region and a destination region of SLOTS_PER_REGION slots."""

    def __init__(self, index: int, soak: "Soak"):
        self.index, self.soak = index, soak
        self.rng = random.Random(1000 + index)
        self.np_rng = np.random.default_rng(1000 + index)
        self.source_base = (2 * index) * sh.SLOTS_PER_REGION
        self.dest_base = (2 * index + 1) * sh.SLOTS_PER_REGION
        self.guard = np.uint32(0xA5A50000 | (index << 8) | 0x5A)
        self.counter = Counter()
        self.current = "starting"

    # -- helpers ------------------------------------------------------------------------------------
    def _slots(self, base: int, n: int) -> np.ndarray:
        blocks = np.array(self.rng.sample(range(sh.BLOCKS_PER_REGION), sh.BLOCKS_PER_REGION), dtype=np.int64)
        positions = np.arange(n, dtype=np.int64)
        return base + blocks[positions // sh.CHUNK] * sh.CHUNK + positions % sh.CHUNK

    def _fail(self, kind: str, message: str) -> None:
        self.soak.failures.add(kind, f"worker {self.index}: {message}")

    def _check_prefix(self, what: str, hit: int, tokens: np.ndarray, salt: int, keys: list[bytes]) -> bool:
        n = len(tokens)
        if not (0 <= hit <= n) or hit % sh.CHUNK:
            self._fail(f"{what}: impossible value", f"{hit} for n={n} salt={salt}")
            return False
        bad = self.soak.ledger.unannounced(keys, hit)
        if bad is not None:
            self._fail(f"{what}: reports a chunk nobody stored (cross-salt or cross-prefix hit)",
                       f"{hit} of n={n} salt={salt}, first unannounced chunk {bad}")
            return False
        return True

    # -- operations -----------------------------------------------------------------------------------
    def store(self, tokens, salt, keys) -> None:
        n = len(tokens)
        kv = self.soak.kv
        slots = self._slots(self.source_base, n)
        if self.rng.random() < 0.1:  # an unmapped slot: nothing from its chunk on may be stored
            slots[self.rng.randrange(n)] = -1
        expected = sh.expected_kv(tokens, salt)
        mapped = slots >= 0
        kv[:, :, slots[mapped]] = expected[mapped].transpose(1, 2, 0, 3, 4)
        skip = 0
        if self.rng.random() < 0.25:
            skip = self.rng.randint(0, n)
        full_chunks = n // sh.CHUNK
        skip_chunk = skip // sh.CHUNK
        # Slots before the rounded-down skip point are not read, so only an unmapped slot from there
        # on ends what may be stored.
        unmapped = np.flatnonzero(~mapped[skip_chunk * sh.CHUNK:])
        first_unmapped_chunk = skip_chunk + int(unmapped[0]) // sh.CHUNK if len(unmapped) else full_chunks
        storable_end = min(full_chunks, first_unmapped_chunk)
        self.soak.ledger.announce(keys[skip_chunk:storable_end])
        if self.rng.random() < 0.3:  # as a job (ABI v2 job_out): the same result once it finished
            with self.soak.engine.store_async(tokens, slots, skip_leading_tokens=skip,
                                              extra_key=sh.SALTS[salt]) as job:
                stored = job.wait(PREFETCH_TIMEOUT_S)
            self.counter["store_jobs"] += 1
        else:
            stored = self.soak.engine.store(tokens, slots, skip_leading_tokens=skip, extra_key=sh.SALTS[salt])
        self.counter["store"] += 1
        if not 0 <= stored.tokens_copied <= stored:
            self._fail("store: impossible tokens_copied", f"{stored!r} for n={n} skip={skip}")
        self.counter["stored_tokens_reported"] += stored
        limit = max(0, storable_end - skip_chunk) * sh.CHUNK
        if not (0 <= stored <= limit) or stored % sh.CHUNK:
            self._fail("store: impossible stored_tokens", f"{stored} for n={n} skip={skip} storable={limit}")
        # A store only reads the layers.
        if not np.array_equal(kv[:, :, slots[mapped]], expected[mapped].transpose(1, 2, 0, 3, 4)):
            self._fail("store: changed its source slots", f"n={n} salt={salt}")

    def retrieve(self, tokens, salt, keys) -> None:
        n = len(tokens)
        kv, base = self.soak.kv, self.dest_base
        slots = self._slots(base, n)
        if self.rng.random() < 0.3:
            slots[self.np_rng.random(n) < 0.1] = -1
        roll = self.rng.random()
        first = 0 if roll < 0.5 else self.rng.randint(0, n) if roll < 0.75 else sh.CHUNK * self.rng.randint(0, n // sh.CHUNK)
        region = kv[:, :, base:base + sh.SLOTS_PER_REGION]
        region[...] = self.guard
        if self.rng.random() < 0.3:  # as a job
            with self.soak.engine.retrieve_async(tokens, slots, first_token_to_write=first,
                                                 extra_key=sh.SALTS[salt]) as job:
                hit = job.wait(PREFETCH_TIMEOUT_S)
            self.counter["retrieve_jobs"] += 1
        else:
            hit = self.soak.engine.retrieve(tokens, slots, first_token_to_write=first, extra_key=sh.SALTS[salt])
        self.counter["retrieve"] += 1
        self.counter["retrieved_tokens"] += hit
        self.counter["retrieve_hit"] += hit > 0
        if not self._check_prefix("retrieve", hit, tokens, salt, keys):
            return
        written = np.zeros(n, dtype=bool)
        written[first:hit] = True
        written &= slots >= 0
        expected_region = np.full_like(region, self.guard)
        expected = sh.expected_kv(tokens, salt)
        expected_region[:, :, slots[written] - base] = expected[written].transpose(1, 2, 0, 3, 4)
        self.counter["written_tokens"] += int(written.sum())
        if hit.tokens_copied != int(written.sum()):
            self._fail("retrieve: tokens_copied is not the number of slots written",
                       f"{hit!r}, expected {int(written.sum())} (n={n} first={first})")
        self.counter["kv_bytes_verified"] += int(written.sum()) * sh.BYTES_PER_TOKEN
        self.counter["guard_bytes_verified"] += (sh.SLOTS_PER_REGION - int(written.sum())) * sh.BYTES_PER_TOKEN
        if not np.array_equal(region, expected_region):
            self._fail("retrieve: wrong bytes", self._describe_mismatch(region, expected_region, tokens, salt, slots,
                                                                        first, hit))

    def _describe_mismatch(self, region, expected_region, tokens, salt, slots, first, hit) -> str:
        layer, kvi, offset, head, d = (int(x) for x in np.argwhere(region != expected_region)[0])
        bad_slots = np.unique(np.argwhere(region != expected_region)[:, 2])
        owner = {int(s) - self.dest_base: t for t, s in enumerate(slots) if s >= 0}
        t = owner.get(offset)
        got = int(region[layer, kvi, offset, head, d])
        what = "guard (not written)" if got == self.guard else "other bits"
        if t is not None and got != self.guard:
            for other in range(len(sh.SALTS)):
                if other != salt and got == int(sh.expected_kv(tokens, other)[t, layer, kvi, head, d]):
                    what = f"the KV of salt {other}"
            same_salt = sh.expected_kv(tokens, salt)[:, layer, kvi, head, d]
            elsewhere = np.flatnonzero(same_salt == got)
            if len(elsewhere):
                what = f"the KV of token {int(elsewhere[0])} of this request"
        return (f"n={len(tokens)} salt={salt} first={first} hit={hit}: {len(bad_slots)} slots differ; first at "
                f"region slot {offset} (token {t}), layer {layer} kv {kvi} head {head} d {d}: "
                f"got {got:#010x} = {what}, expected {int(expected_region[layer, kvi, offset, head, d]):#010x}")

    def lookup(self, tokens, salt, keys) -> int:
        hit = self.soak.engine.lookup(tokens, sh.SALTS[salt])
        self.counter["lookup"] += 1
        if sum(hit.tokens_by_tier) != hit:
            self._fail("lookup: tokens_by_tier do not add up to hit_tokens", repr(hit))
        self.counter["lookup_hit"] += hit > 0
        self._check_prefix("lookup", hit, tokens, salt, keys)
        return hit

    def prefetch(self, tokens, salt, keys) -> None:
        job = self.soak.engine.prefetch(tokens, sh.SALTS[salt])
        started = time.monotonic()
        try:
            result = job.wait(PREFETCH_TIMEOUT_S)
        except LmcTimeout:
            self._fail("prefetch: job still running after its timeout",
                       f"{PREFETCH_TIMEOUT_S} s, n={len(tokens)} (load phase at {self.soak.elapsed():.1f} s)")
            self.counter["prefetch_timed_out"] += 1
            return
        finally:
            job.close()
        self.counter["prefetch"] += 1
        self.counter["prefetch_wait_max_ms"] = max(self.counter["prefetch_wait_max_ms"],
                                                   int((time.monotonic() - started) * 1000))
        self.counter["prefetched_tokens"] += result
        self._check_prefix("prefetch", result, tokens, salt, keys)

    def remote(self, tokens, salt, keys) -> None:
        before = self.lookup(tokens, salt, keys)
        started = time.monotonic()
        try:
            hit = remote_lookup(self.soak.socket_path, tokens, sh.SALTS[salt], timeout_s=REMOTE_TIMEOUT_S)
        except LmcError as e:
            waited = time.monotonic() - started
            self._fail(f"remote_lookup: {type(e).__name__}",
                       f"after {waited:.2f} s (timeout {REMOTE_TIMEOUT_S} s, load phase at {self.soak.elapsed():.1f} s): {e}")
            self.counter["remote_failed"] += 1
            return
        latency_ms = int((time.monotonic() - started) * 1000)
        after = self.lookup(tokens, salt, keys)
        self.counter["remote_ok"] += 1
        self.counter["remote_latency_max_ms"] = max(self.counter["remote_latency_max_ms"], latency_ms)
        if self._check_prefix("remote_lookup", hit, tokens, salt, keys):
            self.counter["remote_between_local" if min(before, after) <= hit <= max(before, after)
                         else "remote_outside_local"] += 1

    # -- loops ----------------------------------------------------------------------------------------
    def run(self) -> None:
        soak = self.soak
        try:
            while not soak.stop.is_set():
                tokens, salt = soak.prompts.pick(self.rng)
                keys = sh.chunk_keys(tokens, salt)
                roll = self.rng.random()
                if roll < 0.35:
                    self.current = "store"
                    self.store(tokens, salt, keys)
                    if self.rng.random() < 0.5:
                        self.current = "retrieve after store"
                        self.retrieve(tokens, salt, keys)
                elif roll < 0.65:
                    self.current = "retrieve"
                    self.retrieve(tokens, salt, keys)
                elif roll < 0.75:
                    self.current = "lookup"
                    self.lookup(tokens, salt, keys)
                elif roll < 0.9:
                    self.current = "prefetch"
                    self.prefetch(tokens, salt, keys)
                    self.current = "retrieve after prefetch"
                    self.retrieve(tokens, salt, keys)
                else:
                    self.current = "remote_lookup"
                    self.remote(tokens, salt, keys)
            self.current = "done"
        except Exception as e:
            self._fail(f"{self.current}: {type(e).__name__}", repr(e))
            self.current = f"died in {self.current}"

    def run_remote(self) -> None:
        """A thread that only asks the lookup server (plus the in-process lookups around it)."""
        try:
            while not self.soak.stop.is_set():
                tokens, salt = self.soak.prompts.pick(self.rng)
                self.current = "remote_lookup"
                self.remote(tokens, salt, sh.chunk_keys(tokens, salt))
            self.current = "done"
        except Exception as e:
            self._fail(f"{self.current}: {type(e).__name__}", repr(e))
            self.current = f"died in {self.current}"


class Soak:
    def __init__(self, disk_dir: str, socket_path: str):
        self.started = time.monotonic()
        self.failures = sh.Failures()
        self.ledger = sh.Ledger()
        self.prompts = sh.Prompts()
        self.stop = threading.Event()
        self.socket_path = socket_path
        regions = 2 * (WORKERS + REMOTE_THREADS)
        num_slots = regions * sh.SLOTS_PER_REGION
        self.kv = np.zeros((sh.LAYERS, 2, num_slots, sh.HEADS, sh.HEAD_SIZE), dtype=np.uint32)
        as_float = torch.from_numpy(self.kv.view(np.float32))
        self.layers = [as_float[layer].view(2, num_slots // sh.CHUNK, sh.CHUNK, sh.HEADS, sh.HEAD_SIZE)
                       for layer in range(sh.LAYERS)]
        self.config = {"chunk_size": sh.CHUNK, "max_local_cpu_size": POOL_CHUNKS * sh.CHUNK_BYTES / 2**30,
                       "local_disk": disk_dir, "max_local_disk_size": DISK_BYTES / 2**30}
        self.engine = Engine(self.config, model_name="soak")
        self.engine.register_layers(self.layers, layout="flash_attn")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _rss_monitor(stop: threading.Event, peak: list) -> None:
    while not stop.wait(0.1):
        peak[0] = max(peak[0], sh.vm_rss_kib())


@pytest.mark.soak
def test_soak(tmp_path):
    test_started = time.monotonic()
    hard_deadline = test_started + SOAK_SECONDS + TEARDOWN_BUDGET_S
    socket_dir = tempfile.mkdtemp(prefix="lmc-soak-")
    socket_path = os.path.join(socket_dir, "lookup.sock")
    soak = Soak(str(tmp_path / "disk"), socket_path)
    engine = soak.engine
    fleet = sh.GarbageFleet(socket_path, soak.prompts, soak.ledger, soak.failures, soak.stop,
                            answer_timeout=REMOTE_TIMEOUT_S, **GARBAGE)
    rss_stop = threading.Event()
    destroyer = None
    try:
        engine.start_lookup_server(socket_path)
        rss_before = sh.vm_rss_kib()
        rss_peak = [rss_before]
        monitor = threading.Thread(target=_rss_monitor, args=(rss_stop, rss_peak), daemon=True, name="rss")
        monitor.start()

        garbage_threads = fleet.start()
        workers = [Worker(i, soak) for i in range(WORKERS + REMOTE_THREADS)]
        worker_threads = [threading.Thread(target=w.run if w.index < WORKERS else w.run_remote, daemon=True,
                                           name=f"worker-{w.index}") for w in workers]
        soak.started = time.monotonic()
        for thread in worker_threads:
            thread.start()

        soak.stop.wait(SOAK_SECONDS)
        soak.stop.set()
        load_seconds = soak.elapsed()

        # Every thread must stop: the slowest legitimate op is a prefetch wait (PREFETCH_TIMEOUT_S).
        join_deadline = min(hard_deadline - FLUSH_TIMEOUT_S - DESTROY_TIMEOUT_S, time.monotonic() + JOIN_TIMEOUT_S)
        for thread in worker_threads + garbage_threads:
            thread.join(max(0.0, join_deadline - time.monotonic()))
        hung = [f"{t.name} ({w.current})" for t, w in zip(worker_threads, workers) if t.is_alive()]
        hung += [t.name for t in garbage_threads if t.is_alive()]
        for name in hung:
            soak.failures.add("thread hung", name)

        if not hung:
            try:
                engine.flush(FLUSH_TIMEOUT_S)
            except LmcError as e:
                soak.failures.add("flush failed", repr(e))
        stats = engine.stats()
        tiers = {t["name"]: t for t in engine.tier_stats()}
        disk = tiers.get("LocalDiskBackend", {})

        # Destroy with idle garbage connections still open; a destroy that does not return is a failure.
        destroy_started = time.monotonic()
        destroyer = threading.Thread(target=engine.close, daemon=True, name="destroy")
        destroyer.start()
        destroyer.join(min(DESTROY_TIMEOUT_S, max(1.0, hard_deadline - time.monotonic())))
        destroy_seconds = time.monotonic() - destroy_started
        if destroyer.is_alive():
            _KEEPALIVE.append((soak.kv, soak.layers))
            soak.failures.add("engine destroy hung", f"still running after {destroy_seconds:.1f} s")
        elif os.path.exists(socket_path):
            soak.failures.add("socket file left behind", socket_path)
    finally:
        # Also on an unexpected exception: no thread, connection or engine outlives the test.
        soak.stop.set()
        rss_stop.set()
        if destroyer is None:
            engine.close()
        fleet.close_held()
        shutil.rmtree(socket_dir, ignore_errors=True)

    # ---- summary ----
    ops = Counter()
    for w in workers:
        ops.update(w.counter)
    garbage = {name: dict(c) for name, c in fleet.counters.items()}
    raw_answered = fleet.counters["valid_raw"]["answered"] + fleet.counters["drip"]["answered"]
    summary = (
        f"soak {load_seconds:.1f}s load + {time.monotonic() - test_started - load_seconds:.1f}s rest, "
        f"{WORKERS}+{REMOTE_THREADS} threads: store={ops['store']} retrieve={ops['retrieve']} "
        f"(hits {ops['retrieve_hit']}) lookup={ops['lookup']} (hits {ops['lookup_hit']}) "
        f"prefetch={ops['prefetch']} (timed out {ops['prefetch_timed_out']}, max wait {ops['prefetch_wait_max_ms']} ms) "
        f"remote_lookup ok={ops['remote_ok']} failed={ops['remote_failed']} "
        f"(max {ops['remote_latency_max_ms']} ms, between local lookups {ops['remote_between_local']}, "
        f"outside {ops['remote_outside_local']}); verified KV bytes={ops['kv_bytes_verified']} "
        f"guard bytes={ops['guard_bytes_verified']}; evicted_chunks={stats['evicted_chunks']} "
        f"store_skipped_chunks={stats['store_skipped_chunks']} disk writes={disk.get('writes')} "
        f"hits={disk.get('hits')} evictions={disk.get('evictions')} drops={disk.get('write_queue_drops')}; "
        f"garbage connections={fleet.total_connections()} raw answers={raw_answered}; "
        f"rss +{(rss_peak[0] - rss_before) // 1024} MiB peak; destroy {destroy_seconds:.2f}s; "
        f"ledger {len(soak.ledger)} chunks"
    )
    print("\n" + summary)
    print("garbage: " + "; ".join(f"{k}={v}" for k, v in sorted(garbage.items())))
    context = f"\n{summary}\ngarbage: {garbage}\nstats: {stats}\ndisk: {disk}"

    assert not soak.failures, f"soak invariants violated:\n{soak.failures.report()}{context}"

    # ---- counters against what the threads did ----
    assert stats["store_requests"] == ops["store"], context
    assert stats["retrieve_requests"] == ops["retrieve"], context
    assert stats["retrieved_tokens"] == ops["retrieved_tokens"], context
    assert stats["retrieved_bytes"] == ops["written_tokens"] * sh.BYTES_PER_TOKEN, context
    local_lookups = ops["lookup"]
    lower = local_lookups + ops["remote_ok"] + raw_answered
    upper = (lower + ops["remote_failed"] + fleet.counters["valid_raw"]["requests_sent"]
             + fleet.counters["chaos"]["valid_then_disconnect"] + fleet.counters["drip"]["fully_sent"])
    assert lower <= stats["lookup_requests"] <= upper, f"lookup_requests not in [{lower}, {upper}]{context}"
    assert stats["pool_capacity_bytes"] == POOL_CHUNKS * sh.CHUNK_BYTES, context
    assert stats["cached_chunks"] <= POOL_CHUNKS and stats["pool_used_bytes"] <= stats["pool_capacity_bytes"], context

    # ---- the soak really exercised what it is about ----
    for kind in ("store", "retrieve", "lookup", "prefetch", "remote_ok", "retrieve_hit", "lookup_hit"):
        assert ops[kind] > 0, f"no {kind} in the whole soak{context}"
    assert stats["evicted_chunks"] > 0, f"the CPU pool never evicted{context}"
    assert disk.get("writes", 0) > 0 and disk.get("hits", 0) > 0, f"the disk tier was not written and read{context}"
    assert disk.get("corrupt_records") == 0 and disk.get("errors") == 0, context
    assert disk.get("used_bytes", 0) <= disk.get("capacity_bytes", 0), context
    assert fleet.total_connections() > 100, f"too little garbage{context}"
    rss_growth_mib = (rss_peak[0] - rss_before) // 1024
    assert rss_growth_mib < RSS_GROWTH_LIMIT_MIB, f"RSS grew by {rss_growth_mib} MiB{context}"
