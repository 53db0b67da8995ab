"""LMCache's Prometheus metrics through the connector, as vLLM's /metrics shows them.

A vLLM instance with TP 2, each worker in its own process (as vLLM runs them), runs in a child
interpreter with PROMETHEUS_MULTIPROC_DIR set (prometheus_client picks multiprocess mode at import,
so the mode cannot be switched inside this test process). The test then reads the directory the way
vLLM's /metrics does (prometheus_client's MultiProcessCollector) and checks the result with promtool,
with a prometheus server scraping it, and against values worked out from the requests: every rank
and the scheduler appear with their labels.

vLLM's own per-connector metrics (build_prom_metrics) are checked in this process with the stats
reports the stand-in vLLM collected.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import fakevllm
from sim import Cluster, Req, Spec

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent.parent
sys.path.insert(0, str(TESTS))
from prometheus_helpers import MetricsHttpServer, PrometheusServer, promtool_problems  # noqa: E402

PROMPT = [2000 + 13 * i for i in range(27)]
EXTRA = {"lmcache.chunk_size": 8, "lmcache.save_unfull_chunk": True, "lmcache.enable_async_loading": False}

CHILD = """
    import json, sys
    import fakevllm
    from sim import Cluster, Req, Spec
    spec = Spec(era=fakevllm.V0_14, tp=2, extra_config=json.loads(sys.argv[1]))
    cluster = Cluster(spec, separate_processes=True)
    try:
        cluster.add(Req("first", json.loads(sys.argv[2]), max_tokens=1))
        cluster.run()
        cluster.add(Req("again", json.loads(sys.argv[2]), max_tokens=2))
        cluster.run()
        answers = {rid: list(map(list, a)) for rid, a in cluster.scheduler.answers.items()}
    finally:
        cluster.shutdown()
    print(json.dumps({"answers": answers}))
