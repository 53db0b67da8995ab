"""The scheduler does not trust lookup answers, and default lookup sockets live in a private directory.

* Whatever a lookup answers -- a rank's engine over the socket channel (a peer process), or a buggy
  in-process one -- vLLM is only told a number of external tokens in [0, tokens of the request]. An
  answer outside [0, lookup tokens] is a failed lookup (a miss), warned about once; it is not
  clamped to the prompt, since a made-up hit would make vLLM skip computing tokens nobody loads.
* Without VLLM_RPC_BASE_PATH the sockets go to $XDG_RUNTIME_DIR when it is private, else to
  <tempdir>/lmcache-native-<uid>, created 0700 and verified with lstat; a directory there that is not
  private (another user's, a symlink, group/other access) is refused, the worker then serves no
  lookups and the scheduler's lookups of other processes are misses.
"""

import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import fakevllm
from fakevllm import V0_10, V0_14
from sim import Cluster, Req, Spec

PROMPT = [3000 + 7 * i for i in range(45)]
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent


def scheduler_of(era, tp=1, rpc_port=11, **config):
    """A scheduler-side connector whose ranks all live in other processes: every lookup goes through
    remote_lookup (the socket channel)."""
    spec = Spec(era=era, tp=tp, extra_config={"lmcache.chunk_size": 16, "lmcache.lookup_timeout_ms": 2000,
                                              "lmcache_rpc_port": rpc_port,
                                              **{f"lmcache.{k}": v for k, v in config.items()}})
    fakevllm.install(era)
    from lmcache_native import vllm_connector

    conn = fakevllm.create_connector(spec.vllm_config(0), fakevllm.role("SCHEDULER"), spec.kv_cache_config())
    return spec, conn, vllm_connector


