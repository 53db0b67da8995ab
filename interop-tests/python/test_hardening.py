"""Hardening through the C ABI: handles of one kind never act on another, caller mistakes are
LMC_E_INVALID_ARGUMENT (never LMC_E_INTERNAL), credentials never leave the library, lookup answers
are checked, and the lookup socket refuses what it does not own."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import threading
from ctypes import byref, c_int64, c_void_p

import numpy as np
import pytest
import torch

import raw_requests as rr
from lmcache_native import Engine, _bindings as b


def _message() -> str:
    return b.lmc_last_error_message().decode("utf-8")


def _raw_engine(config: dict | None = None) -> int:
    handle = c_void_p()
    status = b.lmc_engine_create(byref(handle), json.dumps(config or {"chunk_size": 16}).encode(), b"m", 1, 0)
    assert status == b.LMC_OK, _message()
    return handle.value


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32000, n, dtype=np.int32)


def _lookup(handle: int, tokens: np.ndarray) -> tuple[int, int]:
    status, result = rr.lookup(handle, rr.request(tokens), b.LmcLookupResult(hit_tokens=-1))
    return status, result.hit_tokens


# -- handles: unique across kinds, the wrong kind is refused and changes nothing ------------------
@pytest.fixture
def engine_and_job():
    kv = torch.zeros(2, 8, 16, 2, 8)
    engine = Engine({"chunk_size": 16})
    engine.register_layers([kv])
    tokens = _tokens(64, 1)
    engine.store(tokens, torch.arange(64))
    status, job = rr.prefetch(engine.handle, rr.request(tokens))
    assert status == b.LMC_OK, _message()
    yield engine, job, tokens
    b.lmc_job_destroy(job)
    engine.close()


def test_a_job_and_an_engine_never_share_a_handle_value(engine_and_job):
    engine, job, _ = engine_and_job
    assert job != engine.handle
    # Several engines and jobs interleaved: all values distinct.
    handles = {engine.handle, job}
    extra_engines = [_raw_engine() for _ in range(3)]
    kv = torch.zeros(2, 8, 16, 2, 8)
    from lmcache_native.torch_layout import layer_desc_from_tensor
    descs = (b.LmcKvLayerDesc * 1)(layer_desc_from_tensor(kv))
    for handle in extra_engines:
        assert b.lmc_engine_register_layers(handle, descs, 1) == b.LMC_OK, _message()  # requests need layers
        status, extra_job = rr.prefetch(handle, rr.request(None, 0))
        assert status == b.LMC_OK, _message()
        handles |= {handle, extra_job}
        b.lmc_job_destroy(extra_job)
    assert len(handles) == 2 + 2 * len(extra_engines)
    for handle in extra_engines:
        b.lmc_engine_destroy(handle)


def test_engine_functions_refuse_a_job_handle(engine_and_job):
    engine, job, tokens = engine_and_job
    status, _ = _lookup(job, tokens)
    assert status == b.LMC_E_INVALID_HANDLE
    assert "job" in _message() and "engine" in _message()
    slots = np.arange(64, dtype=np.int64)
    request = rr.request(tokens, slots=slots)
    assert rr.store(job, request)[0] == b.LMC_E_INVALID_HANDLE
    assert rr.retrieve(job, request)[0] == b.LMC_E_INVALID_HANDLE
    assert rr.store(job, request, job=True) == (b.LMC_E_INVALID_HANDLE, None)
    assert rr.prefetch(job, request) == (b.LMC_E_INVALID_HANDLE, None)
    assert b.lmc_engine_flush(job, 0) == b.LMC_E_INVALID_HANDLE


def test_destroying_a_job_handle_as_an_engine_destroys_nothing(engine_and_job):
    engine, job, tokens = engine_and_job
    b.lmc_engine_destroy(job)
    assert "job" in _message()
    assert engine.lookup(tokens) == 64, "the engine is alive"
    status, result = rr.job_wait(job, 10_000)
    assert status == b.LMC_OK, "the job is alive"
    assert result.tokens_matched == 64


def test_job_functions_refuse_an_engine_handle(engine_and_job):
    engine, job, tokens = engine_and_job
    assert rr.job_wait(engine.handle, 0)[0] == b.LMC_E_INVALID_HANDLE
    assert rr.job_poll(engine.handle) == (b.LMC_E_INVALID_HANDLE, -7)
    assert b.lmc_job_result(byref(b.LmcTransferResult()), engine.handle) == b.LMC_E_INVALID_HANDLE
    b.lmc_job_destroy(engine.handle)
    assert "engine" in _message()
    assert engine.lookup(tokens) == 64, "the engine is alive"
    assert rr.job_wait(job, 10_000)[0] == b.LMC_OK


# -- caller mistakes are LMC_E_INVALID_ARGUMENT with a message, never LMC_E_INTERNAL ---------------
@pytest.mark.parametrize("timeout_ms", [3 * 10**14, 10**15, 2**63 - 1, 2**31, -2, -(2**63)])
def test_flush_with_an_absurd_timeout_is_an_invalid_argument(timeout_ms):
    handle = _raw_engine()
    try:
        assert b.lmc_engine_flush(handle, timeout_ms) == b.LMC_E_INVALID_ARGUMENT
        assert "timeout_ms" in _message()
    finally:
        b.lmc_engine_destroy(handle)


@pytest.mark.parametrize("timeout_ms", [10**15, 2**63 - 1, 2**31, 0, -2])
def test_remote_lookup_with_an_absurd_timeout_is_an_invalid_argument(tmp_path, timeout_ms):
    hit = c_int64()
    tokens = _tokens(8)
    status = b.lmc_remote_lookup(byref(hit), str(tmp_path / "x.sock").encode(), tokens.ctypes.data, 8, None, 0, timeout_ms)
    assert status == b.LMC_E_INVALID_ARGUMENT
    assert "timeout_ms" in _message()


@pytest.mark.parametrize("path", [b"", b"/tmp/" + b"x" * 200])
def test_remote_lookup_with_an_empty_or_overlong_path_is_an_invalid_argument(path):
    hit = c_int64()
    tokens = _tokens(8)
    assert b.lmc_remote_lookup(byref(hit), path, tokens.ctypes.data, 8, None, 0, 1000) == b.LMC_E_INVALID_ARGUMENT
    assert "socket_path" in _message()


@pytest.mark.parametrize("length", [0x7FFFFFC7, (1 << 20) + 1])
def test_an_extra_key_over_the_limit_is_an_invalid_argument(length):
    # calloc'd pages are never touched: the length is refused before any byte is read.
    big = np.zeros(length, dtype=np.uint8)
    kv = torch.zeros(2, 8, 16, 2, 8)
    with Engine({"chunk_size": 16}) as engine:
        engine.register_layers([kv])
        tokens = _tokens(32)
        slots = np.arange(32, dtype=np.int64)
        request = rr.request(tokens, slots=slots, extra_key=big.ctypes.data, extra_key_len=length)
        assert rr.lookup(engine.handle, request)[0] == b.LMC_E_INVALID_ARGUMENT
        assert "extra_key_len" in _message()
        assert rr.store(engine.handle, request)[0] == b.LMC_E_INVALID_ARGUMENT
        assert rr.retrieve(engine.handle, request, job=True) == (b.LMC_E_INVALID_ARGUMENT, None)
        assert rr.prefetch(engine.handle, request) == (b.LMC_E_INVALID_ARGUMENT, None)


@pytest.mark.parametrize("config_text", [
    '{"remote_url": "redis://127.0.0.1:1/0", "extra_config": {"remote_ttl_secs": 1e300}}',
    '{"extra_config": {"k": "\\ud800"}}',
    '{"extra_config": {"\\udc00": 1}}',
    '{"\\ud800": 1}',
    '{"local_disk": "\\ud800", "max_local_disk_size": 1}',
    '{"remote_url": "\\udfff"}',
    '{"cache_policy": "\\ud800"}',
])
def test_config_edge_values_are_invalid_arguments(config_text):
    handle = c_void_p()
    status = b.lmc_engine_create(byref(handle), config_text.encode(), b"m", 1, 0)
    if status == b.LMC_OK:
        b.lmc_engine_destroy(handle.value)
    assert status == b.LMC_E_INVALID_ARGUMENT, f"{b.lmc_status_name(status)}: {_message()}"


# -- credentials never leave the library ---------------------------------------------------------
SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("url", [
    f"redis://default:{SECRET}@127.0.0.1:1/0",
    f"redis://:{SECRET}@127.0.0.1:1/0",
    f"rediss://alice:{SECRET}@127.0.0.1:1/0",
])
def test_get_config_redacts_the_url_password_and_secret_keys(url):
    config = {"chunk_size": 16, "remote_url": url, "blocking_timeout_secs": 0.2,
              "extra_config": {"redis_password": SECRET, "nested": {"auth_token": SECRET, "mirror": url}}}
    with Engine(config) as engine:
        text = json.dumps(engine.config())
    assert SECRET not in text
    assert "***" in text
    assert "127.0.0.1:1" in text, "only the secret is hidden"


@pytest.mark.parametrize("url", [
    f"redis://default:{SECRET}@/0",                 # no host
    f"redis://default:{SECRET}@host:6379/notadb",  # bad database
    f"memcached://u:{SECRET}@host:1",               # unknown scheme
])
def test_engine_create_errors_do_not_quote_the_password(url):
    handle = c_void_p()
    status = b.lmc_engine_create(byref(handle), json.dumps({"remote_url": url}).encode(), b"m", 1, 0)
    if status == b.LMC_OK:
        b.lmc_engine_destroy(handle.value)
    assert status in (b.LMC_E_INVALID_ARGUMENT, b.LMC_E_UNSUPPORTED)
    assert SECRET not in _message()
    assert "remote_url" in _message()


def test_invalid_value_messages_redact_and_truncate():
    long_value = f"redis://u:{SECRET}@h/" + "x" * 5000
    handle = c_void_p()
    assert b.lmc_engine_create(byref(handle), json.dumps({"cache_policy": long_value}).encode(), b"m", 1, 0) == b.LMC_E_INVALID_ARGUMENT
    assert SECRET not in _message()
    assert len(_message()) < 400


# -- the lookup channel: answers are checked, the socket path is never someone else's file ---------
def _fake_lookup_server(path: str, status: int, hit: int) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(10)

    def serve():
        with server:
            try:
                peer, _ = server.accept()
            except OSError:
                return
            with peer:
                header = b""
                while len(header) < 16:
                    header += peer.recv(16 - len(header))
                extra, count = struct.unpack_from("<II", header, 8)
                body = extra + 4 * count
                while body > 0:
                    body -= len(peer.recv(body))
                peer.sendall(b"LMLR" + struct.pack("<iq", status, hit))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("status, hit, expected", [
    (0, -5, b.LMC_E_IO), (0, 2**62, b.LMC_E_IO), (0, 101, b.LMC_E_IO), (-10, 0, b.LMC_E_IO), (12345, 0, b.LMC_E_IO),
    (0, 100, b.LMC_OK), (0, 0, b.LMC_OK),
])
def test_remote_lookup_refuses_answers_outside_the_prompt(tmp_path, status, hit, expected):
    path = str(tmp_path / "fake.sock")
    server = _fake_lookup_server(path, status, hit)
    tokens = _tokens(100)
    answer = c_int64(-1)
    got = b.lmc_remote_lookup(byref(answer), path.encode(), tokens.ctypes.data, 100, None, 0, 5000)
    server.join(10)
    assert got == expected, _message()
    if got == b.LMC_OK:
        assert answer.value == hit


def test_starting_a_lookup_server_on_a_users_file_refuses_and_keeps_it(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("do not delete")
    with Engine({"chunk_size": 16}) as engine:
        assert b.lmc_lookup_server_start(engine.handle, str(path).encode()) == b.LMC_E_INVALID_ARGUMENT
        assert "not a socket" in _message()
    assert path.read_text() == "do not delete"


def test_a_lookup_server_socket_is_private_and_answers_in_bounds(tmp_path):
    path = tmp_path / "srv.sock"
    kv = torch.zeros(2, 8, 16, 2, 8)
    with Engine({"chunk_size": 16}) as engine:
        engine.register_layers([kv])
        tokens = _tokens(48, 3)
        engine.store(tokens, torch.arange(48))
        engine.start_lookup_server(str(path))
        assert (os.stat(path).st_mode & 0o777) == 0o600
        hit = c_int64()
        assert b.lmc_remote_lookup(byref(hit), str(path).encode(), tokens.ctypes.data, 48, None, 0, 5000) == b.LMC_OK
        assert hit.value == 48
