"""What the scheduler-side connector sends its workers each step, and the statistics the workers send
back: plain, picklable data only (vLLM's multiprocess executor pickles both).

The classes subclass vLLM's ``KVConnectorMetadata`` / ``KVConnectorStats`` and must be importable by
name in every process (module level); importing this module imports vLLM's base module and nothing of
the library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ._compat import KVConnectorMetadata, KVConnectorPromMetricsBase, KVConnectorStatsBase


@dataclass
class LoadSpec:
    """One request's load: write the KV of ``token_ids`` (the cached prefix found by the lookup)
    into its blocks, from token ``first_token`` (vLLM's own computed tokens are never written) up to
    at least ``expected_tokens``."""

    req_id: str
    token_ids: list
    block_ids: list
    first_token: int
    expected_tokens: int
    is_async: bool
    extra_key: bytes = b""
    fail: bool = False  # the scheduler could not honour vLLM's count: report the blocks invalid


@dataclass
class SaveSpec:
    """One request's save: store the KV of ``token_ids`` (the first ``len(token_ids)`` tokens of the
    request) from its blocks, skipping the ``skip_leading_tokens`` already stored. ``is_async``: as a
    job, whose end the worker reports in finished_sending once the request has finished."""

    req_id: str
    token_ids: list
    block_ids: list
    skip_leading_tokens: int
    total_tokens: int
    extra_key: bytes = b""
    is_async: bool = False


class LMCacheNativeConnectorMetadata(KVConnectorMetadata):
    """Per-step work for the workers. Plain containers only (no handles, locks or tensors).

    ``delayed_free``: finished requests whose ``request_finished`` answered True (their blocks are
    held until every worker reports them in finished_sending, once their save jobs are done).
    ``preempted``: requests vLLM preempted in this step (vLLM >= 0.18 passes the metadata to
    ``handle_preemptions``)."""

    def __init__(self, block_size: int = 16, loads: Optional[list] = None, saves: Optional[list] = None,
                 delayed_free: Optional[list] = None, preempted: Optional[list] = None):
        self.block_size = block_size
        self.loads: list[LoadSpec] = list(loads or [])
        self.saves: list[SaveSpec] = list(saves or [])
        self.delayed_free: list[str] = list(delayed_free or [])
        self.preempted: list[str] = list(preempted or [])

    def __setstate__(self, state):  # metadata pickled by an older connector
        self.__dict__.update({"delayed_free": [], "preempted": []})
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"LMCacheNativeConnectorMetadata(block_size={self.block_size}, "
                f"loads={[l.req_id for l in self.loads]}, saves={[s.req_id for s in self.saves]}, "
                f"delayed_free={self.delayed_free}, preempted={self.preempted})")


STATS_KEYS = ("num_loads", "num_load_failures", "loaded_tokens", "loaded_bytes", "load_seconds", "num_stores",
              "stored_tokens", "stored_bytes", "store_seconds", "num_lookups", "lookup_hit_tokens")


def new_stats_dict() -> dict:
    return {key: (0.0 if key.endswith("_seconds") else 0) for key in STATS_KEYS}


if KVConnectorStatsBase is not None:
    class LMCacheNativeKVConnectorStats(KVConnectorStatsBase):
        """Counters since the last report: loads, stores, tokens, bytes, seconds, failures, lookups."""

        def __init__(self, data=None):
            try:
                super().__init__(data=dict(data or {}))
            except TypeError:  # a base without a data field
                self.data = dict(data or {})
            for key in STATS_KEYS:
                self.data.setdefault(key, 0)

        def reset(self):
            self.data = {key: 0 for key in STATS_KEYS}

        def aggregate(self, other):
            if other is not None:
                for key, value in getattr(other, "data", {}).items():
                    self.data[key] = self.data.get(key, 0) + value
            return self

        def reduce(self):
            return dict(self.data)

        def is_empty(self):
            return not any(self.data.get(key) for key in STATS_KEYS)
else:
    LMCacheNativeKVConnectorStats = None


# What LMCacheNativePromMetrics records from each stats report: (stats key, metric name, help).
PROM_COUNTERS = (
    ("num_loads", "vllm:lmcache_native_loads", "Loads (retrieves into vLLM's KV cache) the workers ran"),
    ("num_load_failures", "vllm:lmcache_native_load_failures", "Loads that wrote fewer tokens than promised"),
    ("loaded_tokens", "vllm:lmcache_native_loaded_tokens", "Tokens whose KV loads wrote into vLLM's KV cache"),
    ("loaded_bytes", "vllm:lmcache_native_loaded_bytes", "Bytes of KV loads wrote into vLLM's KV cache"),
    ("load_seconds", "vllm:lmcache_native_load_seconds", "Seconds the loads took, summed"),
    ("num_stores", "vllm:lmcache_native_stores", "Stores (saves of vLLM's KV) the workers ran"),
    ("stored_tokens", "vllm:lmcache_native_stored_tokens", "Tokens whose KV stores copied into the cache"),
    ("stored_bytes", "vllm:lmcache_native_stored_bytes", "Bytes of KV stores copied into the cache"),
    ("store_seconds", "vllm:lmcache_native_store_seconds", "Seconds the stores took, summed"),
    ("num_lookups", "vllm:lmcache_native_lookups", "Lookups the scheduler answered"),
    ("lookup_hit_tokens", "vllm:lmcache_native_lookup_hit_tokens", "Tokens the scheduler's lookups found cached"),
)

if KVConnectorPromMetricsBase is not None:
    class LMCacheNativePromMetrics(KVConnectorPromMetricsBase):
        """vLLM's per-connector Prometheus metrics (``build_prom_metrics``): the stats reports of
        ``LMCacheNativeKVConnectorStats`` (summed over the workers by vLLM) as counters with vLLM's
        labels, one series per engine. They travel with vLLM's own stats, so they reach ``/metrics``
        without PROMETHEUS_MULTIPROC_DIR; LMCache's ``lmcache:*`` metrics are published by
        ``_prometheus`` (docs/metrics.md)."""

        def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
            super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
            self._counters = {}
            for key, name, documentation in PROM_COUNTERS:
                counter = self._counter_cls(name=name, documentation=documentation, labelnames=list(labelnames))
                self._counters[key] = {engine: counter.labels(*values)
                                       for engine, values in per_engine_labelvalues.items()}

        def observe(self, transfer_stats_data: dict, engine_idx: int = 0):
            for key, per_engine in self._counters.items():
                value = (transfer_stats_data or {}).get(key, 0) or 0
                if value > 0 and engine_idx in per_engine:
                    per_engine[engine_idx].inc(value)
else:
    LMCacheNativePromMetrics = None
