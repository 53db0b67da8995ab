"""Lookups that may block (a remote tier, or ranks in other processes) run on the connector's lookup
pool on vLLM >= 0.11: get_num_new_matched_tokens answers (None, False) until the lookup has finished
and the scheduler asks again in a later step (docs/vllm-connector.md, conformance points 7 and 8). Here the
"remote tier" is a stand-in: the scheduler-side connector is told a remote_url is configured and its
lookup is held at a gate, so the tests decide when the slow lookup finishes."""

import threading
import time

import pytest

from fakevllm import NEW, V0_10, V0_14
from sim import Cluster, Req, RequestStatus, Spec

PROMPT = [2000 + 13 * i for i in range(27)]


def spec_with(era=V0_14, **config):
    return Spec(era=era, extra_config={f"lmcache.{key}": value for key, value in config.items()})


class SlowLookup:
    """Makes the scheduler's lookups remote-tier-like: a remote_url is configured and every lookup
    waits for ``gate`` (or sleeps ``delay`` seconds) before asking the engines."""

    def __init__(self, cluster, monkeypatch, delay: float = 0.0, gated: bool = True):
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.delay = delay
        self.threads: list = []
        conn = cluster.conn
        real = conn._scheduler._lookup

        def slow(tokens, extra_key):
            self.threads.append(threading.current_thread().name)
            assert self.gate.wait(20), "the test never opened the gate"
            time.sleep(self.delay)
            return real(tokens, extra_key)

        monkeypatch.setattr(conn._scheduler, "_lookup", slow)
        monkeypatch.setitem(conn._scheduler._engine_config, "remote_url", "redis://stand-in:6379")

    @property
    def calls(self) -> int:
        return len(self.threads)


def store_prompt(cluster):
    cluster.add(Req("a", PROMPT, max_tokens=1))
    cluster.run()


@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
@pytest.mark.parametrize("load_async", [False, True], ids=["sync", "async"])
def test_slow_lookup_answers_none_then_the_hit(logs, monkeypatch, era, load_async):
    cluster = Cluster(spec_with(era, chunk_size=8, save_unfull_chunk=True, enable_async_loading=load_async))
    try:
        store_prompt(cluster)
        slow = SlowLookup(cluster, monkeypatch)
        request = cluster.add(Req("again", PROMPT, max_tokens=2))
        cluster.step()
        cluster.step()
        # still looking: the request stays waiting, asked again in each step, one lookup only
        assert cluster.scheduler.deferred["again"] == 2 and not cluster.scheduler.answers["again"]
        assert request in cluster.scheduler.waiting and not request.block_ids
        assert slow.calls == 1 and slow.threads[0].startswith("lmcn-lookup")
        assert cluster.conn.internal_state_sizes()["pending_lookups"] == 0
        future = cluster.conn._scheduler._background_lookups["again"].future
        slow.gate.set()
        assert future.result(timeout=20) == 27
        cluster.run()
        assert slow.calls == 1
        assert logs.matching("Reqid: again, Total tokens 27, Inference Engine computed tokens: 0, LMCache hit "
                             "tokens: 27, need to load: 26")
        assert cluster.scheduler.answers["again"] == [(0, 27, True) if load_async else (0, 26, False)]
        assert cluster.loaded_tokens("again", layer=0) == list(range(27))
        assert cluster.loaded_tokens("again", layer=1) == list(range(27))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_sleeping_lookup_is_picked_up_in_a_later_step(logs, monkeypatch):
    """An ordinary slow lookup (a sleep, no gate): the scheduler keeps stepping until it is there."""
    cluster = Cluster(spec_with(chunk_size=8))
    try:
        store_prompt(cluster)
        slow = SlowLookup(cluster, monkeypatch, delay=0.2, gated=False)
        cluster.add(Req("b", PROMPT + [5, 6, 7], max_tokens=1))
        for _ in range(2000):
            if not cluster.scheduler.has_work():
                break
            cluster.step()
            time.sleep(0.005)
        assert not cluster.scheduler.has_work()
        assert cluster.scheduler.deferred["b"] >= 1 and slow.calls == 1
        assert cluster.scheduler.answers["b"] == [(0, 24, False)]
        assert cluster.loaded_tokens("b") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_repeated_calls_while_pending_start_one_lookup(logs, monkeypatch):
    cluster = Cluster(spec_with(chunk_size=8))
    try:
        store_prompt(cluster)
        slow = SlowLookup(cluster, monkeypatch)
        conn = cluster.conn
        request = Req("b", PROMPT + [5, 6, 7], max_tokens=1)
        assert [conn.get_num_new_matched_tokens(request, 0) for _ in range(3)] == [(None, False)] * 3
        assert slow.calls == 1
        assert conn.internal_state_sizes()["background_lookups"] == 1
        assert conn.internal_state_sizes()["pending_lookups"] == 0
        slow.gate.set()
        conn._scheduler._background_lookups["b"].future.result(timeout=20)
        # finished: the same answer every time, from the one lookup, with no side effects
        assert [conn.get_num_new_matched_tokens(request, 0) for _ in range(3)] == [(24, False)] * 3
        assert slow.calls == 1
        assert cluster.workers[0].engine_stats()["retrieve_requests"] == 0
        cluster.add(request)  # the scheduler asks once more (still the same lookup), then admits it
        cluster.run()
        assert slow.calls == 1
        assert cluster.scheduler.answers["b"] == [(0, 24, False)]
        assert cluster.loaded_tokens("b") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_changed_request_starts_a_new_lookup(logs, monkeypatch):
    """A request asked about again with other tokens (or extra key) does not reuse the old lookup."""
    cluster = Cluster(spec_with(chunk_size=8))
    try:
        store_prompt(cluster)
        slow = SlowLookup(cluster, monkeypatch, gated=False)
        conn = cluster.conn
        first = Req("b", [1, 2, 3] + PROMPT, max_tokens=1)
        assert conn.get_num_new_matched_tokens(first, 0) == (None, False)
        conn._scheduler._background_lookups["b"].future.result(timeout=20)
        second = Req("b", PROMPT + [5, 6, 7], max_tokens=1)
        assert conn.get_num_new_matched_tokens(second, 0) == (None, False)
        conn._scheduler._background_lookups["b"].future.result(timeout=20)
        assert conn.get_num_new_matched_tokens(second, 0) == (24, False)
        assert slow.calls == 2
        cluster.add(second)
        cluster.run()
        assert cluster.loaded_tokens("b") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("started", [True, False], ids=["running", "queued"])
