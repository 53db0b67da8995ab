"""Chunking and key semantics: prefix hits, partial hits, save_unfull_chunk, skip_leading_tokens,
slots -1 at store, extra keys (salt), hash algorithms and the model namespace.

Expected hit lengths come from LMCache's rules: tokens are cut into chunk_size
chunks, each chunk's key chains all earlier tokens, and only a contiguous prefix of cached chunks hits.
"""

from __future__ import annotations

import pytest
import torch

import kv_oracle
from lmcache_native import Engine

CHUNK = 16


def config(**overrides):
    return {"chunk_size": CHUNK, "max_local_cpu_size": 0.01, **overrides}


def with_changed_token(tokens: torch.Tensor, position: int) -> torch.Tensor:
    changed = tokens.clone()
    changed[position] = (changed[position] + 1) % 32000
    return changed


@pytest.mark.parametrize("hash_algorithm", ["sha256", "xxh3_128", "builtin"])
def test_prefix_and_partial_hits(make_rig, hash_algorithm):
    rig = make_rig(config(pre_caching_hash_algorithm=hash_algorithm))
    tokens = rig.tokens(100)  # 6 full chunks + 4 tokens
    assert rig.engine.lookup(tokens) == 0
    assert rig.engine.store(tokens, rig.slots(100)) == 96
    assert rig.engine.lookup(tokens) == 96  # the partial trailing chunk is not stored
    assert rig.engine.lookup(tokens[:96]) == 96
    assert rig.engine.lookup(tokens[:50]) == 48  # a prefix: its full chunks hit
    assert rig.engine.lookup(tokens[:15]) == 0  # not even one full chunk
    assert rig.engine.lookup(torch.cat((tokens, rig.tokens(40)))) == 96  # longer prompt, same prefix
    for position, expected_hit in [(0, 0), (15, 0), (16, 16), (47, 32), (48, 48), (95, 80), (99, 96)]:
        # A token changed at `position` invalidates its chunk and every later one.
        assert rig.engine.lookup(with_changed_token(tokens, position)) == expected_hit, position


def test_save_unfull_chunk_stores_the_trailing_partial_chunk(make_rig):
    rig = make_rig(config(save_unfull_chunk=True))
    tokens = rig.tokens(100)
    assert rig.engine.store(tokens, rig.slots(100)) == 100
    assert rig.engine.stats()["stored_tokens"] == 100
    assert rig.engine.lookup(tokens) == 100
    # The partial chunk [96, 100) is its own key: neither a shorter nor a longer tail matches it.
    assert rig.engine.lookup(tokens[:98]) == 96
    assert rig.engine.lookup(torch.cat((tokens, rig.tokens(20)))) == 96
    assert rig.engine.lookup(with_changed_token(tokens, 97)) == 96


def test_without_save_unfull_chunk_a_short_prompt_stores_nothing(make_rig):
    rig = make_rig(config(save_unfull_chunk=False))
    tokens = rig.tokens(CHUNK - 1)
    assert rig.engine.store(tokens, rig.slots(CHUNK - 1)) == 0
    stats = rig.engine.stats()
    assert stats["stored_tokens"] == 0 and stats["cached_chunks"] == 0
    assert rig.engine.lookup(tokens) == 0


def test_store_skips_chunks_before_the_rounded_down_skip_point(make_rig):
    rig = make_rig(config())
    tokens, slots = rig.tokens(100), rig.slots(100)
    # skip 40 rounds down to 32: chunks [32, 96) are stored, [0, 32) are not.
    assert rig.engine.store(tokens, slots, skip_leading_tokens=40) == 64
    stats = rig.engine.stats()
    assert stats["stored_tokens"] == 64
    assert stats["stored_bytes"] == 64 * rig.bytes_per_token
    assert stats["cached_chunks"] == 4
    assert rig.engine.lookup(tokens) == 0  # the first chunk is missing, so no prefix hits
    # Storing the rest copies only the 32 missing tokens; afterwards the whole prefix hits.
    assert rig.engine.store(tokens, slots) == 96
    stats = rig.engine.stats()
    assert stats["stored_tokens"] == 96
    assert stats["cached_chunks"] == 6
    assert rig.engine.lookup(tokens) == 96


def test_store_skip_at_the_end_stores_nothing(make_rig):
    rig = make_rig(config())
    tokens = rig.tokens(100)
    assert rig.engine.store(tokens, rig.slots(100), skip_leading_tokens=96) == 0
    assert rig.engine.stats()["stored_tokens"] == 0


