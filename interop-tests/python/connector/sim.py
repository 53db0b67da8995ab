"""A miniature vLLM: scheduler, workers and the model they run, driving a KV connector in vLLM's order.

* ``MiniScheduler`` follows vllm/v1/core/sched/scheduler.py:
  the ``num_computed_tokens == 0`` gate for connector queries, vLLM's assertions on the answers, a
  block pool with vLLM's null block and an optional prefix cache, ``update_state_after_alloc`` on
  every admission, the WAITING_FOR_REMOTE_KVS state machine and its block arithmetic, preemption
  (without telling the connector), aborts with delayed freeing, ``build_connector_meta`` every step
  (its result pickled, as the multiprocess executor does), ``finished_req_ids`` one step late, and
  invalid blocks truncating ``num_computed_tokens`` (policy "recompute").
* ``MiniWorker`` owns one TP rank's paged KV tensors in a chosen layout and calls the worker hooks in
  the era's order. Its "model" writes deterministic KV -- a function of the token prefix, the
  position, the layer and the rank -- and, before attention would read a request's context, checks
  every context token bit for bit. Every connector call runs inside a watch: calls that may load
  (start_load_kv, wait_for_layer_load, get_finished) see every slot filled with a guard pattern, so a
  write anywhere but the slots the scheduler allowed for loads is caught, and the tokens each load
  wrote are recorded; every other call must leave the KV untouched.
* ``Cluster`` wires one scheduler and TP workers, in this process or with each worker in its own
  process (``worker_proc.py``), aggregates worker outputs with vLLM's all-workers rule, and checks that
  any context corruption the workers saw was reported through invalid block ids in that very step.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import fakevllm
import kv_oracle
from fakevllm import (NEW, V0_14, CachedRequestData, ForwardContext, KVCacheBlocks, KVConnectorOutput,
                      NewRequestData, RequestStatus, SchedulerOutput)

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------------
# Layouts (kv_oracle's cases plus the 2026 ones)
# ------------------------------------------------------------------------------------------------
CASES = dict(kv_oracle.ALL_CASES)
CASES["packed_nhd"] = kv_oracle.LayoutCase("packed_nhd", "packed", 2, lambda B, N, H, D: (B, N, H, 2 * D), (0, 2, 1, 3))
CASES["mla4"] = kv_oracle.LayoutCase("mla4", "mla", 1, lambda B, N, H, D: (B, N, D))  # registered [B,1,N,C]
MLA_LAYOUTS = ("mla", "mla_padded", "mla4")

INT_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
GUARD = kv_oracle.SENTINEL_BITS


@dataclass
class Spec:
    era: tuple = V0_14
    layout: str = "flash_attn_nhd"
    tp: int = 1
    block_size: int = 16
    kernel_split: int = 1  # kernel blocks per vLLM block (kernel block size = block_size / split)
    num_blocks: int = 48
    num_layers: int = 2
    share_last_layer: bool = False  # vLLM KV sharing: the last layer reuses the first one's tensor
    heads: int = 4  # KV heads over all ranks
    head_size: int = 8
    dtype: str = "float32"
    model: str = "fake/model"
    extra_config: dict = field(default_factory=dict)
    kv_role: str = "kv_both"
    prefix_caching: bool = False
    budget: int = 64  # tokens per step (chunked prefill)
    max_running: int = 8
    cudagraph_decode: bool = False  # pure-decode steps skip the per-layer hooks (FULL CUDA graphs)
    env: dict = field(default_factory=dict)  # for worker processes

    @property
    def use_mla(self) -> bool:
        return self.layout in MLA_LAYOUTS

    @property
    def heads_per_rank(self) -> int:
        return 1 if self.use_mla else self.heads // self.tp

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    def vllm_config(self, rank: int = 0):
        return fakevllm.make_vllm_config(
            extra_config=self.extra_config, kv_role=self.kv_role, block_size=self.block_size, tp=self.tp, rank=rank,
            model=self.model, num_layers=self.num_layers, num_kv_heads=self.heads, head_size=self.head_size,
            use_mla=self.use_mla, dtype=self.dtype, prefix_caching=self.prefix_caching)

    def layer_names(self) -> list:
        return [f"model.layers.{i}.self_attn.attn" for i in range(self.num_layers)]

    def kv_cache_config(self):
        return fakevllm.make_kv_cache_config(self.num_blocks, self.layer_names(), self.block_size,
                                             self.heads_per_rank, self.head_size)


# ------------------------------------------------------------------------------------------------
# The deterministic "model"
# ------------------------------------------------------------------------------------------------
_MASK61 = (1 << 61) - 1


def prefix_hashes(tokens, seed: int) -> list:
    """h[p] identifies the prefix tokens[0..p] (and the model variant, via seed)."""
    h, out = seed & _MASK61, []
    for token in tokens:
        h = ((h * 0x100000001B3) ^ (int(token) + 0x9E37)) & _MASK61
        out.append(h)
    return out


def kv_values(hashes, layer: int, rank: int, kv_count: int, heads: int, head_size: int, dtype,
              salt: int = 0) -> torch.Tensor:
    """[T, kv_count, heads, head_size] KV of the tokens whose prefix hashes are given."""
    width = torch.empty(0, dtype=dtype).element_size()
    n = kv_count * heads * head_size
    base = torch.tensor(hashes, dtype=torch.int64).reshape(-1, 1)
    index = torch.arange(n, dtype=torch.int64).reshape(1, -1)
    x = base * 1000003 + index * 7919 + (layer * 104729 + rank * 1299709 + salt * 15485863 + 1)
    x = x ^ (x >> 17)
    x = x * 0x5BD1E995
    x = x ^ (x >> 13)
    x = x & ((1 << (8 * width)) - 1)
    half = 1 << (8 * width - 1)
    x = torch.where(x >= half, x - (half << 1), x).to(INT_DTYPE[width])
    return x.view(dtype).reshape(-1, kv_count, heads, head_size)


def next_token(hashes) -> int:
    return int(hashes[-1] % 30000) + 3


def slots_for(block_ids, block_size: int, lo: int, hi: int) -> list:
    return [block_ids[t // block_size] * block_size + t % block_size
            for t in range(lo, hi) if t // block_size < len(block_ids)]


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------
@dataclass
class LoraRequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass
class PlaceholderRange:
    offset: int
    length: int


@dataclass
class MultiModalFeature:
    identifier: str
    mm_position: PlaceholderRange


class Req:
    """vllm.v1.request.Request stand-in (scheduler process only)."""

    def __init__(self, request_id: str, prompt, max_tokens: int = 2, cache_salt=None, lora_request=None,
                 mm_features=None, kv_transfer_params=None, priority: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = [int(t) for t in prompt]
        self._output_token_ids: list = []
        self.max_tokens = max_tokens
        self.cache_salt = cache_salt
        self.lora_request = lora_request
        self.mm_features = list(mm_features or [])
        self.kv_transfer_params = kv_transfer_params
        self.priority = priority
        self.sampling_params = None
        self.pooling_params = None
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_external_computed_tokens = 0
        self.num_preemptions = 0
        self.block_ids: list = []
        self.awaiting_recv_after_finish = False

    @property
    def output_token_ids(self):
        return list(self._output_token_ids)

    @property
    def all_token_ids(self):
        return self.prompt_token_ids + self._output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self._output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    @property
    def model_seed(self) -> int:
        """What the model's KV depends on besides the tokens: the LoRA adapter and the images (a
        cache salt does not change KV)."""
        lora = self.lora_request.lora_name if self.lora_request else ""
        mm = ";".join(f"{f.identifier}@{f.mm_position.offset}" for f in self.mm_features)
        return zlib.crc32(f"{lora}|{mm}".encode())

    def block_hashes(self, block_size: int) -> list:
        """vLLM's prefix-cache hashes of the full blocks (salt, LoRA and images included)."""
        seed = zlib.crc32(f"{self.cache_salt}|{self.model_seed}".encode())
        tokens = self.all_token_ids
        hashes, h = [], seed
        for start in range(0, len(tokens) - block_size + 1, block_size):
            h = zlib.crc32(struct.pack(f"<q{block_size}i", h, *tokens[start:start + block_size]))
            hashes.append(h)
        return hashes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------------
