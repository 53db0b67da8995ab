"""torch_layout: the lmc_kv_layer_desc of each vLLM layout, checked against the stride table in the
header (written out here by hand from the layout definitions, not from tensor.stride())."""

from __future__ import annotations

import pytest
import torch

from lmcache_native import LmcKvLayerDesc
from lmcache_native import _bindings as b
from lmcache_native.torch_layout import infer_layout, layer_desc_from_tensor, layer_descs_from_kv_caches

B, N, H, D = 6, 16, 4, 32


def expected(kv, block, token, head, kv_count=2, heads=H, head_size=D):
    return dict(kv_count=kv_count, num_blocks=B, block_size=N, num_kv_heads=heads, head_size=head_size,
                kv_stride=kv, block_stride=block, token_stride=token, head_stride=head)


CASES = {
    # name: (tensor factory, layout, expected fields per the header's table)
    "flash_attn_nhd": (lambda dt: torch.zeros(2, B, N, H, D, dtype=dt), "flash_attn",
                       expected(kv=B * N * H * D, block=N * H * D, token=H * D, head=D)),
    "flash_attn_hnd": (lambda dt: torch.zeros(2, B, H, N, D, dtype=dt).permute(0, 1, 3, 2, 4), "flash_attn",
                       expected(kv=B * H * N * D, block=H * N * D, token=D, head=N * D)),
    "blocks_first_nhd": (lambda dt: torch.zeros(B, 2, N, H, D, dtype=dt), "blocks_first",
                         expected(kv=N * H * D, block=2 * N * H * D, token=H * D, head=D)),
    "blocks_first_hnd": (lambda dt: torch.zeros(B, 2, H, N, D, dtype=dt).permute(0, 1, 3, 2, 4), "blocks_first",
                         expected(kv=H * N * D, block=2 * H * N * D, token=D, head=N * D)),
    "packed": (lambda dt: torch.zeros(B, H, N, 2 * D, dtype=dt), "packed",
               expected(kv=D, block=H * N * 2 * D, token=2 * D, head=N * 2 * D)),
    "cpu_sdpa": (lambda dt: torch.zeros(2, B, H, N, D, dtype=dt), "cpu_sdpa",
                 expected(kv=B * H * N * D, block=H * N * D, token=D, head=N * D)),
}


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_descriptions_follow_the_header_table(case, dtype):
    factory, layout, fields = CASES[case]
    tensor = factory(dtype)
    desc = layer_desc_from_tensor(tensor, layout)
    assert isinstance(desc, LmcKvLayerDesc) and desc.struct_size == 88
    for name, value in fields.items():
        assert getattr(desc, name) == value, name
    assert desc.elem_size == torch.empty(0, dtype=dtype).element_size()
    assert desc.device_kind == b.LMC_DEVICE_HOST and desc.device_index == 0 and desc.reserved == 0
    assert desc.base_address == tensor.data_ptr()
    assert desc.span_bytes == tensor.numel() * desc.elem_size


def test_mla_description():
    C = 576
    desc = layer_desc_from_tensor(torch.zeros(B, N, C, dtype=torch.bfloat16))
    assert (desc.kv_count, desc.num_kv_heads, desc.head_size) == (1, 1, C)
    assert (desc.block_stride, desc.token_stride) == (N * C, C)


def test_span_counts_from_the_view_to_the_end_of_the_storage():
    # vLLM views one flat int8 buffer per layer as the cache dtype; a view may start inside it.
    raw = torch.zeros(4096 * 2 * 2 + 100, dtype=torch.int8)
    view = raw[100:100 + 2 * 8 * 16 * 4 * 8 * 2].view(torch.float16).view(2, 8, 16, 4, 8)
    desc = layer_desc_from_tensor(view, "flash_attn")
    assert desc.base_address == raw.data_ptr() + 100
    assert desc.span_bytes == raw.numel() - 100
    assert desc.elem_size == 2


def test_inference_only_for_unambiguous_shapes():
    assert infer_layout((2, 8, 16, 4, 64)) == "flash_attn"
    assert infer_layout((8, 2, 16, 4, 64)) == "blocks_first"
    assert infer_layout((8, 4, 16, 128)) == "packed"
    assert infer_layout((8, 16, 576)) == "mla"
    with pytest.raises(ValueError):
        infer_layout((2, 2, 16, 4, 64))  # K/V axis could be either
    with pytest.raises(ValueError):
        infer_layout((8, 16))


@pytest.mark.parametrize("tensor, layout", [
    (torch.zeros(B, H, N, 2 * D + 1), "packed"),  # odd packed dimension
    (torch.zeros(2, B, N, H, 2 * D)[..., ::2], "flash_attn"),  # head dim not contiguous
    (torch.zeros(2, B, N, H, D, dtype=torch.float64), "flash_attn"),  # 8-byte elements
    (torch.zeros(3, B, N, H, D), "flash_attn"),  # K/V axis of 3
    (torch.zeros(2, B, N, H, D), "paged_something"),  # unknown layout name
    (torch.zeros(B, N, D), "flash_attn"),  # wrong rank
])
def test_bad_tensors_are_refused(tensor, layout):
    with pytest.raises(ValueError):
        layer_desc_from_tensor(tensor, layout)


def test_several_layers_may_share_one_tensor():
    shared, other = torch.zeros(2, B, N, H, D), torch.zeros(2, B, N, H, D)
    descs = layer_descs_from_kv_caches({"layer.0": shared, "layer.1": other, "layer.2": shared})
    assert [d.base_address for d in descs] == [shared.data_ptr(), other.data_ptr(), shared.data_ptr()]
    assert bytes(descs[0]) == bytes(descs[2])
    assert [d.base_address for d in layer_descs_from_kv_caches([other, shared])] == \
        [other.data_ptr(), shared.data_ptr()]
