#!/usr/bin/python3
"""End-to-end demo of lmcache_native on CPU: prefix reuse in a tiny transformer with a paged KV cache.

What it shows:
  1. Request 1 (a ~1000-token prompt) is prefilled by a small deterministic Llama-style model whose
     attention reads and writes a vLLM-style paged KV cache (FlashAttention NHD [2, B, 16, H, D] per
     layer by default; --layout picks another vLLM layout). Blocks come from a shuffled free list.
     Its KV is then stored in LMCacheNative through Engine.store.
  2. Request 2 shares the first 768 tokens and then differs. The demo looks it up, retrieves the
     cached prefix into freshly allocated blocks, and computes only the remaining tokens.
  3. Request 2 is recomputed from scratch without the cache, and the logits of every computed token
     and the KV of every token must be bit-identical (torch.equal) to the cached path.
  4. A long request (--long-prompt-tokens, default 4096; 0 skips it) is prefilled and stored, then
     served again as a full-prompt hit the way vLLM does it: the last prompt token is recomputed (its
     logits are needed), so LMCache loads hit - 1 tokens into fresh blocks and the model computes
     only the last tile. It is then recomputed without the cache; logits and KV must again be
     bit-identical, and the demo prints both times to first token and the speed-up.

Why equality can be exact: every tensor op runs on tiles of TILE tokens aligned to absolute token
positions, so the cached path and the full recompute run the very same op shapes on the very same
inputs for every tile they share; the only coupling between tiles is the KV read from the paged cache,
which LMCache restores bit for bit. (Row results of a GEMM may depend on how many rows it has;
identical tiles sidestep that.)

Exit status: 0 when every comparison holds, 1 when one does not.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lmcache_native import Engine  # noqa: E402

BYTES_PER_GB = 1 << 30  # LMCache reports sizes in GB of 2^30 bytes
TILE = 16  # tokens per compute tile == tokens per KV block

# Demo layouts: name -> (lmcache_native layout name, physical shape, permutation to the logical shape)
# for one layer with B blocks, N tokens per block, H KV heads, D head size.
LAYOUTS = {
    "flash_attn": ("flash_attn", lambda B, N, H, D: (2, B, N, H, D), None),
    "flash_attn_hnd": ("flash_attn", lambda B, N, H, D: (2, B, H, N, D), (0, 1, 3, 2, 4)),
    "blocks_first": ("blocks_first", lambda B, N, H, D: (B, 2, N, H, D), None),
    "blocks_first_hnd": ("blocks_first", lambda B, N, H, D: (B, 2, H, N, D), (0, 1, 3, 2, 4)),
    "packed": ("packed", lambda B, N, H, D: (B, H, N, 2 * D), None),
    "cpu_sdpa": ("cpu_sdpa", lambda B, N, H, D: (2, B, H, N, D), None),
}


# ------------------------------------------------------------------------------------------------
# Paged KV cache
# ------------------------------------------------------------------------------------------------
class PagedKVCache:
    """One KV tensor per layer in a vLLM layout, plus [B, N, H, D] views of K and V for the model.

    Unused memory is filled with NaN so that any slot the model reads without it having been
    written (by the model or by a retrieve) poisons the logits and fails the comparison.
    """

    def __init__(self, layout: str, num_layers: int, num_blocks: int, block_size: int,
                 num_kv_heads: int, head_size: int, dtype: torch.dtype):
        self.lmc_layout, physical_shape, permutation = LAYOUTS[layout]
        self.block_size = block_size
        self.layer_tensors, self.key_views, self.value_views = [], [], []
        for _ in range(num_layers):
            physical = torch.full(physical_shape(num_blocks, block_size, num_kv_heads, head_size),
                                  float("nan"), dtype=dtype)
            logical = physical.permute(*permutation) if permutation else physical
            keys, values = self._kv_views(logical, head_size)
            self.layer_tensors.append(logical)
            self.key_views.append(keys)
            self.value_views.append(values)

    def _kv_views(self, logical: torch.Tensor, head_size: int):
        """[B, N, H, D] views of K and V into the registered tensor (no copies)."""
        if self.lmc_layout == "flash_attn":  # [2, B, N, H, D]
            return logical[0], logical[1]
        if self.lmc_layout == "blocks_first":  # [B, 2, N, H, D]
            return logical[:, 0], logical[:, 1]
        if self.lmc_layout == "packed":  # [B, H, N, 2D]
            return (logical[..., :head_size].permute(0, 2, 1, 3),
                    logical[..., head_size:].permute(0, 2, 1, 3))
        if self.lmc_layout == "cpu_sdpa":  # [2, B, H, N, D]
            return logical[0].permute(0, 2, 1, 3), logical[1].permute(0, 2, 1, 3)
        raise ValueError(self.lmc_layout)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """keys/values: [T, H, D] for T tokens at int64 ``slots``."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.key_views[layer][blocks, offsets] = keys
        self.value_views[layer][blocks, offsets] = values

    def gather(self, layer: int, slots: torch.Tensor):
        """([T, H, D] keys, [T, H, D] values) at ``slots`` (fresh contiguous tensors)."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        return self.key_views[layer][blocks, offsets], self.value_views[layer][blocks, offsets]

    def poison(self, block_ids: list[int]):
        """Fills freed blocks with NaN, as if another request had reused them."""
        index = torch.tensor(block_ids, dtype=torch.int64)
        for keys, values in zip(self.key_views, self.value_views):
            keys[index] = float("nan")
            values[index] = float("nan")


class BlockAllocator:
    """vLLM-like free list of block ids, in a shuffled (seeded) order so requests get scattered
    blocks. Freed blocks go to the back of the list."""

    def __init__(self, num_blocks: int, seed: int):
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.free_blocks = order.tolist()

    def allocate(self, num_tokens: int, block_size: int) -> list[int]:
        needed = -(-num_tokens // block_size)
        if needed > len(self.free_blocks):
            raise RuntimeError("out of KV blocks")
        blocks, self.free_blocks = self.free_blocks[:needed], self.free_blocks[needed:]
        return blocks

    def free(self, blocks: list[int]):
        self.free_blocks.extend(blocks)


def slot_mapping(block_ids: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """vLLM's slot formula: token t lives at block_ids[t // block_size] * block_size + t % block_size."""
    positions = torch.arange(num_tokens, dtype=torch.int64)
    blocks = torch.tensor(block_ids, dtype=torch.int64)[positions // block_size]
    return blocks * block_size + positions % block_size


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # GQA: two query heads per KV head
    head_size: int = 64
    intermediate_size: int = 1024
    max_positions: int = 4096
    rope_theta: float = 10000.0


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_linear")


def matmul_nt(x: torch.Tensor, weight_nt) -> torch.Tensor:
    """x [M, K] times weight^T where ``weight_nt`` is [N, K] (as prepared by ``prepare_weight``).

    Uses oneDNN when torch has it: Debian's torch links the reference BLAS (~1 GFLOP/s), oneDNN is
    ~20x faster. Either way a given shape always runs the same kernel, which the exactness argument
    in the module docstring relies on."""
    if _USE_ONEDNN:
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), weight_nt).to_dense()
    return x @ weight_nt.t()


