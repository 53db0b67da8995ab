"""vLLM V1 KV connector over LMCacheNative (liblmcache_native.so).

Start vLLM with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"LMCacheNativeConnector",
        "kv_connector_module_path":"lmcache_native.vllm_connector", "kv_role":"kv_both"}'

and LMCache's environment variables (``LMCACHE_CHUNK_SIZE``, ``LMCACHE_CONFIG_FILE``, ...) or
``kv_connector_extra_config`` keys ``lmcache.<key>``. docs/vllm-connector.md has the details.

Design (vllm-connector.md §10 is the checklist this follows):

* Importing this module loads nothing: no library, no torch, no threads, no sockets. The library is
  loaded in ``__init__``; the worker creates its engine in ``register_kv_caches`` (the KV tensors
  give the namespace: element size, heads, head size, layers).
* Scheduler side: ``get_num_new_matched_tokens`` asks the worker engines how many leading tokens they
  hold -- directly when the worker lives in this process (TP=1, vLLM's in-process executor), else over
  the library's Unix-socket lookup channel, every rank, taking the minimum; a timeout or absent server
  is a miss. On vLLM >= 0.11, a lookup that may block (a remote tier, or ranks in other processes)
  runs on a small lookup thread pool created on first use, and the hook answers ``None`` ("ask again
  next step") until it has finished. It computes LMCache's "need to load" and keeps per-request
  trackers from which ``build_connector_meta`` emits each step's loads and saves as plain, picklable data.
* Worker side: synchronous loads run in ``start_load_kv`` (or, whichever comes first,
  ``wait_for_layer_load``/``wait_for_save``), before attention reads the layers; asynchronous loads
  start a prefetch job (disk/remote -> CPU) and finish in ``get_finished``, which reports them in
  ``finished_recving``. Saves run in ``wait_for_save``. Loads that come up short report their blocks
  through ``get_block_ids_with_load_errors`` in the step vLLM requires, so vLLM recomputes them.
* No hook raises for a miss or a library error: a lookup degrades to a miss, a load to invalid blocks,
  a save to a skipped save, each with a log line.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import _connector_config as _cfg
from . import _socket_dir
from ._redact import redact_config

logger = logging.getLogger("lmcache_native.vllm_connector")

_LOG_FORMAT = "[%(asctime)s] LMCache %(levelname)s: %(message)s (%(filename)s:%(lineno)d:%(name)s)"
_logging_configured = False
_config_logged = False
_module_lock = threading.Lock()

# Extra-key encoding version; bump if the field encoding below ever changes (old keys then miss).
_EXTRA_KEY_MAGIC = b"LMCNX\x01"


def _configure_logging() -> None:
    """LMCache prints its lines with its own handler ("LMCache INFO: ..."); vLLM only configures the
    "vllm" logger tree, so without a handler our INFO lines would vanish. Done once, at the first
    connector construction (never at import). LMCACHE_LOG_LEVEL sets the level (default INFO)."""
    global _logging_configured
    with _module_lock:
        if _logging_configured:
            return
        _logging_configured = True
        package_logger = logging.getLogger("lmcache_native")
        level = os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper()
        package_logger.setLevel(getattr(logging, level, logging.INFO))
        if not package_logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(_LOG_FORMAT))
            package_logger.addHandler(handler)
            package_logger.propagate = False


# ------------------------------------------------------------------------------------------------
# Small helpers that work across vLLM versions
# ------------------------------------------------------------------------------------------------
def _first_group(block_ids) -> list[int]:
    """vLLM passes block ids as ``tuple[list[int], ...]`` (one list per KV cache group) since 0.9,
    and as a flat ``list[int]`` before; None means "no new blocks"."""
    if block_ids is None:
        return []
    if isinstance(block_ids, (tuple, list)) and block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


def _blocks_of(blocks) -> list[int]:
    """Block ids of group 0 from a ``KVCacheBlocks`` (or an older plain list of blocks)."""
    if blocks is None:
        return []
    if hasattr(blocks, "get_block_ids"):
        return _first_group(blocks.get_block_ids())
    if isinstance(blocks, (list, tuple)):
        return [getattr(block, "block_id", block) for block in blocks]
    return []


def _request_tokens(request) -> list[int]:
    """All token ids of a live ``Request`` (prompt + outputs: a preempted request is looked up again
    with its outputs appended)."""
    tokens = getattr(request, "all_token_ids", None)
    if tokens is None:
        tokens = getattr(request, "prompt_token_ids", None) or []
    return list(tokens)


def _num_tokens(request) -> int:
    value = getattr(request, "num_tokens", None)
    return int(value) if value is not None else len(_request_tokens(request))


def _encode_field(name: str, value) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8")
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    encoded_name = name.encode("utf-8")
    return struct.pack("<I", len(encoded_name)) + encoded_name + struct.pack("<I", len(data)) + data


def build_extra_key(request) -> bytes:
    """The canonical extra key bytes of a request: everything besides the tokens that decides
    whether cached KV applies -- cache salt, LoRA adapter, multimodal inputs (hash and placeholder
    position) and ``lmcache.tag.*`` entries of ``kv_transfer_params``. Each field is a
    length-prefixed UTF-8 name and value, in a fixed order, so every byte counts (no truncation to
    16 bits as LMCache's placeholder rewrite does). Empty for a plain request."""
    fields: list[bytes] = []
    salt = getattr(request, "cache_salt", None)
    if salt:
        fields.append(_encode_field("cache_salt", salt))
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        name = getattr(lora, "lora_name", None) or getattr(lora, "name", None)
        path = getattr(lora, "lora_path", None) or getattr(lora, "path", None)
        identity = name if name else getattr(lora, "lora_int_id", None)
        fields.append(_encode_field("lora", {"name": identity, "path": path}))
    features = getattr(request, "mm_features", None)
    if features:
        for feature in features:
            identifier = getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)
            position = getattr(feature, "mm_position", None)
            fields.append(_encode_field("mm", {
                "hash": identifier,
                "offset": getattr(position, "offset", None),
                "length": getattr(position, "length", None),
            }))
    else:  # vLLM before mm_features: parallel lists
        hashes = getattr(request, "mm_hashes", None) or []
        positions = getattr(request, "mm_positions", None) or []
        for index, identifier in enumerate(hashes):
            position = positions[index] if index < len(positions) else None
            fields.append(_encode_field("mm", {
                "hash": identifier,
                "offset": getattr(position, "offset", None),
                "length": getattr(position, "length", None),
            }))
    params = getattr(request, "kv_transfer_params", None)
    if isinstance(params, dict):
        for key in sorted(k for k in params if isinstance(k, str) and k.startswith("lmcache.tag.")):
            fields.append(_encode_field(key, params[key]))
    if not fields:
        return b""
    return _EXTRA_KEY_MAGIC + b"".join(fields)


