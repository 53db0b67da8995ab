"""pytest setup for the Python interop suite: run as ``/usr/bin/python3 -m pytest interop-tests/python -q``.

Puts ``python-demo`` (the lmcache_native package) and this directory (kv_oracle) on sys.path, and
offers a small KV "rig" (an engine with registered layers) plus a helper to run code in a child
interpreter, for checks whose failure mode is a crash.

Redis: ``shared_redis_url`` is LMC_TEST_REDIS_URL when set (CI's .ci/run starts one server for the
run), else a server started for this session; tests on it must not stop it and use a model name of
their own (``unique_model``) so they never see each other's records. ``private_redis`` is a server of
the test's own (port, directory, appendonly), for tests that stop, pause or restart it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent.parent
PACKAGE_PARENT = REPO_ROOT / "python-demo"
for path in (str(PACKAGE_PARENT), str(TESTS_DIR)):
    if path not in sys.path:
        sys.path.insert(0, path)

import kv_oracle  # noqa: E402
import lmcache_native  # noqa: E402
from redis_helpers import REDIS_SERVER, RedisServer  # noqa: E402

HEADER = REPO_ROOT / "include" / "lmcache_native.h"


def header_statuses() -> dict[str, int]:
    """The status #defines of include/lmcache_native.h: {"LMC_OK": 0, "LMC_E_INVALID_ARGUMENT": -1, ...}."""
    text = HEADER.read_text()
    return {name: int(value) for name, value in re.findall(r"#define (LMC_OK|LMC_E_\w+) \(?(-?\d+)\)?", text)}


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: bounded multi-threaded soak (LMC_SOAK_SECONDS, default 30)")


# The interpreter with torch, numpy and pytest on the project's Debian machines.
CHILD_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def run_child(code: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter that can import lmcache_native and kv_oracle."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), str(TESTS_DIR)])
    child_env.update(env or {})
    return subprocess.run([CHILD_PYTHON, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=child_env)


def run_child_json(code: str, **kwargs):
    """Runs ``code`` in a child interpreter; its last stdout line must be JSON, which is returned.
    A crash (signal) or a non-zero exit fails the calling test with the child's stderr."""
    result = run_child(code, **kwargs)
    assert result.returncode == 0, (
        f"child interpreter exited with {result.returncode}"
        f"{' (killed by signal %d)' % -result.returncode if result.returncode < 0 else ''}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


class KvRig:
    """An engine plus its registered KV layers (one layout case), and helpers to make requests.

    Dimensions are small on purpose: the suite checks behaviour, not speed.
    """

    def __init__(self, config: dict, case_name: str = "flash_attn_nhd", dtype=torch.float32,
                 num_layers: int = 2, num_blocks: int = 64, block_size: int = 16, num_heads: int = 2,
                 head_size: int = 8, fill: str = "random", seed: int = 0, model_name: str = "rig"):
        self.case = kv_oracle.ALL_CASES[case_name]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_heads, self.head_size, self.dtype = num_heads, head_size, dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.layers = [
            kv_oracle.allocate_layer(self.case, num_blocks, block_size, num_heads, head_size, dtype, fill,
                                     self.generator)
            for _ in range(num_layers)
        ]
        self.engine = lmcache_native.Engine(config, model_name=model_name)
        self.engine.register_layers([layer.logical for layer in self.layers], layout=self.case.lmc_layout)

    @property
    def bytes_per_token(self) -> int:
        """Independent of the library: layers x kv_count x heads x head_size x element size."""
        element_size = torch.empty(0, dtype=self.dtype).element_size()
        heads = 1 if self.case.kv_count == 1 else self.num_heads
        return len(self.layers) * self.case.kv_count * heads * self.head_size * element_size

    def tokens(self, count: int, vocab: int = 32000) -> torch.Tensor:
        return torch.randint(0, vocab, (count,), dtype=torch.int32, generator=self.generator)

    def slots(self, count: int, unmapped_fraction: float = 0.0) -> torch.Tensor:
        return kv_oracle.random_slot_mapping(count, self.num_blocks, self.block_size, self.generator,
                                             unmapped_fraction)

    def read(self, slots: torch.Tensor) -> list[torch.Tensor]:
        """Per layer [T, kv, H, D] at slots (no -1)."""
        return [kv_oracle.read_tokens(layer, slots, self.block_size) for layer in self.layers]

    def snapshot(self) -> list[torch.Tensor]:
        return [layer.physical.clone() for layer in self.layers]

    def close(self):
        self.engine.close()


@pytest.fixture
def make_rig():
    rigs = []

    def factory(config: dict | None = None, **kwargs) -> KvRig:
        rig = KvRig(config if config is not None else {"chunk_size": 16, "max_local_cpu_size": 0.01}, **kwargs)
        rigs.append(rig)
        return rig

    yield factory
    for rig in rigs:
        rig.close()


def _require_redis_server() -> None:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"redis-server not installed ({REDIS_SERVER}); ./build.sh deps installs it")


@pytest.fixture(scope="session")
def shared_redis_url(tmp_path_factory):
    """A Redis URL that stays up for the whole session: LMC_TEST_REDIS_URL, or a server of our own."""
    url = os.environ.get("LMC_TEST_REDIS_URL")
    if url:
        yield url
        return
    _require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis-shared")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_redis(tmp_path):
    """A started redis-server of this test only (appendonly, data in tmp_path); always stopped after."""
    _require_redis_server()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


@pytest.fixture
def unique_model() -> str:
    """A model name no other test or run uses: its key namespace is empty in a shared Redis."""
    return f"tiers-{uuid.uuid4().hex}"
