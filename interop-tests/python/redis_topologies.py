"""Private Redis topologies for the remote-tier tests: a 6-node cluster and a Sentinel-watched pair.

Every process is Debian's ``redis-server`` / ``redis-sentinel`` on a free loopback port with its own
directory under the test's tmp_path; ``stop()`` always reaps every process (SIGKILL after SIGCONT, so
a paused node dies too). Settings are the ones docs/remote-tier.md recommends for large values plus
short failure-detection times so failovers happen within seconds:

- cluster: ``cluster-node-timeout 1000`` (a master is failed after ~1 s), ``cluster-replica-validity-factor 0``
  (a replica may always take over), ``cluster-require-full-coverage no`` (the other masters keep
  serving while one is down);
- Sentinel: ``down-after-milliseconds 1000``, ``failover-timeout 5000``, quorum 2 of 3 sentinels.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from redis_helpers import REDIS_SERVER, RespClient, free_port, wait_for_ping

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"

# Large values (32-128 MiB chunk records): a replica's output buffer must hold a burst of them, or
# the master drops the replica and resynchronises it forever (docs/remote-tier.md).
LARGE_VALUE_SETTINGS = ["--proto-max-bulk-len", "512mb", "--client-output-buffer-limit", "replica 0 0 0"]


def _spawn(args: list[str], directory: Path) -> subprocess.Popen:
    log = open(directory / "server.log", "ab")
    try:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory)
    finally:
        log.close()


def _text(reply) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


def _reap(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGCONT)
    except ProcessLookupError:
        return
    process.kill()
    process.wait(10)


class Node:
    """One redis-server (cluster node or plain server) with its own directory."""

    def __init__(self, directory: Path, extra: list[str], password: str | None = None):
        self.directory = directory
        self.password = password
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Node":
        self.process = _spawn([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
                               *LARGE_VALUE_SETTINGS, *self.extra], self.directory)
        if self.password is None:
            wait_for_ping("127.0.0.1", self.port, 10, self.process)
            return self
        deadline = time.monotonic() + 10
        while True:
            assert self.process.poll() is None, f"redis-server exited:\n{self.log_tail()}"
            try:
                if self.command("PING") == "PONG":
                    return self
            except (OSError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "redis-server did not answer"
            time.sleep(0.02)

    def client(self, timeout: float = 5.0) -> RespClient:
        client = RespClient("127.0.0.1", self.port, timeout=timeout)
        if self.password:
            client.command("AUTH", self.password)
        return client

    def command(self, *args):
        with self.client() as client:
            return client.command(*args)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """kill -9: no shutdown, no persistence, connections reset."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        _reap(self.process)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join((self.directory / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Cluster:
    """A Redis Cluster of ``masters`` masters with one replica each, made by ``redis-cli --cluster create``."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000):
        self.replicas = replicas
        # The cluster bus gets a free port of its own (the default, port + 10000, may be taken or > 65535).
        self.nodes = [Node(directory / f"node{i}", ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                                     "--cluster-port", str(free_port()),
                                                     "--cluster-node-timeout", str(node_timeout_ms),
                                                     "--cluster-replica-validity-factor", "0",
                                                     "--cluster-require-full-coverage", "no",
                                                     "--repl-diskless-sync-delay", "0"])
                      for i in range((1 + replicas) * masters)]

    def start(self, timeout: float = 30.0) -> "Cluster":
        try:
            for node in self.nodes:
                node.start()
            result = subprocess.run([REDIS_CLI, "--cluster", "create", *[n.address for n in self.nodes],
                                     "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}"
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and every master has a connected replica."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.info(n, "cluster_state") for n in self.live()]
                masters = self.masters()
                # "state=online": the replica's initial sync is done (before, a failover loses data).
                synced = self.replicas == 0 or all("state=online" in self.replication(m).get("slave0", "") for m in masters)
                if all(s == "ok" for s in states) and len(masters) == len(self.nodes) // (1 + self.replicas) and synced:
                    return
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not become healthy:\n" + "\n".join(n.log_tail(5) for n in self.nodes))
            time.sleep(0.1)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    @staticmethod
    def info(node: Node, field: str) -> str:
        text = _text(node.command("CLUSTER", "INFO"))
        for line in text.splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
        return ""

    @staticmethod
    def replication(node: Node) -> dict:
        text = _text(node.command("INFO", "replication"))
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def masters(self) -> list[Node]:
        return [n for n in self.live() if self.replication(n).get("role") == "master"]

    def node_id(self, node: Node) -> str:
        return _text(node.command("CLUSTER", "MYID"))

    def seeds(self, count: int = 2) -> str:
        return ",".join(n.address for n in self.nodes[:count])

    def keys_by_master(self, pattern: str = "lmcn:*") -> dict[str, int]:
        return {m.address: len(m.command("KEYS", pattern)) for m in self.masters()}

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelPair:
    """A primary and its replica, watched by three Sentinels (quorum 2) under ``service``."""

    def __init__(self, directory: Path, service: str = "lmcache", password: str | None = None):
        self.service = service
        auth = (["--requirepass", password, "--masterauth", password] if password else []) + ["--repl-diskless-sync-delay", "0"]
        self.primary = Node(directory / "primary", auth, password)
        self.replica = Node(directory / "replica", auth, password)
        self.sentinel_dirs = [directory / f"sentinel{i}" for i in range(3)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []
        self.password = password

    @property
    def url_hosts(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def start(self) -> "SentinelPair":
        try:
            self.primary.start()
            self.replica.extra = self.replica.extra + ["--replicaof", "127.0.0.1", str(self.primary.port)]
            self.replica.start()
            for directory, port in zip(self.sentinel_dirs, self.sentinel_ports):
                directory.mkdir(parents=True, exist_ok=True)
                config = directory / "sentinel.conf"
                lines = [f"port {port}", "bind 127.0.0.1", f"dir {directory}",
                         f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2",
                         f"sentinel down-after-milliseconds {self.service} 1000",
                         f"sentinel failover-timeout {self.service} 5000",
                         f"sentinel parallel-syncs {self.service} 1"]
                if self.password:
                    lines.append(f"sentinel auth-pass {self.service} {self.password}")
                config.write_text("\n".join(lines) + "\n")
                process = _spawn([REDIS_SENTINEL, str(config)], directory)
                self.sentinels.append(process)
                wait_for_ping("127.0.0.1", port, 10, process)
            self.wait_synced()
            deadline = time.monotonic() + 20
            while not all(self.sentinel_sees_replica(p) for p in self.sentinel_ports):
                assert time.monotonic() < deadline, "the sentinels did not discover the replica"
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel_sees_replica(self, port: int) -> bool:
        with RespClient("127.0.0.1", port) as client:
            replicas = client.command("SENTINEL", "REPLICAS", self.service)
            others = client.command("SENTINEL", "SENTINELS", self.service)
        return len(replicas) >= 1 and len(others) >= 2

    def primary_port(self) -> int:
        """The primary's port as the first Sentinel reports it."""
        with RespClient("127.0.0.1", self.sentinel_ports[0]) as client:
            host, port = client.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def wait_synced(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.replica.command("INFO", "replication").find(b"master_link_status:up") >= 0:
                    return
            except Exception:
                pass
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.sentinels:
            _reap(process)
        self.primary.stop()
        self.replica.stop()
