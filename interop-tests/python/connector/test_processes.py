"""Scheduler and workers in separate processes: lookups over the library's Unix-socket channel (every
rank asked, the minimum taken), metadata pickled to the workers, and a fresh vLLM (new processes)
finding what an earlier one stored on disk or in Redis."""

import os
import time

import pytest

from fakevllm import NEW, V0_14
from sim import Cluster, Req, Spec

PROMPT = [9000 + 5 * i for i in range(45)]


def test_tp2_workers_in_their_own_processes(logs):
    spec = Spec(era=NEW, layout="packed", tp=2, extra_config={"lmcache.chunk_size": 16})
    cluster = Cluster(spec, separate_processes=True)
    try:
        assert cluster.workers[0].process.pid != cluster.workers[1].process.pid
        cluster.add(Req("a", PROMPT, max_tokens=2))
        cluster.run()
        cluster.add(Req("b", PROMPT, max_tokens=1))
        cluster.run()
        # the scheduler process has no engine: both ranks answered over their sockets, in the
        # background (vLLM >= 0.11), so the scheduler was told "ask again" at least once
        assert cluster.scheduler.deferred["b"] >= 1 and cluster.scheduler.answers["b"] == [(0, 32, True)]
        assert logs.matching("Reqid: b, Total tokens 45, Inference Engine computed tokens: 0, LMCache hit tokens: 32")
        for rank in (0, 1):
            for layer in (0, 1):
                assert cluster.loaded_tokens("b", rank=rank, layer=layer) == list(range(32))
        # rank 1 loses its cache: the minimum over the ranks is a miss
        cluster.workers[1].clear_engine()
        cluster.add(Req("c", PROMPT, max_tokens=1))
        cluster.run()
        assert logs.matching("Reqid: c, Total tokens 45, Inference Engine computed tokens: 0, LMCache hit tokens: 0")
        assert "c" not in cluster.load_writes
        cluster.assert_empty()
    finally:
        cluster.shutdown()
    # a scheduler whose workers are gone sees misses, not errors (no server: LMC_E_IO)
    assert cluster.conn._scheduler._lookup(PROMPT, b"") == 0


def test_fresh_vllm_in_new_processes_loads_from_the_disk_store(logs, tmp_path):
    extra = {"lmcache.chunk_size": 16, "lmcache.local_disk": str(tmp_path / "disk"),
             "lmcache.max_local_disk_size": 0.05, "lmcache.save_unfull_chunk": True}
    spec = Spec(era=V0_14, layout="flash_attn_hnd", tp=2, extra_config=extra)
    first = Cluster(spec, separate_processes=True)
    try:
        first.add(Req("a", PROMPT, max_tokens=1))
        first.run()
        first.assert_empty()
    finally:
        first.shutdown()  # flushes the disk tier
    second = Cluster(spec, separate_processes=True)
    try:
        assert second.workers[0].engine_stats()["cached_chunks"] == 0  # nothing in memory yet
        second.add(Req("b", PROMPT, max_tokens=1))
        second.run()
        assert logs.matching("Reqid: b, Total tokens 45, Inference Engine computed tokens: 0, LMCache hit tokens: 45, "
                             "need to load: 44")
        # async (45 == the prompt length): prefetched from disk, then written bit for bit on both ranks
        assert second.scheduler.answers["b"] == [(0, 45, True)]
        for rank in (0, 1):
            assert second.loaded_tokens("b", rank=rank) == list(range(45))
        second.assert_empty()
    finally:
        second.shutdown()


def wait_for_redis_connection(cluster):
    """The library's Redis tier connects in the background after the engine starts; until then every
    lookup is a miss and every write is dropped (reported as an engine issue). vLLM serves its first
    request seconds after start-up; the test waits likewise, until a probe lookup reaches Redis
    without counting a tier error."""
    engine = cluster.workers[0].conn._worker.engine
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        errors = engine.tier_stats()[0]["errors"]
        engine.lookup(list(range(16)))
        if engine.tier_stats()[0]["errors"] == errors:
            return
        time.sleep(0.05)
    raise AssertionError("the Redis tier did not connect within 10 s")


def test_fresh_engine_loads_from_redis(logs, shared_redis_url, unique_model):
    extra = {"lmcache.chunk_size": 16, "lmcache.remote_url": shared_redis_url}
    spec = Spec(era=NEW, layout="blocks_first_hnd", model=unique_model, extra_config=extra)
    first = Cluster(spec)
    wait_for_redis_connection(first)
    try:
        first.add(Req("a", PROMPT, max_tokens=1))
        first.run()
        first.assert_empty()
    finally:
        first.shutdown()  # flushes the remote writes
    second = Cluster(spec)
    wait_for_redis_connection(second)
    try:
        second.add(Req("b", PROMPT, max_tokens=1))
        second.run()
        assert second.scheduler.answers["b"] == [(0, 32, True)]
        assert second.loaded_tokens("b") == list(range(32))
        tiers = second.workers[0].conn._worker.engine.tier_stats()
        assert tiers[0]["name"] == "RemoteBackend" and tiers[0]["hits"] == 2
        second.assert_empty()
    finally:
        second.shutdown()