def _has_prompt_embeds(request) -> bool:
    return getattr(request, "prompt_embeds", None) is not None


def _kv_params(request) -> dict:
    params = getattr(request, "kv_transfer_params", None)
    return params if isinstance(params, dict) else {}


def _lookup_socket_path(model: str, rpc_port: int, dp_rank: int, rank: int) -> str:
    """Where rank ``rank``'s engine serves lookups. LMCache names its ZMQ sockets by
    ``lmcache_rpc_port`` and ranks under VLLM_RPC_BASE_PATH; the model is folded in as well so two
    vLLM instances serving different models on one machine never collide. Without
    VLLM_RPC_BASE_PATH the directory is private to this user (``_socket_dir``); raises
    ``UnsafeSocketDirectoryError`` when that directory is not safe."""
    digest = hashlib.sha256(f"{model}|{rpc_port}|{dp_rank}".encode("utf-8")).hexdigest()[:16]
    return _socket_dir.default_socket_path(f"lmcn-{digest}-r{rank}.sock")


# In-process worker engines by lookup namespace: {namespace: {rank: engine}}. With TP=1 and vLLM's
# in-process executor the scheduler-side connector asks the worker's engine directly.
_LOCAL_ENGINES: dict[str, dict[int, Any]] = {}


# ------------------------------------------------------------------------------------------------
# Metadata (scheduler -> workers): plain data only, pickled by vLLM's multiprocess executor
# ------------------------------------------------------------------------------------------------
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
    request) from its blocks, skipping the ``skip_leading_tokens`` already stored."""

    req_id: str
    token_ids: list
    block_ids: list
    skip_leading_tokens: int
    total_tokens: int
    extra_key: bytes = b""


class LMCacheNativeConnectorMetadata(KVConnectorMetadata):
    """Per-step work for the workers. Plain containers only (no handles, locks or tensors)."""

    def __init__(self, block_size: int = 16, loads: Optional[list] = None, saves: Optional[list] = None):
        self.block_size = block_size
        self.loads: list[LoadSpec] = list(loads or [])
        self.saves: list[SaveSpec] = list(saves or [])

    def __repr__(self) -> str:
        return (f"LMCacheNativeConnectorMetadata(block_size={self.block_size}, "
                f"loads={[l.req_id for l in self.loads]}, saves={[s.req_id for s in self.saves]})")


# ------------------------------------------------------------------------------------------------
# Scheduler-side state
# ------------------------------------------------------------------------------------------------
@dataclass
class _Lookup:
    """What ``get_num_new_matched_tokens`` found for a request (replaced on every call)."""

    hit_tokens: int
    vllm_cached_tokens: int
    num_external_tokens: int
    is_async: bool
    token_ids: list
    extra_key: bytes


@dataclass
class _BackgroundLookup:
    """A lookup running (or finished) on the lookup pool for a request not yet admitted."""

    future: Any
    tokens: list
    extra_key: bytes


def _vllm_allows_none_lookup() -> bool:
    """vLLM >= 0.11 accepts ``None`` from get_num_new_matched_tokens ("ask again next step")."""
    try:
        from vllm.version import __version__ as version
        parts = str(version).split(".")
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (0, 11)
    except Exception:  # unknown version: the synchronous path is valid in every era
        return False


_LOOKUP_POOL_THREADS = 4


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


# ------------------------------------------------------------------------------------------------
# Statistics (vLLM >= 0.11 has a KVConnectorStats base; the worker's stats travel to the scheduler
# inside the model runner output, so the class must be importable by name: module level)
# ------------------------------------------------------------------------------------------------
try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats as _KVConnectorStatsBase
except Exception:  # this vLLM has no connector stats API
    _KVConnectorStatsBase = None

_STATS_KEYS = ("num_loads", "num_load_failures", "loaded_tokens", "loaded_bytes", "load_seconds", "num_stores",
               "stored_tokens", "stored_bytes", "store_seconds", "num_lookups", "lookup_hit_tokens")

if _KVConnectorStatsBase is not None:
    class LMCacheNativeKVConnectorStats(_KVConnectorStatsBase):
        """Counters since the last report: loads, stores, tokens, bytes, seconds, failures, lookups."""

        def __init__(self, data=None):
            try:
                super().__init__(data=dict(data or {}))
            except TypeError:  # a base without a data field
                self.data = dict(data or {})
            for key in _STATS_KEYS:
                self.data.setdefault(key, 0)

        def reset(self):
            self.data = {key: 0 for key in _STATS_KEYS}

        def aggregate(self, other):
            if other is not None:
                for key, value in getattr(other, "data", {}).items():
                    self.data[key] = self.data.get(key, 0) + value
            return self

        def reduce(self):
            return dict(self.data)

        def is_empty(self):
            return not any(self.data.get(key) for key in _STATS_KEYS)
else:
    LMCacheNativeKVConnectorStats = None


# ------------------------------------------------------------------------------------------------
# The connector
# ------------------------------------------------------------------------------------------------
class LMCacheNativeConnector(KVConnectorBase_V1):
    """LMCache's connector behaviour over LMCacheNative. See the module docstring."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        base_parameters = inspect.signature(KVConnectorBase_V1.__init__).parameters
        if "kv_cache_config" in base_parameters:
            super().__init__(vllm_config, role, kv_cache_config)
        else:  # vLLM <= 0.11
            super().__init__(vllm_config, role)
            self._kv_cache_config = kv_cache_config
        _configure_logging()

        if kv_cache_config is not None:
            groups = getattr(kv_cache_config, "kv_cache_groups", None)
            if groups is not None and len(groups) > 1:
                raise ValueError(
                    f"LMCacheNativeConnector supports one KV cache group, got {len(groups)}: start vLLM "
                    "with --disable-hybrid-kv-cache-manager")

        transfer_config = vllm_config.kv_transfer_config
        self._kv_role = getattr(transfer_config, "kv_role", None) or "kv_both"
        extra = getattr(transfer_config, "kv_connector_extra_config", None) or {}
        self._config = _cfg.resolve(extra)  # ConfigError (a ValueError) on an invalid value
        config = self._config
        self._chunk_size = int(config.get("chunk_size"))
        self._save_unfull_chunk = bool(config.get("save_unfull_chunk")) and not config.plain["discard_partial_chunks"]
        self._save_decode_cache = bool(config.get("save_decode_cache"))
        self._min_retrieve_tokens = int(config.get("min_retrieve_tokens"))
        self._priority_limit = config.get("priority_limit")
        self._lookup_timeout_s = float(config.get("lookup_timeout_ms")) / 1000.0
        self._flush_timeout_s = float(config.get("blocking_timeout_secs"))
        self._skip_last_n_tokens = int(config.plain["skip_last_n_tokens"])
        async_setting = config.get("enable_async_loading")
        # Default: asynchronous, since every vLLM this connector supports (>= 0.10) has
        # WAITING_FOR_REMOTE_KVS; enable_async_loading: false makes every load synchronous.
        self._load_async = True if async_setting is None else bool(async_setting)
        self._engine_config = dict(config.engine)
        self._engine_config["enable_async_loading"] = self._load_async
        try:  # LMCache's switch to turn every save off
            self._force_skip_save = _cfg._bool(os.environ.get("LMCACHE_FORCE_SKIP_SAVE") or "false", True)
        except ValueError:
            raise _cfg.ConfigError("LMCACHE_FORCE_SKIP_SAVE must be true or false") from None

        cache_config = getattr(vllm_config, "cache_config", None)
        self._block_size = int(getattr(cache_config, "block_size", None) or 16)
        model_config = getattr(vllm_config, "model_config", None)
        parallel_config = getattr(vllm_config, "parallel_config", None)
        self._model = str(getattr(model_config, "model", "") or "")
        self._use_mla = bool(getattr(model_config, "use_mla", False))
        tp = int(getattr(parallel_config, "tensor_parallel_size", 1) or 1)
        pp = int(getattr(parallel_config, "pipeline_parallel_size", 1) or 1)
        self._world_size = tp * pp
        self._rank = int(getattr(parallel_config, "rank", 0) or 0)
        self._dp_rank = int(getattr(parallel_config, "data_parallel_rank", 0) or 0)
        self._lookup_namespace = f"{self._model}|{config.plain['lmcache_rpc_port']}|{self._dp_rank}"
        self._rpc_port = int(config.plain["lmcache_rpc_port"])
        if self._engine_config.get("local_disk"):
            # LMCache's local_disk_path_sharding "by_gpu": one directory per rank (a directory has
            # one writing owner; the ranks' records differ anyway)
            self._engine_config["local_disk"] = os.path.join(str(self._engine_config["local_disk"]),
                                                              f"rank{self._rank}")

        self._lmc = self._load_library()  # the lmcache_native package, library loaded
        self._closed = False

        # Scheduler side.
        self._pending_lookups: dict[str, _Lookup] = {}
        self._background_lookups: dict[str, _BackgroundLookup] = {}
        self._lookup_pool = None  # ThreadPoolExecutor, created by the first lookup that may block
        self._may_defer_lookups = _vllm_allows_none_lookup()
        self._warned_bad_lookup_answer = False
        self._trackers: dict[str, _Tracker] = {}
        self._pending_loads: dict[str, LoadSpec] = {}

        # Worker side.
        self._engine = None
        self._kv_caches: dict = {}
        self._layer_names: list[str] = []
        self._serving_socket: Optional[str] = None
        self._step_meta = None  # the metadata object whose step has been started
        self._sync_loads_pending: list[LoadSpec] = []
        self._async_loads: dict[str, tuple[LoadSpec, Any]] = {}  # req_id -> (spec, prefetch job)
        self._finished_recving: set[str] = set()
        self._invalid_block_ids: set[int] = set()
        self._failed_load_reqs: set[str] = set()
        self._stats = self._new_stats_dict()

        self._log_configuration_once()
        if role == KVConnectorRole.SCHEDULER:
            self._validate_engine_config()

    # -- set-up -----------------------------------------------------------------------------------
    @staticmethod
    def _load_library():
        import lmcache_native  # loads the library here, in __init__, not at import

        lmcache_native.Engine  # noqa: B018  (binds the package's names when imported lazily)
        return lmcache_native

    def _log_configuration_once(self) -> None:
        global _config_logged
        with _module_lock:
            if _config_logged:
                return
            _config_logged = True
        shown = dict(self._config.values)
        shown["enable_async_loading"] = self._load_async
        shown.update(self._config.plain)
        # Logs are shared widely; remote_url may carry a password (redis://user:PASSWORD@host)
        logger.info("LMCache Configuration: %s", json.dumps(redact_config(shown), sort_keys=True, default=str))

    def _validate_engine_config(self) -> None:
        """The scheduler never stores, but an invalid value must still fail at start-up: the engine
        validates it. Tier keys are left out so that no directory is scanned or server contacted."""
        probe = {k: v for k, v in self._engine_config.items() if k not in ("local_disk", "remote_url")}
        try:
            engine = self._lmc.Engine(probe, model_name="config-check")
        except self._lmc.LmcError as error:
            raise _cfg.ConfigError(f"LMCacheNative refused the configuration: {error}") from None
        engine.close()

    @staticmethod
    def _new_stats_dict() -> dict:
        return {"num_loads": 0, "num_load_failures": 0, "loaded_tokens": 0, "loaded_bytes": 0,
                "load_seconds": 0.0, "num_stores": 0, "stored_tokens": 0, "stored_bytes": 0,
                "store_seconds": 0.0, "num_lookups": 0, "lookup_hit_tokens": 0}

    # ============================================================================================
    # Worker side
    # ============================================================================================
    def register_kv_caches(self, kv_caches: dict) -> None:
        """Creates the worker's engine and registers the KV layers (layout derived from each
        tensor's shape and strides); starts serving lookups to the scheduler process."""
        if self._closed:
            return
        from . import _kv_layout

        layers = _kv_layout.describe_kv_caches(kv_caches, self._vllm_config, self._kv_cache_config,
                                               use_mla=self._use_mla)
        namespace = _kv_layout.namespace_string(self._model, layers, self._vllm_config)
        if self._engine is not None:
            self._close_engine()
        engine = self._lmc.Engine(self._engine_config, model_name=namespace,
                                  world_size=self._world_size, worker_id=self._rank)
        try:
            engine.register_layers([layer.desc for layer in layers])
        except Exception:
            engine.close()
            raise
        self._engine = engine
        self._kv_caches = dict(kv_caches)
        self._layer_tensors = [layer.tensor for layer in layers]  # keeps the memory referenced
        self._layer_names = [layer.name for layer in layers]
        self._bytes_per_token = engine.bytes_per_token
        logger.info("LMCacheNative engine for %s: rank %d of %d, %d layer(s) registered (%s), %d KV bytes "
                    "per token", self._model, self._rank, self._world_size, len(layers),
                    ", ".join(sorted({layer.layout for layer in layers})), self._bytes_per_token)
        with _module_lock:
            _LOCAL_ENGINES.setdefault(self._lookup_namespace, {})[self._rank] = engine
        self._start_lookup_server()

    def _start_lookup_server(self) -> None:
        if not hasattr(self._engine, "start_lookup_server"):
            return
        try:
            path = _lookup_socket_path(self._model, self._rpc_port, self._dp_rank, self._rank)
        except Exception as error:  # the private socket directory is not safe: serve no lookups
            logger.warning("LMCacheNative: not serving lookups: %s; a scheduler in another process will see "
                           "misses.", error)
            return
        try:
            self._engine.start_lookup_server(path)
        except Exception as error:  # another instance on the same socket, unwritable directory, ...
            logger.warning("LMCacheNative: cannot serve lookups on %s (%s); a scheduler in another process "
                           "will see misses. Set kv_connector_extra_config lmcache_rpc_port to a value no "
                           "other vLLM instance on this machine uses.", path, error)
            return
        self._serving_socket = path

    def register_cross_layers_kv_cache(self, kv_cache, attn_backend=None) -> None:
        """Never requested (``prefer_cross_layer_blocks`` is False); a cross-layer tensor with a
        leading layers dimension is registered layer by layer if a vLLM calls it anyway."""
        self.register_kv_caches({f"layer.{index}": kv_cache[index] for index in range(kv_cache.shape[0])})

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        return False

    def set_host_xfer_buffer_ops(self, copy_operation) -> None:
        """vLLM's copy_kv_blocks: not needed, the library copies itself."""

    def _ensure_registered(self, forward_context) -> None:
        """vLLM builds that never call register_kv_caches: take the layers from the forward context."""
        if self._engine is not None or self._closed or forward_context is None:
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

    def _begin_step(self) -> Optional[LMCacheNativeConnectorMetadata]:
        """The bound metadata; on its first use in a step, queue its sync loads and start its async
        ones. Idempotent within a step, so every hook may call it (vLLM's hook order drifts)."""
        meta = self._connector_metadata
        if not isinstance(meta, LMCacheNativeConnectorMetadata):
            return None
        if meta is not self._step_meta:
            self._step_meta = meta
            self._failed_load_reqs = set()
            self._sync_loads_pending = []
            for load in meta.loads:
                if load.is_async:
                    self._start_async_load(load)
                else:
                    self._sync_loads_pending.append(load)
        return meta

    def _run_sync_loads(self) -> None:
        loads, self._sync_loads_pending = self._sync_loads_pending, []
        for load in loads:
            self._load(load)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        try:
            self._ensure_registered(forward_context)
            if self._begin_step() is not None:
                self._run_sync_loads()
        except Exception as error:  # never out of a hook (checklist 28)
            logger.error("LMCacheNative: start_load_kv failed: %s", error, exc_info=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Sync loads are whole-request copies done before the first layer's attention; this only
        # matters where start_load_kv runs after the forward (vLLM >= 0.28 without has_sync_kv_loads).
        try:
            if self._begin_step() is not None and self._sync_loads_pending:
                self._run_sync_loads()
        except Exception as error:
            logger.error("LMCacheNative: wait_for_layer_load failed: %s", error, exc_info=True)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        """Saves happen in wait_for_save: per-layer hooks are skipped under full CUDA graphs."""

    def wait_for_save(self) -> None:
        try:
            meta = self._begin_step()
            if meta is None:
                return
            self._run_sync_loads()
            if self._kv_role == "kv_consumer" or self._engine is None:
                return
            for save in meta.saves:
                if save.req_id in self._failed_load_reqs:
                    # Its context was not loaded, so the KV computed this step is wrong; vLLM recomputes.
                    logger.debug("LMCacheNative: not storing request %s after its failed load", save.req_id)
                    continue
                self._store(save, meta.block_size)
        except Exception as error:
            logger.error("LMCacheNative: wait_for_save failed: %s", error, exc_info=True)

    def handle_preemptions(self, preempted=None, *args, **kwargs) -> None:
        """Accepts vLLM's set of preempted request ids (≈0.14-0.17) or the step's metadata (≈0.18+).
        Saves finish inside wait_for_save, so no store reads a preempted request's blocks later:
        nothing to fence."""
        if isinstance(preempted, (set, frozenset, list, tuple)) and preempted:
            logger.debug("LMCacheNative: preempted requests %s", sorted(preempted))

    def get_finished(self, finished_req_ids: set) -> tuple:
        """(finished_sending, finished_recving). Saves are synchronous, so nothing is ever sent late
        (request_finished returns False). Asynchronous loads are reported once, when done, failed,
        or cancelled because their request was aborted."""
        try:
            self._begin_step()
            for req_id in finished_req_ids or ():
                entry = self._async_loads.pop(req_id, None)
                if entry is not None:  # aborted while loading: drop the job, report it received
                    spec, job = entry
                    self._close_job(job)
                    logger.info("LMCacheNative: request %s finished while loading; load cancelled", req_id)
                    self._finished_recving.add(req_id)
            for req_id in list(self._async_loads):
                spec, job = self._async_loads[req_id]
                if job is not None and not self._job_done(job):
                    continue
                del self._async_loads[req_id]
                self._close_job(job)
                self._load(spec)
                self._finished_recving.add(req_id)
        except Exception as error:
            logger.error("LMCacheNative: get_finished failed: %s", error, exc_info=True)
        recving, self._finished_recving = self._finished_recving, set()
        return None, (recving or None)

    def get_block_ids_with_load_errors(self) -> set:
        errors, self._invalid_block_ids = self._invalid_block_ids, set()
        return errors

    def get_kv_connector_stats(self):
        """This instance's counters since the last call (None when nothing happened, or on a vLLM
        without the stats API)."""
        if LMCacheNativeKVConnectorStats is None:
            return None
        data, self._stats = self._stats, self._new_stats_dict()
        if not any(data.values()):
            return None
        return LMCacheNativeKVConnectorStats(data=data)

    # -- loads ------------------------------------------------------------------------------------
    def _start_async_load(self, load: LoadSpec) -> None:
        if load.req_id in self._async_loads:
            return
        job = None
        if self._engine is not None and not load.fail:
            try:  # brings disk/remote chunks into the CPU tier in the background
                job = self._engine.prefetch(load.token_ids, load.extra_key)
            except Exception as error:
                logger.warning("LMCacheNative: prefetch for request %s failed to start: %s", load.req_id, error)
        self._async_loads[load.req_id] = (load, job)

    @staticmethod
    def _job_done(job) -> bool:
        try:
            return job.done()
        except Exception:
            return True

    @staticmethod
    def _close_job(job) -> None:
        if job is not None:
            try:
                job.close()
            except Exception:
                pass

    def _slots(self, num_tokens: int, block_ids: list, block_size: int, first_token: int = 0) -> list:
        """vLLM's slot formula for tokens [0, num_tokens); -1 before first_token and past the blocks."""
        slots = [-1] * num_tokens
        limit = min(num_tokens, len(block_ids) * block_size)
        for token in range(max(first_token, 0), limit):
            slots[token] = block_ids[token // block_size] * block_size + token % block_size
        return slots

    def _load(self, load: LoadSpec) -> None:
        """Writes a request's cached prefix into its blocks; blocks it could not fill go to
        get_block_ids_with_load_errors (vLLM recomputes them)."""
        block_size = self._step_meta.block_size if self._step_meta is not None else self._block_size
        retrieved, written, nbytes, seconds = 0, 0, 0, 0.0
        if self._engine is not None and not load.fail:
            slots = self._slots(len(load.token_ids), load.block_ids, block_size, load.first_token)
            try:
                before = self._engine.stats()["retrieved_bytes"]
                start = time.perf_counter()
                retrieved = self._engine.retrieve(load.token_ids, slots, load.first_token, load.extra_key)
                seconds = time.perf_counter() - start
                nbytes = self._engine.stats()["retrieved_bytes"] - before
            except Exception as error:
                logger.warning("LMCacheNative: retrieve for request %s failed: %s", load.req_id, error)
                retrieved = 0
            written = sum(1 for slot in slots[load.first_token:retrieved] if slot >= 0)
            gigabytes = nbytes / 2**30
            logger.info("[req_id=%s] Retrieved %d out of %d required tokens (from %d total tokens). size: "
                        "%.6f gb, cost %.4f ms, throughput: %.4f GB/s;", load.req_id, written,
                        max(len(load.token_ids) - load.first_token, 0), len(load.token_ids), gigabytes,
                        seconds * 1000, gigabytes / seconds if seconds > 0 else 0.0)
        self._stats["num_loads"] += 1
        self._stats["loaded_tokens"] += written
        self._stats["loaded_bytes"] += nbytes
        self._stats["load_seconds"] += seconds
        if retrieved < load.expected_tokens:
            first_bad = max(retrieved, load.first_token)
            bad_blocks = {load.block_ids[token // block_size]
                          for token in range(first_bad, load.expected_tokens)
                          if token // block_size < len(load.block_ids)}
            self._invalid_block_ids |= bad_blocks
            self._failed_load_reqs.add(load.req_id)
            self._stats["num_load_failures"] += 1
            if retrieved > load.first_token or not load.fail:
                logger.warning("The number of retrieved tokens is less than the expected number of tokens! "
                               "This should not happen!")
            logger.warning("Request %s failed to load %d tokens across %d blocks", load.req_id,
                           load.expected_tokens - first_bad, len(bad_blocks))

    # -- saves ------------------------------------------------------------------------------------
    def _store(self, save: SaveSpec, block_size: int) -> None:
        slots = self._slots(len(save.token_ids), save.block_ids, block_size)
        try:
            before = self._engine.stats()
            start = time.perf_counter()
            self._engine.store(save.token_ids, slots, save.skip_leading_tokens, save.extra_key)
            seconds = time.perf_counter() - start
            after = self._engine.stats()
        except Exception as error:
            logger.warning("LMCacheNative: store for request %s failed: %s", save.req_id, error)
            return
        tokens = after["stored_tokens"] - before["stored_tokens"]
        nbytes = after["stored_bytes"] - before["stored_bytes"]
        gigabytes = nbytes / 2**30
        self._stats["num_stores"] += 1
        self._stats["stored_tokens"] += tokens
        self._stats["stored_bytes"] += nbytes
        self._stats["store_seconds"] += seconds
        skipped = after["store_skipped_chunks"] - before["store_skipped_chunks"]
        if skipped:
            logger.warning("Local cpu memory under pressure so choosing to store only part of the KV cache "
                           "of request %s (%d chunk(s) not stored).", save.req_id, skipped)
        logger.info("[req_id=%s] Stored %d out of total %d tokens. size: %.6f GB, cost %.4f ms, throughput: "
                    "%.4f GB/s", save.req_id, tokens, len(save.token_ids), gigabytes, seconds * 1000,
                    gigabytes / seconds if seconds > 0 else 0.0)

    # ============================================================================================
    # Scheduler side
    # ============================================================================================
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple:
        """(tokens vLLM may treat as computed beyond num_computed_tokens, load asynchronously?).
        Idempotent: the lookup result is only remembered until update_state_after_alloc. On vLLM
        >= 0.11 a lookup that may block runs in the background and the answer is (None, False)
        until it has finished."""
        req_id = getattr(request, "request_id", "?")
        try:
            if str(req_id).startswith("mock_req"):  # data-parallel dummy requests
                return 0, False
            tokens = _request_tokens(request)
            num_tokens = _num_tokens(request)
            lookup_tokens = tokens[:len(tokens) - self._skip_last_n_tokens] if self._skip_last_n_tokens else tokens
            extra_key = build_extra_key(request)
            if self._kv_role == "kv_producer" or _has_prompt_embeds(request):
                # a producer only stores (LMCache: no lookup); a prompt given as embeddings has no
                # token ids that could key its KV
                self._pending_lookups[req_id] = _Lookup(0, num_computed_tokens, 0, False, [], extra_key)
                return 0, False
            if self._may_defer_lookups and not self._closed and self._lookup_may_block():
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
            if 0 < need < self._min_retrieve_tokens:
                logger.info("Reqid: %s, Total tokens %d, Inference Engine computed tokens: %d, LMCache hit "
                            "tokens: %d, but need to load: %d < min_retrieve %d, skip retrieve but record for "
                            "save skip", req_id, num_tokens, num_computed_tokens, hit, need,
                            self._min_retrieve_tokens)
                need = 0
            else:
                logger.info("Reqid: %s, Total tokens %d, Inference Engine computed tokens: %d, LMCache hit "
                            "tokens: %d, need to load: %d", req_id, num_tokens, num_computed_tokens, hit, need)
            is_async, ext = False, need
            if need > 0 and self._load_async:
                if full:  # vLLM recomputes the last token after an async load of all of them
                    is_async, ext = True, hit - num_computed_tokens
                elif (num_computed_tokens + need) % self._block_size == 0:
                    is_async = True
            if not 0 <= ext <= num_tokens - num_computed_tokens:  # cannot happen with a checked hit
                logger.warning("LMCacheNative: request %s: %d external tokens beyond its %d tokens; treated as a "
                               "miss", req_id, ext, num_tokens)
                self._pending_lookups[req_id] = _Lookup(0, num_computed_tokens, 0, False, [], extra_key)
                return 0, False
            self._pending_lookups[req_id] = _Lookup(hit, num_computed_tokens, ext, is_async,
                                                    lookup_tokens[:hit], extra_key)
            return ext, is_async
        except Exception as error:
            logger.warning("LMCacheNative: lookup for request %s failed, treated as a miss: %s", req_id, error)
            return 0, False

    def _lookup_may_block(self) -> bool:
        """True when a lookup does I/O that can take up to a timeout: a remote tier, or a rank whose
        engine lives in another process (the socket lookup channel)."""
        if self._engine_config.get("remote_url"):
            return True
        with _module_lock:
            local = _LOCAL_ENGINES.get(self._lookup_namespace, {})
            return any(rank not in local for rank in range(self._world_size))

    def _background_hit(self, req_id, tokens: list, extra_key: bytes) -> Optional[int]:
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
                    max_workers=_LOOKUP_POOL_THREADS, thread_name_prefix="lmcn-lookup")
            tokens = list(tokens)
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

    def _lookup(self, tokens: list, extra_key: bytes) -> int:
        """Leading tokens held by every rank (the minimum); any failure counts as 0 for that rank."""
        if not tokens:
            return 0
        with _module_lock:
            local = dict(_LOCAL_ENGINES.get(self._lookup_namespace, {}))
        hits = []
        for rank in range(self._world_size):
            engine = local.get(rank)
            try:
                if engine is not None:
                    hit = engine.lookup(tokens, extra_key)
                elif hasattr(self._lmc, "remote_lookup"):
                    path = _lookup_socket_path(self._model, self._rpc_port, self._dp_rank, rank)
                    hit = self._lmc.remote_lookup(path, tokens, extra_key, timeout_s=self._lookup_timeout_s)
                else:
                    hit = 0
            except Exception as error:  # LmcTimeout / LmcIOError / closed engine: a miss
                logger.debug("LMCacheNative: lookup on rank %d failed, counted as a miss: %s", rank, error)
                hit = 0
            hit = self._checked_hit(hit, len(tokens), f"rank {rank}")
            hits.append(hit)
            if hit == 0:
                break
        return min(hits) if hits else 0

    def _checked_hit(self, hit, num_tokens: int, origin: str) -> int:
        """``hit`` if it is a token count in [0, num_tokens], else 0. An answer comes from another
        process (or a buggy engine); one out of range would make vLLM skip computing tokens nobody
        loads, so it counts as a failed lookup rather than being clamped into range. Warned once."""
        if isinstance(hit, int) and not isinstance(hit, bool) and 0 <= hit <= num_tokens:
            return hit
        if not self._warned_bad_lookup_answer:
            self._warned_bad_lookup_answer = True
            logger.warning("LMCacheNative: the lookup on %s answered %s for a prompt of %d tokens; counted as a "
                           "miss (further such answers are not logged)", origin, _cfg._shown(hit), num_tokens)
        return 0

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
                    block_ids = _blocks_of(blocks)
                except Exception:
                    block_ids = []
                self._pending_lookups.pop(req_id, None)
                self._pending_loads[req_id] = LoadSpec(req_id, [], block_ids, 0, len(block_ids) * self._block_size,
                                                       False, b"", fail=True)

    def _update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        req_id = request.request_id
        lookup = self._pending_lookups.pop(req_id, None)
        tracker = self._trackers.get(req_id)
        if tracker is None:
            tracker = _Tracker(req_id, request, lookup.extra_key if lookup else build_extra_key(request))
            params = _kv_params(request)
            priority = getattr(request, "priority", None)
            tracker.skip_save = bool(
                self._kv_role == "kv_consumer" or self._force_skip_save or params.get("lmcache.skip_save")
                or _has_prompt_embeds(request)
                or (self._priority_limit is not None and priority is not None and priority > self._priority_limit))
            self._trackers[req_id] = tracker
        tracker.request = request
        if lookup is not None:  # a (re-)admission after a lookup: the store holds hit_tokens
            tracker.num_saved_tokens = lookup.hit_tokens
            tracker.prefill_end = _num_tokens(request)
            tracker.expected_computed = -1
        elif num_external_tokens == 0 and tracker.prefill_end == 0:
            tracker.prefill_end = _num_tokens(request)
        if num_external_tokens <= 0:
            return  # e.g. the second call after an async load, or a miss
        block_ids = _blocks_of(blocks)
        tracker.block_ids = list(block_ids)
        if lookup is None or lookup.num_external_tokens != num_external_tokens:
            logger.error("LMCacheNative: vLLM admitted request %s with %d external tokens but the lookup said "
                         "%s; its blocks will be reported invalid", req_id, num_external_tokens,
                         None if lookup is None else lookup.num_external_tokens)
            first = lookup.vllm_cached_tokens if lookup else 0
            self._pending_loads[req_id] = LoadSpec(req_id, [], block_ids, first, first + num_external_tokens,
                                                   bool(lookup and lookup.is_async), b"", fail=True)
            return
        expected = lookup.vllm_cached_tokens + num_external_tokens
        self._pending_loads[req_id] = LoadSpec(req_id, list(lookup.token_ids), list(block_ids),
                                               lookup.vllm_cached_tokens, expected, lookup.is_async,
                                               lookup.extra_key)
        # vLLM's num_computed_tokens once the load is in: all of it, less the last prompt token
        tracker.expected_computed = expected - (1 if expected == _num_tokens(request) else 0)

    def build_connector_meta(self, scheduler_output):
        """This step's loads (admitted since the last call) and saves (chunks completed by this
        step's forward). Resets the per-step state; never modifies scheduler_output."""
        meta = LMCacheNativeConnectorMetadata(self._block_size)
        try:
            meta.loads = list(self._pending_loads.values())
            self._pending_loads = {}
            for req_id in getattr(scheduler_output, "finished_req_ids", None) or ():
                self._forget(req_id)
            num_scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
            for new in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
                tracker = self._trackers.get(new.req_id)
                if tracker is None:  # builds that skip update_state_after_alloc when ext == 0
                    tracker = _Tracker(new.req_id, None, b"")
                    tracker.prefill_end = len(getattr(new, "prompt_token_ids", None) or [])
                    self._trackers[new.req_id] = tracker
                tracker.block_ids = _first_group(new.block_ids)
                tokens = None if tracker.request is not None else list(getattr(new, "prompt_token_ids", None) or [])
                self._plan_save(meta, tracker, int(new.num_computed_tokens),
                                int(num_scheduled.get(new.req_id, 0)), tokens)
            for req_id, resumed, new_blocks, computed in self._cached_requests(scheduler_output):
                tracker = self._trackers.get(req_id)
                if tracker is None:
                    continue
                if resumed:
                    tracker.block_ids = _first_group(new_blocks)
                    tracker.prefill_end = max(tracker.prefill_end, _num_tokens(tracker.request)
                                              if tracker.request is not None else 0)
                else:
                    tracker.block_ids.extend(_first_group(new_blocks))
                self._plan_save(meta, tracker, int(computed), int(num_scheduled.get(req_id, 0)), None)
        except Exception as error:
            logger.error("LMCacheNative: build_connector_meta failed: %s", error, exc_info=True)
        return meta

    @staticmethod
    def _cached_requests(scheduler_output):
        """(req_id, resumed, new_block_ids, num_computed_tokens) of the running requests, across the
        batched CachedRequestData (>= 0.9.2; resumed_from_preemption list or resumed_req_ids set) and
        the older list of per-request objects."""
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is None:
            return
        if isinstance(cached, (list, tuple)):
            for item in cached:
                yield (item.req_id, bool(getattr(item, "resumed_from_preemption", False)),
                       getattr(item, "new_block_ids", None), item.num_computed_tokens)
            return
        resumed_ids = getattr(cached, "resumed_req_ids", None)
        resumed_flags = getattr(cached, "resumed_from_preemption", None)
        for index, req_id in enumerate(cached.req_ids):
            if resumed_ids is not None:
                resumed = req_id in resumed_ids
            else:
                resumed = bool(resumed_flags[index]) if resumed_flags is not None else False
            yield req_id, resumed, cached.new_block_ids[index], cached.num_computed_tokens[index]

    def _plan_save(self, meta, tracker: _Tracker, num_computed: int, num_scheduled: int, tokens) -> None:
        """LMCache's save rule (lmcache.md §2.4): store when this step completes a chunk beyond the
        stored ones, the trailing partial chunk only at the end of the prefill (save_unfull_chunk),
        decode-phase chunks only with save_decode_cache."""
        if 0 <= num_computed < tracker.expected_computed:
            # vLLM rolled back (a failed load): the store may lack tokens we counted as stored
            tracker.num_saved_tokens = min(tracker.num_saved_tokens, num_computed)
        total = num_computed + num_scheduled
        tracker.expected_computed = total
        if num_scheduled <= 0 or tracker.skip_save:
            return
        in_prefill = num_computed < tracker.prefill_end
        if not in_prefill and not self._save_decode_cache:
            return
        last_prefill = in_prefill and total >= tracker.prefill_end
        if last_prefill and self._save_unfull_chunk:
            save_upto = total
        else:
            save_upto = total // self._chunk_size * self._chunk_size
        if save_upto <= tracker.num_saved_tokens:
            return
        if tokens is None:
            tokens = _request_tokens(tracker.request) if tracker.request is not None else []
        if len(tokens) < save_upto:
            return
        blocks_needed = -(-save_upto // self._block_size)
        meta.saves.append(SaveSpec(tracker.req_id, list(tokens[:save_upto]), list(tracker.block_ids[:blocks_needed]),
                                   tracker.num_saved_tokens, len(tokens), tracker.extra_key))
        tracker.num_saved_tokens = save_upto

    def _forget(self, req_id: str) -> None:
        self._trackers.pop(req_id, None)
        self._pending_lookups.pop(req_id, None)
        self._drop_background_lookup(req_id)

    def request_finished(self, request, block_ids) -> tuple:
        """Saves complete inside wait_for_save, so the blocks are never held: (False, None)."""
        req_id = getattr(request, "request_id", None)
        self._forget(req_id)
        # A load admitted in this very step is still emitted (the workers report it as received,
        # which vLLM needs for a request it keeps waiting for remote KV).
        return False, None

    def update_connector_output(self, connector_output) -> None:
        """Nothing to reconcile: loads and saves are tracked by the workers."""

    def take_events(self) -> Iterable:
        return ()

    def get_finished_count(self):
        return None

    def reset_cache(self):
        """Drops the CPU tier of the engines in this process (lower tiers keep their records)."""
        engines = [self._engine] if self._engine is not None else []
        if self.role == KVConnectorRole.SCHEDULER:
            with _module_lock:
                engines = list(_LOCAL_ENGINES.get(self._lookup_namespace, {}).values())
        for engine in engines:
            try:
                engine.clear()
            except Exception as error:
                logger.warning("LMCacheNative: reset_cache failed: %s", error)
                return False
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

    # -- shutdown ---------------------------------------------------------------------------------
    def _close_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        with _module_lock:
            ranks = _LOCAL_ENGINES.get(self._lookup_namespace)
            if ranks is not None and ranks.get(self._rank) is engine:
                del ranks[self._rank]
                if not ranks:
                    del _LOCAL_ENGINES[self._lookup_namespace]
        try:
            if self._serving_socket is not None:
                engine.stop_lookup_server()
                self._serving_socket = None
            try:
                engine.flush(self._flush_timeout_s)  # disk/remote writes behind
            except Exception as error:
                logger.warning("LMCacheNative: flush at shutdown did not complete: %s", error)
        finally:
            engine.close()

    def shutdown(self) -> None:
        """Idempotent, in both roles: cancels async loads, stops the lookup server, flushes the
        lower tiers (bounded by blocking_timeout_secs) and destroys the engine."""
        if self._closed:
            return
        self._closed = True
        for spec, job in self._async_loads.values():
            self._close_job(job)
        self._async_loads.clear()
        for req_id in list(self._background_lookups):
            self._drop_background_lookup(req_id)
        pool, self._lookup_pool = self._lookup_pool, None
        if pool is not None:  # a lookup still running ends within lookup_timeout_ms; not waited for
            pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._close_engine()
        except Exception as error:
            logger.warning("LMCacheNative: shutdown: %s", error)
        self._layer_tensors = []
        self._kv_caches = {}
        self._trackers.clear()
        self._pending_lookups.clear()
        self._pending_loads.clear()

    # -- introspection for tests and debugging ----------------------------------------------------
    def internal_state_sizes(self) -> dict:
        """Sizes of every per-request map (all 0 once all requests are finished and reported)."""
        return {
            "trackers": len(self._trackers),
            "pending_lookups": len(self._pending_lookups),
            "background_lookups": len(self._background_lookups),
            "pending_loads": len(self._pending_loads),
            "async_loads": len(self._async_loads),
            "sync_loads_pending": len(self._sync_loads_pending),
            "finished_recving": len(self._finished_recving),
            "invalid_block_ids": len(self._invalid_block_ids),
        }