def test_store_stops_at_the_first_chunk_with_an_unmapped_slot(make_rig):
    rig = make_rig(config())
    tokens, slots = rig.tokens(100), rig.slots(100)
    slots[50] = -1  # inside chunk [48, 64)
    assert rig.engine.store(tokens, slots) == 48
    assert rig.engine.stats()["stored_tokens"] == 48
    assert rig.engine.lookup(tokens) == 48


def test_storing_again_copies_nothing(make_rig):
    rig = make_rig(config())
    tokens, slots = rig.tokens(64), rig.slots(64)
    assert rig.engine.store(tokens, slots) == 64
    assert rig.engine.store(tokens, slots) == 64  # "stored now or already there"
    stats = rig.engine.stats()
    assert stats["store_requests"] == 2
    assert stats["stored_tokens"] == 64
    assert stats["stored_bytes"] == 64 * rig.bytes_per_token


def test_retrieve_of_a_partial_hit_writes_only_the_hit_prefix(make_rig):
    rig = make_rig(config(), num_blocks=64)
    tokens = rig.tokens(100)
    source_slots = rig.slots(100)
    assert rig.engine.store(tokens, source_slots) == 96
    other = with_changed_token(tokens, 40)  # chunks [0, 32) still hit
    # Destination slots in blocks disjoint from the source's, so the source stays intact.
    free_blocks = sorted(set(range(rig.num_blocks)) - set((source_slots // rig.block_size).tolist()))
    destination_slots = torch.tensor(
        [free_blocks[t // rig.block_size] * rig.block_size + t % rig.block_size for t in range(100)])
    before = rig.snapshot()
    source_values = rig.read(source_slots[:32])
    assert rig.engine.retrieve(other, destination_slots) == 32
    # Expected: the snapshot with the 32 hit tokens written at their destination slots.
    for layer, old, values in zip(rig.layers, before, source_values):
        expected = kv_oracle.KvLayer(layer.case, old, _logical(layer.case, old, rig.head_size))
        kv_oracle.write_tokens(expected, destination_slots[:32], rig.block_size, values)
        assert kv_oracle.bit_equal(layer.physical, expected.physical)


def _logical(case, physical, head_size):
    logical = physical.permute(*case.permutation) if case.permutation else physical
    return logical[..., :head_size] if case.padding else logical


def test_retrieve_miss_returns_zero_and_writes_nothing(make_rig):
    rig = make_rig(config())
    tokens = rig.tokens(64)
    before = rig.snapshot()
    assert rig.engine.retrieve(tokens, rig.slots(64)) == 0
    assert all(kv_oracle.bit_equal(layer.physical, old) for layer, old in zip(rig.layers, before))


def test_extra_key_isolates_entries(make_rig):
    rig = make_rig(config())
    tokens = rig.tokens(64)
    assert rig.engine.store(tokens, rig.slots(64), extra_key=b"a") == 64
    assert rig.engine.lookup(tokens, extra_key=b"b") == 0
    assert rig.engine.lookup(tokens) == 0
    assert rig.engine.lookup(tokens, extra_key=b"a") == 64
    assert rig.engine.retrieve(tokens, rig.slots(64), extra_key=b"b") == 0


def test_long_extra_keys_are_used_at_full_width(make_rig):
    rig = make_rig(config())
    tokens = rig.tokens(64)
    base = bytes(range(64)) + b"\x00tail"  # longer than 32 bytes, with an embedded NUL
    first, second = base + b"\x01", base + b"\x02"  # differ only in the last byte
    assert rig.engine.store(tokens, rig.slots(64), extra_key=first) == 64
    assert rig.engine.lookup(tokens, extra_key=second) == 0
    assert rig.engine.lookup(tokens, extra_key=first) == 64
    assert rig.engine.lookup(tokens, extra_key=bytearray(first)) == 64  # any bytes-like object


def test_empty_extra_key_equals_no_extra_key(make_rig):
    rig = make_rig(config())
    tokens = rig.tokens(32)
    rig.engine.store(tokens, rig.slots(32), extra_key=b"")
    assert rig.engine.lookup(tokens) == 32


def test_chunk_size_changes_the_granularity(make_rig):
    rig = make_rig({"chunk_size": 48, "max_local_cpu_size": 0.01})
    tokens = rig.tokens(100)
    assert rig.engine.store(tokens, rig.slots(100)) == 96
    assert rig.engine.lookup(with_changed_token(tokens, 50)) == 48


def test_registering_another_model_shape_clears_the_cache(make_rig):
    rig = make_rig(config())
    tokens = rig.tokens(32)
    rig.engine.store(tokens, rig.slots(32))
    assert rig.engine.lookup(tokens) == 32
    other_shape = kv_oracle.allocate_layer(rig.case, rig.num_blocks, rig.block_size, rig.num_heads,
                                           rig.head_size * 2, rig.dtype, "random")
    rig.engine.register_layers([other_shape.logical] * len(rig.layers), layout=rig.case.lmc_layout)
    rig.extra_owner = other_shape  # keep the memory alive while registered
    assert rig.engine.lookup(tokens) == 0
    assert rig.engine.stats()["cached_chunks"] == 0


def test_registering_the_same_shape_in_another_layout_keeps_the_cache(make_rig):
    rig = make_rig(config())
    tokens = rig.tokens(32)
    rig.engine.store(tokens, rig.slots(32))
    hnd = [kv_oracle.allocate_layer(kv_oracle.ALL_CASES["flash_attn_hnd"], rig.num_blocks, rig.block_size,
                                    rig.num_heads, rig.head_size, rig.dtype, "random") for _ in rig.layers]
    rig.engine.register_layers([layer.logical for layer in hnd], layout="flash_attn")
    rig.extra_owner = hnd
    assert rig.engine.lookup(tokens) == 32


def test_engines_are_independent(make_rig):
    first, second = make_rig(config()), make_rig(config())
    tokens = first.tokens(32)
    first.engine.store(tokens, first.slots(32))
    assert second.engine.lookup(tokens) == 0


def test_another_block_size_and_block_count_keep_the_cache_and_retrieve_exactly():
    """Block size and block count are not part of the namespace (the header lists what is): KV
    stored from a 16-token-block cache can be retrieved into a 32-token-block cache."""
    generator = torch.Generator().manual_seed(3)
    case = kv_oracle.GQA_CASES["flash_attn_nhd"]
    source = [kv_oracle.allocate_layer(case, 24, 16, 2, 8, torch.float32, "random", generator) for _ in range(2)]
    destination = [kv_oracle.allocate_layer(case, 20, 32, 2, 8, torch.float32, "sentinel", generator)
                   for _ in range(2)]
    tokens = torch.randint(0, 32000, (100,), dtype=torch.int32, generator=generator)
    source_slots = kv_oracle.random_slot_mapping(100, 24, 16, generator)
    destination_slots = kv_oracle.random_slot_mapping(100, 20, 32, generator)
    with Engine(config(save_unfull_chunk=True)) as engine:
        engine.register_layers([layer.logical for layer in source], layout="flash_attn")
        assert engine.store(tokens, source_slots) == 100
        engine.register_layers([layer.logical for layer in destination], layout="flash_attn")
        assert engine.lookup(tokens) == 100
        assert engine.retrieve(tokens, destination_slots) == 100
    for src, dst in zip(source, destination):
        assert kv_oracle.bit_equal(kv_oracle.read_tokens(dst, destination_slots, 32),
                                   kv_oracle.read_tokens(src, source_slots, 16))


def test_skip_inside_the_partial_chunk_stores_only_that_chunk(make_rig):
    rig = make_rig(config(save_unfull_chunk=True))
    tokens = rig.tokens(100)
    assert rig.engine.store(tokens, rig.slots(100), skip_leading_tokens=98) == 4  # chunk [96, 100)
    assert rig.engine.stats()["stored_tokens"] == 4
    assert rig.engine.lookup(tokens) == 0


def test_a_cached_chunk_is_not_overwritten_by_a_later_store(make_rig):
    rig = make_rig(config())
    tokens, first_slots, second_slots = rig.tokens(32), rig.slots(32), rig.slots(32)
    first_values = rig.read(first_slots)
    assert rig.engine.store(tokens, first_slots) == 32
    assert rig.engine.store(tokens, second_slots) == 32  # other memory, same tokens: already cached
    destination = rig.slots(32)
    assert rig.engine.retrieve(tokens, destination) == 32
    assert all(kv_oracle.bit_equal(got, want) for got, want in zip(rig.read(destination), first_values))
