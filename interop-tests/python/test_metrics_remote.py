"""LMCache's remote metrics from the Redis tier: reads, writes, bytes and their times, worked out
from the chunks the test stores and retrieves."""

from __future__ import annotations

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
