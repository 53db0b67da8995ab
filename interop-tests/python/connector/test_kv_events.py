"""KV events through the stand-in vLLM: the workers' get_kv_connector_kv_cache_events, vLLM's
combination of the ranks' containers (sim.aggregate), the scheduler's update_connector_output and
take_events, as a KV-aware router would receive them (cluster.scheduler.published_events).

Expected events are derived here from the prompts, the chunk size and the pool size: which chunks a
prompt stores (its full chunks), and which of them LRU evicts from a pool of N chunks when
one-chunk prompts are stored one after another (all but the last N)."""

import sys

import pytest

from fakevllm import NEW, V0_10, V0_14
from sim import Cluster, Req, Spec

CHUNK = 16
GB = 1 << 30


def events_spec(era=V0_14, tp=1, pool_chunks=None, **config):
    extra = {"lmcache.chunk_size": CHUNK, "lmcache.enable_kv_events": True}
    if pool_chunks is not None:
        # bytes per token on one rank: layers x K/V x heads per rank x head size x float32
        spec = Spec(era=era, tp=tp)
        chunk_bytes = CHUNK * spec.num_layers * 2 * spec.heads_per_rank * spec.head_size * 4
        extra["lmcache.max_local_cpu_size"] = pool_chunks * chunk_bytes / GB
    extra.update({f"lmcache.{key}": value for key, value in config.items()})
    return Spec(era=era, tp=tp, extra_config=extra)


def prompt(index: int, length: int) -> list:
    return [7000 + 1000 * index + 3 * t for t in range(length)]


def run_one(cluster, rid, tokens):
    cluster.add(Req(rid, tokens, max_tokens=1))
    cluster.run()


def kinds(events, cls_name):
    return [e for e in events if type(e).__name__ == cls_name]


def stored_by_tokens(events):
    """token ids -> the BlockStored event announcing that chunk (each chunk announced once)."""
    result = {}
    for event in kinds(events, "BlockStored"):
        key = tuple(event.token_ids)
        assert key not in result, f"chunk announced twice: {event}"
        result[key] = event
    return result


