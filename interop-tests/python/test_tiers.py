"""The storage tiers below the CPU pool: local disk (``local_disk``) and Redis (``remote_url``).

Every retrieve is checked bit for bit against an independent torch oracle (``tier_scenario``: the
source KV is recomputed from its seed, read with plain indexing), over the whole destination cache:
the retrieved tokens' slots must hold the source values and every other byte its sentinel. Data
crosses processes (a child stores and exits, the parent reads), layouts (stored from FlashAttention
NHD, retrieved into blocks-first HND or packed with another block size) and failures (a writer
killed with SIGKILL, corrupted or truncated records, a Redis server stopped, paused and restarted,
a full disk). In every case the answer must be the right KV or a miss, never other bytes.

The cross-process key check for the disk tier (sha256 and xxh3_128) is in test_cross_process.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

import tier_scenario as ts
from conftest import CHILD_PYTHON, PACKAGE_PARENT, TESTS_DIR, run_child_json
from lmcache_native import Engine
from redis_helpers import RespClient

RECORD_NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{64}\.lmcc$")
TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")
REDIS_KEY = re.compile(rb"^lmcn:[0-9a-f]{32}:[0-9a-f]{64}$")
HEADER = 128
CHUNK_BYTES = ts.CHUNK * ts.Geometry().bytes_per_token  # 16 KiB of KV per 16-token chunk
RECORD_BYTES = HEADER + CHUNK_BYTES
GB = 1 << 30


def disk_config(directory, **extra) -> dict:
    return {"chunk_size": ts.CHUNK, "max_local_cpu_size": 0.05, "local_disk": str(directory),
            "max_local_disk_size": 0.05, **extra}


def redis_config(url, **extra) -> dict:
    return {"chunk_size": ts.CHUNK, "max_local_cpu_size": 0.05, "remote_url": url, **extra}


def tier(engine: Engine, name: str) -> dict:
    tiers = {t["name"]: t for t in engine.tier_stats()}
    assert name in tiers, f"no tier {name!r} in {list(tiers)}"
    return tiers[name]


def records(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).iterdir() if p.name.endswith(".lmcc"))


def temp_files(directory: Path) -> list[Path]:
    return [p for p in Path(directory).iterdir() if ".tmp-" in p.name]


class Source:
    """The source side in this process: layers of ``seed`` and the requests stored from them."""

    def __init__(self, seed: int, geometry: ts.Geometry = ts.Geometry()):
        self.seed, self.geometry = seed, geometry
        self.layers = ts.source_layers(seed, geometry)

    def register(self, engine: Engine) -> None:
        engine.register_layers([layer.logical for layer in self.layers], layout="flash_attn")

    def request(self, index: int, num_tokens: int):
        return ts.request(self.seed, index, num_tokens)

    def expected(self, index: int, num_tokens: int) -> list[torch.Tensor]:
        _, slots = self.request(index, num_tokens)
        return ts.expected_values(self.layers, slots)


def check_retrieve(engine: Engine, destination: ts.Destination, source: Source, index: int, num_tokens: int,
                   expected_hit: int | None, extra_key: bytes = b"", first: int = 0, length: int | None = None,
                   unmapped_fraction: float = 0.1) -> int:
    """Retrieves the first ``length`` tokens (default all) of request ``index`` (``num_tokens`` long)
    into the reset destination, at fresh slots with some -1, and checks every byte of it."""
    length = num_tokens if length is None else length
    tokens = source.request(index, num_tokens)[0][:length]
    destination.reset()
    slots = destination.slots(length, unmapped_fraction)
    hit = engine.retrieve(tokens, slots, first_token_to_write=first, extra_key=extra_key)
    if expected_hit is not None:
        assert hit == expected_hit, f"request {index}: retrieved {hit}, expected {expected_hit}"
    values = [layer_values[:length] for layer_values in source.expected(index, num_tokens)]
    problem = destination.mismatch(values, slots, hit, first)
    assert problem is None, f"request {index}: {problem}"
    return hit


# ------------------------------------------------------------------------------------------------
# Redis shared by two processes
# ------------------------------------------------------------------------------------------------

def test_redis_is_shared_by_engines_in_separate_processes(shared_redis_url, unique_model):
    requests = [(0, 200, ""), (1, 100, "tenant")]
    with RespClient.from_url(shared_redis_url) as client:
        keys_before = set(client.keys("lmcn:*"))
    # The child stores and exits without flushing: destroying its engine must finish the writes.
    child = run_child_json(f"""
        import json, tier_scenario
        print(json.dumps(tier_scenario.store_requests({redis_config(shared_redis_url)!r}, {unique_model!r},
                                                      11, {requests!r})))
    """)
    assert child["stored"] == [192, 96]
    assert [t["name"] for t in child["tiers"]] == ["RemoteBackend"]

    with RespClient.from_url(shared_redis_url) as client:
        new_keys = set(client.keys("lmcn:*")) - keys_before
        assert len(new_keys) == 12 + 6, sorted(new_keys)[:4]
        assert all(REDIS_KEY.match(key) for key in new_keys), sorted(new_keys)[:4]
        assert len({key[:37] for key in new_keys}) == 1, "one namespace prefix for one model"
        for key in new_keys:
            assert client.command("STRLEN", key) == RECORD_BYTES
        assert client.command("GETRANGE", next(iter(new_keys)), 0, 7) == b"LMCNREC1"

    source = Source(11)
    destination = ts.Destination()
    with Engine(redis_config(shared_redis_url), model_name=unique_model) as engine:
        destination.register(engine)
        ts.wait_for_remote(engine)  # see test_fresh_engine_waits_for_its_first_connection
        tokens0, _ = source.request(0, 200)
        tokens1, _ = source.request(1, 100)
        assert engine.lookup(tokens0) == 192
        assert engine.lookup(tokens0, extra_key=b"tenant") == 0
        assert engine.lookup(tokens1, extra_key=b"tenant") == 96
        assert engine.lookup(tokens1) == 0
        assert engine.lookup(tokens1, extra_key=b"tenant2") == 0

        check_retrieve(engine, destination, source, 0, 200, 192)
        remote = tier(engine, "RemoteBackend")
        assert (remote["hits"], remote["bytes_read"]) == (12, 12 * CHUNK_BYTES)
        assert engine.stats()["cached_chunks"] == 12, "retrieved chunks are promoted to the CPU tier"
        check_retrieve(engine, destination, source, 1, 100, 96, extra_key=b"tenant", first=20)
        check_retrieve(engine, destination, source, 1, 100, 0)  # no extra key: a miss, nothing written
        # Again: now from the CPU tier, the remote one is not read.
        check_retrieve(engine, destination, source, 0, 200, 192)
        remote = tier(engine, "RemoteBackend")
        assert (remote["hits"], remote["bytes_read"], remote["corrupt_records"]) == (18, 18 * CHUNK_BYTES, 0)

    # Another model (another namespace) never hits the same tokens.
    with Engine(redis_config(shared_redis_url), model_name=unique_model + "-other") as engine:
        destination.register(engine)
        ts.wait_for_remote(engine)
        assert engine.lookup(tokens0) == 0


def test_fresh_engine_waits_for_its_first_connection(private_redis):
    """A fresh engine's first calls while its connection is still being set up, made deterministic:
    the server is paused (SIGSTOP) while the engines are created and resumes 0.3 s later, well
    within blocking_timeout_secs (3). A lookup must then see what is in Redis and a store's
    write-behind must reach it. Today the tier connects in the background and, until connected,
    answers a fast miss and skips writes (counted as errors): with a healthy server this is a race
    that short-lived writer processes lose (tier_scenario.wait_for_remote works around it elsewhere)."""
    source = Source(12)
    config = redis_config(private_redis.url, blocking_timeout_secs=3)
    tokens0, slots0 = source.request(0, 64)
    tokens1, slots1 = source.request(1, 64)
    with Engine(config, model_name="fresh") as writer:
        source.register(writer)
        ts.wait_for_remote(writer)
        assert writer.store(tokens0, slots0) == 64
        writer.flush(10)

    private_redis.send_signal(signal.SIGSTOP)
    resume = threading.Timer(0.3, private_redis.send_signal, (signal.SIGCONT,))
    reader = writer = None
    try:
        reader = Engine(config, model_name="fresh")
        writer = Engine(config, model_name="fresh")
        resume.start()
        source.register(reader)
        source.register(writer)
        first_lookup, lookup_seconds = _timed(lambda: reader.lookup(tokens0))
        assert writer.store(tokens1, slots1) == 64
        writer.flush(10)
        writer_tier = tier(writer, "RemoteBackend")
    finally:
        resume.join()
        private_redis.send_signal(signal.SIGCONT)
        for engine in (reader, writer):
            if engine is not None:
                engine.close()
    with Engine(config, model_name="fresh") as check:
        source.register(check)
        ts.wait_for_remote(check)
        written = check.lookup(tokens1)
    assert (first_lookup, written) == (64, 64), (
        f"server answering 0.3 s after the engines were created: the first lookup hit {first_lookup} "
        f"of 64 tokens after {lookup_seconds:.3f} s; the store's write-behind put {written} of 64 tokens "
        f"into Redis (writer tier: writes={writer_tier['writes']}, errors={writer_tier['errors']})")


# ------------------------------------------------------------------------------------------------
# A prefix split across tiers
# ------------------------------------------------------------------------------------------------

def test_prefix_split_across_cpu_and_disk(tmp_path):
    source, destination = Source(31), ts.Destination()
    tokens, slots = source.request(0, 128)
    with Engine(disk_config(tmp_path), model_name="split") as engine:
        source.register(engine)
        assert engine.store(tokens, slots) == 128
        engine.flush(30)
        disk = tier(engine, "LocalDiskBackend")
        assert (disk["writes"], disk["bytes_written"], disk["used_bytes"]) == (8, 8 * CHUNK_BYTES, 8 * RECORD_BYTES)
        assert len(records(tmp_path)) == 8

        destination.register(engine)  # same namespace: the cache is kept
        engine.clear()
        assert engine.stats()["cached_chunks"] == 0
        assert engine.lookup(tokens) == 128, "all chunks on disk"

        # Promote the first 3 chunks: the CPU tier holds chunks 0-2, the disk all 8.
        check_retrieve(engine, destination, source, 0, 128, 48, length=48)
        assert tier(engine, "LocalDiskBackend")["hits"] == 3
        assert engine.stats()["cached_chunks"] == 3
        assert engine.lookup(tokens) == 128, "3 chunks in memory + 5 on disk"
        assert engine.lookup(tokens[:100]) == 96

        check_retrieve(engine, destination, source, 0, 128, 128)
        disk = tier(engine, "LocalDiskBackend")
        assert (disk["hits"], disk["bytes_read"]) == (8, 8 * CHUNK_BYTES), "only the 5 missing chunks are read"
        assert engine.stats()["cached_chunks"] == 8

        check_retrieve(engine, destination, source, 0, 128, 128, first=40)
        assert tier(engine, "LocalDiskBackend")["hits"] == 8, "all in memory now"


def test_prefix_split_across_disk_and_redis(tmp_path, shared_redis_url, unique_model):
    """The disk holds the first 3 chunks, Redis all 8: one lookup spans CPU, disk and remote."""
    source, destination = Source(32), ts.Destination()
    tokens, slots = source.request(0, 128)
    with Engine(redis_config(shared_redis_url), model_name=unique_model) as remote_only:
        source.register(remote_only)
        ts.wait_for_remote(remote_only)
        assert remote_only.store(tokens, slots) == 128
        remote_only.flush(30)
        assert tier(remote_only, "RemoteBackend")["writes"] == 8, remote_only.tier_stats()
    with Engine(disk_config(tmp_path), model_name=unique_model) as disk_only:
        source.register(disk_only)
        assert disk_only.store(tokens[:48], slots[:48]) == 48
        disk_only.flush(30)
    assert len(records(tmp_path)) == 3

    config = {**disk_config(tmp_path), "remote_url": shared_redis_url}
    with Engine(config, model_name=unique_model) as engine:
        destination.register(engine)
        ts.wait_for_remote(engine)
        assert [t["name"] for t in engine.tier_stats()] == ["LocalDiskBackend", "RemoteBackend"]
        assert engine.lookup(tokens) == 128
        check_retrieve(engine, destination, source, 0, 128, 16, length=16)  # chunk 0 into memory
        check_retrieve(engine, destination, source, 0, 128, 128)
        disk, remote = tier(engine, "LocalDiskBackend"), tier(engine, "RemoteBackend")
        assert disk["hits"] == 3, "chunk 0 once, then chunks 1-2 (0 came from memory)"
        assert remote["hits"] == 5, "chunks 3-7"
        assert engine.stats()["cached_chunks"] == 8


# ------------------------------------------------------------------------------------------------
# A writer killed with SIGKILL during the write-behind
# ------------------------------------------------------------------------------------------------

BIG = ts.Geometry(layers=4, heads=8, head_size=128)  # 16 KiB per token, 4 MiB per 256-token chunk
BIG_CHUNK, BIG_REQUESTS, BIG_TOKENS = 256, 3, 1024
BIG_CONFIG = {"chunk_size": BIG_CHUNK, "max_local_cpu_size": 0.2, "max_local_disk_size": 1.0}


def _start_writer(directory: Path, seed: int) -> subprocess.Popen:
    args = {"config": {**BIG_CONFIG, "local_disk": str(directory)}, "model_name": "sigkill", "seed": seed,
            "geometry": BIG.as_dict(), "announce": True, "flush": True,
            "requests": [(i, BIG_TOKENS, "") for i in range(BIG_REQUESTS)]}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_PARENT), str(TESTS_DIR)]))
    return subprocess.Popen([CHILD_PYTHON, str(TESTS_DIR / "tier_scenario.py"), json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_records_survive_a_writer_killed_mid_write(tmp_path):
    """Writers storing 4 MiB chunks are SIGKILLed during their write-behind: as soon as a temp file
    shows up, once a third of the records are written, or after a random delay. Then a new engine
    on the directory must delete the temp files when it starts and answer every lookup and retrieve
    with the right bytes or a miss."""
    rng = random.Random(20240607)
    rounds = []  # (seed, strategy, records at the kill, temp files left, killed)
    total_chunks = BIG_REQUESTS * BIG_TOKENS // BIG_CHUNK
    # Each writer's engine deletes the temp files of the previous round when it starts, so the round
    # that kills at the first temp file comes last: its leftovers are what the final engine must clean.
    strategies = ("random-delay", "a-third-written", "random-delay", "first-temp-file")
    for round_index, strategy in enumerate(strategies):
        seed = 700 + round_index
        before = {p.name for p in records(tmp_path)}
        writer = _start_writer(tmp_path, seed)
        try:
            assert writer.stdout.readline().strip() == b"storing", writer.stderr.read().decode()[-2000:]
            if strategy == "random-delay":
                time.sleep(rng.uniform(0.01, 0.06))
            else:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and writer.poll() is None:
                    names = os.listdir(tmp_path)
                    if any(".tmp-" in n for n in names) and (
                            strategy == "first-temp-file"
                            or sum(n.endswith(".lmcc") and n not in before for n in names) >= total_chunks // 3):
                        break
            writer.send_signal(signal.SIGKILL)
        finally:
            writer.kill()
            _, stderr = writer.communicate(timeout=30)
        killed = writer.returncode == -signal.SIGKILL
        assert killed or writer.returncode == 0, f"round {round_index}: writer failed:\n{stderr.decode()[-3000:]}"
        left_behind = temp_files(tmp_path)
        assert all(TEMP_NAME.match(p.name) for p in left_behind), [p.name for p in left_behind]
        rounds.append((seed, strategy, len(records(tmp_path)) - len(before), len(left_behind), killed))

    left = len(temp_files(tmp_path))
    assert left > 0, f"the last kill left no half-written temp file, the test proves little: {rounds}"
    for path in records(tmp_path):
        assert RECORD_NAME.match(path.name), path.name

    destination = ts.Destination(BIG, "packed", num_blocks=160, block_size=8)
    hit_chunks = 0
    with Engine({**BIG_CONFIG, "local_disk": str(tmp_path)}, model_name="sigkill") as engine:
        destination.register(engine)
        assert temp_files(tmp_path) == [], f"temp files left after the engine started (were {left})"
        for seed, *_ in rounds:
            source = Source(seed, BIG)
            for index in range(BIG_REQUESTS):
                tokens, _ = source.request(index, BIG_TOKENS)
                looked_up = engine.lookup(tokens)
                hit = check_retrieve(engine, destination, source, index, BIG_TOKENS, None)
                assert hit % BIG_CHUNK == 0 and hit <= looked_up, (hit, looked_up)
                hit_chunks += hit // BIG_CHUNK
        disk = tier(engine, "LocalDiskBackend")
    assert hit_chunks > 0, f"nothing was readable after the kills: {rounds}"
    assert disk["hits"] == hit_chunks
    print(f"rounds {rounds}; chunks read {hit_chunks}; corrupt {disk['corrupt_records']}")


# ------------------------------------------------------------------------------------------------
# Corrupted records
# ------------------------------------------------------------------------------------------------

def _store_chunk_by_chunk(engine: Engine, source: Source, index: int, num_chunks: int, list_names) -> list:
    """Stores request ``index`` one chunk at a time; returns the name (file or key) of each chunk."""
    tokens, slots = source.request(index, num_chunks * ts.CHUNK)
    names = []
    for chunk in range(1, num_chunks + 1):
        before = set(list_names())
        assert engine.store(tokens[:chunk * ts.CHUNK], slots[:chunk * ts.CHUNK]) == chunk * ts.CHUNK
        engine.flush(30)
        added = set(list_names()) - before
        assert len(added) == 1, added
        names.append(added.pop())
    return names


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x40]))


def test_flipped_and_truncated_disk_records_are_misses(tmp_path):
    source, destination = Source(41), ts.Destination()
    with Engine(disk_config(tmp_path), model_name="corrupt") as writer:
        source.register(writer)
        files = [_store_chunk_by_chunk(writer, source, index, 4, lambda: os.listdir(tmp_path)) for index in range(6)]
    paths = [[tmp_path / name for name in request_files] for request_files in files]
    for path in (p for request_paths in paths for p in request_paths):
        assert RECORD_NAME.match(path.name) and path.stat().st_size == RECORD_BYTES
        assert path.read_bytes()[:8] == b"LMCNREC1"

    _flip_byte(paths[0][2], HEADER + 5000)           # payload byte: found when read
    _flip_byte(paths[1][1], 20)                      # header byte (in the key): found at start
    os.truncate(paths[2][3], HEADER + 100)           # truncated payload
    os.truncate(paths[3][1], HEADER // 2)            # truncated header
    paths[4][1].write_bytes(paths[4][2].read_bytes())  # a valid record of another chunk under this name
    _flip_byte(paths[5][0], RECORD_BYTES - 1)        # last payload byte of the first chunk

    # (request, retrieved tokens): the prefix ends at the damaged chunk.
    expected = [(0, 32), (1, 16), (2, 48), (3, 16), (4, 16), (5, 0)]
    with Engine(disk_config(tmp_path), model_name="corrupt") as engine:
        destination.register(engine)
        for index, hit in expected:
            tokens, _ = source.request(index, 64)
            assert engine.lookup(tokens) in (hit, 64), f"request {index}"
            check_retrieve(engine, destination, source, index, 64, hit)
            assert engine.lookup(tokens) == hit, f"request {index}: a refused record must stay a miss"
        disk = tier(engine, "LocalDiskBackend")
        assert disk["corrupt_records"] == 6, disk
        assert disk["hits"] == sum(hit for _, hit in expected) // ts.CHUNK
    # A further engine: still the right bytes or misses (refused records do not come back).
    with Engine(disk_config(tmp_path), model_name="corrupt") as engine:
        destination.register(engine)
        for index, hit in expected:
            check_retrieve(engine, destination, source, index, 64, hit)


def test_corrupted_redis_records_are_misses(shared_redis_url, unique_model):
    source, destination = Source(42), ts.Destination()
    with RespClient.from_url(shared_redis_url) as client:
        with Engine(redis_config(shared_redis_url), model_name=unique_model) as writer:
            source.register(writer)
            ts.wait_for_remote(writer)
            keys = [_store_chunk_by_chunk(writer, source, index, 4, lambda: client.keys("lmcn:*"))
                    for index in range(3)]
        flipped = client.command("GETRANGE", keys[0][2], HEADER + 777, HEADER + 777)[0] ^ 0x01
        client.command("SETRANGE", keys[0][2], HEADER + 777, bytes([flipped]))
        client.command("SET", keys[1][1], client.command("GET", keys[1][1])[:HEADER + 1000])
        client.command("SET", keys[2][3], client.command("GET", keys[2][2]))  # another chunk's record

    expected = [(0, 32), (1, 16), (2, 48)]
    with Engine(redis_config(shared_redis_url), model_name=unique_model) as engine:
        destination.register(engine)
        ts.wait_for_remote(engine)
        for index, hit in expected:
            check_retrieve(engine, destination, source, index, 64, hit)
        remote = tier(engine, "RemoteBackend")
        assert remote["corrupt_records"] == 3, remote
        assert remote["hits"] == 6


# ------------------------------------------------------------------------------------------------
# Redis going away
# ------------------------------------------------------------------------------------------------

TIMEOUT_S = 1.0
SLACK_S = 0.75  # scheduling on a loaded 2-core machine


def _timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def test_redis_terminated_then_restarted(private_redis):
    source, destination = Source(61), ts.Destination()
    tokens_a, slots_a = source.request(0, 128)
    tokens_b, slots_b = source.request(1, 128)
    config = redis_config(private_redis.url, blocking_timeout_secs=TIMEOUT_S)
    with Engine(config, model_name="restart") as engine:
        source.register(engine)
        ts.wait_for_remote(engine)
        assert engine.store(tokens_a, slots_a) == 128
        engine.flush(10)
        assert tier(engine, "RemoteBackend")["writes"] == 8
        engine.clear()
        assert engine.lookup(tokens_a) == 128, "from Redis"

        private_redis.stop(signal.SIGTERM)
        timings = []
        for _ in range(3):
            hit, seconds = _timed(lambda: engine.lookup(tokens_a))
            timings.append(seconds)
            assert hit == 0
        destination.register(engine)
        hit, seconds = _timed(lambda: check_retrieve(engine, destination, source, 0, 128, 0))
        timings.append(seconds)
        with engine.prefetch(tokens_a) as job:
            assert job.wait(10) == 0
        assert max(timings) < TIMEOUT_S + SLACK_S, timings

        # Stores still work (CPU tier); their remote writes are skipped, not raised.
        source.register(engine)
        assert engine.store(tokens_b, slots_b) == 128
        engine.flush(10)
        assert engine.lookup(tokens_b) == 128
        destination.register(engine)
        check_retrieve(engine, destination, source, 1, 128, 128)
        remote = tier(engine, "RemoteBackend")
        assert remote["errors"] > 0 and remote["hits"] == 0, remote

        private_redis.start()  # appendonly: the records come back with the server
        started = time.monotonic()
        while engine.lookup(tokens_a) != 128:
            assert time.monotonic() - started < 20, "hits did not come back after the restart"
            time.sleep(0.1)
        check_retrieve(engine, destination, source, 0, 128, 128)
        remote = tier(engine, "RemoteBackend")
        assert remote["hits"] == 8 and remote["reconnects"] >= 1, remote
        print(f"lookup/retrieve with Redis down: {[round(t, 3) for t in timings]} s; "
              f"hits back {time.monotonic() - started:.2f} s after the restart")


def test_redis_paused_calls_end_within_the_timeout(private_redis):
    """SIGSTOP: the connection stays open but nothing answers, so only the timeout ends a call."""
    source, destination = Source(62), ts.Destination()
    tokens_a, slots_a = source.request(0, 128)
    tokens_b, slots_b = source.request(1, 32)
    config = redis_config(private_redis.url, blocking_timeout_secs=TIMEOUT_S)
    with Engine(config, model_name="pause") as engine:
        source.register(engine)
        ts.wait_for_remote(engine)
        assert engine.store(tokens_a, slots_a) == 128
        engine.flush(10)
        engine.clear()
        destination.register(engine)
        private_redis.send_signal(signal.SIGSTOP)
        try:
            timings = []
            for _ in range(2):
                hit, seconds = _timed(lambda: engine.lookup(tokens_a))
                timings.append(seconds)
                assert hit == 0
            _, seconds = _timed(lambda: check_retrieve(engine, destination, source, 0, 128, 0))
            timings.append(seconds)
            assert max(timings) < TIMEOUT_S + SLACK_S, timings
            source.register(engine)
            assert engine.store(tokens_b, slots_b) == 32, "stores do not wait for Redis"
        finally:
            private_redis.send_signal(signal.SIGCONT)
        engine.flush(30)
        destination.register(engine)
        started = time.monotonic()
        while engine.lookup(tokens_a) != 128:
            assert time.monotonic() - started < 20, "hits did not come back after SIGCONT"
            time.sleep(0.1)
        check_retrieve(engine, destination, source, 0, 128, 128)
        check_retrieve(engine, destination, source, 1, 32, 32)
        print(f"lookup/retrieve with Redis paused: {[round(t, 3) for t in timings]} s")


# ------------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------------

def test_disk_smaller_than_one_record_skips_writes(tmp_path):
    source, destination = Source(71), ts.Destination()
    config = disk_config(tmp_path, max_local_disk_size=(RECORD_BYTES - 1) / GB)
    with Engine(config, model_name="tiny-disk") as engine:
        source.register(engine)
        for index in range(4):
            tokens, slots = source.request(index, 64)
            assert engine.store(tokens, slots) == 64
        engine.flush(10)
        disk = tier(engine, "LocalDiskBackend")
        assert (disk["writes"], disk["used_bytes"], disk["bytes_written"]) == (0, 0, 0), disk
        assert disk["capacity_bytes"] == RECORD_BYTES - 1
        assert records(tmp_path) == [] and temp_files(tmp_path) == []
        destination.register(engine)
        for index in range(4):
            check_retrieve(engine, destination, source, index, 64, 64)  # the CPU tier has them
        engine.clear()
        for index in range(4):
            assert engine.lookup(source.request(index, 64)[0]) == 0
            check_retrieve(engine, destination, source, index, 64, 0)


def test_disk_capacity_evicts_old_records(tmp_path):
    source, destination = Source(72), ts.Destination()
    capacity = int(3.5 * RECORD_BYTES)
    with Engine(disk_config(tmp_path, max_local_disk_size=capacity / GB), model_name="small-disk") as engine:
        source.register(engine)
        for index in range(3):
            tokens, slots = source.request(index, 64)
            assert engine.store(tokens, slots) == 64
        engine.flush(10)
        disk = tier(engine, "LocalDiskBackend")
        on_disk = records(tmp_path)
        assert disk["writes"] == 12 and disk["evictions"] == 9, disk
        assert len(on_disk) == 3 and sum(p.stat().st_size for p in on_disk) == disk["used_bytes"] <= capacity
        destination.register(engine)
        engine.clear()
        for index in range(3):
            check_retrieve(engine, destination, source, index, 64, None)


def test_write_errors_skip_the_disk_record_and_keep_serving(tmp_path):
    """A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes every record write fail like a full
    disk: the writes are counted as errors and skipped, stores and retrieves go on, nothing crashes
    and no partial file is left."""
    result = run_child_json(f"""
        import json, resource, signal, torch
        import tier_scenario as ts
        from lmcache_native import Engine
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        layers = ts.source_layers(73)
        engine = Engine({disk_config(tmp_path)!r}, model_name="fsize")
        engine.register_layers([l.logical for l in layers], layout="flash_attn")
        resource.setrlimit(resource.RLIMIT_FSIZE, ({RECORD_BYTES // 2}, {RECORD_BYTES // 2}))
        stored, retrieved, equal = [], [], []
        for index in range(3):
            tokens, slots = ts.request(73, index, 64)
            stored.append(engine.store(tokens, slots))
        engine.flush(30)
        expected = [ts.expected_values(layers, ts.request(73, i, 64)[1]) for i in range(3)]
        for layer in layers:
            layer.physical.zero_()
        for index in range(3):
            tokens, slots = ts.request(73, index, 64)
            retrieved.append(engine.retrieve(tokens, slots))
            got = ts.expected_values(layers, slots)
            equal.append(all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, expected[index])))
        disk = [t for t in engine.tier_stats() if t["name"] == "LocalDiskBackend"][0]
        engine.close()
        print(json.dumps({{"stored": stored, "retrieved": retrieved, "equal": equal, "disk": disk}}))
    """)
    assert result["stored"] == [64, 64, 64] and result["retrieved"] == [64, 64, 64]
    assert all(result["equal"])
    disk = result["disk"]
    assert disk["writes"] == 0 and disk["errors"] == 12 and disk["used_bytes"] == 0, disk
    assert records(tmp_path) == []
    leftovers = {p.name: p.stat().st_size for p in temp_files(tmp_path)}
    with Engine(disk_config(tmp_path), model_name="fsize") as engine:
        Source(73).register(engine)
        assert temp_files(tmp_path) == [], "the next owner deletes temp files at start"
    assert leftovers == {}, (
        f"{len(leftovers)} temp files left behind by failed writes (sizes {sorted(set(leftovers.values()))}); "
        f"EFBIG surfaces in .NET as ArgumentOutOfRangeException, not IOException")


ENOSPC_CHILD = """
import json, os
import tier_scenario as ts
from lmcache_native import Engine
directory, seed = os.environ["LMC_TEST_DISK"], 74
layers, destination = ts.source_layers(seed), ts.Destination()
config = {"chunk_size": 16, "max_local_cpu_size": 0.05, "local_disk": directory, "max_local_disk_size": 0.05}
disk_tier = lambda engine: [t for t in engine.tier_stats() if t["name"] == "LocalDiskBackend"][0]
engine = Engine(config, model_name="enospc")
engine.register_layers([layer.logical for layer in layers], layout="flash_attn")
stored = [engine.store(*ts.request(seed, index, 64)) for index in range(3)]
engine.flush(30)
after_stores = disk_tier(engine)
files = sorted(os.listdir(directory))
destination.register(engine)
engine.clear()
retrieves = []
for index in range(3):
    tokens, source_slots = ts.request(seed, index, 64)
    destination.reset()
    slots = destination.slots(64, 0.1)
    hit = engine.retrieve(tokens, slots)
    retrieves.append((hit, destination.mismatch(ts.expected_values(layers, source_slots), slots, hit)))
engine.close()
print(json.dumps({"stored": stored, "disk": after_stores, "files": files, "retrieves": retrieves}))
"""


def test_full_filesystem_skips_disk_writes(tmp_path):
    """A real ENOSPC: the disk tier's directory is a 100 KiB tmpfs (room for about 5 of the 12
    records, while max_local_disk_size allows all), mounted in a private mount namespace of the child
    so nothing outlives it. Skipped where unshare/mount are not permitted."""
    if not shutil.which("unshare"):
        pytest.skip("unshare not installed")
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    env = dict(os.environ, LMC_TEST_DISK=str(mount_point),
               PYTHONPATH=os.pathsep.join([str(PACKAGE_PARENT), str(TESTS_DIR)]))
    script = 'mount -t tmpfs -o size=100k tmpfs "$LMC_TEST_DISK" || exit 77; exec "$0" -c "$1"'
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, CHILD_PYTHON, ENOSPC_CHILD], env=env,
                            capture_output=True, text=True, timeout=120)
    if result.returncode == 77 or (result.returncode != 0 and "unshare" in result.stderr):
        pytest.skip(f"cannot mount a private tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, f"child exited with {result.returncode}:\n{result.stderr[-3000:]}"
    child = json.loads(result.stdout.strip().splitlines()[-1])
    disk = child["disk"]
    assert child["stored"] == [64, 64, 64], "stores succeed whatever the disk does"
    assert 0 < disk["writes"] < 12 and disk["writes"] + disk["errors"] == 12, disk
    assert [name for name in child["files"] if ".tmp-" in name] == [], child["files"]
    assert len([name for name in child["files"] if RECORD_NAME.match(name)]) == disk["writes"], child["files"]
    for index, (hit, problem) in enumerate(child["retrieves"]):
        assert hit % ts.CHUNK == 0 and problem is None, f"request {index}: hit {hit}: {problem}"
    assert child["retrieves"][0][0] > 0, "the first records fitted and are read back"


# ------------------------------------------------------------------------------------------------
# Prefetch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_prefetch_brings_chunks_to_memory(kind, tmp_path, request):
    if kind == "disk":
        config, name, model = disk_config(tmp_path), "LocalDiskBackend", "prefetch"
    else:
        url = request.getfixturevalue("shared_redis_url")
        config, name, model = redis_config(url), "RemoteBackend", request.getfixturevalue("unique_model")
    source, destination = Source(81), ts.Destination()
    tokens, slots = source.request(0, 160)
    with Engine(config, model_name=model) as engine:
        source.register(engine)
        if kind == "redis":
            ts.wait_for_remote(engine)
        assert engine.store(tokens, slots) == 160
        engine.flush(30)
        destination.register(engine)
        engine.clear()
        assert engine.stats()["cached_chunks"] == 0
        with engine.prefetch(tokens) as job:
            assert job.wait(30) == 160
            assert job.done()
        lower = tier(engine, name)
        assert (lower["hits"], lower["bytes_read"]) == (10, 10 * CHUNK_BYTES)
        assert engine.stats()["cached_chunks"] == 10
        check_retrieve(engine, destination, source, 0, 160, 160)
        lower = tier(engine, name)
        assert (lower["hits"], lower["bytes_read"]) == (10, 10 * CHUNK_BYTES), "the retrieve read nothing more"

        longer = torch.cat((tokens, torch.arange(40, dtype=torch.int32)))
        with engine.prefetch(longer) as job:
            assert job.wait(30) == 160
        with engine.prefetch(tokens, extra_key=b"other") as job:
            assert job.wait(30) == 0
        with engine.prefetch(torch.arange(64, dtype=torch.int32)) as job:
            assert job.wait(30) == 0
        assert tier(engine, name)["hits"] == 10


# ------------------------------------------------------------------------------------------------
# A second engine on the same directory
# ------------------------------------------------------------------------------------------------

def test_second_engine_on_a_directory_only_reads(tmp_path):
    source, destination = Source(91), ts.Destination()
    tokens0, slots0 = source.request(0, 64)
    tokens1, slots1 = source.request(1, 64)
    with Engine(disk_config(tmp_path), model_name="shared-dir") as owner:
        source.register(owner)
        assert owner.store(tokens0, slots0) == 64
        owner.flush(10)
        with Engine(disk_config(tmp_path), model_name="shared-dir") as reader:
            source.register(reader)
            assert reader.lookup(tokens0) == 64
            assert reader.store(tokens1, slots1) == 64
            reader.flush(10)
            assert tier(reader, "LocalDiskBackend")["writes"] == 0
            assert len(records(tmp_path)) == 4, "the read-only engine wrote no record"
            destination.register(reader)
            check_retrieve(reader, destination, source, 0, 64, 64)
            assert tier(reader, "LocalDiskBackend")["hits"] == 4
        assert owner.lookup(tokens1) == 0