"""


def _run_cluster_with_multiproc_dir(directory: Path) -> dict:
    env = dict(os.environ)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(TESTS), str(REPO / "python-demo")])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), json.dumps(EXTRA), json.dumps(PROMPT)],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-5000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _multiprocess_text(directory: Path) -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return generate_latest(registry).decode("utf-8")


def _series(text: str) -> dict:
    """(sample name, frozenset of labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_rank_and_the_scheduler_reach_the_multiprocess_metrics(tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    child = _run_cluster_with_multiproc_dir(directory)
    # The second request found the whole 27-token prompt (three chunks of 8 and the stored partial
    # one) and vLLM loads 26 of them, recomputing the last (sync load).
    assert child["answers"]["again"] == [[0, 26, False]]
    text = _multiprocess_text(directory)
    assert promtool_problems(text) == []
    series = _series(text)
    model = "fake/model"

    def value(name, worker_id, role, **extra):
        labels = frozenset({"model_name": model, "worker_id": str(worker_id), "role": role, **extra}.items())
        assert (name, labels) in series, f"no {name} for {role} {worker_id} {extra}"
        return series[(name, labels)]

    for rank in (0, 1):
        # Each rank stored the prompt once: 27 tokens (save_unfull_chunk), and retrieved it once:
        # a 27-token request whose cached prefix is all 27 tokens.
        assert value("lmcache:num_store_requests_total", rank, "worker") == 1
        assert value("lmcache:num_stored_tokens_total", rank, "worker") == 27
        assert value("lmcache:num_retrieve_requests_total", rank, "worker") == 1
        assert value("lmcache:num_hit_tokens_total", rank, "worker") == 27
        assert value("lmcache:local_cpu_cached_chunks", rank, "worker") == 4
        assert value("lmcache:time_to_retrieve_count", rank, "worker") == 1
        assert value("lmcache:time_to_retrieve_bucket", rank, "worker", le="+Inf") == 1
        assert value("lmcache:num_retrieve_hit_chunks_total", rank, "worker", backend="LocalCPUBackend") == 4
    # The scheduler asks rank 0 first and stops at a miss: "first" reached rank 0 only, "again" both.
    assert value("lmcache:num_lookup_requests_total", 0, "worker") == 2
    assert value("lmcache:num_lookup_requests_total", 1, "worker") == 1
    assert value("lmcache:num_lookup_hits_total", 0, "worker") == 27
    assert value("lmcache:lookup_0_hit_requests_total", 0, "worker") == 1
    # The scheduler: two prompts of 27 tokens, no prefix caching in vLLM, two lookups.
    assert value("lmcache:num_prompt_tokens_total", 0, "scheduler") == 54
    assert value("lmcache:num_vllm_hit_tokens_total", 0, "scheduler") == 0
    assert value("lmcache:time_to_lookup_count", 0, "scheduler") == 2
    assert value("lmcache:num_lookup_failures_total", 0, "scheduler") == 0

    # And a prometheus server scraping that output sees both ranks' hits.
    with MetricsHttpServer(lambda: text) as http_server, PrometheusServer(f"127.0.0.1:{http_server.port}") as prom:
        result = prom.wait_for('sum(lmcache:num_hit_tokens_total{role="worker"})', deadline_s=30)
        assert float(result[0]["value"][1]) == 2 * 27


def test_vllms_connector_prom_metrics_count_the_stats_reports():
    """build_prom_metrics: vLLM hands the connector its metric classes and labels per engine, then
    feeds it every stats report; the counters add up to what the requests did."""
    cluster = Cluster(Spec(era=fakevllm.V0_14, tp=1, extra_config=dict(EXTRA)))
    try:
        cluster.add(Req("first", PROMPT, max_tokens=1))
        cluster.run()
        cluster.add(Req("again", PROMPT, max_tokens=2))
        cluster.run()
    finally:
        cluster.shutdown()
    registry = CollectorRegistry()
    metric_types = {cls: functools.partial(cls, registry=registry)
                    for cls in (prometheus_client.Gauge, prometheus_client.Counter, prometheus_client.Histogram)}
    connector_cls = type(cluster.conn)
    prom = connector_cls.build_prom_metrics(cluster.spec.vllm_config(0), metric_types, ["model_name", "engine"],
                                            {0: ["fake/model", "0"]})
    assert prom is not None
    for stats in cluster.stats:
        prom.observe(stats.data, 0)
    labels = {"model_name": "fake/model", "engine": "0"}
    assert registry.get_sample_value("vllm:lmcache_native_stores_total", labels) == 1
    assert registry.get_sample_value("vllm:lmcache_native_stored_tokens_total", labels) == 27
    assert registry.get_sample_value("vllm:lmcache_native_loads_total", labels) == 1
    # vLLM treats 26 tokens as loaded and recomputes the last, but the load writes the whole cached
    # prefix into the request's slots, 27 tokens, as LMCache does (the 27th is recomputed identically).
    assert registry.get_sample_value("vllm:lmcache_native_loaded_tokens_total", labels) == 27
    assert registry.get_sample_value("vllm:lmcache_native_load_failures_total", labels) == 0
    assert promtool_problems(generate_latest(registry).decode()) == []


def test_the_connector_works_without_prometheus_client():
    """prometheus_client is optional: without it the connector serves requests and publishes nothing."""
    code = """
        import sys
        sys.modules["prometheus_client"] = None  # import prometheus_client now raises ImportError
        import fakevllm
        from sim import Cluster, Req, Spec
        from lmcache_native import _prometheus
        assert not _prometheus.available()
        cluster = Cluster(Spec(era=fakevllm.V0_14, tp=1, extra_config=%r))
        try:
            cluster.add(Req("first", %r, max_tokens=1))
            cluster.run()
            cluster.add(Req("again", %r, max_tokens=2))
            cluster.run()
            print("LOADED", cluster.loaded_tokens("again")[-1] + 1)
        finally:
            cluster.shutdown()
    """ % (EXTRA, PROMPT, PROMPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(TESTS), str(REPO / "python-demo")])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED 27" in result.stdout
