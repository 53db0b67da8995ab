"""LMCache's Prometheus metrics for vLLM, through prometheus_client, as LMCache publishes them.

Where the numbers come from:

* **Worker** (role "worker", worker_id = the TP rank): the engine counts everything itself
  (``Engine.metrics()``, the C ABI's lmc_engine_get_metrics). ``EngineMirror`` copies that text into
  prometheus_client metrics of the same names, types, buckets and labels -- counters advanced by
  their increase, gauges set, histogram buckets and sums advanced by their increase -- at most once
  per ``MIRROR_INTERVAL_S`` from the worker's per-step ``get_finished`` (after the step's work, never
  inside it), and once more at shutdown. One read costs a few milliseconds of parsing.
* **Scheduler** (role "scheduler", worker_id = the data-parallel rank): what only vLLM's scheduler
  knows, counted where LMCache counts it: ``lmcache:num_prompt_tokens`` and
  ``lmcache:num_vllm_hit_tokens`` (vLLM's own prefix-cache hit) once per request, the lookup's
  round trip to every rank in ``lmcache:time_to_lookup``, and the ranks' lookups that failed
  (``lmcache:num_lookup_failures``: no answer, refused, I/O) or timed out
  (``lmcache:num_lookup_timeouts``), each of which counts as a miss.

Multiprocess: with ``PROMETHEUS_MULTIPROC_DIR`` set when prometheus_client is first imported (vLLM
sets it for its API servers; set it yourself otherwise, as with LMCache), every process writes its
values there and vLLM's ``/metrics`` (prometheus_client's MultiProcessCollector) shows every rank
and the scheduler. Gauges aggregate per label set: byte and object counts with "livesum", rates and
health with "livemostrecent" ("livemax" on prometheus_client < 0.17). Without the variable the
metrics live in this process's default registry (visible to whatever serves it, not to another
process). Without prometheus_client everything here is a no-op.
"""

from __future__ import annotations

import threading
import time

from ._connector_common import logger

MIRROR_INTERVAL_S = 1.0
LABELNAMES = ("model_name", "worker_id", "role")
# LMCache's buckets (lmcache/observability.py) for the metrics the scheduler observes itself.
LOOKUP_SECONDS_BUCKETS = [0.00001 * 2 ** i for i in range(20)]
# Gauges that are a single current value per label set rather than an amount to add up.
_LATEST_VALUE_GAUGES = {"lmcache:retrieve_hit_rate", "lmcache:lookup_hit_rate", "lmcache:lmcache_is_healthy",
                        "lmcache:remote_ping_latency"}

try:
    import prometheus_client
    from prometheus_client.parser import text_string_to_metric_families
except Exception:  # pragma: no cover - prometheus_client is an optional dependency
    prometheus_client = None

_lock = threading.Lock()
_collectors: dict = {}  # metric name -> Counter/Gauge/Histogram, one per process (names register once)


def available() -> bool:
    return prometheus_client is not None


def _gauge_mode(name: str) -> str:
    if name not in _LATEST_VALUE_GAUGES:
        return "livesum"
    modes = getattr(prometheus_client.Gauge, "_MULTIPROC_MODES", ())
    return "livemostrecent" if "livemostrecent" in modes else "livemax"


def _collector(kind: str, name: str, documentation: str, extra_labels=(), buckets=None):
    """The process's one collector for ``name`` (created on first use)."""
    with _lock:
        collector = _collectors.get(name)
        if collector is None:
            labelnames = list(LABELNAMES) + list(extra_labels)
            if kind == "counter":
                collector = prometheus_client.Counter(name, documentation, labelnames)
            elif kind == "gauge":
                collector = prometheus_client.Gauge(name, documentation, labelnames, multiprocess_mode=_gauge_mode(name))
            else:
                collector = prometheus_client.Histogram(name, documentation, labelnames, buckets=buckets)
            _collectors[name] = collector
        return collector


def _histogram_child_parts(child):
    """prometheus_client's per-bucket values (non-cumulative) and sum of a histogram child; None
    when this prometheus_client keeps them elsewhere (then histograms are not mirrored)."""
    buckets, total = getattr(child, "_buckets", None), getattr(child, "_sum", None)
    if buckets is None or total is None or not all(hasattr(b, "inc") for b in buckets):
        return None
    return buckets, total


