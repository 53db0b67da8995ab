"""Shims for the vLLM interface eras the connector supports (≈0.10 to the 2026 releases, 0.28).

Everything that differs between vLLM versions is read here: the base classes, the constructor's
signature, the era (for the ``None`` lookup answer and ``handle_preemptions``), the shapes of block
ids and of the scheduler output's cached requests, and the request's token accessors. Importing this
module imports vLLM's connector base module and nothing of the library.
"""

from __future__ import annotations

import inspect

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: F401  (re-exported)
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:  # vLLM >= 0.11: the worker's stats travel to the scheduler inside the model runner output
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats as KVConnectorStatsBase
except Exception:  # this vLLM has no connector stats API
    KVConnectorStatsBase = None

try:  # vLLM with per-connector Prometheus metrics (build_prom_metrics)
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics as KVConnectorPromMetricsBase
except Exception:
    KVConnectorPromMetricsBase = None


def vllm_version() -> tuple:
    """(major, minor) of the running vLLM; (0, 0) when unreadable (counts as the oldest era)."""
    try:
        from vllm.version import __version__ as version
        parts = str(version).split(".")
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except Exception:
        return 0, 0


def allows_none_lookup() -> bool:
    """vLLM >= 0.11 accepts ``None`` from get_num_new_matched_tokens ("ask again next step")."""
    return vllm_version() >= (0, 11)


def tells_preemptions() -> bool:
    """vLLM >= 0.14 calls ``handle_preemptions`` before a preempted request's blocks are reused. Before
    that a worker cannot fence a job that still reads them, so stores there stay synchronous."""
    return hasattr(KVConnectorBase_V1, "handle_preemptions") or vllm_version() >= (0, 14)


def init_base(connector, vllm_config, role, kv_cache_config) -> None:
    """Calls the base constructor as this era's base accepts it (two arguments up to ≈0.11)."""
    if "kv_cache_config" in inspect.signature(KVConnectorBase_V1.__init__).parameters:
        KVConnectorBase_V1.__init__(connector, vllm_config, role, kv_cache_config)
    else:
        KVConnectorBase_V1.__init__(connector, vllm_config, role)
        connector._kv_cache_config = kv_cache_config


def first_group(block_ids) -> list:
    """vLLM passes block ids as ``tuple[list[int], ...]`` (one list per KV cache group) since 0.9,
    and as a flat ``list[int]`` before; None means "no new blocks"."""
    if block_ids is None:
        return []
    if isinstance(block_ids, (tuple, list)) and block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


def blocks_of(blocks) -> list:
    """Block ids of group 0 from a ``KVCacheBlocks`` (or an older plain list of blocks)."""
    if blocks is None:
        return []
    if hasattr(blocks, "get_block_ids"):
        return first_group(blocks.get_block_ids())
    if isinstance(blocks, (list, tuple)):
        return [getattr(block, "block_id", block) for block in blocks]
    return []


def request_tokens(request) -> list:
    """All token ids of a live ``Request`` (prompt + outputs: a preempted request is looked up again
    with its outputs appended)."""
    tokens = getattr(request, "all_token_ids", None)
    if tokens is None:
        tokens = getattr(request, "prompt_token_ids", None) or []
    return tokens if type(tokens) is list else list(tokens)


def num_tokens(request) -> int:
    value = getattr(request, "num_tokens", None)
    return int(value) if value is not None else len(request_tokens(request))


def cached_requests(scheduler_output):
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


def preempted_ids(scheduler_output) -> list:
    """Requests preempted in this step (vLLM >= 0.14 lists them; older ones do not tell)."""
    preempted = getattr(scheduler_output, "preempted_req_ids", None)
    return sorted(preempted) if preempted else []


def preempted_from_argument(argument) -> list:
    """handle_preemptions takes a set of request ids (≈0.14-0.17) or the step's metadata (≈0.18+)."""
    if argument is None:
        return []
    if isinstance(argument, (set, frozenset, list, tuple)):
        return list(argument)
    return list(getattr(argument, "preempted", None) or ())
