"""Engine.poll_events (lmc_engine_poll_events through ctypes): KV events for routers.

Expected hashes are computed here from the key scheme (ChunkHasher in
src/LMCacheNative.Core/Keys/ChunkKey.cs): K_-1 = SHA-256(namespace bytes || len(extra) int64 LE || extra), K_i = SHA-256(K_{i-1} ||
token count int32 LE || tokens int32 LE), the namespace being "lmcache-native:1", the model name
(int64 length + UTF-8) and int32 element size, KV heads, head size, layers, K/V count, world size 1
and worker 0.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from lmcache_native import Engine, KvEvent, PolledEvents

CHUNK = 16
GB = 1 << 30


def expected_keys(tokens, model="rig", elem_size=4, heads=2, head_size=8, layers=2, kv_count=2, extra=b""):
    name = model.encode("utf-8")
    namespace = b"lmcache-native:1" + struct.pack("<q", len(name)) + name + struct.pack(
        "<7i", elem_size, heads, head_size, layers, kv_count, 1, 0)
    key = hashlib.sha256(namespace + struct.pack("<q", len(extra)) + extra).digest()
    keys = []
    for start in range(0, len(tokens), CHUNK):
        chunk = [int(t) for t in tokens[start:start + CHUNK]]
        key = hashlib.sha256(key + struct.pack("<i", len(chunk)) + struct.pack(f"<{len(chunk)}i", *chunk)).digest()
        keys.append(key)
    return keys


def drain(engine, max_events=256):
    events, dropped = [], 0
    while True:
        polled = engine.poll_events(max_events)
        assert isinstance(polled, PolledEvents)
        events += polled.events
        dropped += polled.dropped
        if not polled.events:
            return events, dropped


def test_events_are_off_by_default(make_rig):
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.01})
    rig.engine.store(rig.tokens(64), rig.slots(64))
    rig.engine.clear()
    assert rig.engine.poll_events() == PolledEvents([], 0)


def test_store_evict_and_clear_yield_the_expected_events(make_rig):
    pool_chunks = 3
    chunk_bytes = CHUNK * 2 * 2 * 2 * 8 * 4  # tokens x layers x K/V x heads x head size x float32
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": pool_chunks * chunk_bytes / GB,
                    "save_unfull_chunk": True, "enable_kv_events": True})

    tokens = rig.tokens(2 * CHUNK + 5)  # two full chunks and a partial one
    rig.engine.store(tokens, rig.slots(len(tokens)))
    keys = expected_keys(tokens.tolist())
    events, dropped = drain(rig.engine, max_events=2)
    assert dropped == 0
    assert events == [
        KvEvent("BlockStored", "CPU", keys[i], keys[i - 1] if i else None, min(CHUNK, len(tokens) - i * CHUNK),
                tuple(tokens[i * CHUNK:(i + 1) * CHUNK].tolist()))
        for i in range(3)
    ]

    # Two one-chunk prompts into a full pool of 3: LRU evicts the two least recently used chunks.
    # Stores release their chunks last-to-first, so the prefix's tail (the partial chunk, then
    # the second chunk) is the least recently used.
    prompts = [rig.tokens(CHUNK) for _ in range(2)]
    for prompt in prompts:
        rig.engine.store(prompt, rig.slots(CHUNK))
    events, _ = drain(rig.engine)
    removed = [e for e in events if e.kind == "BlockRemoved"]
    assert [(e.medium, e.block_hash, e.parent_hash, e.token_ids) for e in removed] == \
        [("CPU", keys[2], None, None), ("CPU", keys[1], None, None)]
    assert [e.block_hash for e in events if e.kind == "BlockStored"] == [expected_keys(p.tolist())[0] for p in prompts]
    assert rig.engine.stats()["evicted_chunks"] == 2

    rig.engine.clear()
    assert drain(rig.engine) == ([KvEvent("AllBlocksCleared", "CPU", None, None, 0, None)], 0)


def test_a_full_queue_drops_newer_events_and_reports_the_count_once(make_rig):
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "enable_kv_events": True,
                    "kv_events_queue_size": 2, "pre_caching_hash_algorithm": "xxh3_128"})
    tokens = rig.tokens(5 * CHUNK)
    rig.engine.store(tokens, rig.slots(len(tokens)))
    polled = rig.engine.poll_events()
    assert len(polled.events) == 2 and polled.dropped == 3
    assert all(len(e.block_hash) == 16 for e in polled.events), "xxh3_128 keys are 16 bytes"
    assert polled.events[1].parent_hash == polled.events[0].block_hash
    assert rig.engine.poll_events() == PolledEvents([], 0)


def test_poll_events_checks_its_argument_and_a_closed_engine():
    from lmcache_native import LmcInvalidHandle

    engine = Engine({"enable_kv_events": True})
    with pytest.raises(OverflowError):  # the bindings' rule for an int outside its range
        engine.poll_events(0)
    engine.close()
    with pytest.raises(LmcInvalidHandle):
        engine.poll_events()


def test_remote_writes_yield_block_stored_remote(make_rig, shared_redis_url, unique_model):
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "remote_url": shared_redis_url,
                    "enable_kv_events": True}, model_name=unique_model)
    tokens = rig.tokens(3 * CHUNK)
    rig.engine.store(tokens, rig.slots(len(tokens)))
    rig.engine.flush(10)
    keys = expected_keys(tokens.tolist(), model=unique_model)
    events, _ = drain(rig.engine)
    remote = [e for e in events if e.medium == "REMOTE"]
    assert [(e.kind, e.block_hash, e.parent_hash, e.token_ids) for e in remote] == [
        ("BlockStored", keys[i], keys[i - 1] if i else None, tuple(tokens[i * CHUNK:(i + 1) * CHUNK].tolist()))
        for i in range(3)]
    # The CPU copies go; the remote records stay, and no removal is claimed for them.
    rig.engine.clear()
    assert [e.kind for e in drain(rig.engine)[0]] == ["AllBlocksCleared"]
