"""Minimal stand-in ``vllm`` modules, installed into ``sys.modules`` before the connector is imported.

Only the names a KV connector touches exist, with the behaviour of the real ones in the chosen
interface era (docs/vllm-connector.md lists the eras). ``install(era)`` replaces any earlier installation and
drops an already imported connector module, so the connector is re-imported against this era's base
class. Eras are (major, minor) tuples:

  V0_10  ≈0.10: two-argument constructor; CachedRequestData.resumed_from_preemption (list of bools);
         no handle_preemptions, no get_block_ids_with_load_errors, no stats API.
  V0_14  ≈0.14: kv_cache_config as an optional third constructor argument; resumed_req_ids (set);
         handle_preemptions(set of ids) before bind; load errors; KVConnectorStats; KV events from
         connectors (KVConnectorKVEvents in KVConnectorOutput.kv_cache_events, BlockStored with a medium).
  NEW    2026 (≈0.28): kv_cache_config required and the two-argument constructor refused by the factory;
         handle_preemptions(metadata); has_sync_kv_loads and start_load_kv after the forward unless it
         is set; resumed requests arrive as new requests (MRv2); get_transfer_results.
"""

from __future__ import annotations

import abc
import collections
import enum
import importlib
import inspect
import logging
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

V0_10, V0_14, NEW = (0, 10), (0, 14), (0, 28)
ERAS = {"v0.10": V0_10, "v0.14": V0_14, "new": NEW}

CONNECTOR_MODULE = "lmcache_native.vllm_connector"
# Every module of the connector that is built on vLLM's classes: re-imported against each era's.
CONNECTOR_MODULES = [CONNECTOR_MODULE, "lmcache_native._compat", "lmcache_native._metadata",
                     "lmcache_native._scheduler", "lmcache_native._worker", "lmcache_native._events"]

MODULE_NAMES = [
    "vllm", "vllm.distributed", "vllm.distributed.kv_transfer", "vllm.distributed.kv_transfer.kv_connector",
    "vllm.distributed.kv_transfer.kv_connector.v1", "vllm.distributed.kv_transfer.kv_connector.v1.base",
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics", "vllm.distributed.kv_events", "vllm.config", "vllm.v1", "vllm.v1.core",
    "vllm.v1.core.sched", "vllm.v1.core.sched.output", "vllm.v1.request", "vllm.v1.outputs",
    "vllm.v1.kv_cache_interface", "vllm.forward_context", "vllm.logger", "vllm.version",
]

CURRENT_ERA = None


class RequestStatus(enum.IntEnum):
    WAITING = 0
    WAITING_FOR_REMOTE_KVS = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH_CAPPED = 5
    FINISHED_ABORTED = 6

    @staticmethod
    def is_finished(status) -> bool:
        return status >= RequestStatus.FINISHED_STOPPED


# ------------------------------------------------------------------------------------------------
# Plain data classes (the same in every era; era-specific fields are simply not set or not read)
# ------------------------------------------------------------------------------------------------
@dataclass
class KVTransferConfig:
    kv_connector: Optional[str] = None
    kv_connector_module_path: Optional[str] = None
    kv_role: Optional[str] = None
    engine_id: Optional[str] = None
    kv_rank: Optional[int] = None
    kv_parallel_size: int = 1
    kv_connector_extra_config: dict = field(default_factory=dict)
    kv_load_failure_policy: str = "recompute"

    def __post_init__(self):
        if self.kv_connector is not None and self.kv_role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"kv_role must be set with kv_connector, got {self.kv_role!r}")
        if self.engine_id is None:
            self.engine_id = "engine-0"

    @property
    def is_kv_transfer_instance(self) -> bool:
        return self.kv_connector is not None and self.kv_role in ("kv_producer", "kv_consumer", "kv_both")

    @property
    def is_kv_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_kv_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def get_from_extra_config(self, key, default) -> Any:
        return self.kv_connector_extra_config.get(key, default)


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = False
    cache_dtype: str = "auto"


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_rank: int = 0
    rank: int = 0


