"""Scheduling scenarios (hits, misses, partial and full-prompt hits, preemption, aborts, salts, TP), in the interface eras, with the workers checking every context
token bit for bit and every load against guard values (sim.py)."""

import pytest

from fakevllm import ERAS, NEW, V0_10, V0_14
from sim import Cluster, LoraRequest, MultiModalFeature, PlaceholderRange, Req, Spec

PROMPT = [2000 + 13 * i for i in range(27)]


def spec_with(era=V0_14, layout="flash_attn_nhd", **config):
    extra = {f"lmcache.{key}": value for key, value in config.items()}
    return Spec(era=era, layout=layout, extra_config=extra)


# ------------------------------------------------------------------------------------------------
# Hits and the N-1 rule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
@pytest.mark.parametrize("load_async", [False, True], ids=["sync", "async"])
def test_full_prompt_hit_recomputes_the_last_token(logs, era, load_async):
    cluster = Cluster(spec_with(era, chunk_size=8, save_unfull_chunk=True, enable_async_loading=load_async))
    try:
        cluster.add(Req("first", PROMPT, max_tokens=1))
        cluster.run()
        cluster.add(Req("again", PROMPT, max_tokens=2))
        cluster.run()
        assert logs.matching("Reqid: again, Total tokens 27, Inference Engine computed tokens: 0, LMCache hit "
                             "tokens: 27, need to load: 26")
        # sync: vLLM treats 26 as computed and computes token 26; async: all 27 are loaded, then vLLM
        # sets num_computed = 26 and recomputes the last one
        assert cluster.scheduler.answers["again"] == [(0, 27, True) if load_async else (0, 26, False)]
        assert cluster.loaded_tokens("again", layer=0) == list(range(27))
        assert cluster.loaded_tokens("again", layer=1) == list(range(27))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_partial_chunk_of_a_longer_prompt_does_not_hit(logs):
    """LMCache's quickstart: the stored partial chunk [24, 27) does not match [24, 32) of a longer prompt."""
    cluster = Cluster(spec_with(chunk_size=8, save_unfull_chunk=True))
    try:
        cluster.add(Req("short", PROMPT, max_tokens=1))
        cluster.run()
        cluster.add(Req("long", PROMPT + [7, 8, 9, 10, 11], max_tokens=1))
        cluster.run()
        assert logs.matching("Reqid: long, Total tokens 32, Inference Engine computed tokens: 0, LMCache hit "
                             "tokens: 24, need to load: 24")
        assert cluster.loaded_tokens("long") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_prefix_cache_covers_more_than_the_store(logs):
    """vLLM's local hit exceeds LMCache's: need to load is 0, never negative, and nothing is loaded."""
    spec = spec_with(chunk_size=16)
    spec.prefix_caching = True
    cluster = Cluster(spec)
    try:
        prompt = [4000 + i for i in range(40)]
        cluster.add(Req("a", prompt, max_tokens=1))
        cluster.run()
        cluster.workers[0].clear_engine()  # the store loses everything; vLLM's prefix cache keeps 2 blocks
        cluster.add(Req("b", prompt, max_tokens=1))
        cluster.run()
        assert logs.matching("Reqid: b, Total tokens 40, Inference Engine computed tokens: 32, LMCache hit tokens: 0, "
                             "need to load: 0")
        assert cluster.scheduler.answers["b"] == [(32, 0, False)]
        assert "b" not in cluster.load_writes
        cluster.assert_empty()
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# Chunked prefill and saves
# ------------------------------------------------------------------------------------------------
def test_chunked_prefill_saves_each_completed_chunk_once(logs):
    spec = spec_with(chunk_size=8, save_unfull_chunk=True, enable_async_loading=False)
    spec.budget = 10
    cluster = Cluster(spec)
    try:
        prompt = [6000 + 3 * i for i in range(45)]
        cluster.add(Req("a", prompt, max_tokens=2))
        cluster.run()
        stored = [line.split(" Stored ")[1].split(". size")[0] for line in logs.matching("[req_id=a] Stored")]
        # steps end at 10, 20, 30, 40, 45 computed tokens: whole chunks while prefilling, the partial
        # tail at the last prefill step; the decode step stores nothing (save_decode_cache is off)
        assert stored == ["8 out of total 8 tokens", "8 out of total 16 tokens", "8 out of total 24 tokens",
                          "16 out of total 40 tokens", "5 out of total 45 tokens"]
        cluster.add(Req("b", prompt, max_tokens=1))
        cluster.run()
        assert cluster.scheduler.answers["b"] == [(0, 44, False)]
        assert cluster.loaded_tokens("b") == list(range(45))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("save_decode_cache", [False, True])
