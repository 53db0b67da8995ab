"""Loads and saves as the library's jobs (issue "one request path"): asynchronous loads reported only
once their job has completed, asynchronous saves holding the request's blocks through vLLM's
request_finished / finished_sending protocol, and the fences before vLLM reuses blocks (abort,
preemption). Jobs are held by the tests: a held load writes nothing until it is released (its real
retrieve then runs when the connector polls it), a held store has copied at once but reports done
only when released -- or when the connector waits for it, which is what a fence does."""

import inspect

import pytest

from fakevllm import NEW, V0_10, V0_14
from sim import Cluster, Req, RequestStatus, Spec

PROMPT = [2000 + 13 * i for i in range(27)]
FENCING_CALLS = ("handle_preemptions", "get_finished", "wait_for_save", "start_load_kv", "shutdown")


def spec_with(era=V0_14, **config):
    return Spec(era=era, extra_config={f"lmcache.{key}": value for key, value in config.items()})


def _connector_caller() -> str:
    for frame in inspect.stack()[2:]:
        if frame.function in FENCING_CALLS:
            return frame.function
    return "?"


class HeldJob:
    """A job still running until ``release`` (or until somebody waits for it)."""

    def __init__(self, kind, start):
        self.kind, self._start = kind, start
        self.job = None
        self.held = True
        self.closed = False
        self.waited_in: list = []  # connector calls that waited for it while it was held
        if kind == "store":  # a store reads the blocks now, while they hold this request's KV
            self._run().wait(30)

    def _run(self):
        if self.job is None:
            self.job = self._start()
        return self.job

    def release(self):
        self.held = False

    def done(self):
        return not self.held and self._run().done()

    def result(self):
        assert not self.held, "the result of a held job was read"
        return self._run().result()

    def wait(self, timeout_s=None):
        if self.held:
            self.waited_in.append(_connector_caller())
            self.held = False  # waiting lasts until the job is done
        return self._run().wait(timeout_s)

    def close(self):
        self.closed = True
        if self.job is not None:
            self.job.close()


class FailedJob:
    """A job that failed (e.g. the remote tier broke while reading)."""

    held = False

    def __init__(self):
        self.closed = False

    def done(self):
        return True

    def result(self):
        raise RuntimeError("the remote tier failed while reading")

    wait = lambda self, timeout_s=None: self.result()  # noqa: E731

    def close(self):
        self.closed = True


def hold(worker, kind: str) -> list:
    """Every later job of this kind ("load" or "store") on the worker's engine is held."""
    engine = worker.conn._worker.engine
    name = "retrieve_async" if kind == "load" else "store_async"
    real = getattr(engine, name)
    held = []

    def start(tokens, *args, **kwargs):
        held.append(HeldJob(kind, lambda: real(tokens, *args, **kwargs)))
        blocks = list(kwargs.get("block_ids") or ())
        held[-1].request_id = next((rid for rid, owned in worker.req_blocks.items()
                                    if blocks and owned[:len(blocks)] == blocks), None)
        return held[-1]

    setattr(engine, name, start)
    return held


def store_prompt(cluster, prompt=PROMPT + [1] * 5):
    cluster.add(Req("a", prompt, max_tokens=1))
    cluster.run()