@dataclass
class ModelConfig:
    model: str = "fake/model"
    dtype: str = "float32"
    num_layers: int = 2
    num_kv_heads: int = 2
    head_size: int = 8
    use_mla: bool = False

    def get_num_layers(self, parallel_config=None) -> int:
        return self.num_layers

    def get_num_kv_heads(self, parallel_config=None) -> int:
        tp = parallel_config.tensor_parallel_size if parallel_config is not None else 1
        return 1 if self.use_mla else max(1, self.num_kv_heads // tp)

    def get_head_size(self) -> int:
        return self.head_size


@dataclass
class SchedulerConfig:
    disable_hybrid_kv_cache_manager: bool = True
    max_num_batched_tokens: int = 64


@dataclass
class DeviceConfig:
    device: str = "cpu"


@dataclass
class VllmConfig:
    kv_transfer_config: Optional[KVTransferConfig] = None
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)


@dataclass
class FullAttentionSpec:
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: Any = None


@dataclass
class KVCacheGroupSpec:
    layer_names: list
    kv_cache_spec: Any


@dataclass
class KVCacheTensor:
    size: int
    shared_by: list


@dataclass
class KVCacheConfig:
    num_blocks: int
    kv_cache_tensors: list
    kv_cache_groups: list


class KVCacheBlocks:
    def __init__(self, block_ids: list):
        self._block_ids = list(block_ids)

    def get_block_ids(self, allow_none: bool = False):
        return (list(self._block_ids),)

    def get_unhashed_block_ids(self):
        return list(self._block_ids)


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: Optional[list]
    mm_features: list
    sampling_params: Any
    pooling_params: Any
    block_ids: tuple
    num_computed_tokens: int
    lora_request: Any
    prompt_embeds: Any = None
    prefill_token_ids: Optional[list] = None  # MRv2: all tokens, also for resumed requests


@dataclass
class CachedRequestData:
    req_ids: list
    new_token_ids: list
    new_block_ids: list
    num_computed_tokens: list
    # era-specific (exactly one is set): ≈0.10 list of bools, ≥0.12 set of ids
    resumed_from_preemption: Optional[list] = None
    resumed_req_ids: Optional[set] = None
    all_token_ids: Optional[dict] = None
    num_output_tokens: Optional[list] = None


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict
    total_num_scheduled_tokens: int
    scheduled_spec_decode_tokens: dict
    scheduled_encoder_inputs: dict
    num_common_prefix_blocks: list
    finished_req_ids: set
    free_encoder_mm_hashes: list
    preempted_req_ids: Optional[set] = None
    kv_connector_metadata: Any = None
    has_sync_kv_loads: bool = False


@dataclass
class KVConnectorOutput:
    finished_sending: Optional[set] = None
    finished_recving: Optional[set] = None
    kv_connector_stats: Any = None
    kv_cache_events: Any = None
    invalid_block_ids: set = field(default_factory=set)
    expected_finished_count: int = 0


@dataclass
class ForwardContext:
    no_compile_layers: dict
    attn_metadata: Any
    virtual_engine: int = 0


@dataclass
class KVConnectorStats:
    """vllm/distributed/kv_transfer/kv_connector/v1/metrics.py (≥0.11)."""

    data: dict = field(default_factory=dict)

    def reset(self):
        raise NotImplementedError

    def aggregate(self, other):
        raise NotImplementedError

    def reduce(self):
        raise NotImplementedError

    def is_empty(self) -> bool:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# vllm/distributed/kv_events.py. The real events are msgspec Structs (tagged, hashable, compared by
# value); frozen dataclasses behave alike here. Eras: ≈0.10 BlockStored without a medium and no
# connector events; ≈0.14 medium and KVConnectorKVEvents; 2026 also lora_name (required) and the
# optional extra_keys / group_idx.
# ------------------------------------------------------------------------------------------------
class KVCacheEvent:
    """Base class of the KV cache events."""