def prepare_weight(weight_nt: torch.Tensor):
    """A constant [N, K] weight in the form ``matmul_nt`` wants (converted to oneDNN once)."""
    return weight_nt.contiguous().to_mkldnn() if _USE_ONEDNN else weight_nt.contiguous()


_USE_ONEDNN = _onednn_available()


class TinyLlama:
    """Llama-style decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) with fixed random weights.
    Weights are stored [out_features, in_features], like torch.nn.Linear."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)

        def weight(fan_out: int, fan_in: int) -> torch.Tensor:
            return torch.randn(fan_out, fan_in, generator=generator) / math.sqrt(fan_in)

        q_size, kv_size = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
        self.embedding = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=generator)
        self.layers = [
            dict(
                attn_norm=1.0 + 0.1 * torch.randn(cfg.hidden_size, generator=generator),
                # Q, K and V projections fused into one [q + 2 kv, hidden] weight.
                w_qkv=prepare_weight(weight(q_size + 2 * kv_size, cfg.hidden_size)),
                w_o=prepare_weight(weight(cfg.hidden_size, q_size)),
                mlp_norm=1.0 + 0.1 * torch.randn(cfg.hidden_size, generator=generator),
                # Gate and up projections fused into one [2 * intermediate, hidden] weight.
                w_gate_up=prepare_weight(weight(2 * cfg.intermediate_size, cfg.hidden_size)),
                w_down=prepare_weight(weight(cfg.hidden_size, cfg.intermediate_size)),
            )
            for _ in range(cfg.num_layers)
        ]
        self.final_norm = torch.ones(cfg.hidden_size)
        self.lm_head = prepare_weight(weight(cfg.vocab_size, cfg.hidden_size))
        # RoPE tables [max_positions, D/2], computed once and indexed by position.
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_size, 2).float() / cfg.head_size)
        angles = torch.arange(cfg.max_positions).float()[:, None] * inv_freq[None, :]
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    @staticmethod
    def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] (neox style: the two halves of D form the rotated pairs)."""
        cos, sin = self.rope_cos[positions][:, None, :], self.rope_sin[positions][:, None, :]
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
        """Causal GQA attention of one tile. q: [T, Hq, D] at ``positions``; keys/values:
        [end, Hkv, D] for tokens [0, end). Returns [T, Hq * D]."""
        cfg = self.cfg
        group = cfg.num_heads // cfg.num_kv_heads
        num_queries, end = q.shape[0], keys.shape[0]
        future = torch.arange(end)[None, :] > positions[:, None]  # [T, end]
        outputs = []
        for kv_head in range(cfg.num_kv_heads):
            # The query heads sharing this KV head, stacked: [group * T, D].
            queries = q[:, kv_head * group:(kv_head + 1) * group].transpose(0, 1).reshape(-1, cfg.head_size)
            scores = matmul_nt(queries, keys[:, kv_head]) / math.sqrt(cfg.head_size)  # [group*T, end]
            scores = scores.view(group, num_queries, end).masked_fill(future, float("-inf"))
            probs = torch.softmax(scores, dim=-1).view(group * num_queries, end)
            attended = matmul_nt(probs, values[:, kv_head].t())  # [group*T, D]
            outputs.append(attended.view(group, num_queries, cfg.head_size))
        return torch.cat(outputs).transpose(0, 1).reshape(num_queries, -1)  # [T, Hq * D]

    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor, cache: PagedKVCache,
                first_token: int = 0) -> torch.Tensor:
        """Computes tokens [first_token, T) of a prompt whose KV for [0, first_token) is already in
        ``cache`` at ``slots``; writes their KV into ``cache`` and returns their logits [T', vocab].
        ``first_token`` must be a multiple of TILE so tiles line up with absolute positions."""
        cfg = self.cfg
        assert first_token % TILE == 0
        num_tokens = tokens.shape[0]
        q_size, kv_size = cfg.num_heads * cfg.head_size, cfg.num_kv_heads * cfg.head_size
        tile_starts = range(first_token, num_tokens, TILE)
        hidden = {start: self.embedding[tokens[start:start + TILE].long()] for start in tile_starts}
        for layer_index, layer in enumerate(self.layers):
            for start in tile_starts:
                end = min(start + TILE, num_tokens)
                h = hidden[start]  # [T, hidden], the residual stream of this tile
                positions = torch.arange(start, end)
                qkv = matmul_nt(self._rms_norm(h, layer["attn_norm"]), layer["w_qkv"])
                q = self._rope(qkv[:, :q_size].reshape(-1, cfg.num_heads, cfg.head_size), positions)
                k = self._rope(qkv[:, q_size:q_size + kv_size].reshape(-1, cfg.num_kv_heads, cfg.head_size),
                               positions)
                v = qkv[:, q_size + kv_size:].reshape(-1, cfg.num_kv_heads, cfg.head_size)
                cache.write(layer_index, slots[start:end], k, v)
                # Attention over every earlier token, read back from the paged cache.
                keys, values = cache.gather(layer_index, slots[:end])  # [end, Hkv, D] each
                h = h + matmul_nt(self._attention(q, keys, values, positions), layer["w_o"])
                gate, up = matmul_nt(self._rms_norm(h, layer["mlp_norm"]), layer["w_gate_up"]).chunk(2, dim=-1)
                h = h + matmul_nt(torch.nn.functional.silu(gate) * up, layer["w_down"])
                hidden[start] = h
        return torch.cat([matmul_nt(self._rms_norm(hidden[s], self.final_norm), self.lm_head)
                          for s in tile_starts])


