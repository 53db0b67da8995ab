"""The scheduler-side part of the vLLM connector: lookups (in-process, over the lookup sockets, or in
the background), LMCache's hit accounting, per-request trackers, each step's metadata and
``request_finished``. No library is loaded here beyond what the facade already loaded; no torch."""

from __future__ import annotations

import array
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from . import _compat, _events
from ._connector_common import (LOCAL_ENGINES, build_extra_key, has_prompt_embeds, kv_params, logger,
                                lookup_socket_path, module_lock)
from ._metadata import LMCacheNativeConnectorMetadata, LoadSpec, SaveSpec, new_stats_dict
from ._prometheus import SchedulerMetrics

LOOKUP_POOL_THREADS = 4


def pack_tokens(tokens) -> array.array:
    """Token ids as a contiguous int32 array: converted once per request, then sliced (memcpy) for
    lookups, loads and saves, and pickled as bytes in the metadata."""
    if isinstance(tokens, array.array) and tokens.typecode == "i":
        return tokens
    packed = array.array("i")
    try:
        packed.frombytes(struct.pack(f"{len(tokens)}i", *tokens))  # ~2x faster than array("i", list)
    except struct.error:
        packed = array.array("i", tokens)  # raises the precise error
    return packed


def _probe_positions(length: int) -> list:
    """Positions checked to tell a continuation from another sequence: the last, the first, and
    about 16 spread between them."""
    step = max((length - 1) // 16, 1)
    return [*range(length - 1, 0, -step), 0]


def extend_packed(packed: array.array, tokens) -> array.array:
    """``packed`` (an int32 array holding a prefix of ``tokens``) grown in place to all of
    ``tokens``, converting only the tokens it lacks: a request's token list only grows (decode
    outputs appended; a preempted request keeps them). A sequence that is not a continuation of
    ``packed`` (shorter, or differing at any of about 18 positions spread over the packed prefix,
    both ends included) is packed anew instead: wrong tokens would key the KV of another prompt."""
    have, total = len(packed), len(tokens)
    if have and (total < have or any(tokens[i] != packed[i] for i in _probe_positions(have))):
        return pack_tokens(tokens)
    if total > have:
        tail = tokens[have:]
        if len(tail) <= 64:
            packed.extend(tail)  # a decode step adds a token or a few (OverflowError/TypeError like array("i"))
        else:
            packed.frombytes(pack_tokens(tail).tobytes())
    return packed


@dataclass
class _Lookup:
    """What ``get_num_new_matched_tokens`` found for a request (replaced on every call)."""

    hit_tokens: int
    vllm_cached_tokens: int
    num_external_tokens: int
    is_async: bool
    token_ids: Any  # the hit prefix (int32 array)
    extra_key: bytes


@dataclass
class _BackgroundLookup:
    """A lookup running (or finished) on the lookup pool for a request not yet admitted."""

    future: Any
    tokens: Any
    extra_key: bytes


@dataclass
class _Tracker:
    """A live request on the scheduler side."""

    req_id: str
    request: Any
    extra_key: bytes
    block_ids: list = field(default_factory=list)
    num_saved_tokens: int = 0  # leading tokens known to be stored (saves skip them)
    prefill_end: int = 0  # tokens to compute since the last admission (prompt, or prompt+outputs)
    expected_computed: int = -1  # vLLM's num_computed_tokens we expect at the next step
    skip_save: bool = False
    saves_in_flight: bool = False  # an asynchronous save was emitted since the last admission


class SchedulerPart:
    def __init__(self, settings):
        self._settings = settings
        self._lmc = settings.lmc
        self._engine_config = settings.engine_config
        self._closed = False
        self._pending_lookups: dict[str, _Lookup] = {}
        self._background_lookups: dict[str, _BackgroundLookup] = {}
        self._lookup_pool = None  # ThreadPoolExecutor, created by the first lookup that may block
        self._may_defer_lookups = _compat.allows_none_lookup()
        self._warned_bad_lookup_answer = False
        self._trackers: dict[str, _Tracker] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        self._delayed_free: list[str] = []
        # req_id -> the request's token ids as int32 (a prefix of them at least): converted from
        # its list once, then only grown by the tokens it gains; lookups, loads and saves take
        # slices (memcpy) of it. Dropped with the request (_forget) and at shutdown.
        self._token_buffers: dict[str, array.array] = {}
        self._stats = new_stats_dict()
        # Combines the TP ranks' KV events into one per chunk (enable_kv_events, on a vLLM that
        # carries connector events); None otherwise.
        self._kv_events = _events.EventAggregator(settings.world_size) if settings.kv_events else None
        self._metrics = SchedulerMetrics(settings.model, settings.dp_rank)

    def _packed_tokens(self, req_id, tokens) -> array.array:
        """The request's int32 token buffer holding all of ``tokens`` (created on first use)."""
        packed = self._token_buffers.get(req_id)
        if packed is None:
            packed = pack_tokens(tokens)
            if packed is tokens:  # an int32 array given by the caller: never grown in place
                packed = array.array("i", packed)
        else:
            packed = extend_packed(packed, tokens)  # O(1) when nothing was added
        self._token_buffers[req_id] = packed
        return packed

    # -- lookups -----------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple:
        s = self._settings
        req_id = getattr(request, "request_id", "?")
        try:
            if str(req_id).startswith("mock_req"):  # data-parallel dummy requests
                return 0, False
            tokens = _compat.request_tokens(request)
            num_tokens = _compat.num_tokens(request)
            extra_key = build_extra_key(request)
            if s.kv_role == "kv_producer" or has_prompt_embeds(request):
                # a producer only stores (LMCache: no lookup); a prompt given as embeddings has no
                # token ids that could key its KV
                self._pending_lookups[req_id] = _Lookup(0, num_computed_tokens, 0, False, [], extra_key)
                return 0, False
            packed = self._packed_tokens(req_id, tokens)
            lookup_tokens = packed[:len(packed) - s.skip_last_n_tokens] if s.skip_last_n_tokens else packed
            if self._may_defer_lookups and not self._closed and self._lookup_may_block():
                if lookup_tokens is packed:  # the pool thread reads a copy (memcpy): the buffer may grow
                    lookup_tokens = packed[:]
                hit = self._background_hit(req_id, lookup_tokens, extra_key)
                if hit is None:
                    return None, False  # still looking: vLLM keeps the request waiting, asks again
            else:
                hit = self._lookup(lookup_tokens, extra_key)
            # Whatever produced it (a replaced lookup, a background result), vLLM is only ever told
            # about tokens the request has.
            hit = self._checked_hit(hit, min(len(lookup_tokens), num_tokens), "this request")
            full = hit == num_tokens
            need = max(hit - num_computed_tokens - (1 if full else 0), 0)
            self._stats["num_lookups"] += 1
            self._stats["lookup_hit_tokens"] += hit
            self._metrics.request_seen(req_id, getattr(request, "num_prompt_tokens", None) or num_tokens,
                                       num_computed_tokens)
            if 0 < need < s.min_retrieve_tokens:
                logger.info("Reqid: %s, Total tokens %d, Inference Engine computed tokens: %d, LMCache hit "
                            "tokens: %d, but need to load: %d < min_retrieve %d, skip retrieve but record for "
                            "save skip", req_id, num_tokens, num_computed_tokens, hit, need, s.min_retrieve_tokens)
                need = 0
            else:
                logger.info("Reqid: %s, Total tokens %d, Inference Engine computed tokens: %d, LMCache hit "
                            "tokens: %d, need to load: %d", req_id, num_tokens, num_computed_tokens, hit, need)
            is_async, ext = False, need
            if need > 0 and s.load_async:
                if full:  # vLLM recomputes the last token after an async load of all of them
                    is_async, ext = True, hit - num_computed_tokens
                elif (num_computed_tokens + need) % s.block_size == 0:
                    is_async = True
            if not 0 <= ext <= num_tokens - num_computed_tokens:  # cannot happen with a checked hit
                logger.warning("LMCacheNative: request %s: %d external tokens beyond its %d tokens; treated as a "
                               "miss", req_id, ext, num_tokens)
                self._pending_lookups[req_id] = _Lookup(0, num_computed_tokens, 0, False, [], extra_key)
                return 0, False
            self._pending_lookups[req_id] = _Lookup(hit, num_computed_tokens, ext, is_async,
                                                    packed[:hit], extra_key)
            return ext, is_async
        except Exception as error:
            logger.warning("LMCacheNative: lookup for request %s failed, treated as a miss: %s", req_id, error)
            return 0, False

    def _lookup_may_block(self) -> bool:
        """True when a lookup does I/O that can take up to a timeout: a remote tier, or a rank whose
        engine lives in another process (the socket lookup channel)."""
        if self._engine_config.get("remote_url"):
            return True
        with module_lock:
            local = LOCAL_ENGINES.get(self._settings.lookup_namespace, {})
            return any(rank not in local for rank in range(self._settings.world_size))

    def _background_hit(self, req_id, tokens, extra_key: bytes) -> Optional[int]:
        """The hit of the request's background lookup, None while it runs (starting it if there is
        none for these tokens). The finished result is kept until update_state_after_alloc, so asking
        again (a failed allocation) starts nothing new."""
        entry = self._background_lookups.get(req_id)
        if entry is not None and (entry.tokens != tokens or entry.extra_key != extra_key):
            entry.future.cancel()  # the request changed (e.g. preempted with outputs): look up anew
            entry = None
        if entry is None:
            if self._lookup_pool is None:
                import concurrent.futures
                self._lookup_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=LOOKUP_POOL_THREADS, thread_name_prefix="lmcn-lookup")
            future = self._lookup_pool.submit(self._lookup, tokens, extra_key)
            self._background_lookups[req_id] = _BackgroundLookup(future, tokens, extra_key)
            return None
        if not entry.future.done():
            return None
        try:
            return int(entry.future.result())
        except Exception as error:  # cancelled, or a failure _lookup did not absorb: a miss
            logger.debug("LMCacheNative: background lookup for request %s failed: %s", req_id, error)
            return 0

    def _drop_background_lookup(self, req_id) -> None:
        entry = self._background_lookups.pop(req_id, None)
        if entry is not None:
            entry.future.cancel()  # a lookup already running finishes on its own; its result is dropped

    def _lookup(self, tokens, extra_key: bytes) -> int:
        """Leading tokens held by every rank (the minimum); any failure counts as 0 for that rank."""
        if not len(tokens):
            return 0
        s = self._settings
        with module_lock:
            local = dict(LOCAL_ENGINES.get(s.lookup_namespace, {}))
        hits = []
        started, failures, timeouts = time.perf_counter(), 0, 0
        for rank in range(s.world_size):
            engine = local.get(rank)
            try:
                if engine is not None:
                    hit = engine.lookup(tokens, extra_key)
                elif hasattr(self._lmc, "remote_lookup"):
                    path = lookup_socket_path(s.model, s.rpc_port, s.dp_rank, rank)
                    hit = self._lmc.remote_lookup(path, tokens, extra_key, timeout_s=s.lookup_timeout_s)
                else:
                    hit = 0
            except Exception as error:  # LmcTimeout / LmcIOError / closed engine: a miss
                logger.debug("LMCacheNative: lookup on rank %d failed, counted as a miss: %s", rank, error)
                hit = 0
                failures += 1
                timeouts += type(error).__name__ == "LmcTimeout"
            hit = self._checked_hit(hit, len(tokens), f"rank {rank}")
            hits.append(hit)
            if hit == 0:
                break
        self._metrics.lookup_done(time.perf_counter() - started, failures, timeouts)
        return min(hits) if hits else 0

    def _checked_hit(self, hit, num_tokens: int, origin: str) -> int:
        """``hit`` if it is a token count in [0, num_tokens], else 0. An answer comes from another
        process (or a buggy engine); one out of range would make vLLM skip computing tokens nobody
        loads, so it counts as a failed lookup rather than being clamped into range. Warned once."""
        if isinstance(hit, int) and not isinstance(hit, bool) and 0 <= hit <= num_tokens:
            return int(hit)  # a LookupResult is an int: its value is the hit
        if not self._warned_bad_lookup_answer:
            self._warned_bad_lookup_answer = True
            from ._connector_config import _shown
            logger.warning("LMCacheNative: the lookup on %s answered %s for a prompt of %d tokens; counted as a "
                           "miss (further such answers are not logged)", origin, _shown(hit), num_tokens)
        return 0

    # -- admission ---------------------------------------------------------------------------------
    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._drop_background_lookup(getattr(request, "request_id", None))
        try:
            self._update_state_after_alloc(request, blocks, num_external_tokens)
        except Exception as error:  # never out of a hook; tokens vLLM now counts as loaded must not be trusted
            req_id = getattr(request, "request_id", "?")
            logger.error("LMCacheNative: update_state_after_alloc failed for request %s: %s", req_id, error,
                         exc_info=True)
            if num_external_tokens and num_external_tokens > 0:
                try:
                    block_ids = _compat.blocks_of(blocks)
                except Exception:
                    block_ids = []
                self._pending_lookups.pop(req_id, None)
                self._pending_loads[req_id] = LoadSpec(req_id, [], block_ids, 0,
                                                       len(block_ids) * self._settings.block_size, False, b"",
                                                       fail=True)

    def _update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        s = self._settings
        req_id = request.request_id
        lookup = self._pending_lookups.pop(req_id, None)
        tracker = self._trackers.get(req_id)
        if tracker is None:
            tracker = _Tracker(req_id, request, lookup.extra_key if lookup else build_extra_key(request))
            params = kv_params(request)
            priority = getattr(request, "priority", None)
            tracker.skip_save = bool(
                s.kv_role == "kv_consumer" or s.force_skip_save or params.get("lmcache.skip_save")
                or has_prompt_embeds(request)
                or (s.priority_limit is not None and priority is not None and priority > s.priority_limit))
            self._trackers[req_id] = tracker
        tracker.request = request
        if lookup is not None:  # a (re-)admission after a lookup: the store holds hit_tokens
            tracker.num_saved_tokens = lookup.hit_tokens
            tracker.prefill_end = _compat.num_tokens(request)
            tracker.expected_computed = -1
            # re-admitted after a preemption: handle_preemptions fenced the saves that read the old blocks
            tracker.saves_in_flight = False
        elif num_external_tokens == 0 and tracker.prefill_end == 0:
            tracker.prefill_end = _compat.num_tokens(request)
        if num_external_tokens <= 0:
            return  # e.g. the second call after an async load, or a miss
        block_ids = _compat.blocks_of(blocks)
        tracker.block_ids = block_ids
        if lookup is None or lookup.num_external_tokens != num_external_tokens:
            logger.error("LMCacheNative: vLLM admitted request %s with %d external tokens but the lookup said "
                         "%s; its blocks will be reported invalid", req_id, num_external_tokens,
                         None if lookup is None else lookup.num_external_tokens)
            first = lookup.vllm_cached_tokens if lookup else 0
            self._pending_loads[req_id] = LoadSpec(req_id, [], list(block_ids), first, first + num_external_tokens,
                                                   bool(lookup and lookup.is_async), b"", fail=True)
            return
        expected = lookup.vllm_cached_tokens + num_external_tokens
        self._pending_loads[req_id] = LoadSpec(req_id, lookup.token_ids, list(block_ids),
                                               lookup.vllm_cached_tokens, expected, lookup.is_async,
                                               lookup.extra_key)
        # vLLM's num_computed_tokens once the load is in: all of it, less the last prompt token
        tracker.expected_computed = expected - (1 if expected == _compat.num_tokens(request) else 0)

    # -- metadata ----------------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output):
        """This step's loads (admitted since the last call), saves (chunks completed by this step's
        forward), the requests finished with their blocks held for a save, and the preempted ones.
        Resets the per-step state; never modifies scheduler_output."""
        meta = LMCacheNativeConnectorMetadata(self._settings.block_size)
        try:
            meta.loads = list(self._pending_loads.values())
            self._pending_loads = {}
            meta.delayed_free, self._delayed_free = self._delayed_free, []
            meta.preempted = _compat.preempted_ids(scheduler_output)
            for req_id in getattr(scheduler_output, "finished_req_ids", None) or ():
                self._forget(req_id)
            num_scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
            for new in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
                tracker = self._trackers.get(new.req_id)
                if tracker is None:  # builds that skip update_state_after_alloc when ext == 0
                    tracker = _Tracker(new.req_id, None, b"")
                    tracker.prefill_end = len(getattr(new, "prompt_token_ids", None) or [])
                    self._trackers[new.req_id] = tracker
                tracker.block_ids = _compat.first_group(new.block_ids)
                tokens = None if tracker.request is not None else getattr(new, "prompt_token_ids", None) or []
                self._plan_save(meta, tracker, int(new.num_computed_tokens),
                                int(num_scheduled.get(new.req_id, 0)), tokens)
            for req_id, resumed, new_blocks, computed in _compat.cached_requests(scheduler_output):
                tracker = self._trackers.get(req_id)
                if tracker is None:
                    continue
                if resumed:
                    tracker.block_ids = _compat.first_group(new_blocks)
                    tracker.prefill_end = max(tracker.prefill_end, _compat.num_tokens(tracker.request)
                                              if tracker.request is not None else 0)
                elif new_blocks:
                    tracker.block_ids = tracker.block_ids + _compat.first_group(new_blocks)
                self._plan_save(meta, tracker, int(computed), int(num_scheduled.get(req_id, 0)), None)
        except Exception as error:
            logger.error("LMCacheNative: build_connector_meta failed: %s", error, exc_info=True)
        return meta

    def _plan_save(self, meta, tracker: _Tracker, num_computed: int, num_scheduled: int, tokens) -> None:
        """LMCache's save rule: store when this step completes a chunk beyond the
        stored ones, the trailing partial chunk only at the end of the prefill (save_unfull_chunk),
        decode-phase chunks only with save_decode_cache."""
        s = self._settings
        if 0 <= num_computed < tracker.expected_computed:
            # vLLM rolled back (a failed load): the store may lack tokens we counted as stored
            tracker.num_saved_tokens = min(tracker.num_saved_tokens, num_computed)
        total = num_computed + num_scheduled
        tracker.expected_computed = total
        if num_scheduled <= 0 or tracker.skip_save:
            return
        in_prefill = num_computed < tracker.prefill_end
        if not in_prefill and not s.save_decode_cache:
            return
        last_prefill = in_prefill and total >= tracker.prefill_end
        if last_prefill and s.save_unfull_chunk:
            save_upto = total
        else:
            save_upto = total // s.chunk_size * s.chunk_size
        if save_upto <= tracker.num_saved_tokens:
            return
        packed = self._token_buffers.get(tracker.req_id)
        if packed is None or len(packed) < save_upto:  # outputs beyond the tokens packed so far
            if tokens is None:
                tokens = _compat.request_tokens(tracker.request) if tracker.request is not None else []
            if len(tokens) < save_upto:
                return
            packed = self._packed_tokens(tracker.req_id, tokens)
        num_total = _compat.num_tokens(tracker.request) if tracker.request is not None else len(packed)
        blocks_needed = -(-save_upto // s.block_size)
        meta.saves.append(SaveSpec(tracker.req_id, packed[:save_upto], tracker.block_ids[:blocks_needed],
                                   tracker.num_saved_tokens, num_total, tracker.extra_key, s.save_async))
        tracker.num_saved_tokens = save_upto
        if s.save_async:
            tracker.saves_in_flight = True

    def _forget(self, req_id: str) -> None:
        self._trackers.pop(req_id, None)
        self._pending_lookups.pop(req_id, None)
        self._token_buffers.pop(req_id, None)
        self._drop_background_lookup(req_id)
        self._metrics.request_forgotten(req_id)

    def request_finished(self, request, block_ids) -> tuple:
        """(True, None) while an asynchronous save of the request may still read its blocks: vLLM
        keeps them until every worker reports the request in finished_sending. Otherwise (False, None)."""
        req_id = getattr(request, "request_id", None)
        tracker = self._trackers.get(req_id)
        delay = bool(tracker is not None and tracker.saves_in_flight)
        self._forget(req_id)
        if delay:
            self._delayed_free.append(req_id)
        # A load admitted in this very step is still emitted (the workers report it as received,
        # which vLLM needs for a request it keeps waiting for remote KV).
        return delay, None

    # -- KV events ----------------------------------------------------------------------------------
    def add_kv_events(self, kv_cache_events) -> None:
        """The workers' records of one step (vLLM's combined KVConnectorKVEvents)."""
        if self._kv_events is None or kv_cache_events is None:
            return
        if not isinstance(kv_cache_events, _events.LMCacheNativeKVEvents):
            return  # another connector's container (a multi-connector setup): not ours to read
        self._kv_events.add(kv_cache_events.get_all_events())

    def take_kv_events(self) -> list:
        return self._kv_events.take() if self._kv_events is not None else []

    def kv_event_state_sizes(self) -> dict:
        return self._kv_events.sizes() if self._kv_events is not None else {}

    # -- the rest ----------------------------------------------------------------------------------
    def take_stats(self) -> dict:
        data, self._stats = self._stats, new_stats_dict()
        return data

    def reset_cache(self) -> bool:
        with module_lock:
            engines = list(LOCAL_ENGINES.get(self._settings.lookup_namespace, {}).values())
        for engine in engines:
            try:
                engine.clear()
            except Exception as error:
                logger.warning("LMCacheNative: reset_cache failed: %s", error)
                return False
        return True

    def shutdown(self) -> None:
        self._closed = True
        for req_id in list(self._background_lookups):
            self._drop_background_lookup(req_id)
        pool, self._lookup_pool = self._lookup_pool, None
        if pool is not None:  # a lookup still running ends within lookup_timeout_ms; not waited for
            pool.shutdown(wait=False, cancel_futures=True)
        self._trackers.clear()
        self._pending_lookups.clear()
        self._pending_loads.clear()
        self._delayed_free.clear()
        self._token_buffers.clear()

    def internal_state_sizes(self) -> dict:
        return {
            "trackers": len(self._trackers),
            "pending_lookups": len(self._pending_lookups),
            "background_lookups": len(self._background_lookups),
            "pending_loads": len(self._pending_loads),
            "delayed_free": len(self._delayed_free),
            "token_buffers": len(self._token_buffers),
        }