# Block pool (vLLM's: block 0 is the null block; freed blocks stay prefix-cached until reused)
# ------------------------------------------------------------------------------------------------
class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.ref[0] = 1  # null block, never handed out
        self.free = collections.OrderedDict((b, None) for b in range(1, num_blocks))  # first = evicted first
        self.hash_of: dict = {}
        self.cached: dict = {}

    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, count: int):
        if count <= 0:
            return []
        if count > len(self.free):
            return None
        out = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(block, None)
            if h is not None and self.cached.get(h) == block:
                del self.cached[h]
            self.ref[block] = 1
            out.append(block)
        return out

    def touch(self, blocks) -> None:
        for block in blocks:
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1

    def release(self, blocks) -> None:
        for block in reversed(list(blocks)):  # the tail is evicted first
            self.ref[block] -= 1
            assert self.ref[block] >= 0, f"block {block} freed twice"
            if self.ref[block] == 0:
                self.free[block] = None

    def cache(self, block: int, h) -> None:
        if h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h

    def lookup(self, hashes) -> list:
        out = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            out.append(block)
        return out


# ------------------------------------------------------------------------------------------------
# Scheduler
# ------------------------------------------------------------------------------------------------
class MiniScheduler:
    def __init__(self, conn, spec: Spec):
        self.conn = conn
        self.spec = spec
        self.era = spec.era
        self.bs = spec.block_size
        self.published_events: list = []  # every event take_events yielded, in order
        self.pool = BlockPool(spec.num_blocks)
        self.requests: dict = {}
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.finished_since_last: set = set()
        self.recv_done: set = set()
        self.async_failed: dict = {}
        self.async_allowed: dict = {}
        self.delayed: set = set()
        self.answers: dict = collections.defaultdict(list)  # rid -> [(local, ext, is_async)]
        self.deferred: collections.Counter = collections.Counter()  # rid -> answers of None
        self.finished: dict = {}  # rid -> status
        self.step_no = 0
        self.last_failed: set = set()

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request: Req) -> None:
        assert request.request_id not in self.requests
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None or request.is_finished():
            return
        self._finish(request, RequestStatus.FINISHED_ABORTED)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.delayed
                    or any(r.awaiting_recv_after_finish for r in self.requests.values()))

    def _finish(self, request: Req, status) -> None:
        was_receiving = request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        delay, params = self.conn.request_finished(request, list(request.block_ids))
        assert params is None or isinstance(params, dict)
        self.finished[request.request_id] = status
        self.finished_since_last.add(request.request_id)
        self.recv_done.discard(request.request_id)
        if was_receiving:
            request.awaiting_recv_after_finish = True  # blocks freed when the load is reported
        elif delay:
            self.delayed.add(request.request_id)
        else:
            self._free(request)

    def _free(self, request: Req) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []
        self.async_allowed.pop(request.request_id, None)
        del self.requests[request.request_id]

    def _preempt(self, request: Req) -> None:
        self.running.remove(request)
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self):
        self.step_no += 1
        bs, budget = self.bs, self.spec.budget
        num_scheduled, new_reqs, cached, preempted = {}, [], [], set()
        has_sync_loads = False
        allowed = dict(self.async_allowed)

        for request in list(self.running):
            if request not in self.running or budget <= 0:
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if n <= 0:
                continue
            need = cdiv(request.num_computed_tokens + n, bs) - len(request.block_ids)
            new_blocks = []
            while need > 0:
                got = self.pool.allocate(need)
                if got is not None:
                    new_blocks = got
                    break
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            if request not in self.running:
                continue
            request.block_ids.extend(new_blocks)
            num_scheduled[request.request_id] = n
            budget -= n
            cached.append((request, False, new_blocks))

        if not preempted:
            for request in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.spec.max_running:
                    break
                rid = request.request_id
                if request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                    if rid not in self.recv_done:
                        continue
                    self.recv_done.discard(rid)
                    computed = min(len(request.block_ids) * bs, request.num_tokens)
                    valid = self.async_failed.pop(rid, None)
                    if valid is not None:
                        computed = min(computed, valid)
                    if computed == request.num_tokens:
                        computed -= 1
                    request.num_computed_tokens = computed
                    request.status = RequestStatus.PREEMPTED if request.num_preemptions else RequestStatus.WAITING
                    self.async_allowed.pop(rid, None)
                    allowed.pop(rid, None)
                resumed = request.status == RequestStatus.PREEMPTED
                ext, is_async, local_blocks = 0, False, []
                if request.num_computed_tokens == 0:
                    if self.spec.prefix_caching:
                        limit = (request.num_tokens - 1) // bs
                        local_blocks = self.pool.lookup(request.block_hashes(bs)[:limit])
                    local = len(local_blocks) * bs
                    answer = self.conn.get_num_new_matched_tokens(request, local)
                    assert isinstance(answer, tuple) and len(answer) == 2, answer
                    ext, is_async = answer
                    if ext is None:  # "still looking": the request stays waiting, asked again next step
                        assert self.era >= (0, 11), "None is only allowed from vLLM 0.11 on"
                        self.deferred[rid] += 1
                        continue
                    self.answers[rid].append((local, ext, is_async))
                    assert isinstance(ext, int) and ext >= 0 and isinstance(is_async, bool), answer
                    assert not (ext == 0 and is_async), "(0, True) is illegal"
                    if is_async:
                        assert (local + ext) % bs == 0 or local + ext == request.num_tokens, (local, ext)
                    else:
                        assert local + ext <= request.num_tokens - 1, (local, ext, request.num_tokens)
                    computed = local + ext
                else:
                    local = 0
                    computed = request.num_computed_tokens
                n_new = 0 if is_async else min(request.num_tokens - computed, budget)
                assert is_async or n_new > 0
                have = len(request.block_ids)
                need = cdiv(computed + n_new, bs) - have - len(local_blocks)
                self.pool.touch(local_blocks)
                got = self.pool.allocate(max(need, 0))
                if got is None:
                    self.pool.release(local_blocks)
                    break  # the connector was already asked: it must be idempotent
                request.block_ids = request.block_ids + local_blocks + got
                self.conn.update_state_after_alloc(request, KVCacheBlocks(request.block_ids), ext)
                request.num_external_computed_tokens = ext
                if is_async:
                    request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                    self.async_allowed[rid] = (list(request.block_ids), local, local + ext)
                    allowed[rid] = self.async_allowed[rid]
                    continue
                if ext > 0:
                    has_sync_loads = True
                    hi = local + ext + (1 if local + ext == request.num_tokens - 1 else 0)
                    allowed[rid] = (list(request.block_ids), local, hi)
                request.num_computed_tokens = computed
                self.waiting.remove(request)
                self.running.append(request)
                request.status = RequestStatus.RUNNING
                num_scheduled[rid] = n_new
                budget -= n_new
                if resumed and self.era < NEW:
                    cached.append((request, True, list(request.block_ids)))
                else:
                    new_reqs.append(NewRequestData(
                        req_id=rid, prompt_token_ids=list(request.prompt_token_ids), mm_features=request.mm_features,
                        sampling_params=None, pooling_params=None, block_ids=(list(request.block_ids),),
                        num_computed_tokens=computed, lora_request=request.lora_request,
                        prefill_token_ids=request.all_token_ids if self.era >= NEW else None))

        cached_data = CachedRequestData(
            req_ids=[r.request_id for r, _, _ in cached], new_token_ids=[[] for _ in cached],
            new_block_ids=[(list(blocks),) if blocks else None for _, _, blocks in cached],
            num_computed_tokens=[r.num_computed_tokens for r, _, _ in cached])
        if self.era < (0, 12):
            cached_data.resumed_from_preemption = [resumed for _, resumed, _ in cached]
        else:
            cached_data.resumed_req_ids = {r.request_id for r, resumed, _ in cached if resumed}
            cached_data.all_token_ids = {r.request_id: r.all_token_ids for r, resumed, _ in cached if resumed}
            cached_data.num_output_tokens = [len(r.output_token_ids) for r, _, _ in cached]
        output = SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached_data, num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()), scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={}, num_common_prefix_blocks=[0], finished_req_ids=set(self.finished_since_last),
            free_encoder_mm_hashes=[], preempted_req_ids=preempted if self.era >= V0_14 else None,
            has_sync_kv_loads=has_sync_loads)
        before = pickle.dumps(output)
        meta = self.conn.build_connector_meta(output)
        assert meta is not None
        assert pickle.dumps(output) == before, "build_connector_meta modified the scheduler output"
        output.kv_connector_metadata = pickle.loads(pickle.dumps(meta))  # as the executor ships it
        self.finished_since_last = set()
        info = {
            "tokens": {rid: self.requests[rid].all_token_ids for rid in num_scheduled},
            "seeds": {rid: self.requests[rid].model_seed for rid in num_scheduled},
            "prompt_len": {rid: self.requests[rid].num_prompt_tokens for rid in num_scheduled},
            "allowed": allowed,
        }
        for rid, n in num_scheduled.items():
            self.requests[rid].num_computed_tokens += n
        return output, info

    def update_from_output(self, output: SchedulerOutput, kv_output: KVConnectorOutput) -> None:
        bs = self.bs
        failed = set()
        invalid = set(kv_output.invalid_block_ids or ())
        if invalid:
            for request in list(self.requests.values()):
                for index, block in enumerate(request.block_ids):
                    if block not in invalid:
                        continue
                    if request.status == RequestStatus.WAITING_FOR_REMOTE_KVS or request.awaiting_recv_after_finish:
                        self.async_failed[request.request_id] = min(self.async_failed.get(request.request_id, 1 << 62),
                                                                    index * bs)
                    elif index * bs < request.num_computed_tokens:
                        request.num_computed_tokens = index * bs
                        failed.add(request.request_id)
                    break
        self.last_failed = failed
        if self.spec.prefix_caching:
            for request in self.running:
                if request.request_id in failed:
                    continue
                hashes = request.block_hashes(bs)
                for index in range(min(request.num_computed_tokens // bs, len(hashes), len(request.block_ids))):
                    self.pool.cache(request.block_ids[index], hashes[index])
        for rid in output.num_scheduled_tokens:
            request = self.requests.get(rid)
            if request is None or rid in failed or request.status != RequestStatus.RUNNING:
                continue
            if request.num_computed_tokens >= request.num_tokens:
                request._output_token_ids.append(next_token(prefix_hashes(request.all_token_ids, request.model_seed)))
                if len(request._output_token_ids) >= request.max_tokens:
                    self._finish(request, RequestStatus.FINISHED_LENGTH_CAPPED)
        self.conn.update_connector_output(kv_output)
        for rid in kv_output.finished_recving or ():
            assert rid in self.requests, f"finished_recving for unknown request {rid}"
            request = self.requests[rid]
            if request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
                self.recv_done.add(rid)
            else:
                assert request.awaiting_recv_after_finish, f"finished_recving for {rid} in state {request.status}"
                request.awaiting_recv_after_finish = False
                self._free(request)
        for rid in kv_output.finished_sending or ():
            assert rid in self.delayed, f"finished_sending for {rid}, whose request_finished returned False"
            self.delayed.discard(rid)
            self._free(self.requests[rid])
        events = self.conn.take_events()
        assert events is not None
        self.published_events.extend(events)  # what vLLM's KV-event publisher would send


# ------------------------------------------------------------------------------------------------
# Worker
# ------------------------------------------------------------------------------------------------
class _Layer:  # an attention layer module in forward_context.no_compile_layers
    def __init__(self, kv_cache):
        self.kv_cache = kv_cache


class _AttnMetadata:
    def __init__(self, slot_mapping):
        self.slot_mapping = slot_mapping


class MiniWorker:
    def __init__(self, spec: Spec, rank: int):
        self.spec, self.rank, self.era = spec, rank, spec.era
        case = CASES[spec.layout]
        self.case = case
        self.kbs = spec.block_size // spec.kernel_split
        heads = spec.heads_per_rank
        distinct = spec.num_layers - (1 if spec.share_last_layer else 0)
        self.layers = [kv_oracle.allocate_layer(case, spec.num_blocks * spec.kernel_split, self.kbs, heads,
                                                spec.head_size, spec.torch_dtype, "sentinel")
                       for _ in range(distinct)]
        self.layer_index = {}
        kv_caches = {}
        for index, name in enumerate(spec.layer_names()):
            layer_id = min(index, distinct - 1) if not spec.share_last_layer or index < distinct else 0
            self.layer_index[name] = layer_id
            tensor = self.layers[layer_id].logical
            kv_caches[name] = tensor.unsqueeze(1) if spec.layout == "mla4" else tensor
        self.kv_caches = kv_caches
        self.all_slots = torch.arange(spec.num_blocks * spec.block_size, dtype=torch.int64)
        self.req_blocks: dict = {}
        self.violations: list = []
        self.conn = fakevllm.create_connector(spec.vllm_config(rank), fakevllm.role("WORKER"), spec.kv_cache_config())
        self._watch("register_kv_caches", False, {}, self.conn.register_kv_caches, kv_caches)
        self.conn.set_host_xfer_buffer_ops(lambda *args, **kwargs: None)

    @property
    def kv_count(self):
        return self.case.kv_count

    def _expected(self, hashes, layer_id, salt=0):
        return kv_values(hashes, layer_id, self.rank, self.kv_count, self.spec.heads_per_rank, self.spec.head_size,
                         self.spec.torch_dtype, salt)

    # -- watches around connector calls -------------------------------------------------------------
    def _read_all(self, layer):
        return kv_oracle.read_tokens(layer, self.all_slots, self.kbs)

    def _settle_jobs(self, kinds) -> None:
        """Waits for the connector's jobs of these kinds that a test does not hold. The library runs
        them on its own threads; the watches below need their writes inside the call that may load
        (and a store must not read the guard values a watch fills in), so the stand-in settles them
        at those points. A job a test holds (``held``) is left running: it writes nothing until the
        test releases it and the connector then polls it."""
        worker_part = getattr(self.conn, "_worker", None)
        if worker_part is None:
            return
        for kind, _, job in worker_part.jobs_in_flight():
            if kind in kinds and not getattr(job, "held", False):
                try:
                    job.wait(30)
                except Exception:  # noqa: BLE001 -- a failed job is the connector's to report
                    pass

    def _watch(self, what: str, may_load: bool, allowed: dict, function, *args, **kwargs):
        if may_load:
            self._settle_jobs(("store",))  # a store must not read the guard values filled in below
        snapshots = [layer.physical.clone() for layer in self.layers]
        if not may_load:
            result = function(*args, **kwargs)
            for layer, snapshot in zip(self.layers, snapshots):
                if not torch.equal(kv_oracle.bits(layer.physical), kv_oracle.bits(snapshot)):
                    self.violations.append(f"rank {self.rank}: {what} changed the KV cache")
            return result
        slot_owner = {}
        for rid, (block_ids, lo, hi) in allowed.items():
            for token, slot in zip(range(lo, hi), slots_for(block_ids, self.spec.block_size, lo, hi)):
                slot_owner[slot] = (rid, token)
        for layer in self.layers:
            kv_oracle.bits(layer.physical).fill_(GUARD[layer.element_size])
        result = function(*args, **kwargs)
        self._settle_jobs(("load",))  # the loads this call started write now, inside the watch
        for layer_id, (layer, snapshot) in enumerate(zip(self.layers, snapshots)):
            values = self._read_all(layer)
            guard = GUARD[layer.element_size]
            if self.case.padding:  # elements between the rows of a strided view belong to nobody
                padding = kv_oracle.bits(layer.physical[..., -self.case.padding:])
                if not bool((padding == guard).all()):
                    self.violations.append(f"rank {self.rank}: {what} wrote padding of layer {layer_id}")
            flat = kv_oracle.bits(values).reshape(values.shape[0], -1)
            written = (flat != torch.tensor(guard, dtype=flat.dtype)).any(dim=1).nonzero().flatten().tolist()
            kept = []
            for slot in written:
                owner = slot_owner.get(slot)
                if owner is None:
                    self.violations.append(f"rank {self.rank}: {what} wrote slot {slot} (layer {layer_id}), "
                                           f"which no load may write")
                    continue
                self.load_writes.setdefault(owner[0], set()).add((layer_id, owner[1]))
                kept.append(slot)
            layer.physical.copy_(snapshot)
            if kept:
                index = torch.tensor(kept, dtype=torch.int64)
                kv_oracle.write_tokens(layer, index, self.kbs, values[index])
        return result

    # -- one step ---------------------------------------------------------------------------------
    def step(self, output: SchedulerOutput, info: dict):
        self.load_writes = {}
        self.corrupt = []
        era, conn, allowed = self.era, self.conn, info["allowed"]
        for rid in output.finished_req_ids:
            self.req_blocks.pop(rid, None)
        for rid in output.preempted_req_ids or ():
            self.req_blocks.pop(rid, None)
        computed = {}
        for new in output.scheduled_new_reqs:
            self.req_blocks[new.req_id] = list(new.block_ids[0])
            computed[new.req_id] = new.num_computed_tokens
        cached = output.scheduled_cached_reqs
        for index, rid in enumerate(cached.req_ids):
            if cached.resumed_req_ids is not None:
                resumed = rid in cached.resumed_req_ids
            else:
                resumed = bool(cached.resumed_from_preemption[index])
            blocks = list(cached.new_block_ids[index][0]) if cached.new_block_ids[index] else []
            self.req_blocks[rid] = blocks if resumed else self.req_blocks.get(rid, []) + blocks
            computed[rid] = cached.num_computed_tokens[index]
        forward = output.total_num_scheduled_tokens > 0
        attn = None
        if forward:
            slots = []
            for rid, n in output.num_scheduled_tokens.items():
                slots += slots_for(self.req_blocks[rid], self.spec.block_size, computed[rid], computed[rid] + n)
            attn = {name: _AttnMetadata(torch.tensor(slots, dtype=torch.int64)) for name in self.kv_caches}
        context = ForwardContext(no_compile_layers={n: _Layer(t) for n, t in self.kv_caches.items()},
                                 attn_metadata=attn)
        if era >= V0_14:
            argument = output.preempted_req_ids if era < (0, 18) else output.kv_connector_metadata
            self._watch("handle_preemptions", False, {}, conn.handle_preemptions, argument)
        conn.bind_connector_metadata(output.kv_connector_metadata)
        early = era < NEW or output.has_sync_kv_loads
        if early:
            self._watch("start_load_kv", True, allowed, conn.start_load_kv, context)
        if forward:
            hashes = {rid: prefix_hashes(info["tokens"][rid][:computed[rid] + n], info["seeds"][rid])
                      for rid, n in output.num_scheduled_tokens.items()}
            decode_only = not output.scheduled_new_reqs and all(
                computed[rid] >= info["prompt_len"][rid] for rid in output.num_scheduled_tokens)
            hooks = not (self.spec.cudagraph_decode and decode_only)
            done_layers = set()
            for name in self.kv_caches:
                if hooks:
                    self._watch(f"wait_for_layer_load({name})", True, allowed, conn.wait_for_layer_load, name)
                layer_id = self.layer_index[name]
                if layer_id not in done_layers:  # a layer sharing another's KV writes nothing
                    done_layers.add(layer_id)
                    self._forward_layer(layer_id, output, computed, hashes)
                if hooks:
                    self._watch(f"save_kv_layer({name})", False, {}, conn.save_kv_layer, name, self.kv_caches[name],
                                attn[name])
        if not early:
            self._watch("start_load_kv", True, allowed, conn.start_load_kv, context)
        self._watch("wait_for_save", False, {}, conn.wait_for_save)
        if era >= NEW:
            sending, recving = self._watch("get_transfer_results", True, allowed, conn.get_transfer_results,
                                           output.finished_req_ids)
            sending, recving = sending or None, recving or None
        else:
            sending, recving = self._watch("get_finished", True, allowed, conn.get_finished, output.finished_req_ids)
        invalid = set(conn.get_block_ids_with_load_errors()) if era >= (0, 11) else set()
        stats = conn.get_kv_connector_stats() if era >= (0, 11) else None
        # vLLM's model runner asks every worker for its connector's KV events after the step (≥0.14).
        kv_events = conn.get_kv_connector_kv_cache_events() if era >= (0, 14) else None
        conn.clear_connector_metadata()
        assert conn._connector_metadata is None
        kv_output = KVConnectorOutput(finished_sending=set(sending) if sending else None,
                                      finished_recving=set(recving) if recving else None,
                                      kv_connector_stats=stats, invalid_block_ids=invalid, kv_cache_events=kv_events)
        report = {"violations": self.violations, "corrupt": self.corrupt, "load_writes": self.load_writes}
        self.violations = []
        return kv_output, report

    def _forward_layer(self, layer_id: int, output, computed: dict, hashes: dict) -> None:
        layer = self.layers[layer_id]
        bs = self.spec.block_size
        for rid, n in output.num_scheduled_tokens.items():
            start = computed[rid]
            blocks = self.req_blocks[rid]
            salt = 0
            if start > 0:  # attention reads the context: it must be exactly what the model wrote
                context = torch.tensor(slots_for(blocks, bs, 0, start), dtype=torch.int64)
                got = kv_oracle.read_tokens(layer, context, self.kbs)
                want = self._expected(hashes[rid][:start], layer_id)
                same = (kv_oracle.bits(got).reshape(start, -1) == kv_oracle.bits(want).reshape(start, -1)).all(dim=1)
                if not bool(same.all()):
                    bad = int((~same).nonzero()[0])
                    self.corrupt.append({"rid": rid, "layer": layer_id, "token": bad, "block": blocks[bad // bs]})
                    salt = 1  # computed from a wrong context: garbage KV (vLLM recomputes it)
            slots = torch.tensor(slots_for(blocks, bs, start, start + n), dtype=torch.int64)
            kv_oracle.write_tokens(layer, slots, self.kbs, self._expected(hashes[rid][start:start + n], layer_id, salt))

    # -- commands used by tests ---------------------------------------------------------------------
    def state(self) -> dict:
        return self.conn.internal_state_sizes()

    def engine_stats(self) -> dict:
        return self.conn._worker.engine.stats()

    def clear_engine(self) -> None:
        self.conn._worker.engine.clear()

    def shutdown(self) -> None:
        self.conn.shutdown()
        self.conn.shutdown()  # idempotent


class WorkerProcess:
    """A MiniWorker in its own interpreter (``worker_proc.py``), spoken to over pipes."""

    def __init__(self, spec: Spec, rank: int):
        env = dict(os.environ)
        env.update(spec.env)
        repo = HERE.parent.parent.parent
        env["PYTHONPATH"] = os.pathsep.join([str(repo / "python-demo"), str(HERE.parent), str(HERE)])
        self.process = subprocess.Popen(["/usr/bin/python3", str(HERE / "worker_proc.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self.rank = rank
        self._send(("init", spec, rank))

    def _send(self, message) -> None:
        data = pickle.dumps(message)
        self.process.stdin.write(struct.pack("<Q", len(data)) + data)
        self.process.stdin.flush()

    def _receive(self):
        header = self.process.stdout.read(8)
        if len(header) < 8:
            raise RuntimeError(f"worker process {self.rank} died (exit status {self.process.wait()})")
        (length,) = struct.unpack("<Q", header)
        status, value = pickle.loads(self.process.stdout.read(length))
        if status == "error":
            raise RuntimeError(f"worker process {self.rank}: {value}")
        return value

    def call(self, command: str, *args):
        self._send((command,) + args)
        return self._receive()

    def wait_ready(self) -> None:
        self._receive()

    def step(self, output, info):
        return self.call("step", output, info)

    def state(self):
        return self.call("state")

    def engine_stats(self):
        return self.call("engine_stats")

    def clear_engine(self):
        return self.call("clear_engine")

    def shutdown(self):
        self.begin_shutdown()
        self.finish_shutdown()

    def begin_shutdown(self):
        self._send(("shutdown",))

    def finish_shutdown(self):
        try:
            self._receive()
        finally:
            self.process.stdin.close()
            self.process.wait(timeout=30)


def aggregate(outputs: list, pending: dict) -> KVConnectorOutput:
    """KVOutputAggregator: an id is finished once every worker reported it (once each)."""
    world = len(outputs)
    result = KVConnectorOutput(finished_sending=set(), finished_recving=set(), invalid_block_ids=set())
    for output in outputs:
        result.invalid_block_ids |= set(output.invalid_block_ids or ())
        for kind in ("finished_sending", "finished_recving"):
            for rid in getattr(output, kind) or ():
                counts = pending.setdefault(kind, collections.Counter())
                counts[rid] += 1
                assert counts[rid] <= world, f"{rid} reported in {kind} more than once per worker"
                if counts[rid] == world:
                    getattr(result, kind).add(rid)
                    del counts[rid]
    stats = [o.kv_connector_stats for o in outputs if o.kv_connector_stats is not None]
    if stats:
        merged = stats[0]
        for other in stats[1:]:
            merged = merged.aggregate(other)
        result.kv_connector_stats = merged
    # KV events as vLLM's KVOutputAggregator combines them: the first worker's container collects
    # every other worker's events, one increment_workers per worker added.
    combined = None
    for output in outputs:
        if combined is None:
            combined = output.kv_cache_events
        elif output.kv_cache_events:
            assert isinstance(combined, type(output.kv_cache_events))
            combined.add_events(output.kv_cache_events.get_all_events())
            combined.increment_workers(1)
    result.kv_cache_events = combined or None
    result.finished_sending = result.finished_sending or None
    result.finished_recving = result.finished_recving or None
    return result


class Cluster:
    """One vLLM instance: a scheduler-side connector and TP workers (same or separate processes)."""

    def __init__(self, spec: Spec, separate_processes: bool = False):
        self.spec = spec
        fakevllm.install(spec.era)
        if separate_processes:
            self.workers = [WorkerProcess(spec, rank) for rank in range(spec.tp)]
            for worker in self.workers:
                worker.wait_ready()
        else:  # vLLM's in-process executor creates the worker before the scheduler
            self.workers = [MiniWorker(spec, rank) for rank in range(spec.tp)]
        self.conn = fakevllm.create_connector(spec.vllm_config(0), fakevllm.role("SCHEDULER"), spec.kv_cache_config())
        self.scheduler = MiniScheduler(self.conn, spec)
        self.pending: dict = {}
        self.load_writes: dict = collections.defaultdict(set)  # rid -> {(rank, layer, token)}
        self.stats: list = []
        self.steps = 0
        self.before_workers = None  # test hook: called with (output, info) before the workers run

    def add(self, request: Req) -> Req:
        self.scheduler.add_request(request)
        return request

    def step(self):
        output, info = self.scheduler.schedule()
        if self.before_workers is not None:
            self.before_workers(output, info)
        results = [worker.step(output, info) for worker in self.workers]
        outputs = [kv_output for kv_output, _ in results]
        for rank, (_, report) in enumerate(results):
            assert not report["violations"], report["violations"]
            for rid, writes in report["load_writes"].items():
                self.load_writes[rid] |= {(rank, layer, token) for layer, token in writes}
        merged = aggregate(outputs, self.pending)
        for rank, (_, report) in enumerate(results):
            for corrupt in report["corrupt"]:
                assert corrupt["block"] in merged.invalid_block_ids, (
                    f"rank {rank}: attention read wrong KV of request {corrupt['rid']} at token {corrupt['token']} "
                    f"(layer {corrupt['layer']}) and the connector did not report block {corrupt['block']}")
        if merged.kv_connector_stats is not None:
            self.stats.append(merged.kv_connector_stats)
        self.scheduler.update_from_output(output, merged)
        self.steps += 1
        return output, merged

    def run(self, max_steps: int = 200) -> int:
        steps = 0
        while self.scheduler.has_work():
            self.step()
            steps += 1
            assert steps < max_steps, "the scheduler made no progress"
        return steps

    def loaded_tokens(self, rid: str, rank: int = 0, layer: int = 0) -> list:
        return sorted(token for r, l, token in self.load_writes.get(rid, ()) if r == rank and l == layer)

    def assert_empty(self) -> None:
        """assert_scheduler_empty, plus: the connector's own maps are empty on every side."""
        scheduler = self.scheduler
        assert not scheduler.requests and not scheduler.waiting and not scheduler.running, scheduler.requests
        assert not scheduler.recv_done and not scheduler.delayed and not scheduler.async_allowed
        assert scheduler.pool.num_free() == scheduler.pool.num_blocks - 1, "blocks leaked"
        assert all(ref == 0 for ref in scheduler.pool.ref[1:])
        assert not any(self.pending.get(kind) for kind in ("finished_sending", "finished_recving"))
        # one more (empty) step delivers the last finished_req_ids to the workers
        self.step()
        assert not any(self.conn.internal_state_sizes().values()), self.conn.internal_state_sizes()
        for worker in self.workers:
            assert not any(worker.state().values()), worker.state()

    def shutdown(self) -> None:
        errors = []
        for worker in self.workers:  # worker processes shut down in parallel
            if isinstance(worker, WorkerProcess):
                worker.begin_shutdown()
        for worker in self.workers:
            try:
                if isinstance(worker, WorkerProcess):
                    worker.finish_shutdown()
                else:
                    worker.shutdown()
            except Exception as error:  # noqa: BLE001
                errors.append(error)
        self.conn.shutdown()
        self.conn.shutdown()
        if errors:
            raise errors[0]


def run_prompt_twice_spec(**kwargs) -> Spec:
    return replace(Spec(), **kwargs)