# ------------------------------------------------------------------------------------------------
# LMCache-style reporting
# ------------------------------------------------------------------------------------------------
def _gb(num_bytes: int) -> float:
    return num_bytes / BYTES_PER_GB


def _throughput(num_bytes: int, seconds: float) -> float:
    return _gb(num_bytes) / seconds if seconds > 0 else float("inf")


def store_with_log(engine: Engine, request_id: str, tokens, slots, skip_leading_tokens: int = 0) -> int:
    """Engine.store plus LMCache's store log line. The size is the bytes this call actually copied
    (from the engine's stored_bytes counter), so chunks that were already cached count as 0."""
    bytes_before = engine.stats()["stored_bytes"]
    started = time.perf_counter()
    stored = engine.store(tokens, slots, skip_leading_tokens=skip_leading_tokens)
    elapsed = time.perf_counter() - started
    moved = engine.stats()["stored_bytes"] - bytes_before
    print(f"[req_id={request_id}] Stored {stored} out of total {len(tokens)} tokens. "
          f"size: {_gb(moved):.4f} GB, cost {elapsed * 1e3:.4f} ms, "
          f"throughput: {_throughput(moved, elapsed):.4f} GB/s")
    return stored


def retrieve_with_log(engine: Engine, request_id: str, tokens, slots, required_tokens: int) -> int:
    """Engine.retrieve plus LMCache's retrieve log line (size = bytes written into the KV layers).
    Slots of -1 are not written; the line counts the tokens actually written."""
    bytes_before = engine.stats()["retrieved_bytes"]
    started = time.perf_counter()
    retrieved = engine.retrieve(tokens, slots)
    elapsed = time.perf_counter() - started
    moved = engine.stats()["retrieved_bytes"] - bytes_before
    written = int((slots[:retrieved] >= 0).sum())
    print(f"[req_id={request_id}] Retrieved {written} out of {required_tokens} required tokens "
          f"(from {len(tokens)} total tokens). size: {_gb(moved):.4f} GB, cost {elapsed * 1e3:.4f} ms, "
          f"throughput: {_throughput(moved, elapsed):.4f} GB/s")
    return retrieved


