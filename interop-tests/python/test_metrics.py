"""lmc_engine_get_metrics through ``Engine.metrics()``: LMCache's Prometheus metrics, checked with
real Prometheus tooling (promtool, a prometheus server that scrapes them) and against values worked
out here from chunk arithmetic, never read back from the library.
"""

from __future__ import annotations

import torch

from prometheus_helpers import MetricsHttpServer, PrometheusServer, promtool_problems

CHUNK = 16


def _run_requests(rig) -> dict:
    """Stores, lookups, hits and misses; returns what they imply for LMCache's counters."""
    engine = rig.engine
    tokens = rig.tokens(100)
    assert engine.store(tokens, rig.slots(100)) == 96  # 6 whole chunks (no save_unfull_chunk)
    # A prompt sharing 40 tokens with the stored one: 2 whole chunks of it hit.
    shared = torch.cat([tokens[:40], rig.tokens(24)])
    unrelated = rig.tokens(48)
    hits = {"lookup": 0, "retrieve": 0}
    for prompt, want in ((tokens, 96), (shared, 32), (unrelated, 0)):
        assert engine.lookup(prompt) == want
        hits["lookup"] += want
    for prompt, want in ((tokens, 96), (shared, 32), (unrelated, 0)):
        assert engine.retrieve(prompt, rig.slots(len(prompt))) == want
        hits["retrieve"] += want
    prompt_tokens = 100 + 64 + 48
    return {
        "lmcache:num_store_requests_total": 1,
        "lmcache:num_stored_tokens_total": 96,
        "lmcache:num_lookup_requests_total": 3,
        "lmcache:num_lookup_tokens_total": prompt_tokens,
        "lmcache:num_lookup_hits_total": hits["lookup"],
        "lmcache:lookup_0_hit_requests_total": 1,
        "lmcache:num_retrieve_requests_total": 3,
        "lmcache:num_requested_tokens_total": prompt_tokens,
        "lmcache:num_hit_tokens_total": hits["retrieve"],
        "lmcache:retrieve_hit_rate": hits["retrieve"] / prompt_tokens,
        "lmcache:local_cache_usage": 6 * CHUNK * rig.bytes_per_token,
        "lmcache:active_memory_objs_count": 6,
        "lmcache:time_to_lookup_count": 3,
        "lmcache:time_to_retrieve_count": 3,
        "lmcache:retrieve_speed_count": 2,  # LMCache leaves out zero speeds (the miss)
        "lmcache:time_to_store_count": 1,
    }


def _values(engine) -> dict:
    """Sample values by name (this engine's one label set), parsed with prometheus_client."""
    values = {}
    for family in engine.metric_families().values():
        for sample in family.samples:
            if "le" not in sample.labels and "backend" not in sample.labels:
                assert sample.labels == {"model_name": "rig-model", "worker_id": "0", "role": "worker"}, sample
                values[sample.name] = sample.value
    return values


def test_metrics_have_the_values_the_requests_imply(make_rig):
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.01}, model_name="rig-model")
    expected = _run_requests(rig)
    values = _values(rig.engine)
    for name, want in expected.items():
        assert values[name] == want, name


def test_promtool_accepts_the_library_output(make_rig):
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.01}, model_name="rig-model")
    _run_requests(rig)
    text = rig.engine.metrics()
    assert promtool_problems(text) == []


def test_a_prometheus_server_scrapes_the_hit_tokens(make_rig):
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.01}, model_name="rig-model")
    expected = _run_requests(rig)
    with MetricsHttpServer(rig.engine.metrics) as http_server, \
            PrometheusServer(f"127.0.0.1:{http_server.port}") as prometheus:
        result = prometheus.wait_for('lmcache:num_hit_tokens_total{model_name="rig-model"}', deadline_s=30)
        assert len(result) == 1
        sample = result[0]
        assert sample["metric"]["worker_id"] == "0" and sample["metric"]["role"] == "worker"
        assert float(sample["value"][1]) == expected["lmcache:num_hit_tokens_total"] == 128
        # The histograms arrive whole: the scraped count is the number of retrieves.
        count = prometheus.wait_for("lmcache:time_to_retrieve_count", deadline_s=10)
        assert float(count[0]["value"][1]) == 3
        assert http_server.scrapes >= 1
