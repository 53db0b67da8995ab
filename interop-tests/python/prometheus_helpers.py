"""Real Prometheus tooling for the metrics tests: ``promtool check metrics`` and a ``prometheus``
server (Debian's ``prometheus`` package, installed by scripts/deps.sh) scraping a tiny HTTP server
of the test's own.

promtool lints two things in LMCache's metric names that are LMCache's choice and that this project
keeps on purpose (dashboards and alerts written for LMCache must keep working): every name has a
colon (``lmcache:``), and four gauges end in ``_count`` (``active_memory_objs_count``,
``pinned_memory_objs_count``, ``put_failed_count``, ``get_blocking_failed_count``). Those two lint
messages are the only ones tolerated; a parse error or any other lint problem fails.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

LMCACHE_COUNT_GAUGES = {
    "lmcache:active_memory_objs_count",
    "lmcache:pinned_memory_objs_count",
    "lmcache:put_failed_count",
    "lmcache:get_blocking_failed_count",
}


def require_tool(name: str) -> str:
    """The tool's path; a missing tool fails the test (CI installs the prometheus package)."""
    path = shutil.which(name)
    assert path, f"{name} not found: install Debian's prometheus package (./build.sh deps)"
    return path


def promtool_problems(text: str) -> list[str]:
    """Runs ``promtool check metrics`` on ``text``; fails on a parse error; returns the lint problems
    other than LMCache's naming (see the module docstring)."""
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert "error while linting" not in output and result.returncode in (0, 3), (
        f"promtool could not parse the metrics (exit {result.returncode}):\n{output}")
    problems = []
    for line in output.splitlines():
        name, _, message = line.partition(" ")
        if message == "metric names should not contain ':'":
            continue
        if name in LMCACHE_COUNT_GAUGES and "should not have \"_count\" suffix" in message:
            continue
        problems.append(line)
    return problems


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MetricsHttpServer:
    """Serves ``render()`` as /metrics on a loopback port, in a thread of the test process."""

    def __init__(self, render):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                body = outer.render().encode("utf-8")
                outer.scrapes += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.render = render
        self.scrapes = 0
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class PrometheusServer:
    """A ``prometheus`` server on a free loopback port, scraping ``target`` ("host:port") every
    second, with its data in a temporary directory; always stopped on exit."""

    def __init__(self, target: str):
        self.binary = require_tool("prometheus")
        self.target = target
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="lmcn-prometheus-")
        self._process = None
        self.log = Path(self._dir.name) / "prometheus.log"

    def __enter__(self):
        config = Path(self._dir.name) / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: lmcache_native\n    static_configs:\n"
            f"      - targets: ['{self.target}']\n")
        self._log_file = open(self.log, "w")
        self._process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self._dir.name}/data",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log_file, stderr=subprocess.STDOUT)
        return self

    def __exit__(self, *exc):
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._log_file.close()
        self._dir.cleanup()

    def query(self, promql: str) -> list:
        """The result vector of an instant query ([] while the server starts or has no sample yet)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={urllib.parse.quote(promql)}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = json.load(response)
        except OSError:
            return []
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, deadline_s: float = 30.0) -> list:
        """Polls ``promql`` until it returns a sample, for at most ``deadline_s`` seconds."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            assert self._process.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            result = self.query(promql)
            if result:
                return result
            time.sleep(0.25)
        raise AssertionError(f"no sample for {promql} within {deadline_s} s; log:\n{self.log.read_text()[-3000:]}")
