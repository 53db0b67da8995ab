"""pytest setup of the connector conformance harness: puts this directory (fakevllm, sim) on sys.path,
gives every test a clean LMCACHE_* environment, fresh stand-in vllm modules and a log capture of the
connector's logger ("lmcache_native"), and checks at the end that the test left no lookup socket."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import fakevllm  # noqa: E402


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def matching(self, text: str) -> list:
        return [line for line in self.lines if text in line]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)
    # the lookup sockets of this test's workers live in a short directory of its own
    socket_dir = Path(tempfile.mkdtemp(prefix="lmcn", dir="/tmp"))
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(socket_dir))
    yield socket_dir
    leftovers = [p.name for p in socket_dir.iterdir()]
    shutil.rmtree(socket_dir, ignore_errors=True)
    assert not leftovers, f"lookup sockets left behind: {leftovers}"


@pytest.fixture
def logs():
    handler = LogLines()
    package_logger = logging.getLogger("lmcache_native")
    package_logger.addHandler(handler)
    previous = package_logger.level
    package_logger.setLevel(logging.DEBUG)
    yield handler
    package_logger.removeHandler(handler)
    package_logger.setLevel(previous)
