"""Turns vLLM paged KV-cache tensors into ``lmc_kv_layer_desc`` structs.

Supported layouts (logical shape = the tensor's ``.shape``; B blocks, N tokens per block, H KV heads,
D head size, C MLA latent size):

  ``flash_attn``    [2, B, N, H, D]  FlashAttention; NHD or HND (physical [2, B, H, N, D]) have the
                                     same logical shape, only the strides differ
  ``blocks_first``  [B, 2, N, H, D]  FlashInfer, Triton attention (NHD or HND likewise)
  ``packed``        [B, H, N, 2D]    K = [..., :D], V = [..., D:]
  ``mla``           [B, N, C]        one latent vector per token, no separate V
  ``cpu_sdpa``      [2, B, H, N, D]  vLLM's CPU (torch SDPA) backend

Everything is read from the tensor itself (``data_ptr()``, ``stride()``, element size and storage
size), never from assumed contiguity: vLLM registers permuted views of one flat buffer. Strides stay
in ELEMENTS, as the header wants.

Layout inference (``layout=None``) only accepts unambiguous shapes: 3-D is ``mla``, 4-D is ``packed``,
5-D with exactly one of the first two dims equal to 2 is ``flash_attn`` or ``blocks_first``.
``cpu_sdpa`` has the same rank and leading 2 as ``flash_attn``, so it must always be named.
"""

from __future__ import annotations

from typing import Iterable

from ._bindings import LMC_DEVICE_CUDA, LMC_DEVICE_HOST, LmcKvLayerDesc

LAYOUTS = ("flash_attn", "blocks_first", "packed", "mla", "cpu_sdpa")
SUPPORTED_ELEMENT_SIZES = (1, 2, 4)  # fp8/int8 (torch.uint8), fp16/bf16, fp32


def infer_layout(shape) -> str:
    """The layout name for a logical shape, or ValueError when the shape alone cannot tell."""
    rank = len(shape)
    if rank == 3:
        return "mla"
    if rank == 4:
        return "packed"
    if rank == 5:
        kv_first, kv_second = shape[0] == 2, shape[1] == 2
        if kv_first and not kv_second:
            return "flash_attn"
        if kv_second and not kv_first:
            return "blocks_first"
    raise ValueError(
        f"cannot infer the KV layout of shape {tuple(shape)}; pass layout= one of {LAYOUTS}"
    )


def _storage_nbytes(tensor) -> int:
    # torch >= 2.0 has untyped_storage(); 1.13's TypedStorage.nbytes() reports the underlying bytes
    # too (also for a view of an int8 buffer as another dtype, which is what vLLM registers).
    if hasattr(tensor, "untyped_storage"):
        return tensor.untyped_storage().nbytes()
    return tensor.storage().nbytes()


def layer_desc_from_tensor(tensor, layout: str | None = None) -> LmcKvLayerDesc:
    """The ``lmc_kv_layer_desc`` of one layer's KV tensor in ``layout`` (inferred when None).

    The tensor's memory is borrowed: it must stay alive while an engine has it registered.
    """
    layout = layout or infer_layout(tensor.shape)
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    expected_rank = {"flash_attn": 5, "blocks_first": 5, "packed": 4, "mla": 3, "cpu_sdpa": 5}
    if layout not in expected_rank:
        raise ValueError(f"unknown KV layout {layout!r}; expected one of {LAYOUTS}")
    if len(shape) != expected_rank[layout]:
        raise ValueError(f"layout {layout!r} needs a {expected_rank[layout]}-D tensor, got shape {shape}")

    if layout == "flash_attn":  # [2, B, N, H, D]
        kv_count, (num_blocks, block_size, heads, head_size) = shape[0], shape[1:]
        kv_stride, block_stride, token_stride, head_stride, d_stride = strides
    elif layout == "blocks_first":  # [B, 2, N, H, D]
        num_blocks, kv_count, block_size, heads, head_size = shape
        block_stride, kv_stride, token_stride, head_stride, d_stride = strides
    elif layout == "cpu_sdpa":  # [2, B, H, N, D]
        kv_count, num_blocks, heads, block_size, head_size = shape
        kv_stride, block_stride, head_stride, token_stride, d_stride = strides
    elif layout == "packed":  # [B, H, N, 2D]; V starts D elements after K
        num_blocks, heads, block_size, packed_size = shape
        block_stride, head_stride, token_stride, d_stride = strides
        if packed_size % 2:
            raise ValueError(f"packed layout needs an even last dimension (2*D), got {packed_size}")
        kv_count, head_size = 2, packed_size // 2
        kv_stride = head_size * d_stride
    else:  # mla [B, N, C]: one "head" of C elements, no V
        num_blocks, block_size, head_size = shape
        block_stride, token_stride, d_stride = strides
        kv_count, heads = 1, 1
        kv_stride, head_stride = 0, head_size  # never multiplied by a non-zero index

    if kv_count not in (1, 2) or (layout != "mla" and kv_count != 2):
        raise ValueError(f"layout {layout!r}: the K/V dimension must be 2, got shape {shape}")
    if head_size > 1 and d_stride != 1:
        raise ValueError(f"the head dimension must be contiguous (stride 1), got strides {strides}")
    elem_size = tensor.element_size()
    if elem_size not in SUPPORTED_ELEMENT_SIZES:
        raise ValueError(f"element size {elem_size} ({tensor.dtype}) is not one of {SUPPORTED_ELEMENT_SIZES}")

    if tensor.device.type == "cuda":
        device_kind, device_index = LMC_DEVICE_CUDA, tensor.device.index or 0
    elif tensor.device.type == "cpu":
        device_kind, device_index = LMC_DEVICE_HOST, 0
    else:
        raise ValueError(f"unsupported device {tensor.device}")

    span_bytes = _storage_nbytes(tensor) - tensor.storage_offset() * elem_size
    return LmcKvLayerDesc(
        device_kind=device_kind,
        device_index=device_index,
        elem_size=elem_size,
        kv_count=kv_count,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=heads,
        head_size=head_size,
        reserved=0,
        base_address=tensor.data_ptr(),
        span_bytes=span_bytes,
        kv_stride=kv_stride,
        block_stride=block_stride,
        token_stride=token_stride,
        head_stride=head_stride,
    )


def layer_descs_from_kv_caches(kv_caches, layout: str | None = None) -> list[LmcKvLayerDesc]:
    """Descriptions for several layers, in order: a dict of layer name -> tensor (vLLM's
    ``register_kv_caches`` argument, insertion order = layer order) or a list of tensors. Layers that
    share one tensor (vLLM KV sharing) get identical descriptions, which the engine accepts."""
    tensors: Iterable = kv_caches.values() if isinstance(kv_caches, dict) else kv_caches
    return [layer_desc_from_tensor(tensor, layout) for tensor in tensors]