@dataclass(frozen=True)
class BlockStored_V0_10(KVCacheEvent):
    block_hashes: list
    parent_block_hash: Any
    token_ids: list
    block_size: int
    lora_id: Optional[int]

    def __hash__(self):
        return hash((tuple(self.block_hashes), self.parent_block_hash, tuple(self.token_ids), self.block_size,
                     self.lora_id))


@dataclass(frozen=True)
class BlockStored_V0_14(KVCacheEvent):
    block_hashes: list
    parent_block_hash: Any
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]

    def __hash__(self):
        return hash((tuple(self.block_hashes), self.parent_block_hash, tuple(self.token_ids), self.block_size,
                     self.lora_id, self.medium))


@dataclass(frozen=True)
class BlockStored_NEW(KVCacheEvent):
    block_hashes: list
    parent_block_hash: Any
    token_ids: list
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list] = None
    group_idx: Optional[int] = None
    kv_cache_spec_kind: Optional[str] = None
    kv_cache_spec_sliding_window: Optional[int] = None

    def __hash__(self):
        return hash((tuple(self.block_hashes), self.parent_block_hash, tuple(self.token_ids), self.block_size,
                     self.lora_id, self.medium, self.group_idx))


@dataclass(frozen=True)
class BlockRemoved_V0_10(KVCacheEvent):
    block_hashes: list

    def __hash__(self):
        return hash(tuple(self.block_hashes))


@dataclass(frozen=True)
class BlockRemoved_NEW(KVCacheEvent):
    block_hashes: list
    medium: Optional[str]
    group_idx: Optional[int] = None

    def __hash__(self):
        return hash((tuple(self.block_hashes), self.medium, self.group_idx))


@dataclass(frozen=True)
class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventAggregator:
    """Counts events across workers; the common ones are those every worker emitted."""

    def __init__(self, num_workers: int) -> None:
        if num_workers <= 0:
            raise ValueError("num_workers must be greater than zero.")
        self._event_counter = collections.Counter()
        self._num_workers = num_workers

    def add_events(self, events: list) -> None:
        if not isinstance(events, list):
            raise TypeError("events must be a list of KVCacheEvent.")
        self._event_counter.update(events)

    def get_common_events(self) -> list:
        return [event for event, count in self._event_counter.items() if count == self._num_workers]

    def get_all_events(self) -> list:
        return list(self._event_counter.elements())

    def clear_events(self) -> None:
        self._event_counter.clear()

    def increment_workers(self, count: int = 1) -> None:
        if count <= 0:
            raise ValueError("count must be positive.")
        self._num_workers += count

    def reset_workers(self) -> None:
        self._num_workers = 1

    def get_number_of_workers(self) -> int:
        return self._num_workers


class KVConnectorKVEvents(abc.ABC):
    """Container of a connector's KV events (worker -> scheduler)."""

    @abc.abstractmethod
    def add_events(self, events: list) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def aggregate(self) -> "KVConnectorKVEvents":
        raise NotImplementedError

    @abc.abstractmethod
    def increment_workers(self, count: int = 1) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def get_all_events(self) -> list:
        raise NotImplementedError

    @abc.abstractmethod
    def get_number_of_workers(self) -> int:
        raise NotImplementedError

    @abc.abstractmethod
    def clear_events(self) -> None:
        raise NotImplementedError

    def merge(self, other: "KVConnectorKVEvents") -> "KVConnectorKVEvents":
        self.add_events(other.get_all_events())
        return self


