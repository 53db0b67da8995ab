"""lmc_stats: counters add up to what the calls did, pool gauges follow the cache, LRU eviction.

Sizes are computed here from the model shape: bytes per token = layers x 2 x heads x head_size x
element size; a chunk holds chunk_size tokens; LMCache's GB is 2^30 bytes.
"""

from __future__ import annotations

import pytest

from lmcache_native import Engine

GB = 1 << 30


def test_counters_add_up(make_rig):
    rig = make_rig({"chunk_size": 16, "max_local_cpu_size": 0.01})
    bytes_per_token = rig.bytes_per_token
    assert bytes_per_token == 2 * 2 * 2 * 8 * 4  # layers x K/V x heads x head size x float32
    stats = rig.engine.stats()
    assert all(stats[name] == 0 for name in stats if name != "pool_capacity_bytes"), stats

    tokens_a, tokens_b = rig.tokens(100), rig.tokens(40)
    slots_a = rig.slots(100)
    assert rig.engine.store(tokens_a, slots_a) == 96
    assert rig.engine.store(tokens_b, rig.slots(40)) == 32
    assert rig.engine.lookup(tokens_a) == 96
    assert rig.engine.lookup(tokens_b[:20]) == 16
    assert rig.engine.lookup(rig.tokens(50)) == 0
    destination = rig.slots(100, unmapped_fraction=0.25)
    written_tokens = int((destination[10:96] != -1).sum())
    assert rig.engine.retrieve(tokens_a, destination, first_token_to_write=10) == 96
    assert rig.engine.retrieve(rig.tokens(30), rig.slots(30)) == 0

    stats = rig.engine.stats()
    assert stats["store_requests"] == 2
    assert stats["stored_tokens"] == 96 + 32
    assert stats["stored_bytes"] == (96 + 32) * bytes_per_token
    assert stats["lookup_requests"] == 3
    assert stats["lookup_tokens"] == 100 + 20 + 50
    assert stats["lookup_hit_tokens"] == 96 + 16
    assert stats["retrieve_requests"] == 2
    assert stats["retrieve_requested_tokens"] == 100 + 30
    assert stats["retrieved_tokens"] == 96
    assert stats["retrieved_bytes"] == written_tokens * bytes_per_token
    assert stats["cached_chunks"] == 6 + 2
    chunk_bytes = 16 * bytes_per_token
    assert stats["pool_used_bytes"] == 8 * chunk_bytes
    # Capacity: max_local_cpu_size in whole chunks.
    assert stats["pool_capacity_bytes"] == int(0.01 * GB) // chunk_bytes * chunk_bytes
    assert stats["evicted_chunks"] == 0 and stats["store_skipped_chunks"] == 0


def test_failed_calls_do_not_count(make_rig):
    rig = make_rig()
    tokens = rig.tokens(32)
    bad_slots = rig.slots(32)
    bad_slots[3] = rig.num_blocks * rig.block_size
    for call in (lambda: rig.engine.store(tokens, bad_slots), lambda: rig.engine.retrieve(tokens, bad_slots)):
        try:
            call()
        except ValueError:
            pass
    stats = rig.engine.stats()
    assert stats["store_requests"] == 0 and stats["retrieve_requests"] == 0
    assert stats["stored_tokens"] == 0 and stats["cached_chunks"] == 0


def test_clear_empties_the_cache_and_keeps_counters(make_rig):
    rig = make_rig()
    tokens = rig.tokens(64)
    rig.engine.store(tokens, rig.slots(64))
    rig.engine.clear()
    stats = rig.engine.stats()
    assert stats["cached_chunks"] == 0 and stats["pool_used_bytes"] == 0
    assert stats["stored_tokens"] == 64 and stats["store_requests"] == 1
    assert rig.engine.lookup(tokens) == 0
    assert rig.engine.store(tokens, rig.slots(64)) == 64  # stored again after the clear
    assert rig.engine.stats()["stored_tokens"] == 128


# Eviction rig: 4 KiB per token (2 layers x K/V x 2 heads x 128 x float32), 64 KiB per 16-token
# chunk; max_local_cpu_size 0.001 GB = 1,073,741 bytes holds 16 whole chunks.
EVICTION_SHAPE = dict(num_layers=2, num_heads=2, head_size=128, num_blocks=80, block_size=16)
CHUNK_BYTES = 16 * 4096