class EngineMirror:
    """Copies one worker engine's metrics into prometheus_client (see the module docstring)."""

    def __init__(self, model_name: str, worker_id: int):
        self._labels = {"model_name": str(model_name), "worker_id": str(worker_id), "role": "worker"}
        self._last: dict = {}  # (family, extra label items) -> last value(s) seen
        self._engine_id = None
        self._next_at = 0.0
        self._warned = False

    def maybe_publish(self, engine) -> None:
        """Publishes when ``MIRROR_INTERVAL_S`` has passed since the last time (cheap otherwise)."""
        now = time.monotonic()
        if now < self._next_at:
            return
        self._next_at = now + MIRROR_INTERVAL_S
        self.publish(engine)

    def publish(self, engine) -> None:
        if prometheus_client is None or engine is None:
            return
        try:
            text = engine.metrics()
            if id(engine) != self._engine_id:  # a new engine counts from 0 again
                self._engine_id, self._last = id(engine), {}
            for family in text_string_to_metric_families(text):
                if family.type in ("counter", "gauge"):
                    self._mirror_scalar(family)
                elif family.type == "histogram":
                    self._mirror_histogram(family)
        except Exception as error:  # metrics must never disturb the worker
            if not self._warned:
                self._warned = True
                logger.warning("LMCacheNative: publishing metrics failed (not retried in the log): %s", error)

    def _mirror_scalar(self, family) -> None:
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_total"):
                continue  # prometheus_client's parser may add _created samples
            extra = {k: v for k, v in sample.labels.items() if k not in LABELNAMES}
            collector = _collector(family.type, family.name, family.documentation, tuple(sorted(extra)))
            child = collector.labels(**self._labels, **extra)
            key = (family.name, tuple(sorted(extra.items())))
            if family.type == "gauge":
                child.set(sample.value)
            else:
                increase = sample.value - self._last.get(key, 0.0)
                if increase > 0:
                    child.inc(increase)
                self._last[key] = max(sample.value, self._last.get(key, 0.0))

    def _mirror_histogram(self, family) -> None:
        bounds, cumulative, total = [], [], 0.0
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                if le != "+Inf":
                    bounds.append(float(le))
                cumulative.append(sample.value)
            elif sample.name.endswith("_sum"):
                total = sample.value
        collector = _collector("histogram", family.name, family.documentation, buckets=bounds)
        parts = _histogram_child_parts(collector.labels(**self._labels))
        if parts is None:
            return
        buckets, sum_value = parts
        counts = [c - (cumulative[i - 1] if i else 0) for i, c in enumerate(cumulative)]
        key = (family.name, ())
        last_counts, last_sum = self._last.get(key, ([0.0] * len(counts), 0.0))
        if len(buckets) != len(counts):
            return  # registered with other buckets (histogram_bucket overrides differ): leave it
        for bucket, now, before in zip(buckets, counts, last_counts):
            if now > before:
                bucket.inc(now - before)
        if total > last_sum:
            sum_value.inc(total - last_sum)
        self._last[key] = (counts, total)


class SchedulerMetrics:
    """What only vLLM's scheduler knows (see the module docstring)."""

    def __init__(self, model_name: str, dp_rank: int):
        self._labels = {"model_name": str(model_name), "worker_id": str(dp_rank), "role": "scheduler"}
        self._counted: set = set()  # requests whose prompt and vLLM hit are counted

    def request_seen(self, req_id, num_prompt_tokens: int, num_vllm_hit_tokens: int) -> None:
        """Counts a request's prompt and vLLM's prefix-cache hit once, however often vLLM asks."""
        if prometheus_client is None or req_id in self._counted:
            return
        self._counted.add(req_id)
        _collector("counter", "lmcache:num_prompt_tokens", "Number of prompt tokens in lmcache").labels(
            **self._labels).inc(max(int(num_prompt_tokens), 0))
        _collector("counter", "lmcache:num_vllm_hit_tokens", "Number of hit tokens in vllm").labels(
            **self._labels).inc(max(int(num_vllm_hit_tokens), 0))

    def request_forgotten(self, req_id) -> None:
        self._counted.discard(req_id)

    def lookup_done(self, seconds: float, failures: int, timeouts: int) -> None:
        if prometheus_client is None:
            return
        _collector("histogram", "lmcache:time_to_lookup", "Time to lookup in lmcache (seconds)",
                   buckets=LOOKUP_SECONDS_BUCKETS).labels(**self._labels).observe(seconds)
        failed = _collector("counter", "lmcache:num_lookup_failures",
                            "Total number of ranks' lookups that failed (no answer, refused, I/O) and counted as a miss")
        timed_out = _collector("counter", "lmcache:num_lookup_timeouts",
                               "Total number of ranks' lookups that timed out (lookup_timeout_ms) and counted as a miss")
        failed.labels(**self._labels).inc(failures)
        timed_out.labels(**self._labels).inc(timeouts)
