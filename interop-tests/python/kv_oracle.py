"""Independent torch oracle for paged KV caches in vLLM layouts.

The tests allocate KV tensors here and compute what must be at each slot by plain torch indexing of
the logical tensor, following the layout definitions (vllm-connector.md section 4.2), never the
library's stride arithmetic nor lmcache_native.torch_layout. A "case" is a concrete physical
allocation: a layout plus NHD/HND or padding.

Token-major oracle values are [T, kv_count, H, D] tensors: token t's K (kv 0) and V (kv 1), per head.
Bit patterns are compared through same-width integer views, so NaN payloads and -0.0 count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Integer dtype of the same width, for bit-exact comparisons and random bit patterns.
INT_VIEW_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
SENTINEL_BITS = {1: 0x5A, 2: 0x5A5A, 4: 0x5A5A5A5A}  # a pattern no random fill is likely to repeat


@dataclass(frozen=True)
class LayoutCase:
    name: str  # test id
    lmc_layout: str  # lmcache_native.torch_layout name
    kv_count: int
    # physical allocation shape for (B, N, H, D), and the permutation physical -> logical (or None)
    physical_shape: callable
    permutation: tuple | None = None
    # MLA padding: extra elements per token after the C used ones (a strided, non-contiguous view)
    padding: int = 0


GQA_CASES = {
    case.name: case
    for case in (
        LayoutCase("flash_attn_nhd", "flash_attn", 2, lambda B, N, H, D: (2, B, N, H, D)),
        LayoutCase("flash_attn_hnd", "flash_attn", 2, lambda B, N, H, D: (2, B, H, N, D), (0, 1, 3, 2, 4)),
        LayoutCase("blocks_first_nhd", "blocks_first", 2, lambda B, N, H, D: (B, 2, N, H, D)),
        LayoutCase("blocks_first_hnd", "blocks_first", 2, lambda B, N, H, D: (B, 2, H, N, D), (0, 1, 3, 2, 4)),
        LayoutCase("packed", "packed", 2, lambda B, N, H, D: (B, H, N, 2 * D)),
        LayoutCase("cpu_sdpa", "cpu_sdpa", 2, lambda B, N, H, D: (2, B, H, N, D)),
    )
}
MLA_CASES = {
    case.name: case
    for case in (
        LayoutCase("mla", "mla", 1, lambda B, N, H, D: (B, N, D)),
        LayoutCase("mla_padded", "mla", 1, lambda B, N, H, D: (B, N, D + 8), padding=8),
    )
}
ALL_CASES = {**GQA_CASES, **MLA_CASES}


@dataclass
class KvLayer:
    """One layer's KV memory: ``physical`` owns it, ``logical`` is what gets registered."""

    case: LayoutCase
    physical: torch.Tensor
    logical: torch.Tensor

    @property
    def element_size(self) -> int:
        return self.physical.element_size()


def allocate_layer(case: LayoutCase, num_blocks: int, block_size: int, num_heads: int, head_size: int,
                   dtype: torch.dtype, fill: str, generator: torch.Generator | None = None) -> KvLayer:
    """``fill`` is "random" (random bit patterns, NaNs included) or "sentinel"."""
    shape = case.physical_shape(num_blocks, block_size, num_heads, head_size)
    element_size = torch.empty(0, dtype=dtype).element_size()
    int_dtype = INT_VIEW_DTYPE[element_size]
    if fill == "random":
        info = torch.iinfo(int_dtype)
        bits = torch.randint(info.min, info.max, shape, dtype=int_dtype, generator=generator)
    else:
        bits = torch.full(shape, SENTINEL_BITS[element_size], dtype=int_dtype)
    physical = bits.view(dtype)
    logical = physical.permute(*case.permutation) if case.permutation else physical
    if case.padding:
        logical = logical[..., :head_size]
    return KvLayer(case, physical, logical)


def _split_slots(slots: torch.Tensor, block_size: int):
    return slots // block_size, slots % block_size


def read_tokens(layer: KvLayer, slots: torch.Tensor, block_size: int) -> torch.Tensor:
    """[T, kv_count, H, D] values at ``slots`` (int64, no -1), by indexing the logical tensor."""
    blocks, offsets = _split_slots(slots, block_size)
    t, name = layer.logical, layer.case.lmc_layout
    if name == "flash_attn":  # [2, B, N, H, D] -> t[:, b, n] is [2, T, H, D]
        return t[:, blocks, offsets].transpose(0, 1)
    if name == "blocks_first":  # [B, 2, N, H, D] -> t[b, :, n] is [T, 2, H, D]
        return t[blocks, :, offsets]
    if name == "cpu_sdpa":  # [2, B, H, N, D] -> t[:, b, :, n] is [T, 2, H, D]
        return t[:, blocks, :, offsets]
    if name == "packed":  # [B, H, N, 2D] -> t[b, :, n] is [T, H, 2D]; K first half, V second
        packed = t[blocks, :, offsets]
        head_size = packed.shape[-1] // 2
        return torch.stack((packed[..., :head_size], packed[..., head_size:]), dim=1)
    if name == "mla":  # [B, N, C] -> [T, C]
        return t[blocks, offsets][:, None, None, :]
    raise ValueError(name)


def write_tokens(layer: KvLayer, slots: torch.Tensor, block_size: int, values: torch.Tensor) -> None:
    """Inverse of ``read_tokens``: writes [T, kv_count, H, D] ``values`` at ``slots`` (in place)."""
    blocks, offsets = _split_slots(slots, block_size)
    t, name = layer.logical, layer.case.lmc_layout
    if name == "flash_attn":
        t[:, blocks, offsets] = values.transpose(0, 1)
    elif name == "blocks_first":
        t[blocks, :, offsets] = values
    elif name == "cpu_sdpa":
        t[:, blocks, :, offsets] = values
    elif name == "packed":
        head_size = values.shape[-1]
        t[blocks, :, offsets, :head_size] = values[:, 0]
        t[blocks, :, offsets, head_size:] = values[:, 1]
    elif name == "mla":
        t[blocks, offsets] = values[:, 0, 0]
    else:
        raise ValueError(name)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Same-width integer view, for bit-exact equality."""
    return tensor.view(INT_VIEW_DTYPE[tensor.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def random_slot_mapping(num_tokens: int, num_blocks: int, block_size: int, generator: torch.Generator,
                        unmapped_fraction: float = 0.0) -> torch.Tensor:
    """Slots for ``num_tokens`` tokens in blocks taken in random order, vLLM's slot formula, and a
    random ``unmapped_fraction`` of the tokens set to -1."""
    needed_blocks = -(-num_tokens // block_size)
    assert needed_blocks <= num_blocks
    block_ids = torch.randperm(num_blocks, generator=generator)[:needed_blocks]
    positions = torch.arange(num_tokens)
    slots = block_ids[positions // block_size] * block_size + positions % block_size
    if unmapped_fraction:
        unmapped = torch.rand(num_tokens, generator=generator) < unmapped_fraction
        slots[unmapped] = -1
    return slots.to(torch.int64)