def test_save_decode_cache(logs, save_decode_cache):
    cluster = Cluster(spec_with(chunk_size=8, save_decode_cache=save_decode_cache))
    try:
        first = cluster.add(Req("a", [7000 + i for i in range(16)], max_tokens=12))
        cluster.run()
        # 16 prompt + 11 decoded tokens have KV (the 12th output was never fed back)
        everything = first.all_token_ids
        hit = cluster.workers[0].conn._worker.engine.lookup(everything[:27])
        assert hit == (24 if save_decode_cache else 16)
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("how", ["kv_transfer_params", "priority_limit", "LMCACHE_FORCE_SKIP_SAVE", "kv_consumer"])
def test_saves_can_be_turned_off(logs, monkeypatch, how):
    spec = spec_with(chunk_size=8)
    params, priority = None, 0
    if how == "kv_transfer_params":
        params = {"lmcache.skip_save": True}
    elif how == "priority_limit":
        spec.extra_config["lmcache.priority_limit"] = 5
        priority = 6
    elif how == "LMCACHE_FORCE_SKIP_SAVE":
        monkeypatch.setenv("LMCACHE_FORCE_SKIP_SAVE", "1")
    else:
        spec.kv_role = "kv_consumer"
    cluster = Cluster(spec)
    try:
        cluster.add(Req("a", PROMPT, max_tokens=3, kv_transfer_params=params, priority=priority))
        cluster.add(Req("control", [1, 2, 3] + PROMPT, max_tokens=1, priority=0))
        cluster.run()
        stats = cluster.workers[0].engine_stats()
        assert not logs.matching("[req_id=a] Stored")
        if how == "kv_consumer" or how == "LMCACHE_FORCE_SKIP_SAVE":
            assert stats["stored_tokens"] == 0 and stats["store_requests"] == 0
        else:
            assert logs.matching("[req_id=control] Stored 24 out of total 24 tokens")
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_min_retrieve_tokens_skips_small_loads_but_not_the_save_skip(logs):
    cluster = Cluster(spec_with(chunk_size=8, min_retrieve_tokens=20))
    try:
        cluster.add(Req("a", PROMPT[:16], max_tokens=1))
        cluster.run()
        cluster.add(Req("b", PROMPT, max_tokens=1))
        cluster.run()
        assert logs.matching("Reqid: b, Total tokens 27, Inference Engine computed tokens: 0, LMCache hit tokens: 16, "
                             "but need to load: 16 < min_retrieve 20, skip retrieve but record for save skip")
        assert cluster.scheduler.answers["b"] == [(0, 0, False)]
        assert "b" not in cluster.load_writes
        # only the chunk after the 16 stored tokens is new
        assert logs.matching("[req_id=b] Stored 8 out of total 24 tokens")
        cluster.assert_empty()
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# Preemption, aborts, repeated queries, steps without a forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("era", [V0_10, V0_14, NEW], ids=["v0.10", "v0.14", "new"])
def test_preemption_and_resume(logs, era):
    spec = spec_with(era, chunk_size=16)
    spec.num_blocks = 10  # 9 usable blocks of 16 tokens: three 70-token requests cannot all fit
    cluster = Cluster(spec)
    try:
        for index in range(3):
            cluster.add(Req(f"r{index}", [100 * index + j for j in range(40)], max_tokens=30))
        steps = cluster.run()
        preempted = [rid for rid, answers in cluster.scheduler.answers.items() if len(answers) > 1]
        assert preempted, "the scenario must preempt"
        for rid in preempted:
            # re-queried with its outputs appended, and its stored prompt chunks (plus decode chunks)
            # came back from the store
            lines = logs.matching(f"Reqid: {rid}, Total tokens ")
            assert len(lines) >= 2
            total = int(lines[-1].split("Total tokens ")[1].split(",")[0])
            assert total > 40
            assert cluster.scheduler.answers[rid][-1][1] >= 32
            assert cluster.loaded_tokens(rid)[:32] == list(range(32))
        assert all(status.name == "FINISHED_LENGTH_CAPPED" for status in cluster.scheduler.finished.values())
        assert steps > 30
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_repeated_lookup_for_one_request_has_no_side_effects(logs):
    cluster = Cluster(spec_with(chunk_size=8))
    try:
        cluster.add(Req("a", PROMPT, max_tokens=1))
        cluster.run()
        request = Req("b", PROMPT + [5, 6, 7], max_tokens=1)
        answers = [cluster.conn.get_num_new_matched_tokens(request, 0) for _ in range(3)]
        assert answers == [(24, False)] * 3  # 24 is not block-aligned: a sync load
        assert cluster.conn.internal_state_sizes()["pending_lookups"] == 1
        stats_before = cluster.workers[0].engine_stats()
        assert stats_before["retrieve_requests"] == 0  # a lookup never loads
        cluster.add(request)  # the scheduler asks once more, then admits it
        cluster.run()
        assert cluster.scheduler.answers["b"] == [(0, 24, False)]
        assert cluster.loaded_tokens("b") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# Failed loads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
