"""Every KV layout in the interface eras that have it: a prompt stored over chunked prefill steps, then a
second prompt sharing part of it hits, loads exactly the shared tokens bit for bit (the workers check
every context token before each forward, and every slot outside the load's own held a guard value
during the load), and computes the rest."""

import pytest

from fakevllm import NEW, V0_10, V0_14
from sim import Cluster, Req, Spec

CHUNK = 16
PROMPT_A = [3000 + 11 * i for i in range(40)]  # 2 full chunks + 8 tokens
PROMPT_B = PROMPT_A[:32] + [5] * 9  # shares the two full chunks


LIBRARY_LAYOUT = {"flash_attn_nhd": "flash_attn", "flash_attn_hnd": "flash_attn", "blocks_first_nhd": "blocks_first",
                  "blocks_first_hnd": "blocks_first", "packed": "packed", "packed_nhd": "packed",
                  "cpu_sdpa": "cpu_sdpa", "mla": "mla", "mla_padded": "mla", "mla4": "mla"}


def scenario(spec: Spec, logs, *, async_loads=True, extra=None):
    spec.extra_config = {"lmcache.chunk_size": CHUNK, "lmcache.enable_async_loading": async_loads, **(extra or {})}
    spec.budget = 24  # chunked prefill: prompt A takes two steps
    cluster = Cluster(spec)
    try:
        # the layout was derived from shapes and strides, not assumed
        assert logs.matching(f"registered ({LIBRARY_LAYOUT[spec.layout]})")
        cluster.add(Req("a", PROMPT_A, max_tokens=3))
        cluster.run()
        # the first step computed 24 tokens: 16 (one chunk) stored; the last prefill step stored the
        # second chunk; the 8-token tail is not (save_unfull_chunk is off)
        assert logs.matching("[req_id=a] Stored 16 out of total 16 tokens.")
        assert logs.matching("[req_id=a] Stored 16 out of total 32 tokens.")
        cluster.add(Req("b", PROMPT_B, max_tokens=2))
        cluster.run()
        assert logs.matching("Reqid: b, Total tokens 41, Inference Engine computed tokens: 0, LMCache hit tokens: 32, "
                             "need to load: 32")
        for rank in range(spec.tp):
            for layer in range(spec.num_layers - (1 if spec.share_last_layer else 0)):
                assert cluster.loaded_tokens("b", rank=rank, layer=layer) == list(range(32)), (rank, layer)
        assert cluster.scheduler.answers["b"] == [(0, 32, async_loads)]
        cluster.assert_empty()
    finally:
        cluster.shutdown()
    return cluster


ERA_LAYOUTS = [
    (V0_10, "flash_attn_nhd"), (V0_10, "flash_attn_hnd"), (V0_10, "mla"), (V0_10, "cpu_sdpa"),
    (V0_14, "flash_attn_nhd"), (V0_14, "flash_attn_hnd"), (V0_14, "blocks_first_nhd"), (V0_14, "blocks_first_hnd"),
    (V0_14, "cpu_sdpa"), (V0_14, "mla"), (V0_14, "mla_padded"),
    (NEW, "blocks_first_nhd"), (NEW, "packed"), (NEW, "packed_nhd"), (NEW, "mla4"),
]


@pytest.mark.parametrize("era,layout", ERA_LAYOUTS, ids=[f"{'.'.join(map(str, e))}-{l}" for e, l in ERA_LAYOUTS])
def test_layout_partial_prefix_hit_is_bit_exact(logs, era, layout):
    scenario(Spec(era=era, layout=layout), logs, async_loads=(layout != "cpu_sdpa"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_and_tp2_in_one_process(logs, dtype):
    scenario(Spec(era=V0_14, layout="flash_attn_hnd", dtype=dtype, tp=2), logs)


def test_kernel_blocks_smaller_than_vllm_blocks_and_shared_layers_and_cuda_graph_decode(logs):
    # kernel block of 8 tokens under vLLM's 16; the last layer shares the first one's KV tensor
    # (stored once); pure-decode steps skip the per-layer hooks as under FULL CUDA graphs
    spec = Spec(era=NEW, layout="blocks_first_hnd", kernel_split=2, num_layers=3, share_last_layer=True,
                cudagraph_decode=True)
    scenario(spec, logs)
    assert logs.matching("2 layer(s) registered (blocks_first)")


def test_fp16_and_bf16_caches_never_share_keys(logs, tmp_path):
    """Same element size, different dtype, one disk store: the namespace keeps them apart."""
    disk = {"lmcache.local_disk": str(tmp_path), "lmcache.max_local_disk_size": 0.05}
    scenario(Spec(era=V0_14, dtype="float16"), logs, extra=disk)
    hits = {}
    for dtype in ("float16", "bfloat16"):
        cluster = Cluster(Spec(era=V0_14, dtype=dtype, extra_config={"lmcache.chunk_size": CHUNK, **disk}))
        try:
            hits[dtype] = cluster.workers[0].conn._worker.engine.lookup(PROMPT_A)
        finally:
            cluster.shutdown()
    assert hits == {"float16": 32, "bfloat16": 0}


def test_a_restart_with_another_layout_and_block_size_still_hits_bit_exact(logs, tmp_path):
    """Stored chunks are token-major in the library, independent of vLLM's layout: a vLLM restarted
    on another backend (FlashAttention NHD, block 16 -> 2026 packed, block 32 in kernel blocks of 16)
    loads what the first one stored, bit for bit."""
    disk = {"lmcache.chunk_size": CHUNK, "lmcache.local_disk": str(tmp_path), "lmcache.max_local_disk_size": 0.05}
    first = Cluster(Spec(era=V0_14, layout="flash_attn_nhd", block_size=16, extra_config=disk))
    try:
        first.add(Req("a", PROMPT_A, max_tokens=1))
        first.run()
        first.assert_empty()
    finally:
        first.shutdown()
    second = Cluster(Spec(era=NEW, layout="packed", block_size=32, kernel_split=2, num_blocks=24, extra_config=disk))
    try:
        second.add(Req("b", PROMPT_B, max_tokens=1))
        second.run()
        assert second.scheduler.answers["b"] == [(0, 32, True)]
        assert second.loaded_tokens("b", layer=0) == list(range(32))
        assert second.loaded_tokens("b", layer=1) == list(range(32))
        second.assert_empty()
    finally:
        second.shutdown()