@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_stores_yield_one_block_stored_per_chunk(logs, era):
    cluster = Cluster(events_spec(era))
    try:
        tokens = prompt(0, 2 * CHUNK + 7)  # two full chunks; the partial one is not saved
        run_one(cluster, "a", tokens)
        events = cluster.scheduler.published_events
        stored = kinds(events, "BlockStored")
        assert len(stored) == 2 and len(events) == 2, events
        first, second = stored
        assert type(first) is sys.modules["vllm.distributed.kv_events"].BlockStored  # vLLM's class of this era
        assert first.token_ids == tokens[:CHUNK] and second.token_ids == tokens[CHUNK:2 * CHUNK]
        assert first.block_size == second.block_size == CHUNK
        assert first.medium == second.medium == "CPU" and first.lora_id is None
        assert len(first.block_hashes) == 1 and len(first.block_hashes[0]) == 32  # sha256 chunk key
        assert first.parent_block_hash is None and second.parent_block_hash == first.block_hashes[0]
        assert first.block_hashes != second.block_hashes
        # The same prompt again is a hit: nothing new is stored, nothing announced.
        run_one(cluster, "b", tokens)
        assert len(cluster.scheduler.published_events) == 2
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("tp", [1, 2])
def test_eviction_under_a_small_pool_yields_block_removed_for_exactly_the_evicted_chunks(logs, tp):
    pool_chunks, prompts = 3, 6
    cluster = Cluster(events_spec(tp=tp, pool_chunks=pool_chunks))
    try:
        tokens = [prompt(i, CHUNK + 5) for i in range(prompts)]  # one full chunk each
        for i, t in enumerate(tokens):
            run_one(cluster, f"p{i}", t)
        events = cluster.scheduler.published_events
        stored = stored_by_tokens(events)
        chunks = [tuple(t[:CHUNK]) for t in tokens]
        assert list(stored) == chunks, "one BlockStored per chunk, in store order, across all ranks"
        # LRU: storing prompt i (i >= pool) evicts prompt i - pool, the least recently used.
        expected_removed = [stored[c].block_hashes for c in chunks[:prompts - pool_chunks]]
        removed = kinds(events, "BlockRemoved")
        assert [e.block_hashes for e in removed] == expected_removed
        assert all(e.medium == "CPU" for e in removed)
        for rank in range(tp):
            assert cluster.workers[rank].engine_stats()["evicted_chunks"] == prompts - pool_chunks
        # Each removal follows its chunk's store and precedes the store that needed the room.
        position = {id(e): i for i, e in enumerate(events)}
        for i, hashes in enumerate(expected_removed):
            removal = next(e for e in removed if e.block_hashes == hashes)
            assert position[id(stored[chunks[i]])] < position[id(removal)] < position[id(stored[chunks[i + pool_chunks]])]
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("tp", [1, 2])
def test_a_clear_yields_one_all_blocks_cleared(logs, tp):
    cluster = Cluster(events_spec(tp=tp))
    try:
        run_one(cluster, "a", prompt(1, 3 * CHUNK))
        before = len(cluster.scheduler.published_events)
        assert before == 3
        # vLLM's reset_prefix_cache reaches every worker's connector
        for worker in cluster.workers:
            worker.clear_engine()
        cluster.step()
        cluster.step()
        after = cluster.scheduler.published_events[before:]
        assert [type(e).__name__ for e in after] == ["AllBlocksCleared"], after
        # The router starts over: the same prompt, stored again, is announced again.
        run_one(cluster, "b", prompt(1, 3 * CHUNK))
        assert len(kinds(cluster.scheduler.published_events[before:], "BlockStored")) == 3
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_tp2_a_chunk_lost_on_one_rank_is_removed_at_once(logs):
    cluster = Cluster(events_spec(tp=2))
    try:
        run_one(cluster, "a", prompt(2, 2 * CHUNK))
        assert len(kinds(cluster.scheduler.published_events, "BlockStored")) == 2
        cluster.workers[1].clear_engine()  # only rank 1 loses its CPU copies: no longer a hit
        cluster.step()
        after = cluster.scheduler.published_events[2:]
        assert [type(e).__name__ for e in after] == ["AllBlocksCleared"]
        cluster.workers[0].clear_engine()  # the other rank's clear: the router knows already
        cluster.step()
        assert len(cluster.scheduler.published_events) == 3
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_tp2_announced_once_every_rank_holds_a_chunk_removed_once_one_rank_lost_it(logs):
    cluster = Cluster(events_spec(tp=2, pool_chunks=2))
    try:
        engines = [worker.conn._worker.engine for worker in cluster.workers]
        tokens = prompt(6, 2 * CHUNK)
        slots = list(range(2 * CHUNK))
        engines[0].store(tokens, slots)  # rank 0 alone: not a hit yet
        cluster.step()
        assert cluster.scheduler.published_events == []
        engines[1].store(tokens, slots)
        cluster.step()
        stored = stored_by_tokens(cluster.scheduler.published_events)
        assert list(stored) == [tuple(tokens[:CHUNK]), tuple(tokens[CHUNK:])]
        # A new chunk on rank 0 alone: its pool of 2 evicts the least recently used chunk there,
        # the prompt's second (a store releases its chunks last to first). Rank 1 still holds it,
        # but a chunk one rank lacks is no hit: removed now. The new chunk is not announced.
        engines[0].store(prompt(7, CHUNK), list(range(CHUNK)))
        cluster.step()
        after = cluster.scheduler.published_events[2:]
        assert [(type(e).__name__, e.block_hashes) for e in after] == \
            [("BlockRemoved", stored[tuple(tokens[CHUNK:])].block_hashes)]
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_tp2_workers_in_their_own_processes_yield_one_event_per_chunk(logs):
    cluster = Cluster(events_spec(era=NEW, tp=2, pool_chunks=2), separate_processes=True)
    try:
        tokens = [prompt(10 + i, CHUNK) for i in range(3)]
        for i, t in enumerate(tokens):
            run_one(cluster, f"q{i}", t)
        cluster.step()
        events = cluster.scheduler.published_events
        stored = stored_by_tokens(events)
        assert list(stored) == [tuple(t) for t in tokens]
        assert [e.block_hashes for e in kinds(events, "BlockRemoved")] == [stored[tuple(tokens[0])].block_hashes]
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_disk_write_behind_yields_block_stored_disk(logs, tmp_path):
    cluster = Cluster(events_spec(local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01))
    try:
        tokens = prompt(3, 2 * CHUNK)
        run_one(cluster, "a", tokens)
        cluster.workers[0].conn._worker.engine.flush(10)
        cluster.step()
        events = cluster.scheduler.published_events
        by_medium = {medium: [e for e in kinds(events, "BlockStored") if e.medium == medium] for medium in ("CPU", "DISK")}
        assert [e.token_ids for e in by_medium["DISK"]] == [tokens[:CHUNK], tokens[CHUNK:]]
        assert [e.block_hashes for e in by_medium["DISK"]] == [e.block_hashes for e in by_medium["CPU"]]
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_an_overflowing_queue_makes_the_router_start_over(logs):
    cluster = Cluster(events_spec(kv_events_queue_size=1))
    try:
        run_one(cluster, "a", prompt(4, 3 * CHUNK))
        events = cluster.scheduler.published_events
        # Only the first of three chunks fits the queue; the two dropped are reported, and the
        # router is told to forget everything rather than keep an incomplete view.
        assert [type(e).__name__ for e in events] == ["BlockStored", "AllBlocksCleared"]
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_events_off_or_a_vllm_without_connector_events_yield_nothing(logs):
    for spec in (Spec(era=V0_14, extra_config={"lmcache.chunk_size": CHUNK}), events_spec(era=V0_10)):
        cluster = Cluster(spec)
        try:
            run_one(cluster, "a", prompt(5, 2 * CHUNK))
            assert cluster.scheduler.published_events == []
            assert cluster.workers[0].conn.get_kv_connector_kv_cache_events() is None
            assert list(cluster.conn.take_events()) == []
            cluster.assert_empty()
        finally:
            cluster.shutdown()