# ------------------------------------------------------------------------------------------------
# Long request: a full-prompt hit
# ------------------------------------------------------------------------------------------------
@dataclass
class LongRequestResult:
    ttft_cached: float
    ttft_full: float
    computed_tokens: int
    first_output_token: int
    reference_output_token: int
    logits_equal: bool
    kv_equal: bool
    max_logit_difference: float

    @property
    def ok(self) -> bool:
        return (self.logits_equal and self.kv_equal
                and self.first_output_token == self.reference_output_token)


def serve_long_request(engine: Engine, model: TinyLlama, cache: PagedKVCache, allocator: BlockAllocator,
                       prompt: torch.Tensor) -> LongRequestResult:
    """Prefills and stores ``prompt``, serves it again as a full-prompt hit, then recomputes it
    without the cache, and compares. Every phase frees (and poisons) its blocks, so the paged cache
    only needs room for the prompt once."""
    block_size, num_tokens = cache.block_size, len(prompt)

    # Cold prefill and store.
    blocks = allocator.allocate(num_tokens, block_size)
    slots = slot_mapping(blocks, num_tokens, block_size)
    model.prefill(prompt, slots, cache)
    store_with_log(engine, "req-long", prompt, slots)
    allocator.free(blocks)
    cache.poison(blocks)

    # Full-prompt hit, as vLLM with LMCache serves it: vLLM must compute the last prompt token to get
    # its logits, so the connector asks for hit - computed - 1 tokens and loads only those into the
    # fresh blocks; the last token's slot is left to the model (-1: the engine does not write it).
    num_computed_tokens = 0  # no local (vLLM) prefix cache
    started = time.perf_counter()
    hit_tokens = engine.lookup(prompt)
    full_hit = hit_tokens == num_tokens
    need_to_load = max(hit_tokens - num_computed_tokens - (1 if full_hit else 0), 0)
    print(f"Reqid: req-long, Total tokens {num_tokens}, Inference Engine computed tokens: "
          f"{num_computed_tokens}, LMCache hit tokens: {hit_tokens}, need to load: {need_to_load}")
    blocks_cached = allocator.allocate(num_tokens, block_size)
    slots_cached = slot_mapping(blocks_cached, num_tokens, block_size)
    load_slots = slots_cached.clone()
    load_slots[num_computed_tokens + need_to_load:] = -1
    retrieved = retrieve_with_log(engine, "req-long", prompt, load_slots, required_tokens=need_to_load)
    loaded = min(retrieved, num_computed_tokens + need_to_load)
    # The model computes from the tile holding the first token not loaded (at least the last token).
    first_computed = min(loaded, num_tokens - 1) // TILE * TILE
    logits_cached = model.prefill(prompt, slots_cached, cache, first_token=first_computed)
    first_output_token = int(logits_cached[-1].argmax())
    ttft_cached = time.perf_counter() - started
    # Keep the cached path's KV for the comparison, then release its blocks like a finished request.
    kv_cached = [cache.gather(layer, slots_cached) for layer in range(len(cache.layer_tensors))]
    allocator.free(blocks_cached)
    cache.poison(blocks_cached)

    # The same prompt without LMCache: the reference.
    blocks_full = allocator.allocate(num_tokens, block_size)
    slots_full = slot_mapping(blocks_full, num_tokens, block_size)
    started = time.perf_counter()
    logits_full = model.prefill(prompt, slots_full, cache)
    reference_output_token = int(logits_full[-1].argmax())
    ttft_full = time.perf_counter() - started

    logits_equal = torch.equal(logits_cached, logits_full[first_computed:])
    kv_equal = all(
        torch.equal(cached, full)
        for layer, cached_kv in enumerate(kv_cached)
        for cached, full in zip(cached_kv, cache.gather(layer, slots_full))
    )
    max_logit_difference = (logits_cached - logits_full[first_computed:]).abs().max().item()
    allocator.free(blocks_full)
    cache.poison(blocks_full)
    return LongRequestResult(ttft_cached, ttft_full, num_tokens - first_computed, first_output_token,
                             reference_output_token, logits_equal, kv_equal, max_logit_difference)