def ask(conn, request, timeout_s=10.0):
    """get_num_new_matched_tokens as vLLM calls it: again while it answers None (a background lookup)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = conn.get_num_new_matched_tokens(request, 0)
        if answer[0] is not None:
            return answer
        assert time.monotonic() < deadline, "the background lookup never finished"
        time.sleep(0.01)


def finish(conn, *request_ids):
    for request_id in request_ids:
        conn.request_finished(Req(request_id, PROMPT), [])
    assert not any(conn.internal_state_sizes().values())


# ------------------------------------------------------------------------------------------------
# Lookup answers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("era", [V0_10, V0_14], ids=["sync", "background"])
@pytest.mark.parametrize("answer", [-5, -1, len(PROMPT) + 1, 2**62, 2**63 - 1, True, 3.0, "16", None])
def test_an_out_of_range_remote_answer_is_a_miss_warned_once(monkeypatch, logs, era, answer):
    spec, conn, _ = scheduler_of(era, tp=2)
    asked = []

    def hostile(path, tokens, extra_key=b"", timeout_s=None):
        asked.append(len(tokens))
        return answer

    monkeypatch.setattr(conn._scheduler._lmc, "remote_lookup", hostile)
    try:
        assert ask(conn, Req("a", PROMPT)) == (0, False)
        assert ask(conn, Req("b", PROMPT)) == (0, False)
        assert asked and all(count == len(PROMPT) for count in asked)
        assert conn._scheduler._pending_lookups["a"].num_external_tokens == 0 and len(conn._scheduler._pending_lookups["a"].token_ids) == 0
        assert conn._scheduler._stats["lookup_hit_tokens"] == 0
        warned = logs.matching("counted as a miss (further such answers are not logged)")
        assert len(warned) == 1 and f"for a prompt of {len(PROMPT)} tokens" in warned[0]
    finally:
        finish(conn, "a", "b")
        conn.shutdown()


@pytest.mark.parametrize("era", [V0_10, V0_14], ids=["sync", "background"])
def test_one_hostile_rank_makes_the_lookup_a_miss(monkeypatch, logs, era):
    spec, conn, _ = scheduler_of(era, tp=2)
    answers = {"r0.sock": 32, "r1.sock": -5}
    monkeypatch.setattr(conn._scheduler._lmc, "remote_lookup",
                        lambda path, tokens, extra_key=b"", timeout_s=None: answers[path.rsplit("-", 1)[1]])
    try:
        assert ask(conn, Req("a", PROMPT)) == (0, False)
        answers["r1.sock"] = 32  # both ranks in range: the hit is used, so the answers are really read
        assert ask(conn, Req("b", PROMPT)) == (32, True)
        answers["r1.sock"] = len(PROMPT)  # a full hit on one rank, 32 on the other: the minimum
        assert ask(conn, Req("c", PROMPT)) == (32, True)
    finally:
        finish(conn, "a", "b", "c")
        conn.shutdown()


def test_a_full_hit_keeps_the_last_token_for_vllm(monkeypatch):
    spec, conn, _ = scheduler_of(V0_10, enable_async_loading=False)
    monkeypatch.setattr(conn._scheduler._lmc, "remote_lookup", lambda *args, **kwargs: len(PROMPT))
    try:
        assert conn.get_num_new_matched_tokens(Req("a", PROMPT), 0) == (len(PROMPT) - 1, False)
        # vLLM already computed more than the store holds: nothing to load, never negative
        assert conn.get_num_new_matched_tokens(Req("b", PROMPT), len(PROMPT)) == (0, False)
    finally:
        finish(conn, "a", "b")
        conn.shutdown()


def test_an_in_process_engine_answer_is_checked_too(logs):
    cluster = Cluster(Spec(era=V0_10, extra_config={"lmcache.chunk_size": 16}))
    try:
        engine = cluster.workers[0].conn._worker.engine
        real_lookup = engine.lookup
        engine.lookup = lambda tokens, extra_key=b"": 10**30
        try:
            assert cluster.conn.get_num_new_matched_tokens(Req("a", PROMPT), 0) == (0, False)
        finally:
            engine.lookup = real_lookup
        assert len(logs.matching("counted as a miss")) == 1
        cluster.conn.request_finished(Req("a", PROMPT), [])
    finally:
        cluster.shutdown()


class FakeLookupServer:
    """A peer speaking the lookup channel's wire format (LookupChannel.cs) that answers ``hit`` with
    status 0 to every request, whatever it holds."""

    REQUEST = struct.Struct("<4sHHII")
    RESPONSE = struct.Struct("<4siq")

    def __init__(self, path: str, hit: int):
        self.path, self.hit = path, hit
        self.requests: list = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def _read(connection, size):
        data = b""
        while len(data) < size:
            chunk = connection.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            with connection:
                try:
                    while True:
                        magic, version, _, extra_len, count = self.REQUEST.unpack(
                            self._read(connection, self.REQUEST.size))
                        body = self._read(connection, extra_len + 4 * count)
                        tokens = list(struct.unpack(f"<{count}i", body[extra_len:]))
                        self.requests.append((magic, version, body[:extra_len], tokens))
                        connection.sendall(self.RESPONSE.pack(b"LMLR", 0, self.hit))
                except (EOFError, OSError):
                    pass

    def close(self):
        self.listener.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.mark.parametrize("era", [V0_10, V0_14], ids=["sync", "background"])
@pytest.mark.parametrize("hit", [2**62, -5, len(PROMPT) + 1])
def test_a_hostile_lookup_server_cannot_inflate_the_hit(logs, era, hit):
    spec, conn, vc = scheduler_of(era, tp=1, rpc_port=13)
    server = FakeLookupServer(vc._lookup_socket_path(spec.model, 13, 0, 0), hit)
    try:
        assert ask(conn, Req("a", PROMPT)) == (0, False)
        assert conn._scheduler._stats["lookup_hit_tokens"] == 0
        # the request really went over the channel, in its wire format
        assert server.requests and server.requests[0][:2] == (b"LMLQ", 1) and server.requests[0][3] == PROMPT
    finally:
        server.close()
        finish(conn, "a")
        conn.shutdown()


# ------------------------------------------------------------------------------------------------
# The default socket directory
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def temp_root(monkeypatch):
    """A short temporary directory standing in for the system's, with no VLLM_RPC_BASE_PATH or
    XDG_RUNTIME_DIR: the per-uid default applies, without touching the real /tmp."""
    from lmcache_native import _socket_dir

    root = tempfile.mkdtemp(prefix="lmcnt", dir="/tmp")
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", root)
    monkeypatch.setattr(tempfile, "tempdir", root)
    monkeypatch.setattr(_socket_dir, "_SHORT_TEMP_DIR", root)
    yield Path(root)
    for path in Path(root).rglob("*"):  # undo what the tests made read-only or foreign
        if path.is_dir() and not path.is_symlink():
            os.chmod(path, 0o700)
    shutil.rmtree(root, ignore_errors=True)


def private_dir(root: Path) -> Path:
    return root / f"lmcache-native-{os.geteuid()}"


def socket_paths(rpc_port=21):
    fakevllm.install(V0_10)
    from lmcache_native import vllm_connector as vc

    return [vc._lookup_socket_path("fake/model", rpc_port, 0, rank) for rank in (0, 1)]


def test_default_sockets_live_in_a_new_private_directory(temp_root):
    paths = socket_paths()
    directory = private_dir(temp_root)
    assert [Path(path).parent for path in paths] == [directory, directory]  # both ranks agree
    assert paths[0] != paths[1] and all(len(os.fsencode(path)) <= 107 for path in paths)
    info = os.lstat(directory)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
    assert socket_paths() == paths  # the existing directory is accepted


def test_another_process_of_the_instance_computes_the_same_path(temp_root):
    paths = socket_paths()
    code = ("import sys, fakevllm; fakevllm.install(fakevllm.V0_10)\n"
            "from lmcache_native import vllm_connector as vc\n"
            "print(vc._lookup_socket_path('fake/model', 21, 0, 1))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python-demo"), str(HERE.parent), str(HERE)]))
    child = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == paths[1]


def _make_world_writable(directory: Path):
    directory.mkdir()
    os.chmod(directory, 0o777)


def _make_group_readable(directory: Path):
    directory.mkdir()
    os.chmod(directory, 0o750)


def _make_symlink(directory: Path):
    target = directory.parent / "elsewhere"
    target.mkdir(mode=0o700)
    directory.symlink_to(target)


def _make_file(directory: Path):
    directory.write_text("")


def _make_foreign(directory: Path):
    if os.geteuid() != 0:
        pytest.skip("making a directory owned by another user needs root")
    directory.mkdir(mode=0o700)
    os.chown(directory, 4242, -1)


@pytest.mark.parametrize("make,reason", [
    (_make_world_writable, "its mode is 0777"),
    (_make_group_readable, "its mode is 0750"),
    (_make_symlink, "it is a symbolic link"),
    (_make_file, "it is not a directory"),
    (_make_foreign, "it is owned by uid 4242"),
])
def test_a_directory_that_is_not_private_is_refused(temp_root, make, reason):
    from lmcache_native._socket_dir import UnsafeSocketDirectoryError

    make(private_dir(temp_root))
    with pytest.raises(UnsafeSocketDirectoryError) as caught:
        socket_paths()
    assert str(private_dir(temp_root)) in str(caught.value) and reason in str(caught.value)
    assert "VLLM_RPC_BASE_PATH" in str(caught.value)


def test_with_an_unsafe_directory_the_worker_serves_nothing_and_lookups_miss(temp_root, logs):
    _make_world_writable(private_dir(temp_root))
    spec = Spec(era=V0_10, tp=2, extra_config={"lmcache.chunk_size": 16, "lmcache.lookup_timeout_ms": 300})
    fakevllm.install(V0_10)
    from sim import MiniWorker

    worker = MiniWorker(spec, 1)  # rank 1 lives "elsewhere"; rank 0 has no engine at all
    scheduler = fakevllm.create_connector(spec.vllm_config(0), fakevllm.role("SCHEDULER"), spec.kv_cache_config())
    try:
        assert worker.conn._worker.engine is not None and worker.conn._worker._serving_socket is None
        assert logs.matching("not serving lookups: refusing to put lookup sockets in")
        assert list(private_dir(temp_root).iterdir()) == []
        assert scheduler.get_num_new_matched_tokens(Req("a", PROMPT), 0) == (0, False)
        scheduler.request_finished(Req("a", PROMPT), [])
    finally:
        worker.shutdown()
        scheduler.shutdown()


def test_a_private_xdg_runtime_dir_is_used_and_a_shared_one_is_not(temp_root, monkeypatch):
    runtime = temp_root / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert {Path(path).parent for path in socket_paths()} == {runtime}
    os.chmod(runtime, 0o777)  # not the per-login directory it should be: the per-uid one instead
    assert {Path(path).parent for path in socket_paths()} == {private_dir(temp_root)}


def test_vllm_rpc_base_path_is_the_operators_choice(temp_root, monkeypatch):
    chosen = temp_root / "rpc"
    chosen.mkdir()
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(chosen))
    assert {Path(path).parent for path in socket_paths()} == {chosen}
    assert not private_dir(temp_root).exists()


def test_a_directory_too_long_for_a_socket_address_falls_back_to_a_short_private_one(temp_root, monkeypatch):
    from lmcache_native import _socket_dir

    deep = temp_root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    short_root = Path(tempfile.mkdtemp(prefix="s", dir=temp_root))
    monkeypatch.setattr(_socket_dir, "_SHORT_TEMP_DIR", str(short_root))
    paths = socket_paths()
    assert {Path(path).parent for path in paths} == {short_root / f"lmcache-native-{os.geteuid()}"}
    assert all(len(os.fsencode(path)) <= 107 for path in paths)
    # an over-long VLLM_RPC_BASE_PATH falls back the same way (formerly: straight into /tmp)
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(deep))
    assert socket_paths() == paths