@pytest.mark.parametrize("load_async", [False, True], ids=["sync", "async"])
def test_load_failure_is_reported_and_recomputed(logs, era, load_async):
    cluster = Cluster(spec_with(era, chunk_size=16, enable_async_loading=load_async))
    try:
        prompt = PROMPT + [9] * 13  # 40 tokens: 32 stored
        cluster.add(Req("a", prompt, max_tokens=1))
        cluster.run()

        def evict_before_the_load(output, info):
            if output.kv_connector_metadata.loads:
                for worker in cluster.workers:
                    worker.clear_engine()  # the chunks vanish between the lookup and the load

        cluster.before_workers = evict_before_the_load
        cluster.add(Req("b", prompt, max_tokens=2))
        cluster.run()
        cluster.before_workers = None
        assert logs.matching("Request b failed to load 32 tokens across 2 blocks")
        assert cluster.scheduler.requests == {} and cluster.scheduler.finished["b"].name == "FINISHED_LENGTH_CAPPED"
        # vLLM recomputed b from token 0 (checked bit for bit by the workers) and the store was refilled
        assert logs.matching("[req_id=b] Stored 32 out of total 32 tokens")
        cluster.add(Req("c", prompt, max_tokens=1))
        cluster.run()
        assert cluster.loaded_tokens("c") == list(range(32))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_kv_computed_after_a_failed_sync_load_is_never_stored(logs):
    """b's first 16 tokens were stored by a, then evicted before b's load: the forward of b's other
    tokens in that step read a wrong context, so their KV must not reach the store (a later request
    would load it as if it were right)."""
    cluster = Cluster(spec_with(V0_14, chunk_size=16, enable_async_loading=False))
    try:
        prompt = [8500 + i for i in range(40)]
        cluster.add(Req("a", prompt[:16] + [1], max_tokens=1))
        cluster.run()

        def evict_before_the_load(output, info):
            if output.kv_connector_metadata.loads:
                cluster.workers[0].clear_engine()

        cluster.before_workers = evict_before_the_load
        cluster.add(Req("b", prompt, max_tokens=1))
        cluster.run()
        cluster.before_workers = None
        assert logs.matching("Request b failed to load 16 tokens across 1 blocks")
        cluster.add(Req("c", prompt, max_tokens=1))
        cluster.run()  # the workers check c's loaded context bit for bit
        assert cluster.loaded_tokens("c") == list(range(32))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_partial_load_failure_reports_only_the_missing_blocks(logs):
    cluster = Cluster(spec_with(V0_14, chunk_size=16, enable_async_loading=False))
    try:
        prompt = [8000 + i for i in range(50)]  # 48 stored
        cluster.add(Req("a", prompt, max_tokens=1))
        cluster.run()
        engine = cluster.workers[0].conn._worker.engine
        real_retrieve = engine.retrieve

        def short_retrieve(tokens, slot_mapping=None, first_token_to_write=0, extra_key=b"", **table):
            # the cache only returns the first chunk (as if the rest were evicted mid-way)
            return real_retrieve(tokens[:16], slot_mapping, first_token_to_write, extra_key, **table)

        engine.retrieve = short_retrieve
        cluster.add(Req("b", prompt, max_tokens=1))
        output, merged = cluster.step()
        engine.retrieve = real_retrieve
        blocks = cluster.workers[0].req_blocks["b"]
        assert merged.invalid_block_ids == {blocks[1], blocks[2]}
        assert cluster.scheduler.requests["b"].num_computed_tokens == 16  # truncated to the first bad block
        assert logs.matching("Request b failed to load 32 tokens across 2 blocks")
        cluster.run()
        cluster.assert_empty()
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# Extra keys
# ------------------------------------------------------------------------------------------------
def logged_hit(logs, rid):
    lines = logs.matching(f"Reqid: {rid}, ")
    assert lines, f"no lookup line for {rid}"
    return int(lines[-1].split("LMCache hit tokens: ")[1].split(",")[0])


