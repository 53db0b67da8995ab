"""Derives each vLLM KV tensor's layout from its shape, strides and the model's dimensions, and the
engine namespace that makes cached KV of another model, dtype or layer set a miss.

vLLM registers logical views of flat buffers whose strides encode NHD or HND; which backend
produced a tensor is never assumed. Shapes:

  3-D  [B, N, C]              MLA
  4-D  [B, 1, N, C]           MLA, the 2026 standard layout (when the model uses MLA)
  4-D  [B, H, N, 2D]          packed K|V (2026 FlashAttention/FlashInfer/Triton, newest CPU)
  5-D  [2, B, N, H, D]        FlashAttention (NHD or HND strides)
  5-D  [2, B, H, N, D]        vLLM's CPU (torch SDPA) backend
  5-D  [B, 2, N, H, D]        blocks-first (FlashInfer, Triton, 2026 FlashAttention)

The two leading-2 5-D shapes differ only in which of dims 2 and 3 is the head count, so the model's
KV heads per rank decide; when they are equal (heads == tokens per block) the device decides (the
CPU backend registers [2, B, H, N, D]). Tokens per block come from the tensor, so kernel blocks
smaller than vLLM's block work: vLLM's flat slot ids address them unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


@dataclass
class KvLayer:
    name: str  # vLLM's layer name (the first, when several layers share one tensor)
    tensor: Any  # the view described (kept referenced while registered)
    layout: str  # torch_layout name
    desc: Any  # LmcKvLayerDesc


def _call(obj, method: str, *args):
    function = getattr(obj, method, None)
    if not callable(function):
        return None
    try:
        return function(*args)
    except Exception:
        return None


def kv_heads_per_rank(vllm_config) -> int | None:
    model_config = getattr(vllm_config, "model_config", None)
    parallel_config = getattr(vllm_config, "parallel_config", None)
    heads = _call(model_config, "get_num_kv_heads", parallel_config)
    return int(heads) if heads else None


def choose_layout(shape, device_type: str, heads: int | None, num_blocks: int | None, use_mla: bool) -> str:
    rank = len(shape)
    if rank == 3:
        return "mla"
    if rank == 4:
        if use_mla and shape[1] == 1:
            return "mla4"
        if shape[3] % 2:
            raise ValueError(f"4-D KV tensor {tuple(shape)}: not packed [B, H, N, 2D] (odd last dimension)")
        return "packed"
    if rank != 5:
        raise ValueError(f"KV tensor of shape {tuple(shape)}: unknown layout (expected 3, 4 or 5 dimensions)")
    first_is_kv, second_is_kv = shape[0] == 2, shape[1] == 2
    if first_is_kv and second_is_kv:  # two blocks in all: ambiguous; FlashAttention is vLLM's default
        second_is_kv = False
    if second_is_kv and not first_is_kv:
        return "blocks_first"
    if not first_is_kv:
        raise ValueError(f"5-D KV tensor {tuple(shape)}: neither dim 0 nor dim 1 is the K/V pair (2)")
    a, b = shape[2], shape[3]
    if heads is not None and a != b:
        if b == heads:
            return "flash_attn"
        if a == heads:
            return "cpu_sdpa"
    return "cpu_sdpa" if device_type == "cpu" and heads is not None and a == heads else "flash_attn"


def describe_kv_caches(kv_caches: dict, vllm_config, kv_cache_config=None, use_mla: bool = False) -> list[KvLayer]:
    """One KvLayer per distinct tensor (layers sharing a tensor -- vLLM's KV sharing -- are stored
    once), in registration order."""
    from .torch_layout import layer_desc_from_tensor

    if not kv_caches:
        raise ValueError("register_kv_caches got no KV tensors")
    heads = kv_heads_per_rank(vllm_config)
    num_blocks = getattr(kv_cache_config, "num_blocks", None)
    layers, seen = [], set()
    for name, tensor in kv_caches.items():
        if isinstance(tensor, (list, tuple)):  # very old builds: one tensor per virtual engine
            tensor = tensor[0]
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype))
        if identity in seen:
            continue
        seen.add(identity)
        layout = choose_layout(tuple(tensor.shape), tensor.device.type, heads, num_blocks, use_mla)
        view = tensor
        if layout == "mla4":
            view, layout = tensor.select(1, 0), "mla"
        try:
            desc = layer_desc_from_tensor(view, layout)
        except ValueError as error:
            raise ValueError(f"KV layer {name}: {error}") from None
        layers.append(KvLayer(name, view, layout, desc))
    return layers


def namespace_string(model: str, layers: list[KvLayer], vllm_config) -> str:
    """The engine's model name: the model plus what makes stored KV inapplicable when it changes and
    the engine's own namespace (element size, heads, head size, layer count, TP) would not see it:
    the dtype (fp16 vs bf16 have one size), vLLM's KV-cache dtype (fp8 scales) and the layer names."""
    cache_config = getattr(vllm_config, "cache_config", None)
    cache_dtype = str(getattr(cache_config, "cache_dtype", "auto") or "auto")
    dtype = str(layers[0].tensor.dtype).replace("torch.", "")
    names = hashlib.sha256("\n".join(layer.name for layer in layers).encode("utf-8")).hexdigest()[:16]
    return f"{model}|dtype={dtype}|kv_cache_dtype={cache_dtype}|layers={names}"