# ------------------------------------------------------------------------------------------------
# Asynchronous loads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_a_load_job_running_over_several_steps_is_reported_once_done(logs, era):
    cluster = Cluster(spec_with(era, chunk_size=16))
    try:
        store_prompt(cluster)
        held = hold(cluster.workers[0], "load")
        request = cluster.add(Req("b", PROMPT + [1] * 5, max_tokens=2))
        for _ in range(4):  # b waits for its KV; nothing else runs: steps without a forward pass
            output, merged = cluster.step()
            assert output.total_num_scheduled_tokens == 0 and not merged.finished_recving
        assert len(held) == 1 and held[0].job is None  # started in start_load_kv, not yet run
        assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS and "b" not in cluster.load_writes
        assert cluster.workers[0].state()["async_loads"] == 1
        held[0].release()
        _, merged = cluster.step()
        assert merged.finished_recving == {"b"} and held[0].closed
        cluster.run()  # the workers check b's context bit for bit before its forward
        assert cluster.loaded_tokens("b", layer=0) == list(range(32))
        assert cluster.loaded_tokens("b", layer=1) == list(range(32))
        assert logs.matching("[req_id=b] Retrieved 32 out of 32 required tokens (from 32 total tokens). size: ")
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_abort_during_an_asynchronous_load_frees_the_blocks_only_after_the_job(logs, era):
    cluster = Cluster(spec_with(era, chunk_size=16))
    try:
        store_prompt(cluster)
        held = hold(cluster.workers[0], "load")
        request = cluster.add(Req("b", PROMPT + [1] * 5, max_tokens=2))
        cluster.step()
        blocks = list(request.block_ids)
        assert blocks and request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        cluster.scheduler.abort("b")
        for _ in range(3):  # the abort reached the worker; its job still runs: not reported, blocks held
            _, merged = cluster.step()
            assert not merged.finished_recving
            assert request.awaiting_recv_after_finish and all(cluster.scheduler.pool.ref[b] == 1 for b in blocks)
        assert logs.matching("request b finished while loading; reported once the load's job has completed")
        held[0].release()
        _, merged = cluster.step()  # the job writes (into b's blocks, still b's) and is reported
        assert merged.finished_recving == {"b"} and "b" not in cluster.scheduler.requests
        assert all(cluster.scheduler.pool.ref[b] == 0 for b in blocks)
        assert cluster.scheduler.finished["b"] == RequestStatus.FINISHED_ABORTED
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_a_failed_load_job_reports_its_blocks_and_writes_nothing(logs, era):
    cluster = Cluster(spec_with(era, chunk_size=16))
    try:
        store_prompt(cluster)
        engine = cluster.workers[0].conn._worker.engine
        failed = []
        engine.retrieve_async = lambda *args, **kwargs: failed.append(FailedJob()) or failed[-1]
        request = cluster.add(Req("b", PROMPT + [1] * 5, max_tokens=2))
        _, merged = cluster.step()
        assert merged.finished_recving == {"b"}  # still reported finished, so vLLM recomputes
        assert len(merged.invalid_block_ids) == 2 and merged.invalid_block_ids <= set(request.block_ids)
        assert failed[0].closed and "b" not in cluster.load_writes
        assert logs.matching("retrieve for request b failed: the remote tier failed while reading")
        assert logs.matching("Request b failed to load 32 tokens across 2 blocks")
        del engine.retrieve_async
        cluster.run()  # recomputed from token 0, checked bit for bit
        assert cluster.scheduler.finished["b"] == RequestStatus.FINISHED_LENGTH_CAPPED
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_synchronous_loads_stay_available(logs):
    cluster = Cluster(spec_with(V0_14, chunk_size=16, enable_async_loading=False))
    try:
        store_prompt(cluster)
        held = hold(cluster.workers[0], "load")
        cluster.add(Req("b", PROMPT + [1] * 5, max_tokens=1))
        cluster.run()
        assert not held and cluster.scheduler.answers["b"] == [(0, 31, False)]  # N-1: vLLM computes the last
        assert cluster.loaded_tokens("b") == list(range(32))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# Asynchronous saves
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_request_finished_holds_the_blocks_while_a_save_runs(logs, era):
    cluster = Cluster(spec_with(era, chunk_size=8))
    try:
        held = hold(cluster.workers[0], "store")
        request = cluster.add(Req("a", PROMPT, max_tokens=1))
        cluster.step()  # the prefill: a store job starts; the request finishes (one output token)
        assert len(held) == 1 and cluster.scheduler.delayed == {"a"}
        blocks = list(request.block_ids)
        assert blocks and all(cluster.scheduler.pool.ref[b] == 1 for b in blocks)
        assert not logs.matching("[req_id=a] Stored")  # logged from the job's result, when it is done
        for _ in range(2):
            _, merged = cluster.step()
            assert not merged.finished_sending and cluster.scheduler.delayed == {"a"}
        held[0].release()
        _, merged = cluster.step()
        assert merged.finished_sending == {"a"} and not cluster.scheduler.delayed
        assert all(cluster.scheduler.pool.ref[b] == 0 for b in blocks)
        assert logs.matching("[req_id=a] Stored 24 out of total 24 tokens. size: ")
        # what the job stored loads bit for bit
        cluster.add(Req("b", PROMPT, max_tokens=1))
        cluster.run()
        assert cluster.loaded_tokens("b") == list(range(24))
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_a_request_without_a_save_in_flight_frees_at_once(logs):
    cluster = Cluster(spec_with(V0_14, chunk_size=8))
    try:
        request = Req("a", PROMPT[:5], max_tokens=2)  # shorter than a chunk: nothing to store
        cluster.add(request)
        cluster.step()
        cluster.step()
        assert cluster.scheduler.finished["a"] == RequestStatus.FINISHED_LENGTH_CAPPED
        assert not cluster.scheduler.delayed and "a" not in cluster.scheduler.requests
        assert cluster.conn.request_finished(Req("x", PROMPT), []) == (False, None)  # unknown: nothing held
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("era,async_saving", [(V0_14, False), (V0_10, True)], ids=["off", "v0.10"])
def test_synchronous_saves_when_off_or_before_handle_preemptions(logs, era, async_saving):
    """async_saving false, or a vLLM that never tells the worker about preemptions: stores finish in
    wait_for_save and request_finished never delays."""
    cluster = Cluster(spec_with(era, chunk_size=8, async_saving=async_saving))
    try:
        held = hold(cluster.workers[0], "store")
        cluster.add(Req("a", PROMPT, max_tokens=1))
        cluster.run()
        assert not held and not cluster.scheduler.delayed
        assert logs.matching("[req_id=a] Stored 24 out of total 24 tokens.")
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_abort_during_an_asynchronous_save(logs, era):
    spec = spec_with(era, chunk_size=8)
    spec.budget = 10  # chunked prefill: a chunk is stored while the prompt is still being computed
    cluster = Cluster(spec)
    try:
        held = hold(cluster.workers[0], "store")
        request = cluster.add(Req("a", PROMPT, max_tokens=4))
        cluster.step()
        assert len(held) == 1 and not held[0].done()
        cluster.scheduler.abort("a")
        assert cluster.scheduler.delayed == {"a"}  # request_finished answered True
        blocks = list(request.block_ids)
        _, merged = cluster.step()
        assert not merged.finished_sending and all(cluster.scheduler.pool.ref[b] == 1 for b in blocks)
        held[0].release()
        _, merged = cluster.step()
        assert merged.finished_sending == {"a"} and all(cluster.scheduler.pool.ref[b] == 0 for b in blocks)
        assert cluster.scheduler.finished["a"] == RequestStatus.FINISHED_ABORTED
        assert logs.matching("[req_id=a] Stored 8 out of total 8 tokens.")
        cluster.assert_empty()
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("era", [V0_14, NEW], ids=["v0.14", "new"])
def test_preemption_waits_for_the_saves_before_the_blocks_are_reused(logs, era):
    spec = spec_with(era, chunk_size=16)
    spec.num_blocks = 10  # 9 usable blocks of 16 tokens: three 70-token requests cannot all fit
    cluster = Cluster(spec)
    try:
        held = hold(cluster.workers[0], "store")
        preempted_at: dict = {}
        state = {"step": 0}

        def note(output, info):
            state["step"] += 1
            for rid in output.preempted_req_ids or ():
                preempted_at.setdefault(rid, state["step"])

        cluster.before_workers = note
        for index in range(3):
            cluster.add(Req(f"r{index}", [100 * index + j for j in range(40)], max_tokens=30))
        for _ in range(200):
            if not cluster.scheduler.has_work():
                break
            cluster.step()
            for job in held:  # saves run until their request has finished, unless a fence waits for them
                if job.request_id in cluster.scheduler.delayed:
                    job.release()
        assert preempted_at, "the scenario must preempt"
        fenced = [job for job in held if job.waited_in]
        assert fenced and all(job.waited_in == ["handle_preemptions"] for job in fenced), \
            [job.waited_in for job in held]
        for rid in preempted_at:  # resumed requests loaded what was stored before the preemption
            assert cluster.loaded_tokens(rid)[:32] == list(range(32))
        cluster.assert_empty()
    finally:
        cluster.before_workers = None
        cluster.shutdown()


def test_shutdown_waits_for_and_closes_every_job(logs):
    cluster = Cluster(spec_with(V0_14, chunk_size=8))
    worker = cluster.workers[0]
    try:
        held = hold(worker, "store")
        cluster.add(Req("a", PROMPT, max_tokens=1))
        cluster.step()
        assert worker.state()["store_jobs"] == 1
    finally:
        cluster.shutdown()
    assert held[0].waited_in == ["shutdown"] and held[0].closed
    assert not any(worker.conn.internal_state_sizes().values())