# ------------------------------------------------------------------------------------------------
# Demo
# ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="flash_attn",
                        help="vLLM KV layout of the paged cache (default: FlashAttention NHD)")
    parser.add_argument("--prompt-1-tokens", type=int, default=1000, help="length of request 1's prompt")
    parser.add_argument("--prompt-2-tokens", type=int, default=1040, help="length of request 2's prompt")
    parser.add_argument("--shared-tokens", type=int, default=768, help="prefix shared by the prompts")
    parser.add_argument("--long-prompt-tokens", type=int, default=4096,
                        help="length of the long request served as a full-prompt hit (0 skips it)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.shared_tokens <= min(args.prompt_1_tokens, args.prompt_2_tokens):
        parser.error("--shared-tokens must be in (0, shorter prompt length]")
    if args.long_prompt_tokens < 0:
        parser.error("--long-prompt-tokens must be >= 0")

    # The RoPE table and the paged cache grow only when the long request needs more than the defaults.
    cfg = ModelConfig(max_positions=max(ModelConfig.max_positions, args.long_prompt_tokens))
    model = TinyLlama(cfg, seed=args.seed)
    block_size = TILE
    num_blocks = max(256, -(-args.long_prompt_tokens // block_size))
    cache = PagedKVCache(args.layout, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                         cfg.head_size, torch.float32)
    allocator = BlockAllocator(num_blocks, seed=args.seed + 1)

    token_rng = torch.Generator().manual_seed(args.seed + 2)
    prompt_1 = torch.randint(0, cfg.vocab_size, (args.prompt_1_tokens,), generator=token_rng, dtype=torch.int32)
    # Request 2: the shared prefix of request 1, then other tokens; the first one after the prefix
    # differs from request 1's token at that position for sure (+1 mod vocab).
    suffix = torch.randint(0, cfg.vocab_size, (args.prompt_2_tokens - args.shared_tokens,),
                           generator=token_rng, dtype=torch.int32)
    if args.shared_tokens < args.prompt_1_tokens and len(suffix):
        suffix[0] = (prompt_1[args.shared_tokens] + 1) % cfg.vocab_size
    prompt_2 = torch.cat((prompt_1[:args.shared_tokens], suffix))
    # The long request: its own tokens (a generator of its own leaves requests 1 and 2 as they were).
    long_rng = torch.Generator().manual_seed(args.seed + 3)
    prompt_long = torch.randint(0, cfg.vocab_size, (args.long_prompt_tokens,), generator=long_rng,
                                dtype=torch.int32)

    config = {"chunk_size": args.chunk_size, "max_local_cpu_size": 1.0}
    print(f"layout: {args.layout}  model: {cfg.num_layers} layers, {cfg.num_heads} heads / "
          f"{cfg.num_kv_heads} KV heads x {cfg.head_size}, float32  cache: {num_blocks} blocks x {block_size}")
    with Engine(config, model_name="tiny-llama-demo") as engine:
        engine.register_layers(cache.layer_tensors, layout=cache.lmc_layout)
        resolved = engine.config()
        print("engine config: " + ", ".join(f"{key}={resolved[key]}" for key in
                                            ("chunk_size", "max_local_cpu_size", "save_unfull_chunk",
                                             "pre_caching_hash_algorithm")))

        # Request 1: cold prefill, then store its KV.
        blocks_1 = allocator.allocate(len(prompt_1), block_size)
        slots_1 = slot_mapping(blocks_1, len(prompt_1), block_size)
        started = time.perf_counter()
        logits_1 = model.prefill(prompt_1, slots_1, cache)
        ttft_request_1 = time.perf_counter() - started
        store_with_log(engine, "req-1", prompt_1, slots_1)
        allocator.free(blocks_1)
        cache.poison(blocks_1)

        # Request 2 with LMCache: lookup, retrieve the prefix, compute the rest.
        num_computed_tokens = 0  # this demo has no local (vLLM) prefix cache
        started = time.perf_counter()
        hit_tokens = engine.lookup(prompt_2)
        need_to_load = max(hit_tokens - num_computed_tokens - (1 if hit_tokens == len(prompt_2) else 0), 0)
        print(f"Reqid: req-2, Total tokens {len(prompt_2)}, Inference Engine computed tokens: "
              f"{num_computed_tokens}, LMCache hit tokens: {hit_tokens}, need to load: {need_to_load}")
        blocks_2 = allocator.allocate(len(prompt_2), block_size)
        slots_2 = slot_mapping(blocks_2, len(prompt_2), block_size)
        retrieved = retrieve_with_log(engine, "req-2", prompt_2, slots_2, required_tokens=hit_tokens)
        # Recompute at least the last prompt token (its logits are needed), from a tile boundary.
        first_computed = min(retrieved, len(prompt_2) - 1) // TILE * TILE
        logits_cached = model.prefill(prompt_2, slots_2, cache, first_token=first_computed)
        first_output_token = int(logits_cached[-1].argmax())
        ttft_cached = time.perf_counter() - started
        store_with_log(engine, "req-2", prompt_2, slots_2, skip_leading_tokens=retrieved)

        # Request 2 again, without LMCache: the reference.
        blocks_3 = allocator.allocate(len(prompt_2), block_size)
        slots_3 = slot_mapping(blocks_3, len(prompt_2), block_size)
        started = time.perf_counter()
        logits_full = model.prefill(prompt_2, slots_3, cache)
        reference_output_token = int(logits_full[-1].argmax())
        ttft_full = time.perf_counter() - started

        stats = engine.stats()

        # Comparisons: logits of every token the cached path computed, and every token's KV.
        logits_equal = torch.equal(logits_cached, logits_full[first_computed:])
        kv_equal = all(
            torch.equal(cached, full)
            for layer in range(cfg.num_layers)
            for cached, full in zip(cache.gather(layer, slots_2), cache.gather(layer, slots_3))
        )
        # Request 1 and request 2 share the prefix, so the tiles wholly inside it give equal logits too.
        shared_tiles_end = args.shared_tokens // TILE * TILE
        prefix_logits_equal = torch.equal(logits_1[:shared_tiles_end], logits_full[:shared_tiles_end])
        max_logit_difference = (logits_cached - logits_full[first_computed:]).abs().max().item()
        allocator.free(blocks_2 + blocks_3)
        cache.poison(blocks_2 + blocks_3)

        long_result = None
        if args.long_prompt_tokens:
            long_result = serve_long_request(engine, model, cache, allocator, prompt_long)

    print(f"time to first token, request 1 (cold):          {ttft_request_1 * 1e3:8.1f} ms")
    print(f"time to first token, request 2 with LMCache:    {ttft_cached * 1e3:8.1f} ms "
          f"(computed {len(prompt_2) - first_computed} of {len(prompt_2)} tokens)")
    print(f"time to first token, request 2 without cache:  {ttft_full * 1e3:8.1f} ms")
    if long_result:
        print(f"time to first token, long request with LMCache: {long_result.ttft_cached * 1e3:8.1f} ms "
              f"(computed {long_result.computed_tokens} of {len(prompt_long)} tokens)")
        print(f"time to first token, long request without cache: {long_result.ttft_full * 1e3:8.1f} ms")
        print(f"speed-up, long request (without / with cache): "
              f"{long_result.ttft_full / long_result.ttft_cached:.1f}x")
    print(f"first output token: {first_output_token} (with cache) vs {reference_output_token} (recompute)")
    if long_result:
        print(f"first output token, long request: {long_result.first_output_token} (with cache) vs "
              f"{long_result.reference_output_token} (recompute)")
    print(f"engine stats: stored_tokens={stats['stored_tokens']} retrieved_tokens={stats['retrieved_tokens']} "
          f"cached_chunks={stats['cached_chunks']} pool_used_bytes={stats['pool_used_bytes']}")
    print(f"logits identical: {logits_equal} (max |diff| {max_logit_difference:.3g}), "
          f"KV identical: {kv_equal}, shared-prefix logits of request 1 identical: {prefix_logits_equal}")
    ok = logits_equal and kv_equal and prefix_logits_equal and first_output_token == reference_output_token
    if long_result:
        print(f"long request: logits identical: {long_result.logits_equal} "
              f"(max |diff| {long_result.max_logit_difference:.3g}), KV identical: {long_result.kv_equal}")
        ok = ok and long_result.ok
    print("RESULT: PASS" if ok else "RESULT: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