def _install_kv_events(era, module) -> None:
    """vllm.distributed.kv_events as the era has it (class names as vLLM's)."""
    if era < (0, 14):
        stored, removed = BlockStored_V0_10, BlockRemoved_V0_10
    elif era < NEW:
        stored, removed = BlockStored_V0_14, BlockRemoved_NEW
    else:
        stored, removed = BlockStored_NEW, BlockRemoved_NEW
    classes = {"KVCacheEvent": KVCacheEvent, "BlockStored": stored, "BlockRemoved": removed,
               "AllBlocksCleared": AllBlocksCleared, "KVEventAggregator": KVEventAggregator}
    if era >= (0, 14):
        classes["KVConnectorKVEvents"] = KVConnectorKVEvents
    for name, cls in classes.items():
        cls.__module__ = module.__name__
        cls.__name__ = cls.__qualname__ = name  # the era's class under vLLM's name (repr, pickle)
        setattr(module, name, cls)
    module.MEDIUM_GPU = "GPU"


class KVConnectorPromMetrics:
    """vllm/distributed/kv_transfer/kv_connector/v1/metrics.py (≥0.11): a connector's Prometheus
    metrics. ``metric_types`` maps prometheus_client's Gauge/Counter/Histogram to the classes vLLM
    wants used (its own subclasses in a real server)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from prometheus_client import Counter, Gauge, Histogram

        self._kv_transfer_config = vllm_config.kv_transfer_config
        self._gauge_cls = metric_types[Gauge]
        self._counter_cls = metric_types[Counter]
        self._histogram_cls = metric_types[Histogram]
        self._labelnames = labelnames
        self.per_engine_labelvalues = per_engine_labelvalues

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0):
        raise NotImplementedError


class KVConnectorProm:
    """vLLM's driver of the above (same module): resolves the connector class from the config and
    asks it for its metrics with prometheus_client's classes; ``observe`` forwards stats reports."""

    def __init__(self, vllm_config, labelnames, per_engine_labelvalues):
        from prometheus_client import Counter, Gauge, Histogram

        self.prom_metrics = None
        transfer = vllm_config.kv_transfer_config
        if transfer and transfer.kv_connector:
            connector_cls = getattr(importlib.import_module(transfer.kv_connector_module_path), transfer.kv_connector)
            self.prom_metrics = connector_cls.build_prom_metrics(
                vllm_config, {Gauge: Gauge, Counter: Counter, Histogram: Histogram}, labelnames, per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict, engine_idx: int = 0):
        if self.prom_metrics is None:
            return
        self.prom_metrics.observe(transfer_stats_data, engine_idx)


# Classes whose pickles must resolve in other processes live in their vllm.* module.
_HOMES = {
    "vllm.config": [KVTransferConfig, CacheConfig, ParallelConfig, ModelConfig, SchedulerConfig, DeviceConfig,
                    VllmConfig],
    "vllm.v1.kv_cache_interface": [FullAttentionSpec, KVCacheGroupSpec, KVCacheTensor, KVCacheConfig],
    "vllm.v1.core.sched.output": [NewRequestData, CachedRequestData, SchedulerOutput],
    "vllm.v1.outputs": [KVConnectorOutput],
    "vllm.v1.request": [RequestStatus],
    "vllm.forward_context": [ForwardContext],
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics": [KVConnectorStats, KVConnectorPromMetrics, KVConnectorProm],
}