@pytest.mark.parametrize("role", ["kv_producer", "kv_consumer"])
def test_producer_stores_and_consumer_loads_through_a_shared_disk(logs, tmp_path, role):
    extra = {"lmcache.chunk_size": 16, "lmcache.local_disk": str(tmp_path / "disk"), "lmcache.max_local_disk_size": 0.05}
    producer = Cluster(Spec(era=V0_14, kv_role="kv_producer", extra_config=extra))
    try:
        producer.add(Req("p1", PROMPT, max_tokens=1))
        producer.run()
        producer.add(Req("p2", PROMPT, max_tokens=1))
        producer.run()
        # a producer does not look up (LMCache returns 0 for kv_producer) and stores each time
        assert producer.scheduler.answers["p2"] == [(0, 0, False)]
        assert "p2" not in producer.load_writes
        producer.assert_empty()
    finally:
        producer.shutdown()
    if role == "kv_producer":
        return
    consumer = Cluster(Spec(era=V0_14, kv_role="kv_consumer", extra_config=extra))
    try:
        consumer.add(Req("c", PROMPT, max_tokens=3))
        consumer.add(Req("d", [1, 2, 3] + PROMPT, max_tokens=3))
        consumer.run()
        assert consumer.loaded_tokens("c") == list(range(32))
        stats = consumer.workers[0].engine_stats()
        assert stats["store_requests"] == 0 and stats["stored_tokens"] == 0  # a consumer never stores
        assert consumer.workers[0].conn._worker.engine.tier_stats()[0]["writes"] == 0
        consumer.assert_empty()
    finally:
        consumer.shutdown()


def test_every_rank_is_asked_and_a_silent_one_is_a_miss_after_the_timeout(logs):
    """A TP-2 scheduler with its workers elsewhere: rank 0's engine serves lookups for real (32 tokens
    cached), rank 1's socket accepts and never answers. The lookup takes the minimum over the ranks,
    so it is a miss -- after lookup_timeout_ms, neither a hang nor an exception. With both ranks
    answering it is a hit."""
    import socket

    import torch

    import fakevllm
    from lmcache_native import Engine

    spec = Spec(era=V0_14, tp=2, extra_config={"lmcache.chunk_size": 16, "lmcache.lookup_timeout_ms": 300,
                                               "lmcache_rpc_port": 7})
    fakevllm.install(spec.era)
    from lmcache_native import vllm_connector as vc

    scheduler = fakevllm.create_connector(spec.vllm_config(0), fakevllm.role("SCHEDULER"), spec.kv_cache_config())
    paths = [vc._lookup_socket_path(spec.model, 7, 0, rank) for rank in (0, 1)]
    kv = torch.zeros(2, 8, 16, 2, 8)
    engines = [Engine({"chunk_size": 16}, model_name="elsewhere") for _ in range(2)]
    for engine in engines:
        engine.register_layers([kv], layout="flash_attn")
        engine.store(PROMPT, list(range(len(PROMPT))))
    engines[0].start_lookup_server(paths[0])
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(paths[1])
    hung.listen(4)
    def ask_until_answered(request):
        """vLLM >= 0.11: a cross-process lookup runs in the background; the hook answers None (at
        once, never blocking the scheduler) until it has finished. Asked again like vLLM does."""
        asked = time.monotonic()
        assert scheduler.get_num_new_matched_tokens(request, 0) == (None, False)
        assert time.monotonic() - asked < 0.2  # the scheduler thread does not wait for the sockets
        while True:
            answer = scheduler.get_num_new_matched_tokens(request, 0)
            if answer[0] is not None:
                return answer
            assert time.monotonic() - asked < 5.0, "the background lookup never finished"
            time.sleep(0.01)

    try:
        start = time.monotonic()
        assert ask_until_answered(Req("x", PROMPT)) == (0, False)
        elapsed = time.monotonic() - start
        assert 0.25 <= elapsed < 2.0, elapsed
        assert logs.matching("Reqid: x, Total tokens 45, Inference Engine computed tokens: 0, LMCache hit tokens: 0,")
        hung.close()
        os.unlink(paths[1])
        engines[1].start_lookup_server(paths[1])
        assert ask_until_answered(Req("y", PROMPT)) == (32, True)
        assert logs.matching("Reqid: y, Total tokens 45, Inference Engine computed tokens: 0, LMCache hit tokens: 32,")
        scheduler.request_finished(Req("x", PROMPT), [])
        scheduler.request_finished(Req("y", PROMPT), [])
        assert not any(scheduler.internal_state_sizes().values())
    finally:
        hung.close()
        for engine in engines:
            engine.close()  # stops the servers and removes their sockets
        scheduler.shutdown()
