"""Store from one vLLM layout, retrieve into another, compare bit for bit against the torch oracle.

Every pair of GQA layouts (FlashAttention NHD/HND, blocks-first NHD/HND, packed, CPU SDPA) and of
MLA layouts, for 1-, 2- and 4-byte elements. Sources hold random bit patterns (NaNs included), so
only a byte-exact copy passes. Destinations start filled with a sentinel: after the retrieve every
element that was not written (slot -1, tokens before first_token_to_write, other blocks, MLA
padding) must still hold it, which the test checks over the whole physical allocation.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import kv_oracle
from kv_oracle import GQA_CASES, MLA_CASES
from lmcache_native import Engine

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE = 2, 24, 16, 2, 8
NUM_TOKENS = 150  # 4 chunks of 32 + a partial chunk of 22 (stored: save_unfull_chunk)
CONFIG = {"chunk_size": 32, "save_unfull_chunk": True, "max_local_cpu_size": 0.01}
DTYPES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str):
    actual_bits, expected_bits = kv_oracle.bits(actual), kv_oracle.bits(expected)
    if torch.equal(actual_bits, expected_bits):
        return
    differing = (actual_bits != expected_bits).nonzero()
    first = tuple(differing[0].tolist())
    pytest.fail(f"{what}: {len(differing)} of {actual.numel()} elements differ; first at {first}: "
                f"got bits {int(actual_bits[first])}, expected {int(expected_bits[first])}")


def roundtrip(source_name: str, destination_name: str, dtype: torch.dtype, first_token_to_write: int = 0,
              unmapped_fraction: float = 0.15, shared_layers: bool = False):
    """Stores NUM_TOKENS tokens from a ``source_name`` cache and retrieves them into a
    ``destination_name`` cache; checks the whole destination against the oracle."""
    cases = {**GQA_CASES, **MLA_CASES}
    source_case, destination_case = cases[source_name], cases[destination_name]
    seed = zlib.crc32(f"{source_name}/{destination_name}/{dtype}/{first_token_to_write}".encode())
    generator = torch.Generator().manual_seed(seed)

    def allocate(case, fill):
        return kv_oracle.allocate_layer(case, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE, dtype, fill, generator)

    source = [allocate(source_case, "random") for _ in range(NUM_LAYERS)]
    destination = [allocate(destination_case, "sentinel") for _ in range(NUM_LAYERS)]
    if shared_layers:  # vLLM KV sharing: a third layer name that reuses layer 0's tensor
        source.append(source[0])
        destination.append(destination[0])
    tokens = torch.randint(0, 50000, (NUM_TOKENS,), dtype=torch.int32, generator=generator)
    source_slots = kv_oracle.random_slot_mapping(NUM_TOKENS, NUM_BLOCKS, BLOCK_SIZE, generator)
    destination_slots = kv_oracle.random_slot_mapping(NUM_TOKENS, NUM_BLOCKS, BLOCK_SIZE, generator,
                                                      unmapped_fraction)

    with Engine(CONFIG, model_name="roundtrip") as engine:
        engine.register_layers([layer.logical for layer in source], layout=source_case.lmc_layout)
        assert engine.store(tokens, source_slots) == NUM_TOKENS
        # Same model namespace, other memory and layout: the cached chunks must survive this.
        engine.register_layers([layer.logical for layer in destination], layout=destination_case.lmc_layout)
        retrieved = engine.retrieve(tokens, destination_slots, first_token_to_write=first_token_to_write)
        stats = engine.stats()
    assert retrieved == NUM_TOKENS

    written = (torch.arange(NUM_TOKENS) >= first_token_to_write) & (destination_slots != -1)
    for index, (src, dst) in enumerate(zip(source, destination)):
        expected = allocate(destination_case, "sentinel")
        values = kv_oracle.read_tokens(src, source_slots[written], BLOCK_SIZE)
        kv_oracle.write_tokens(expected, destination_slots[written], BLOCK_SIZE, values)
        assert_bits_equal(dst.physical, expected.physical, f"layer {index} destination")
    heads = NUM_HEADS if source_case.kv_count == 2 else 1
    bytes_per_token = len(source) * source_case.kv_count * heads * HEAD_SIZE * source[0].element_size
    assert stats["retrieved_bytes"] == int(written.sum()) * bytes_per_token


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("destination_name", GQA_CASES)
@pytest.mark.parametrize("source_name", GQA_CASES)
def test_gqa_layout_pairs_are_bit_exact(source_name, destination_name, dtype_name):
    roundtrip(source_name, destination_name, DTYPES[dtype_name])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("destination_name", MLA_CASES)
@pytest.mark.parametrize("source_name", MLA_CASES)
def test_mla_layout_pairs_are_bit_exact(source_name, destination_name, dtype_name):
    roundtrip(source_name, destination_name, DTYPES[dtype_name])


@pytest.mark.parametrize("first_token_to_write", [5, 32, 149, 150])
@pytest.mark.parametrize("destination_name", [*GQA_CASES, "mla_padded"])
def test_first_token_to_write_leaves_earlier_slots_untouched(destination_name, first_token_to_write):
    source_name = "mla" if destination_name.startswith("mla") else "flash_attn_nhd"
    roundtrip(source_name, destination_name, torch.bfloat16, first_token_to_write=first_token_to_write)


@pytest.mark.parametrize("destination_name", ["flash_attn_nhd", "packed"])
def test_layers_sharing_one_tensor(destination_name):
    roundtrip("blocks_first_hnd", destination_name, torch.float16, shared_layers=True)


def test_all_slots_unmapped_writes_nothing():
    roundtrip("flash_attn_nhd", "cpu_sdpa", torch.float32, unmapped_fraction=1.0)


def test_cross_layer_block_major_layout():
    """vLLM's cross-layer KV layout (prefer_cross_layer_blocks; BLNHC in the 2026 layout enum): one
    tensor [B, L, 2, N, H, D] whose layer views t[:, l] interleave block by block. The layers share
    no element, so the header's "layers must not overlap" holds, though their address ranges
    intersect. Stored from it and retrieved into a plain FlashAttention NHD cache, bit for bit."""
    generator = torch.Generator().manual_seed(11)
    info = torch.iinfo(torch.int16)
    cross = torch.randint(info.min, info.max, (NUM_BLOCKS, NUM_LAYERS, 2, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE),
                          dtype=torch.int16, generator=generator).view(torch.bfloat16)
    case = GQA_CASES["blocks_first_nhd"]
    source = [kv_oracle.KvLayer(case, cross, cross[:, index]) for index in range(NUM_LAYERS)]
    destination_case = GQA_CASES["flash_attn_nhd"]
    destination = [kv_oracle.allocate_layer(destination_case, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_SIZE,
                                            torch.bfloat16, "sentinel") for _ in range(NUM_LAYERS)]
    tokens = torch.randint(0, 50000, (NUM_TOKENS,), dtype=torch.int32, generator=generator)
    source_slots = kv_oracle.random_slot_mapping(NUM_TOKENS, NUM_BLOCKS, BLOCK_SIZE, generator)
    destination_slots = kv_oracle.random_slot_mapping(NUM_TOKENS, NUM_BLOCKS, BLOCK_SIZE, generator)
    with Engine(CONFIG, model_name="cross-layer") as engine:
        engine.register_layers([layer.logical for layer in source], layout="blocks_first")
        assert engine.store(tokens, source_slots) == NUM_TOKENS
        engine.register_layers([layer.logical for layer in destination], layout="flash_attn")
        assert engine.retrieve(tokens, destination_slots) == NUM_TOKENS
    for index, (src, dst) in enumerate(zip(source, destination)):
        assert_bits_equal(kv_oracle.read_tokens(dst, destination_slots, BLOCK_SIZE),
                          kv_oracle.read_tokens(src, source_slots, BLOCK_SIZE), f"layer {index}")
