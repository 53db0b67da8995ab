"""The scheduler converts a request's token ids to int32 once: later lookups of the same request
reuse the buffer, decode steps only append the tokens the request gained, and the buffer goes with
the request (finished, aborted while waiting, or reported in finished_req_ids)."""

from fakevllm import V0_14
from sim import Cluster, Req, Spec

PROMPT = [4000 + 11 * i for i in range(40)]


def spec_with(**config):
    return Spec(era=V0_14, extra_config={f"lmcache.{key}": value for key, value in config.items()})


def count_conversions(monkeypatch):
    """Every list -> int32 conversion the scheduler makes from now on: the length of each converted
    list. (Called once the cluster exists: installing the stand-in vLLM reloads the package.)"""
    from lmcache_native import _scheduler

    converted = []
    original = _scheduler.pack_tokens

    def counting(tokens):
        converted.append(len(tokens))
        return original(tokens)

    monkeypatch.setattr(_scheduler, "pack_tokens", counting)
    return converted


def test_a_request_is_converted_once_across_lookups_and_decode_steps(logs, monkeypatch):
    cluster = Cluster(spec_with(chunk_size=8, save_decode_cache=True))
    try:
        conversions = count_conversions(monkeypatch)
        request = Req("a", PROMPT, max_tokens=30)
        answers = [cluster.conn.get_num_new_matched_tokens(request, 0) for _ in range(5)]
        assert answers == [(0, False)] * 5
        assert conversions == [len(PROMPT)]  # five lookups, one conversion
        buffers = cluster.conn._scheduler._token_buffers
        cluster.add(request)  # asked again, admitted, prefilled, then 29 decode steps saving each chunk
        cluster.run()
        # the decode steps appended the tokens they needed to the buffer; nothing was converted anew
        assert conversions == [len(PROMPT)]
        assert not buffers
        everything = request.all_token_ids
        hit = cluster.workers[0].conn._worker.engine.lookup(everything[:len(PROMPT) + 29])
        assert hit == (len(PROMPT) + 29) // 8 * 8  # the decode chunks were stored under the right tokens
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_a_grown_request_is_extended_not_converted_again(monkeypatch):
    cluster = Cluster(spec_with(chunk_size=8))
    try:
        conversions = count_conversions(monkeypatch)
        request = Req("a", PROMPT, max_tokens=5)
        cluster.conn.get_num_new_matched_tokens(request, 0)
        part = cluster.conn._scheduler
        first = part._token_buffers["a"]
        request._output_token_ids += [1, 2, 3]  # e.g. preempted after three decode steps
        cluster.conn.get_num_new_matched_tokens(request, 0)
        assert part._token_buffers["a"] is first and list(first) == PROMPT + [1, 2, 3]
        assert conversions == [len(PROMPT)]
        # a request whose tokens are not a continuation of the buffer is converted anew
        changed = Req("a", [9] + PROMPT[1:], max_tokens=5)
        cluster.conn.get_num_new_matched_tokens(changed, 0)
        assert list(part._token_buffers["a"]) == changed.all_token_ids
        assert conversions == [len(PROMPT), len(PROMPT)]
        cluster.conn.request_finished(changed, [])
    finally:
        cluster.shutdown()


def test_the_buffer_is_dropped_when_the_request_ends():
    cluster = Cluster(spec_with(chunk_size=8))
    try:
        conn = cluster.conn
        waiting = Req("aborted", PROMPT)
        conn.get_num_new_matched_tokens(waiting, 0)
        assert conn.internal_state_sizes()["token_buffers"] == 1
        conn.request_finished(waiting, [])  # aborted while waiting for admission
        assert conn.internal_state_sizes()["token_buffers"] == 0
        # a request run to its end: dropped by request_finished / finished_req_ids
        cluster.add(Req("done", PROMPT, max_tokens=3))
        cluster.step()
        assert conn.internal_state_sizes()["token_buffers"] == 1
        cluster.run()
        cluster.assert_empty()  # every map of the connector, the token buffers included, is empty
        # shutdown drops what is left
        conn.get_num_new_matched_tokens(Req("left", PROMPT), 0)
        assert conn.internal_state_sizes()["token_buffers"] == 1
        conn.shutdown()
        assert conn.internal_state_sizes()["token_buffers"] == 0
    finally:
        cluster.shutdown()