def _make_base_module(era, module):
    class KVConnectorRole(enum.Enum):
        SCHEDULER = 0
        WORKER = 1

    class KVConnectorMetadata(abc.ABC):  # noqa: B024  (an empty marker ABC, as in vLLM)
        pass

    class KVConnectorBase_V1(abc.ABC):
        def _init(self, vllm_config, role, kv_cache_config):
            logging.getLogger("vllm.fake").debug("experimental API")
            if vllm_config.kv_transfer_config is None:
                raise ValueError("kv_transfer_config must be set")
            self._connector_metadata = None
            self._vllm_config = vllm_config
            self._kv_transfer_config = vllm_config.kv_transfer_config
            self._kv_cache_config = kv_cache_config
            self._role = role

        @property
        def role(self):
            return self._role

        def bind_connector_metadata(self, connector_metadata):
            self._connector_metadata = connector_metadata

        def clear_connector_metadata(self):
            self._connector_metadata = None

        def _get_connector_metadata(self):
            assert self._connector_metadata is not None
            return self._connector_metadata

        def register_kv_caches(self, kv_caches):
            return None

        def set_host_xfer_buffer_ops(self, copy_operation):
            return None

        def get_finished(self, finished_req_ids):
            return None, None

        def shutdown(self):
            return None

        def update_connector_output(self, connector_output):
            return None

        def request_finished(self, request, block_ids):
            return False, None

        def take_events(self):
            return ()

        def get_finished_count(self):
            return None

        @classmethod
        def get_required_kvcache_layout(cls, vllm_config):
            if cls is KVConnectorBase_V1:
                raise TypeError("get_required_kvcache_layout should not be called on the abstract base class")
            return None

        # -- abstract: every connector implements these --
        @abc.abstractmethod
        def start_load_kv(self, forward_context, **kwargs):
            ...

        @abc.abstractmethod
        def wait_for_layer_load(self, layer_name):
            ...

        @abc.abstractmethod
        def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
            ...

        @abc.abstractmethod
        def wait_for_save(self):
            ...

        @abc.abstractmethod
        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            ...

        @abc.abstractmethod
        def update_state_after_alloc(self, request, blocks, num_external_tokens):
            ...

        @abc.abstractmethod
        def build_connector_meta(self, scheduler_output):
            ...

    if era < (0, 12):
        def __init__(self, vllm_config, role):
            self._init(vllm_config, role, None)
    elif era < (0, 21):
        def __init__(self, vllm_config, role, kv_cache_config=None):
            self._init(vllm_config, role, kv_cache_config)
    else:
        def __init__(self, vllm_config, role, kv_cache_config):
            self._init(vllm_config, role, kv_cache_config)
    KVConnectorBase_V1.__init__ = __init__

    if era >= (0, 11):
        def get_block_ids_with_load_errors(self):
            return set()

        def get_kv_connector_stats(self):
            return None

        @classmethod
        def build_kv_connector_stats(cls, data=None):
            return None

        @classmethod
        def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
            return None

        @classmethod
        def requires_piecewise_for_cudagraph(cls, extra_config):
            return False

        def reset_cache(self):
            return None

        KVConnectorBase_V1.get_block_ids_with_load_errors = get_block_ids_with_load_errors
        KVConnectorBase_V1.get_kv_connector_stats = get_kv_connector_stats
        KVConnectorBase_V1.build_kv_connector_stats = build_kv_connector_stats
        KVConnectorBase_V1.build_prom_metrics = build_prom_metrics
        KVConnectorBase_V1.requires_piecewise_for_cudagraph = requires_piecewise_for_cudagraph
        KVConnectorBase_V1.reset_cache = reset_cache
    if era >= (0, 14):
        def handle_preemptions(self, preempted_req_ids):
            return None

        KVConnectorBase_V1.handle_preemptions = handle_preemptions
    if era >= (0, 26):
        def has_connector_metadata(self):
            return self._connector_metadata is not None

        def get_transfer_results(self, finished_req_ids):
            sending, recving = self.get_finished(finished_req_ids)
            return sending or set(), recving or set()

        KVConnectorBase_V1.has_connector_metadata = has_connector_metadata
        KVConnectorBase_V1.get_transfer_results = get_transfer_results

    for cls in (KVConnectorRole, KVConnectorMetadata, KVConnectorBase_V1):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)