def test_abort_while_the_lookup_is_pending_leaves_nothing(logs, monkeypatch, started):
    cluster = Cluster(spec_with(chunk_size=8))
    slow = None
    try:
        store_prompt(cluster)
        slow = SlowLookup(cluster, monkeypatch)
        conn = cluster.conn
        blockers = []
        if not started:  # every pool thread busy: b's lookup waits in the queue
            from lmcache_native import vllm_connector
            for index in range(vllm_connector._LOOKUP_POOL_THREADS):
                blocker = Req(f"x{index}", PROMPT, max_tokens=1)
                assert conn.get_num_new_matched_tokens(blocker, 0) == (None, False)
                blockers.append(blocker)
        cluster.add(Req("b", PROMPT + [5, 6, 7], max_tokens=1))
        cluster.step()
        assert cluster.scheduler.deferred["b"] == 1
        future = conn._scheduler._background_lookups["b"].future
        cluster.scheduler.abort("b")
        for blocker in blockers:  # vLLM calls request_finished for these too
            conn.request_finished(blocker, [])
        assert conn.internal_state_sizes()["background_lookups"] == 0
        if not started:
            assert future.cancelled()  # never ran
        slow.gate.set()
        if started:
            assert future.result(timeout=20) == 24  # ran to its end; the result went nowhere
        cluster.run()
        assert "b" not in cluster.load_writes and not cluster.scheduler.answers["b"]
        assert cluster.scheduler.finished["b"] == RequestStatus.FINISHED_ABORTED
        cluster.assert_empty()
    finally:
        if slow is not None:
            slow.gate.set()
        cluster.shutdown()


def test_shutdown_forgets_pending_lookups(logs, monkeypatch):
    cluster = Cluster(spec_with(chunk_size=8))
    slow = SlowLookup(cluster, monkeypatch)
    try:
        cluster.add(Req("b", PROMPT, max_tokens=1))
        cluster.step()
        assert cluster.scheduler.deferred["b"] == 1
        future = cluster.conn._scheduler._background_lookups["b"].future
        cluster.conn.shutdown()
        assert cluster.conn.internal_state_sizes()["background_lookups"] == 0
        assert cluster.conn._scheduler._lookup_pool is None
        # after shutdown the connector looks up synchronously (and its engines are gone: a miss)
        slow.gate.set()
        future.result(timeout=20)
        assert cluster.conn.get_num_new_matched_tokens(Req("c", PROMPT, max_tokens=1), 0) == (0, False)
        assert not cluster.conn._scheduler._background_lookups
    finally:
        slow.gate.set()
        cluster.shutdown()


def test_era_0_10_never_answers_none(logs, monkeypatch):
    cluster = Cluster(spec_with(V0_10, chunk_size=8))
    try:
        store_prompt(cluster)
        slow = SlowLookup(cluster, monkeypatch, delay=0.05, gated=False)
        cluster.add(Req("b", PROMPT + [5, 6, 7], max_tokens=1))
        cluster.run()
        assert cluster.scheduler.deferred["b"] == 0
        assert cluster.scheduler.answers["b"] == [(0, 24, False)]
        assert slow.threads == ["MainThread"]  # on the scheduler's thread, no pool
        assert cluster.conn._scheduler._lookup_pool is None
        assert cluster.loaded_tokens("b") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_local_lookups_without_a_remote_tier_stay_synchronous(logs, monkeypatch, era):
    cluster = Cluster(spec_with(era, chunk_size=8))
    try:
        store_prompt(cluster)
        threads = []
        real = cluster.conn._scheduler._lookup

        def recording(tokens, extra_key):
            threads.append(threading.current_thread().name)
            return real(tokens, extra_key)

        monkeypatch.setattr(cluster.conn._scheduler, "_lookup", recording)
        cluster.add(Req("b", PROMPT + [5, 6, 7], max_tokens=1))
        cluster.run()
        assert cluster.scheduler.deferred["b"] == 0 and cluster.scheduler.answers["b"] == [(0, 24, False)]
        assert threads == ["MainThread"] and cluster.conn._scheduler._lookup_pool is None
        cluster.assert_empty()
    finally:
        cluster.shutdown()