@pytest.mark.parametrize("field", ["cache_salt", "lora", "mm", "tag"])
def test_extra_keys_separate_caches(logs, field):
    cluster = Cluster(spec_with(chunk_size=8))

    def variant(value):
        if field == "cache_salt":
            return {"cache_salt": value}
        if field == "lora":
            return {"lora_request": LoraRequest(f"adapter-{value}", 1)}  # same int id, other adapter
        if field == "mm":
            # hashes equal in their low 16 bits (LMCache's placeholder rewrite would collide)
            return {"mm_features": [MultiModalFeature(f"{value}0000beef", PlaceholderRange(4, 8))]}
        return {"kv_transfer_params": {f"lmcache.tag.user": value}}

    try:
        cluster.add(Req("stored", PROMPT, max_tokens=1, **variant("aaaa")))
        cluster.run()
        cluster.add(Req("other", PROMPT, max_tokens=1, **variant("bbbb")))
        cluster.add(Req("plain", PROMPT, max_tokens=1))
        cluster.run()
        cluster.add(Req("same", PROMPT, max_tokens=1, **variant("aaaa")))
        cluster.run()
        assert [logged_hit(logs, rid) for rid in ("other", "plain", "same")] == [0, 0, 24]
        assert cluster.loaded_tokens("same") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def test_connector_stats_report_what_moved(logs):
    cluster = Cluster(spec_with(V0_14, chunk_size=8))
    try:
        cluster.add(Req("a", PROMPT, max_tokens=1))
        cluster.run()
        cluster.add(Req("b", PROMPT, max_tokens=1))
        cluster.run()
        totals = {}
        for stats in cluster.stats:
            for key, value in stats.reduce().items():
                totals[key] = totals.get(key, 0) + value
        worker_engine = cluster.workers[0].engine_stats()
        assert totals["stored_tokens"] == worker_engine["stored_tokens"] == 24
        assert totals["stored_bytes"] == worker_engine["stored_bytes"] > 0
        assert totals["loaded_bytes"] == worker_engine["retrieved_bytes"] > 0
        assert totals["loaded_tokens"] == 24 and totals["num_loads"] == 1 and totals["num_load_failures"] == 0
        assert cluster.conn.get_kv_connector_stats().reduce()["num_lookups"] == 2
        cluster.assert_empty()
    finally:
        cluster.shutdown()