def install(era=V0_14):
    """Installs the stand-in modules for ``era`` (replacing earlier ones) and forgets the connector
    module so the next import builds it on this era's base class. Returns the base module."""
    global CURRENT_ERA
    if isinstance(era, str):
        era = ERAS[era]
    for name in MODULE_NAMES:
        sys.modules.pop(name, None)
    package = sys.modules.get(CONNECTOR_MODULE.rsplit(".", 1)[0])
    for module_name in CONNECTOR_MODULES:
        sys.modules.pop(module_name, None)
        attribute = module_name.rsplit(".", 1)[1]
        if package is not None and attribute in vars(package):
            delattr(package, attribute)  # "from lmcache_native import vllm_connector" must re-import
    mods = {}
    for name in MODULE_NAMES:
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so submodules resolve from sys.modules
        sys.modules[name] = module
        mods[name] = module
    for parent_name in MODULE_NAMES:
        if "." in parent_name:
            parent, child = parent_name.rsplit(".", 1)
            setattr(mods[parent], child, mods[parent_name])
    for module_name, classes in _HOMES.items():
        if module_name == "vllm.distributed.kv_transfer.kv_connector.v1.metrics" and era < (0, 11):
            continue
        for cls in classes:
            cls.__module__ = module_name
            setattr(mods[module_name], cls.__name__, cls)
    if era < (0, 11):  # no stats API at all: importing the metrics module fails
        del sys.modules["vllm.distributed.kv_transfer.kv_connector.v1.metrics"]
        delattr(mods["vllm.distributed.kv_transfer.kv_connector.v1"], "metrics")
    _make_base_module(era, mods["vllm.distributed.kv_transfer.kv_connector.v1.base"])
    _install_kv_events(era, mods["vllm.distributed.kv_events"])
    mods["vllm.logger"].init_logger = logging.getLogger
    mods["vllm.version"].__version__ = "%d.%d.0" % era
    CURRENT_ERA = era
    return mods["vllm.distributed.kv_transfer.kv_connector.v1.base"]


def base_module():
    return sys.modules["vllm.distributed.kv_transfer.kv_connector.v1.base"]


def create_connector(vllm_config, role, kv_cache_config, era=None):
    """The factory's resolution and constructor call for the era (how vLLM loads kv_connector_module_path)."""
    era = era or CURRENT_ERA
    transfer = vllm_config.kv_transfer_config
    module_path = transfer.kv_connector_module_path
    if era >= (0, 21) and module_path == "":
        raise ValueError("kv_connector_module_path is empty")
    module = importlib.import_module(module_path)
    cls = getattr(module, transfer.kv_connector, None)
    if cls is None:
        raise AttributeError(f"Class {transfer.kv_connector} not found in {module_path}")
    takes_kv_cache_config = "kv_cache_config" in inspect.signature(cls.__init__).parameters
    if era >= (0, 21):
        if not takes_kv_cache_config:
            raise ValueError(f"{cls.__name__} uses deprecated 2-argument constructor signature")
        return cls(vllm_config, role, kv_cache_config)
    if era >= (0, 12) and takes_kv_cache_config:
        return cls(vllm_config, role, kv_cache_config)
    return cls(vllm_config, role)


def role(name: str):
    return getattr(base_module().KVConnectorRole, name)


def make_vllm_config(*, extra_config=None, kv_role="kv_both", block_size=16, tp=1, rank=0, model="fake/model",
                     num_layers=2, num_kv_heads=2, head_size=8, use_mla=False, dtype="float32",
                     prefix_caching=False, engine_id="engine-0"):
    return VllmConfig(
        kv_transfer_config=KVTransferConfig(
            kv_connector="LMCacheNativeConnector", kv_connector_module_path=CONNECTOR_MODULE, kv_role=kv_role,
            engine_id=engine_id, kv_connector_extra_config=dict(extra_config or {})),
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
        parallel_config=ParallelConfig(tensor_parallel_size=tp, rank=rank),
        model_config=ModelConfig(model=model, dtype=dtype, num_layers=num_layers, num_kv_heads=num_kv_heads,
                                 head_size=head_size, use_mla=use_mla),
    )


def make_kv_cache_config(num_blocks: int, layer_names: list, block_size: int, heads: int, head_size: int):
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(list(layer_names),
                                                           FullAttentionSpec(block_size, heads, head_size))])

