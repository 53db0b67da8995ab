"""vLLM V1 KV connector over LMCacheNative (liblmcache_native.so).

Start vLLM with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"LMCacheNativeConnector",
        "kv_connector_module_path":"lmcache_native.vllm_connector", "kv_role":"kv_both"}'

and LMCache's environment variables (``LMCACHE_CHUNK_SIZE``, ``LMCACHE_CONFIG_FILE``, ...) or
``kv_connector_extra_config`` keys ``lmcache.<key>``. docs/vllm-connector.md has the details.

This module is the thin facade vLLM loads: ``LMCacheNativeConnector`` resolves the configuration and
delegates by role, as vLLM's larger connectors do:

* ``_scheduler.SchedulerPart`` -- lookups, LMCache's hit accounting, per-request trackers, each
  step's metadata, ``request_finished``;
* ``_worker.WorkerPart`` -- the engine and its KV layers, loads and saves as the library's jobs, the
  preemption fences, ``get_finished``;
* ``_metadata`` -- the picklable metadata and statistics; ``_compat`` -- the vLLM era shims;
  ``_connector_config`` -- the configuration (engine keys from the library's schema);
* ``_prometheus`` -- LMCache's ``lmcache:*`` Prometheus metrics through prometheus_client, every rank
  and the scheduler (docs/metrics.md).

Importing this module loads nothing: no library, no torch, no threads, no sockets. The library is
loaded in ``__init__``; the worker creates its engine in ``register_kv_caches``. No hook raises for a
miss or a library error: a lookup degrades to a miss, a load to invalid blocks, a save to a skipped
save, each with a log line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from . import _compat
from . import _connector_config as _cfg
from ._compat import KVConnectorBase_V1, KVConnectorRole
from ._connector_common import build_extra_key, configure_logging, logger, lookup_socket_path, module_lock
from ._metadata import (LMCacheNativeConnectorMetadata, LMCacheNativeKVConnectorStats, LMCacheNativePromMetrics,
                        LoadSpec, SaveSpec)
from ._redact import redact_config
from ._scheduler import LOOKUP_POOL_THREADS

__all__ = ["LMCacheNativeConnector", "LMCacheNativeConnectorMetadata", "LMCacheNativeKVConnectorStats",
           "LoadSpec", "SaveSpec", "build_extra_key"]

# Compatibility names (tests and tools of the single-module connector).
_lookup_socket_path = lookup_socket_path
_LOOKUP_POOL_THREADS = LOOKUP_POOL_THREADS
_config_logged = False


@dataclass
class _Settings:
    """The resolved configuration as both parts read it."""

    lmc: Any
    config: Any
    engine_config: dict
    kv_role: str
    chunk_size: int
    save_unfull_chunk: bool
    save_decode_cache: bool
    min_retrieve_tokens: int
    priority_limit: Optional[int]
    lookup_timeout_s: float
    flush_timeout_s: float
    skip_last_n_tokens: int
    load_async: bool
    save_async: bool
    force_skip_save: bool
    block_size: int
    model: str
    use_mla: bool
    world_size: int
    rank: int
    dp_rank: int
    rpc_port: int
    lookup_namespace: str
    kv_events: bool = False  # enable_kv_events, on a vLLM that carries connector KV events


def _settings(vllm_config, lmc) -> _Settings:
    transfer_config = vllm_config.kv_transfer_config
    extra = getattr(transfer_config, "kv_connector_extra_config", None) or {}
    config = _cfg.resolve(extra)  # ConfigError (a ValueError) on an invalid value
    try:  # LMCache's switch to turn every save off
        force_skip_save = _cfg._bool(os.environ.get("LMCACHE_FORCE_SKIP_SAVE") or "false", True)
    except ValueError:
        raise _cfg.ConfigError("LMCACHE_FORCE_SKIP_SAVE must be true or false") from None
    cache_config = getattr(vllm_config, "cache_config", None)
    model_config = getattr(vllm_config, "model_config", None)
    parallel_config = getattr(vllm_config, "parallel_config", None)
    tp = int(getattr(parallel_config, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(parallel_config, "pipeline_parallel_size", 1) or 1)
    rank = int(getattr(parallel_config, "rank", 0) or 0)
    dp_rank = int(getattr(parallel_config, "data_parallel_rank", 0) or 0)
    model = str(getattr(model_config, "model", "") or "")
    rpc_port = int(config.plain["lmcache_rpc_port"])
    engine_config = dict(config.engine)  # only the engine's keys: it refuses the connector's
    if engine_config.get("local_disk"):
        # LMCache's local_disk_path_sharding "by_gpu": one directory per rank (a directory has one
        # writing owner; the ranks' records differ anyway)
        engine_config["local_disk"] = os.path.join(str(engine_config["local_disk"]), f"rank{rank}")
    return _Settings(
        lmc=lmc, config=config, engine_config=engine_config,
        kv_role=getattr(transfer_config, "kv_role", None) or "kv_both",
        chunk_size=int(config.get("chunk_size")),
        save_unfull_chunk=bool(config.get("save_unfull_chunk")) and not config.plain["discard_partial_chunks"],
        save_decode_cache=bool(config.get("save_decode_cache")),
        min_retrieve_tokens=int(config.get("min_retrieve_tokens")),
        priority_limit=config.get("priority_limit"),
        lookup_timeout_s=float(config.get("lookup_timeout_ms")) / 1000.0,
        flush_timeout_s=float(config.get("blocking_timeout_secs")),
        skip_last_n_tokens=int(config.plain["skip_last_n_tokens"]),
        load_async=bool(config.get("enable_async_loading")),
        # a worker can only fence a store that reads a preempted request's blocks where vLLM says so
        save_async=bool(config.get("async_saving")) and _compat.tells_preemptions(),
        force_skip_save=force_skip_save,
        block_size=int(getattr(cache_config, "block_size", None) or 16),
        model=model, use_mla=bool(getattr(model_config, "use_mla", False)),
        world_size=tp * pp, rank=rank, dp_rank=dp_rank, rpc_port=rpc_port,
        lookup_namespace=f"{model}|{rpc_port}|{dp_rank}",
        kv_events=bool(config.get("enable_kv_events")) and _kv_events_supported())


def _kv_events_supported() -> bool:
    from . import _events

    return _events.supported()


def _load_library():
    import lmcache_native  # loads the library here, in __init__, not at import

    lmcache_native.Engine  # noqa: B018  (binds the package's names when imported lazily)
    return lmcache_native


def _log_configuration_once(settings: _Settings) -> None:
    global _config_logged
    with module_lock:
        if _config_logged:
            return
        _config_logged = True
    shown = dict(settings.config.values)
    shown.update(settings.config.plain)
    # Logs are shared widely; remote_url may carry a password (redis://user:PASSWORD@host)
    logger.info("LMCache Configuration: %s", json.dumps(redact_config(shown), sort_keys=True, default=str))


class LMCacheNativeConnector(KVConnectorBase_V1):
    """LMCache's connector behaviour over LMCacheNative: a facade over the scheduler part and the
    worker part of its role. See the module docstring."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        _compat.init_base(self, vllm_config, role, kv_cache_config)
        configure_logging()
        if kv_cache_config is not None:
            groups = getattr(kv_cache_config, "kv_cache_groups", None)
            if groups is not None and len(groups) > 1:
                raise ValueError(
                    f"LMCacheNativeConnector supports one KV cache group, got {len(groups)}: start vLLM "
                    "with --disable-hybrid-kv-cache-manager")
        lmc = _load_library()
        self._settings = _settings(vllm_config, lmc)
        self._config = self._settings.config
        self._closed = False
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from ._scheduler import SchedulerPart
            self._scheduler = SchedulerPart(self._settings)
        else:
            from ._worker import WorkerPart
            self._worker = WorkerPart(self._settings, self)
        _log_configuration_once(self._settings)

    # ============================================================================================
    # Worker side
    # ============================================================================================
    def register_kv_caches(self, kv_caches: dict) -> None:
        if self._worker is not None:
            self._worker.register_kv_caches(kv_caches)

    def register_cross_layers_kv_cache(self, kv_cache, attn_backend=None) -> None:
        """Never requested (``prefer_cross_layer_blocks`` is False); a cross-layer tensor with a
        leading layers dimension is registered layer by layer if a vLLM calls it anyway."""
        self.register_kv_caches({f"layer.{index}": kv_cache[index] for index in range(kv_cache.shape[0])})

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        return False

    def set_host_xfer_buffer_ops(self, copy_operation) -> None:
        """vLLM's copy_kv_blocks: not needed, the library copies itself."""

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        try:
            if self._worker is not None:
                self._worker.start_load_kv(forward_context)
        except Exception as error:  # an exception out of a hook would kill vLLM's worker
            logger.error("LMCacheNative: start_load_kv failed: %s", error, exc_info=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        try:
            if self._worker is not None:
                self._worker.wait_for_layer_load(layer_name)
        except Exception as error:
            logger.error("LMCacheNative: wait_for_layer_load failed: %s", error, exc_info=True)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        """Saves happen in wait_for_save: per-layer hooks are skipped under full CUDA graphs."""

    def wait_for_save(self) -> None:
        try:
            if self._worker is not None:
                self._worker.wait_for_save()
        except Exception as error:
            logger.error("LMCacheNative: wait_for_save failed: %s", error, exc_info=True)

    def handle_preemptions(self, preempted=None, *args, **kwargs) -> None:
        """Accepts vLLM's set of preempted request ids (≈0.14-0.17) or the step's metadata (≈0.18+);
        waits for the jobs that still read or write a preempted request's blocks."""
        try:
            if self._worker is not None:
                self._worker.handle_preemptions(preempted)
        except Exception as error:
            logger.error("LMCacheNative: handle_preemptions failed: %s", error, exc_info=True)

    def get_finished(self, finished_req_ids: set) -> tuple:
        if self._worker is None:
            return None, None
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set:
        return self._worker.get_block_ids_with_load_errors() if self._worker is not None else set()

    def get_kv_connector_kv_cache_events(self):
        """This rank's KV events since the last call (an ``LMCacheNativeKVEvents``, vLLM's
        KVConnectorKVEvents), or None. vLLM combines the ranks' and hands them to the scheduler's
        ``update_connector_output``."""
        return self._worker.take_kv_events() if self._worker is not None else None

    def get_kv_connector_stats(self):
        """This instance's counters since the last call (None when nothing happened, or on a vLLM
        without the stats API)."""
        if LMCacheNativeKVConnectorStats is None:
            return None
        part = self._worker if self._worker is not None else self._scheduler
        data = part.take_stats() if part is not None else {}
        if not any(data.values()):
            return None
        return LMCacheNativeKVConnectorStats(data=data)

    # ============================================================================================
    # Scheduler side
    # ============================================================================================
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple:
        """(tokens vLLM may treat as computed beyond num_computed_tokens, load asynchronously?).
        Idempotent: the lookup result is only remembered until update_state_after_alloc. On vLLM
        >= 0.11 a lookup that may block runs in the background and the answer is (None, False)
        until it has finished."""
        if self._scheduler is None:
            return 0, False
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if self._scheduler is not None:
            self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        if self._scheduler is None:
            return LMCacheNativeConnectorMetadata(self._settings.block_size)
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request, block_ids) -> tuple:
        """(True, None) while an asynchronous save may still read the request's blocks (vLLM frees
        them once the workers report the request in finished_sending), else (False, None)."""
        try:
            if self._scheduler is not None:
                return self._scheduler.request_finished(request, block_ids)
        except Exception as error:
            logger.error("LMCacheNative: request_finished failed: %s", error, exc_info=True)
        return False, None

    def update_connector_output(self, connector_output) -> None:
        """The workers track their jobs; only their KV events (combined by vLLM) are taken in here."""
        if self._scheduler is None:
            return
        try:
            self._scheduler.add_kv_events(getattr(connector_output, "kv_cache_events", None))
        except Exception as error:  # events are advisory: never fail a step for them
            logger.warning("LMCacheNative: KV events of the workers not read: %s", error)

    def take_events(self) -> Iterable:
        """vLLM's BlockStored / BlockRemoved / AllBlocksCleared since the last call, one per chunk
        and medium across the TP ranks (docs/vllm-connector.md, "KV events")."""
        if self._scheduler is None:
            return ()
        try:
            return self._scheduler.take_kv_events()
        except Exception as error:
            logger.warning("LMCacheNative: KV events not published: %s", error)
            return ()

    def get_finished_count(self):
        return None

    def reset_cache(self):
        """Drops the CPU tier of the engines in this process (lower tiers keep their records)."""
        if self._worker is not None:
            return self._worker.reset_cache()
        if self._scheduler is not None:
            return self._scheduler.reset_cache()
        return True

    # -- class methods vLLM calls without an instance ---------------------------------------------
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config):
        return None  # any layout: it is derived from the registered tensors

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config) -> bool:
        return False  # no work in the per-layer hooks

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        if LMCacheNativeKVConnectorStats is None:
            return None
        return LMCacheNativeKVConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        """vLLM's per-connector Prometheus metrics over the stats reports (None on a vLLM without
        them). LMCache's lmcache:* metrics are published separately (docs/metrics.md)."""
        if LMCacheNativePromMetrics is None:
            return None
        return LMCacheNativePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- shutdown ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Idempotent, in both roles: waits for and closes the jobs, forgets pending lookups, stops
        the lookup server, flushes the lower tiers (bounded by blocking_timeout_secs) and destroys
        the engine."""
        if self._closed:
            return
        self._closed = True
        for part in (self._worker, self._scheduler):
            if part is not None:
                try:
                    part.shutdown()
                except Exception as error:
                    logger.warning("LMCacheNative: shutdown: %s", error)

    # -- introspection for tests and debugging ----------------------------------------------------
    def internal_state_sizes(self) -> dict:
        """Sizes of every per-request map (all 0 once all requests are finished and reported)."""
        sizes = {}
        for part in (self._scheduler, self._worker):
            if part is not None:
                sizes.update(part.internal_state_sizes())
        return sizes
