"""LMCache's remote metrics from the Redis tier: reads, writes, bytes and their times, worked out
from the chunks the test stores and retrieves."""

from __future__ import annotations

import signal
import time
import urllib.parse

import tier_scenario as ts
from prometheus_helpers import promtool_problems

CHUNK = 16


def _values(engine) -> dict:
    return {(sample.name, sample.labels.get("backend")): sample.value
            for family in engine.metric_families().values() for sample in family.samples if "le" not in sample.labels}


def test_remote_counters_follow_the_chunks_written_and_read(make_rig, shared_redis_url, unique_model):
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.05, "remote_url": shared_redis_url},
                   model_name=unique_model)
    engine = rig.engine
    ts.wait_for_remote(engine)
    tokens = rig.tokens(100)
    assert engine.store(tokens, rig.slots(100)) == 96  # 6 chunks, written down in the background
    engine.flush(30)
    engine.clear()  # the CPU copy goes: the retrieve reads all 6 from Redis, in one batch
    assert engine.retrieve(tokens, rig.slots(100)) == 96
    chunk_bytes = CHUNK * rig.bytes_per_token
    values = _values(engine)
    assert values[("lmcache:num_remote_write_requests_total", None)] == 6
    assert values[("lmcache:num_remote_write_bytes_total", None)] == 6 * chunk_bytes
    assert values[("lmcache:num_remote_read_requests_total", None)] == 6
    assert values[("lmcache:num_remote_read_bytes_total", None)] == 6 * chunk_bytes
    assert values[("lmcache:remote_time_to_put_count", None)] == 6
    assert values[("lmcache:remote_time_to_get_count", None)] == 1
    assert values[("lmcache:num_retrieve_hit_chunks_total", "RemoteBackend")] == 6
    assert values[("lmcache:tier_read_hits_total", "RemoteBackend")] == 6
    assert values[("lmcache:remote_put_task_num", None)] == 0
    assert values[("lmcache:put_failed_count", None)] == 0
    assert promtool_problems(engine.metrics()) == []


def _samples(engine) -> list:
    return [sample for family in engine.metric_families().values() for sample in family.samples]


def _one(samples, name: str, **labels) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0]


def test_remote_pings_and_per_node_metrics(make_rig, shared_redis_url, unique_model):
    """The tier pings the server in the background (LMCache's ping_interval key, here 100 ms): the
    ping metrics count successes with code 0; the per-node families carry tier_nodes()'s values."""
    rig = make_rig({"chunk_size": CHUNK, "max_local_cpu_size": 0.05, "remote_url": shared_redis_url,
                    "extra_config": {"ping_interval": 0.1}}, model_name=unique_model)
    engine = rig.engine
    ts.wait_for_remote(engine)
    deadline = time.monotonic() + 10
    while _one(_samples(engine), "lmcache:remote_ping_successes_total") < 3:
        assert time.monotonic() < deadline, "no three successful pings in 10 s"
        time.sleep(0.05)
    tokens = rig.tokens(64)
    assert engine.store(tokens, rig.slots(64)) == 64
    engine.flush(30)
    engine.clear()
    assert engine.retrieve(tokens, rig.slots(64)) == 64

    text = engine.metrics()
    samples = _samples(engine)
    nodes = engine.tier_nodes([t["name"] for t in engine.tier_stats()].index("RemoteBackend"))
    assert _one(samples, "lmcache:remote_ping_successes_total") >= 3
    assert _one(samples, "lmcache:remote_ping_errors_total") == 0
    assert _one(samples, "lmcache:remote_ping_error_code") == 0
    assert _one(samples, "lmcache:remote_ping_latency") > 0
    assert _one(samples, "lmcache:lmcache_is_healthy") == 1

    port = urllib.parse.urlsplit(shared_redis_url).port
    server = [n for n in nodes if n["endpoint"].endswith(f":{port}")]
    assert len(server) == 1 and server[0]["role"] == "master" and server[0]["connected"], nodes
    assert server[0]["bytes_written"] == 4 * CHUNK * rig.bytes_per_token == server[0]["bytes_read"]
    for node in nodes:
        labels = {"backend": "RemoteBackend", "node": node["endpoint"], "node_role": node["role"]}
        assert _one(samples, "lmcache:remote_node_read_bytes_total", **labels) == node["bytes_read"]
        assert _one(samples, "lmcache:remote_node_written_bytes_total", **labels) == node["bytes_written"]
        assert _one(samples, "lmcache:remote_node_errors_total", **labels) == node["errors"]
        assert _one(samples, "lmcache:remote_node_reconnects_total", **labels) == node["reconnects"]
        assert _one(samples, "lmcache:remote_node_redirects_total", **labels) == node["redirects"]
        assert _one(samples, "lmcache:remote_node_connected", **labels) == (1 if node["connected"] else 0)
    assert promtool_problems(text) == []


def test_a_killed_server_fails_the_pings_and_the_health(make_rig, private_redis):
    """After SIGKILL of the server the pings fail: the error counter grows, the error code is
    LMCache's -1 (timeout) or -2 (other failure) and lmcache_is_healthy drops to 0, with no request made."""
    rig = make_rig({"chunk_size": CHUNK, "remote_url": private_redis.url, "blocking_timeout_secs": 1,
                    "extra_config": {"ping_interval": 0.1, "ping_timeout": 1}})
    engine = rig.engine
    ts.wait_for_remote(engine)
    deadline = time.monotonic() + 10
    while _one(_samples(engine), "lmcache:remote_ping_successes_total") < 1:
        assert time.monotonic() < deadline, "no successful ping in 10 s"
        time.sleep(0.05)
    assert _one(_samples(engine), "lmcache:lmcache_is_healthy") == 1
    private_redis.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _one(_samples(engine), "lmcache:remote_ping_errors_total") < 2:
        assert time.monotonic() < deadline, "no two failed pings in 10 s"
        time.sleep(0.05)
    samples = _samples(engine)
    assert _one(samples, "lmcache:remote_ping_error_code") in (-1, -2)
    assert _one(samples, "lmcache:lmcache_is_healthy") == 0
    assert promtool_problems(engine.metrics()) == []
