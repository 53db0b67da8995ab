"""A private redis-server for tests that stop, pause or restart one, and a minimal RESP client.

There is no redis-py on the project's machines, so ``RespClient`` speaks the protocol itself (enough
for PING, KEYS, GET, SETRANGE, DEL, FLUSHDB...). ``RedisServer`` runs
``redis-server --port <free> --bind 127.0.0.1 --save '' --appendonly yes --dir <tmp>`` so that a
restart on the same directory brings the data back; ``stop`` always reaps the process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RespError(Exception):
    """An error reply (-ERR ...) from the server."""


class RespClient:
    """One blocking connection; ``command(*args)`` sends a RESP array and returns the parsed reply
    (bytes for bulk strings, None for a nil bulk, int, str for simple strings, list for arrays)."""

    def __init__(self, host: str, port: int, db: int = 0, timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb", buffering=1 << 16)
        if db:
            self.command("SELECT", db)

    @classmethod
    def from_url(cls, url: str, timeout: float = 5.0) -> "RespClient":
        parsed = urlparse(url)
        db = int(parsed.path.strip("/") or 0)
        return cls(parsed.hostname or "127.0.0.1", parsed.port or 6379, db, timeout)

    def command(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode("utf-8")
            elif isinstance(arg, int):
                arg = str(arg).encode("ascii")
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        self.sock.sendall(b"".join(parts))
        return self._reply()

    def _reply(self):
        line = self.reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self.reader.read(length + 2)
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise ConnectionError(f"unexpected RESP reply {line!r}")

    def keys(self, pattern: str) -> list[bytes]:
        return self.command("KEYS", pattern)

    def close(self):
        try:
            self.reader.close()
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def wait_for_ping(host: str, port: int, timeout: float = 10.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            with RespClient(host, port, timeout=1.0) as client:
                if client.command("PING") == "PONG":
                    return
        except (OSError, ConnectionError, RespError) as error:
            last_error = error
        time.sleep(0.02)
    raise TimeoutError(f"redis-server on port {port} did not answer PING within {timeout} s: {last_error}")


class RedisServer:
    """A private redis-server process; ``start`` (again after ``stop``) reuses port and directory."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.directory / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 10.0) -> "RedisServer":
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes", "--dir", str(self.directory), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        try:
            wait_for_ping("127.0.0.1", self.port, timeout, self.process)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def client(self) -> RespClient:
        return RespClient("127.0.0.1", self.port)

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Sends ``signum`` and reaps the process (SIGKILL if it does not exit in time)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            if signum != signal.SIGKILL:
                os.kill(process.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.send_signal(signum)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