def test_a_request_larger_than_the_pool_keeps_the_prefix_that_fits(make_rig):
    # LMCache under memory pressure "chooses to store only N total chunks": the request's own chunks
    # are not evicted to make room for its later chunks (that would leave no usable prefix), so the
    # first 16 chunks are cached and the other 14 are skipped.
    rig = make_rig({"chunk_size": 16, "max_local_cpu_size": 0.001}, **EVICTION_SHAPE)
    assert rig.bytes_per_token * 16 == CHUNK_BYTES
    capacity_chunks = int(0.001 * GB) // CHUNK_BYTES
    assert capacity_chunks == 16
    tokens = rig.tokens(30 * 16)
    assert rig.engine.store(tokens, rig.slots(30 * 16)) == capacity_chunks * 16
    stats = rig.engine.stats()
    assert stats["pool_capacity_bytes"] == capacity_chunks * CHUNK_BYTES
    assert stats["stored_tokens"] == capacity_chunks * 16
    assert stats["store_skipped_chunks"] == 30 - capacity_chunks
    assert stats["evicted_chunks"] == 0
    assert stats["cached_chunks"] == capacity_chunks
    assert stats["pool_used_bytes"] == capacity_chunks * CHUNK_BYTES
    assert rig.engine.lookup(tokens) == capacity_chunks * 16


@pytest.mark.parametrize("read_a_before_storing_c", [True, False])
def test_lru_evicts_the_least_recently_used_request_suffix_first(make_rig, read_a_before_storing_c):
    """LRU over requests; within a request the suffix chunks go first (LMCache's touch order: prefix
    chunks are the most recent), so an evicted request keeps a usable prefix."""
    rig = make_rig({"chunk_size": 16, "max_local_cpu_size": 0.001}, **EVICTION_SHAPE)
    request_a, request_b, request_c = rig.tokens(10 * 16), rig.tokens(6 * 16), rig.tokens(4 * 16)
    rig.engine.store(request_a, rig.slots(len(request_a)))
    rig.engine.store(request_b, rig.slots(len(request_b)))
    assert rig.engine.stats()["cached_chunks"] == 16  # full, nothing evicted yet
    assert rig.engine.stats()["evicted_chunks"] == 0
    if read_a_before_storing_c:  # A becomes the most recently used request
        assert rig.engine.retrieve(request_a, rig.slots(len(request_a))) == len(request_a)
    rig.engine.store(request_c, rig.slots(len(request_c)))
    stats = rig.engine.stats()
    assert stats["evicted_chunks"] == 4 and stats["cached_chunks"] == 16
    assert rig.engine.lookup(request_c) == len(request_c)
    if read_a_before_storing_c:  # B lost its last 4 chunks
        assert rig.engine.lookup(request_a) == len(request_a)
        assert rig.engine.lookup(request_b) == (6 - 4) * 16
    else:  # A was least recently used and lost its last 4 chunks
        assert rig.engine.lookup(request_a) == (10 - 4) * 16
        assert rig.engine.lookup(request_b) == len(request_b)


def test_chunks_that_do_not_fit_are_skipped(make_rig):
    # 0.00005 GB = 53,687 bytes: less than one 64 KiB chunk.
    rig = make_rig({"chunk_size": 16, "max_local_cpu_size": 0.00005}, **EVICTION_SHAPE)
    tokens = rig.tokens(64)
    assert rig.engine.store(tokens, rig.slots(64)) == 0
    stats = rig.engine.stats()
    assert stats["pool_capacity_bytes"] == 0
    assert stats["stored_tokens"] == 0 and stats["cached_chunks"] == 0
    assert stats["store_skipped_chunks"] >= 1
    assert rig.engine.lookup(tokens) == 0


def test_local_cpu_false_has_no_pool(make_rig):
    try:
        rig = make_rig({"chunk_size": 16, "local_cpu": False})
    except NotImplementedError:
        return  # a build may refuse an engine without any tier; that is a valid answer
    tokens = rig.tokens(32)
    assert rig.engine.store(tokens, rig.slots(32)) == 0
    assert rig.engine.lookup(tokens) == 0
    assert rig.engine.stats()["pool_capacity_bytes"] == 0


def test_stats_struct_size_prefix_is_respected():
    """A caller compiled against a shorter lmc_stats gets only that many bytes written."""
    import ctypes

    from lmcache_native import _bindings as b

    with Engine({"chunk_size": 16}) as engine:
        stats = b.LmcStats(struct_size=16)  # struct_size, reserved, lookup_requests only
        stats.lookup_tokens = 0xDEADBEEF  # byte 16..23: must stay untouched
        assert b.lmc_engine_get_stats(engine.handle, ctypes.byref(stats)) == b.LMC_OK
        assert stats.lookup_tokens == 0xDEADBEEF
        assert stats.lookup_requests == 0
