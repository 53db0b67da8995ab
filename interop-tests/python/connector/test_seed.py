"""The seed scenario: LMCACHE_CHUNK_SIZE=8, vLLM block size 16, one 27-token prompt sent twice."""

import pytest

from fakevllm import ERAS
from sim import Cluster, Req, Spec

PROMPT = [1000 + 7 * i for i in range(27)]


@pytest.mark.parametrize("era", ["v0.10", "v0.14", "new"])
@pytest.mark.parametrize("load_async", [False, True], ids=["sync", "async"])
def test_same_27_token_prompt_twice_loads_only_tokens_16_to_26(monkeypatch, logs, era, load_async):
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "8")
    monkeypatch.setenv("LMCACHE_SAVE_UNFULL_CHUNK", "true")
    monkeypatch.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "true" if load_async else "false")
    layout = "packed" if era == "new" else "flash_attn_nhd"
    cluster = Cluster(Spec(era=ERAS[era], layout=layout, block_size=16, prefix_caching=True))
    try:
        cluster.add(Req("req-1", PROMPT, max_tokens=1))
        cluster.run()
        assert logs.matching("Reqid: req-1, Total tokens 27, Inference Engine computed tokens: 0, "
                             "LMCache hit tokens: 0, need to load: 0")
        assert logs.matching("[req_id=req-1] Stored 27 out of total 27 tokens.")
        assert cluster.load_writes == {}

        cluster.add(Req("req-2", PROMPT, max_tokens=1))
        cluster.run()
        assert logs.matching("Reqid: req-2, Total tokens 27, Inference Engine computed tokens: 16, "
                             "LMCache hit tokens: 27, need to load: 10")
        # vLLM's prefix cache had block 0 (tokens 0-15); the load wrote tokens 16-26 and nothing else
        # (every other slot held guard values during the load), in every layer
        for layer in range(2):
            assert cluster.loaded_tokens("req-2", layer=layer) == list(range(16, 27))
        local, ext, is_async = cluster.scheduler.answers["req-2"][0]
        assert (local, ext, is_async) == ((16, 11, True) if load_async else (16, 10, False))
        assert logs.matching("[req_id=req-2] Retrieved 11 out of 11 required tokens (from 27 total tokens).")
        assert not logs.matching("[req_id=req-2] Stored")  # nothing new to store
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_seed_scenario_with_the_worker_in_its_own_process(monkeypatch, logs):
    """TP 1 with vLLM's multiprocess executor: the scheduler's lookups cross to the worker's engine
    over the lookup socket; the metadata travels pickled inside the scheduler output."""
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "8")
    monkeypatch.setenv("LMCACHE_SAVE_UNFULL_CHUNK", "true")
    cluster = Cluster(Spec(era=ERAS["new"], layout="packed", block_size=16, prefix_caching=True),
                      separate_processes=True)
    try:
        cluster.add(Req("req-1", PROMPT, max_tokens=1))
        cluster.run()
        cluster.add(Req("req-2", PROMPT, max_tokens=1))
        cluster.run()
        assert logs.matching("Reqid: req-2, Total tokens 27, Inference Engine computed tokens: 16, "
                             "LMCache hit tokens: 27, need to load: 10")
        assert cluster.loaded_tokens("req-2", layer=0) == list(range(16, 27))
        assert cluster.loaded_tokens("req-2", layer=1) == list(range(16, 27))
        cluster.assert_empty()
    finally:
        cluster.shutdown()
