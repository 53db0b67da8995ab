"""The worker-side part of the vLLM connector: the engine and its KV layers, loads and saves as the
library's jobs, the fences vLLM's block reuse needs, and what ``get_finished`` reports.

* Synchronous loads run in ``start_load_kv`` (or whichever of ``wait_for_layer_load`` /
  ``wait_for_save`` comes first in a step) and are complete before attention reads a layer.
* Asynchronous loads start there as retrieve jobs with the request's block table; ``get_finished``
  polls them (``Job.done()``, never blocking) and reports a request in finished_recving only once its
  job has completed -- also when it was aborted, since vLLM frees its blocks on that report.
* Saves run in ``wait_for_save``: as store jobs with ``async_saving`` (vLLM >= 0.14), reported in
  finished_sending for the requests whose ``request_finished`` delayed freeing their blocks once the
  jobs are done; synchronously otherwise. ``handle_preemptions`` waits for a preempted request's jobs
  before vLLM reuses its blocks.
* Every byte and token count logged or counted comes from the library's transfer result.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from . import _compat, _events
from ._connector_common import LOCAL_ENGINES, logger, lookup_socket_path, module_lock
from ._metadata import LMCacheNativeConnectorMetadata, LoadSpec, SaveSpec, new_stats_dict
from ._prometheus import EngineMirror


class _Transfer:
    """A load or store job in flight."""

    __slots__ = ("spec", "job", "block_size", "error")

    def __init__(self, spec, job, block_size: int, error: Optional[BaseException] = None):
        self.spec, self.job, self.block_size, self.error = spec, job, block_size, error

    def done(self) -> bool:
        if self.job is None:
            return True
        try:
            return bool(self.job.done())
        except Exception:
            return True

    def result(self, timeout_s: Optional[float] = 0):
        """The job's TransferResult (waiting up to timeout_s; None waits as long as it takes), or
        raises the job's (or its start's) error."""
        if self.job is None:
            raise self.error or RuntimeError("the job did not start")
        if timeout_s == 0 and hasattr(self.job, "result"):
            return self.job.result()
        return self.job.wait(timeout_s)

    def close(self) -> None:
        job, self.job = self.job, None
        if job is not None:
            try:
                job.close()
            except Exception:
                pass


class WorkerPart:
    def __init__(self, settings, connector):
        self._settings = settings
        self._connector = connector  # the facade: bound metadata, vLLM's configs
        self._lmc = settings.lmc
        self._closed = False
        self.engine = None
        self._layer_tensors: list = []
        self._kv_caches: dict = {}
        self._layer_names: list[str] = []
        self._bytes_per_token = 0
        self._serving_socket: Optional[str] = None
        self._step_meta = None  # the metadata object whose step has been started
        self._sync_loads_pending: list[LoadSpec] = []
        self._loads: dict[str, _Transfer] = {}  # asynchronous loads in flight, by request
        self._stores: dict[str, list[_Transfer]] = {}  # store jobs in flight, by request, in start order
        self._sending_pending: set[str] = set()  # finished requests vLLM holds the blocks of
        self._finished_recving: set[str] = set()
        self._finished_sending: set[str] = set()
        self._invalid_block_ids: set[int] = set()
        self._failed_load_reqs: set[str] = set()
        self._stats = new_stats_dict()
        # KV events of this rank not yet handed to vLLM (records of _events), e.g. the clear that a
        # replaced engine implies; None when enable_kv_events is off or vLLM cannot carry them.
        self._kv_event_backlog: Optional[list] = [] if settings.kv_events else None
        # LMCache's Prometheus metrics: the engine's own counters, copied into prometheus_client
        self._metrics = EngineMirror(settings.model, settings.rank)

    # -- registration ------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict) -> None:
        """Creates the worker's engine and registers the KV layers (layout derived from each
        tensor's shape and strides); starts serving lookups to the scheduler process."""
        if self._closed:
            return
        from . import _kv_layout

        s, connector = self._settings, self._connector
        layers = _kv_layout.describe_kv_caches(kv_caches, connector._vllm_config, connector._kv_cache_config,
                                               use_mla=s.use_mla)
        namespace = _kv_layout.namespace_string(s.model, layers, connector._vllm_config)
        if self.engine is not None:
            self._close_engine()
            if self._kv_event_backlog is not None:  # the old engine's CPU tier is gone with it
                self._kv_event_backlog.append(_events.RankEvent(s.rank, _events.CLEARED, "CPU", None, None, 0, None))
        engine = self._lmc.Engine(s.engine_config, model_name=namespace, world_size=s.world_size,
                                  worker_id=s.rank)
        try:
            engine.register_layers([layer.desc for layer in layers])
        except Exception:
            engine.close()
            raise
        self.engine = engine
        self._kv_caches = dict(kv_caches)
        self._layer_tensors = [layer.tensor for layer in layers]  # keeps the memory referenced
        self._layer_names = [layer.name for layer in layers]
        self._bytes_per_token = engine.bytes_per_token
        logger.info("LMCacheNative engine for %s: rank %d of %d, %d layer(s) registered (%s), %d KV bytes "
                    "per token", s.model, s.rank, s.world_size, len(layers),
                    ", ".join(sorted({layer.layout for layer in layers})), self._bytes_per_token)
        with module_lock:
            LOCAL_ENGINES.setdefault(s.lookup_namespace, {})[s.rank] = engine
        self._start_lookup_server()

    def _start_lookup_server(self) -> None:
        if not hasattr(self.engine, "start_lookup_server"):
            return
        s = self._settings
        try:
            path = lookup_socket_path(s.model, s.rpc_port, s.dp_rank, s.rank)
        except Exception as error:  # the private socket directory is not safe: serve no lookups
            logger.warning("LMCacheNative: not serving lookups: %s; a scheduler in another process will see "
                           "misses.", error)
            return
        try:
            self.engine.start_lookup_server(path)
        except Exception as error:  # another instance on the same socket, unwritable directory, ...
            logger.warning("LMCacheNative: cannot serve lookups on %s (%s); a scheduler in another process "
                           "will see misses. Set kv_connector_extra_config lmcache_rpc_port to a value no "
                           "other vLLM instance on this machine uses.", path, error)
            return
        self._serving_socket = path

    def ensure_registered(self, forward_context) -> None:
        """vLLM builds that never call register_kv_caches: take the layers from the forward context."""
        if self.engine is not None or self._closed or forward_context is None:
            return
        layers = getattr(forward_context, "no_compile_layers", None) or {}
        kv_caches = {}
        for name, layer in layers.items():
            kv = getattr(layer, "kv_cache", None)
            if kv is None:
                continue
            if isinstance(kv, (list, tuple)):
                kv = kv[getattr(forward_context, "virtual_engine", 0) or 0] if kv else None
            if kv is not None and hasattr(kv, "data_ptr") and kv.numel() > 0:
                kv_caches[name] = kv
        if kv_caches:
            try:
                self.register_kv_caches(kv_caches)
            except Exception as error:
                logger.error("LMCacheNative: cannot register the KV caches of the forward context: %s", error)

    # -- steps -------------------------------------------------------------------------------------
    def _begin_step(self) -> Optional[LMCacheNativeConnectorMetadata]:
        """The bound metadata; on its first use in a step, queue its sync loads and start its async
        ones. Idempotent within a step, so every hook may call it (vLLM's hook order drifts)."""
        meta = self._connector._connector_metadata
        if not isinstance(meta, LMCacheNativeConnectorMetadata):
            return None
        if meta is not self._step_meta:
            self._step_meta = meta
            self._failed_load_reqs = set()
            self._sync_loads_pending = []
            for req_id in getattr(meta, "preempted", ()):  # already fenced by handle_preemptions
                self._fence(req_id)
            self._sending_pending.update(getattr(meta, "delayed_free", ()))
            for load in meta.loads:
                if load.is_async:
                    self._start_async_load(load, meta.block_size)
                else:
                    self._sync_loads_pending.append(load)
        return meta

    def _run_sync_loads(self) -> None:
        loads, self._sync_loads_pending = self._sync_loads_pending, []
        block_size = self._step_meta.block_size if self._step_meta is not None else self._settings.block_size
        for load in loads:
            self._load_now(load, block_size)

    def start_load_kv(self, forward_context) -> None:
        self.ensure_registered(forward_context)
        if self._begin_step() is not None:
            self._run_sync_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Sync loads are whole-request copies done before the first layer's attention; this only
        # matters where start_load_kv runs after the forward (vLLM >= 0.28 without has_sync_kv_loads).
        if self._begin_step() is not None and self._sync_loads_pending:
            self._run_sync_loads()

    def wait_for_save(self) -> None:
        meta = self._begin_step()
        if meta is None:
            return
        self._run_sync_loads()
        if self._settings.kv_role == "kv_consumer" or self.engine is None:
            return
        for save in meta.saves:
            if save.req_id in self._failed_load_reqs:
                # Its context was not loaded, so the KV computed this step is wrong; vLLM recomputes.
                logger.debug("LMCacheNative: not storing request %s after its failed load", save.req_id)
                continue
            if getattr(save, "is_async", False):
                self._start_store(save, meta.block_size)
            else:
                self._store_now(save, meta.block_size)

    def handle_preemptions(self, argument) -> None:
        """Waits for the jobs of the preempted requests: vLLM reuses their blocks in this step."""
        for req_id in _compat.preempted_from_argument(argument):
            self._fence(req_id)

    def _fence(self, req_id) -> None:
        stores = self._stores.pop(req_id, None)
        for transfer in stores or ():
            self._finish_store(transfer, wait=True)
        load = self._loads.get(req_id)
        if load is not None and load.job is not None:
            try:
                load.job.wait(None)  # get_finished reports it as usual
            except Exception:
                pass

    def get_finished(self, finished_req_ids) -> tuple:
        """(finished_sending, finished_recving). A load is reported once its job has completed
        (successfully or not: a failed one reports its blocks through get_block_ids_with_load_errors),
        also for a request aborted while loading; a finished request whose blocks vLLM holds for its
        saves is reported once its store jobs are done. Never waits."""
        try:
            self._begin_step()
            for req_id in finished_req_ids or ():
                if req_id in self._loads:
                    logger.info("LMCacheNative: request %s finished while loading; reported once the load's job "
                                "has completed", req_id)
            for req_id in [r for r, transfer in self._loads.items() if transfer.done()]:
                transfer = self._loads.pop(req_id)
                self._finish_load(transfer)
                self._finished_recving.add(req_id)
            for req_id in list(self._stores):
                transfers = self._stores[req_id]
                while transfers and transfers[0].done():
                    self._finish_store(transfers.pop(0), wait=False)
                if not transfers:
                    del self._stores[req_id]
            for req_id in [r for r in self._sending_pending if r not in self._stores]:
                self._sending_pending.discard(req_id)
                self._finished_sending.add(req_id)
        except Exception as error:
            logger.error("LMCacheNative: get_finished failed: %s", error, exc_info=True)
        sending, self._finished_sending = self._finished_sending, set()
        recving, self._finished_recving = self._finished_recving, set()
        self._metrics.maybe_publish(self.engine)  # once a second at most, after the step's work
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set:
        errors, self._invalid_block_ids = self._invalid_block_ids, set()
        return errors

    def take_stats(self) -> dict:
        data, self._stats = self._stats, new_stats_dict()
        return data

    # -- loads -------------------------------------------------------------------------------------
    def _start_async_load(self, load: LoadSpec, block_size: int) -> None:
        if load.req_id in self._loads:
            return
        job, error = None, None
        if self.engine is not None and not load.fail:
            try:
                job = self.engine.retrieve_async(load.token_ids, first_token_to_write=load.first_token,
                                                 extra_key=load.extra_key, block_ids=load.block_ids,
                                                 block_size=block_size)
            except Exception as caught:
                logger.warning("LMCacheNative: retrieve for request %s failed to start: %s", load.req_id, caught)
                error = caught
        self._loads[load.req_id] = _Transfer(load, job, block_size, error)

    def _load_now(self, load: LoadSpec, block_size: int) -> None:
        """A synchronous load: the request's cached prefix written into its blocks before returning."""
        result = None
        if self.engine is not None and not load.fail:
            try:
                result = self.engine.retrieve(load.token_ids, first_token_to_write=load.first_token,
                                              extra_key=load.extra_key, block_ids=load.block_ids,
                                              block_size=block_size)
            except Exception as error:
                logger.warning("LMCacheNative: retrieve for request %s failed: %s", load.req_id, error)
        self._account_load(load, block_size, result, attempted=self.engine is not None and not load.fail)

    def _finish_load(self, transfer: _Transfer) -> None:
        load, result = transfer.spec, None
        attempted = transfer.job is not None
        if attempted:
            try:
                result = transfer.result(0)
            except Exception as error:
                logger.warning("LMCacheNative: retrieve for request %s failed: %s", load.req_id, error)
        elif transfer.error is not None:
            attempted = True  # it failed to start: logged then, counted now
        transfer.close()
        self._account_load(load, transfer.block_size, result, attempted)

    def _account_load(self, load: LoadSpec, block_size: int, result, attempted: bool) -> None:
        """Logs and counts a load from its TransferResult (None: it failed); blocks it could not
        fill go to get_block_ids_with_load_errors (vLLM recomputes them)."""
        retrieved = int(getattr(result, "tokens_matched", 0) or 0) if result is not None else 0
        written = int(getattr(result, "tokens_copied", 0) or 0) if result is not None else 0
        nbytes = int(getattr(result, "bytes_copied", 0) or 0) if result is not None else 0
        seconds = (getattr(result, "elapsed_ns", 0) or 0) / 1e9 if result is not None else 0.0
        if attempted:
            gigabytes = nbytes / 2**30
            num_tokens = len(load.token_ids)
            logger.info("[req_id=%s] Retrieved %d out of %d required tokens (from %d total tokens). size: "
                        "%.6f gb, cost %.4f ms, throughput: %.4f GB/s;", load.req_id, written,
                        max(num_tokens - load.first_token, 0), num_tokens, gigabytes,
                        seconds * 1000, gigabytes / seconds if seconds > 0 else 0.0)
        stats = self._stats
        stats["num_loads"] += 1
        stats["loaded_tokens"] += written
        stats["loaded_bytes"] += nbytes
        stats["load_seconds"] += seconds
        if retrieved < load.expected_tokens:
            first_bad = max(retrieved, load.first_token)
            blocks = load.block_ids
            bad_blocks = {blocks[token // block_size]
                          for token in range(first_bad, load.expected_tokens, 1)
                          if token // block_size < len(blocks)}
            self._invalid_block_ids |= bad_blocks
            self._failed_load_reqs.add(load.req_id)
            stats["num_load_failures"] += 1
            if retrieved > load.first_token or not load.fail:
                logger.warning("The number of retrieved tokens is less than the expected number of tokens! "
                               "This should not happen!")
            logger.warning("Request %s failed to load %d tokens across %d blocks", load.req_id,
                           load.expected_tokens - first_bad, len(bad_blocks))

    # -- saves -------------------------------------------------------------------------------------
    def _save_stream(self) -> int:
        """The stream a store's copy is ordered on: for GPU layers, the current torch stream, which the
        step's forward pass wrote the KV on (vLLM may call wait_for_save before that work is done);
        0 (ignored) for host layers."""
        first = self._layer_tensors[0] if self._layer_tensors else None
        if first is None or not getattr(first, "is_cuda", False):
            return 0
        import torch

        return torch.cuda.current_stream(first.device).cuda_stream

    def _start_store(self, save: SaveSpec, block_size: int) -> None:
        try:
            job = self.engine.store_async(save.token_ids, skip_leading_tokens=save.skip_leading_tokens,
                                          extra_key=save.extra_key, block_ids=save.block_ids,
                                          block_size=block_size, stream=self._save_stream())
        except Exception as error:
            logger.warning("LMCacheNative: store for request %s failed: %s", save.req_id, error)
            return
        self._stores.setdefault(save.req_id, []).append(_Transfer(save, job, block_size))

    def _store_now(self, save: SaveSpec, block_size: int) -> None:
        try:
            result = self.engine.store(save.token_ids, skip_leading_tokens=save.skip_leading_tokens,
                                       extra_key=save.extra_key, block_ids=save.block_ids, block_size=block_size,
                                       stream=self._save_stream())
        except Exception as error:
            logger.warning("LMCacheNative: store for request %s failed: %s", save.req_id, error)
            return
        self._account_store(save, result)

    def _finish_store(self, transfer: _Transfer, wait: bool) -> None:
        try:
            result = transfer.result(None if wait else 0)
        except Exception as error:
            logger.warning("LMCacheNative: store for request %s failed: %s", transfer.spec.req_id, error)
            result = None
        transfer.close()
        if result is not None:
            self._account_store(transfer.spec, result)

    def _account_store(self, save: SaveSpec, result) -> None:
        tokens = int(getattr(result, "tokens_copied", 0) or 0)
        nbytes = int(getattr(result, "bytes_copied", 0) or 0)
        seconds = (getattr(result, "elapsed_ns", 0) or 0) / 1e9
        skipped = int(getattr(result, "chunks_skipped_for_space", 0) or 0)
        gigabytes = nbytes / 2**30
        stats = self._stats
        stats["num_stores"] += 1
        stats["stored_tokens"] += tokens
        stats["stored_bytes"] += nbytes
        stats["store_seconds"] += seconds
        if skipped:
            logger.warning("Local cpu memory under pressure so choosing to store only part of the KV cache "
                           "of request %s (%d chunk(s) not stored).", save.req_id, skipped)
        logger.info("[req_id=%s] Stored %d out of total %d tokens. size: %.6f GB, cost %.4f ms, throughput: "
                    "%.4f GB/s", save.req_id, tokens, len(save.token_ids), gigabytes, seconds * 1000,
                    gigabytes / seconds if seconds > 0 else 0.0)

    # -- KV events ----------------------------------------------------------------------------------
    def take_kv_events(self):
        """This rank's engine events since the last call, as an ``LMCacheNativeKVEvents`` (None when
        there are none, events are off, or this vLLM cannot carry them). Never raises."""
        if self._kv_event_backlog is None:
            return None
        try:
            records, self._kv_event_backlog = self._kv_event_backlog, []
            engine = self.engine
            if engine is not None:
                while True:  # drain: a step may have produced more than one poll's worth
                    polled = engine.poll_events(1024)
                    records += _events.records_from_poll(self._settings.rank, polled)
                    if len(polled.events) < 1024:
                        break
            return _events.LMCacheNativeKVEvents(records) if records else None
        except Exception as error:
            logger.warning("LMCacheNative: reading KV events failed: %s", error)
            return None

    # -- shutdown and introspection ----------------------------------------------------------------
    def reset_cache(self) -> bool:
        if self.engine is None:
            return True
        try:
            self.engine.clear()
        except Exception as error:
            logger.warning("LMCacheNative: reset_cache failed: %s", error)
            return False
        return True

    def _close_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is None:
            return
        s = self._settings
        with module_lock:
            ranks = LOCAL_ENGINES.get(s.lookup_namespace)
            if ranks is not None and ranks.get(s.rank) is engine:
                del ranks[s.rank]
                if not ranks:
                    del LOCAL_ENGINES[s.lookup_namespace]
        try:
            if self._serving_socket is not None:
                engine.stop_lookup_server()
                self._serving_socket = None
            try:
                engine.flush(s.flush_timeout_s)  # disk/remote writes behind
            except Exception as error:
                logger.warning("LMCacheNative: flush at shutdown did not complete: %s", error)
        finally:
            engine.close()

    def shutdown(self) -> None:
        """Waits for (at most blocking_timeout_secs) and closes every job, stops the lookup server,
        flushes the lower tiers and destroys the engine."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._settings.flush_timeout_s
        transfers = list(self._loads.values()) + [t for ts in self._stores.values() for t in ts]
        for transfer in transfers:
            if transfer.job is not None:
                try:
                    transfer.job.wait(max(0.0, deadline - time.monotonic()))
                except Exception:
                    pass
            transfer.close()
        self._loads.clear()
        self._stores.clear()
        self._sending_pending.clear()
        self._metrics.publish(self.engine)  # the final values, before the engine goes
        try:
            self._close_engine()
        except Exception as error:
            logger.warning("LMCacheNative: shutdown: %s", error)
        self._layer_tensors = []
        self._kv_caches = {}

    def jobs_in_flight(self) -> list:
        """(kind, request id, job) of every job not yet reported (tests and debugging)."""
        jobs = [("load", req_id, t.job) for req_id, t in self._loads.items() if t.job is not None]
        jobs += [("store", req_id, t.job) for req_id, ts in self._stores.items() for t in ts if t.job is not None]
        return jobs

    def internal_state_sizes(self) -> dict:
        return {
            "async_loads": len(self._loads),
            "store_jobs": sum(len(ts) for ts in self._stores.values()),
            "sending_pending": len(self._sending_pending),
            "sync_loads_pending": len(self._sync_loads_pending),
            "finished_recving": len(self._finished_recving),
            "finished_sending": len(self._finished_sending),
            "invalid_block_ids": len(self._invalid_block_ids),
        }
