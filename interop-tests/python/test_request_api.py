"""The ABI v2 request API through the Python wrapper: block-table destinations (equal to the slot
mappings they expand to, bit for bit), the per-tier fields of TransferResult and LookupResult, the
argument forms of block_ids, and config_schema()."""

from __future__ import annotations

import array
import pickle

import numpy as np
import pytest
import torch

import kv_oracle
import lmcache_native
from lmcache_native import (Engine, LmcInvalidArgument, LookupResult, TokenBuffer, TransferResult,
                            config_schema)

CHUNK = 16
BLOCK = 16  # the rig's block_size


def table_to_slots(block_ids, block_size: int, num_tokens: int) -> torch.Tensor:
    """The header's expansion: token t -> block_ids[t // bs] * bs + t % bs; -1 blocks and tokens past
    the table have no slot."""
    slots = torch.full((num_tokens,), -1, dtype=torch.int64)
    for t in range(num_tokens):
        index = t // block_size
        if index < len(block_ids) and block_ids[index] != -1:
            slots[t] = block_ids[index] * block_size + t % block_size
    return slots


def random_table(rig, num_blocks: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(rig.num_blocks, generator=generator)[:num_blocks].tolist()


def _all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(kv_oracle.bit_equal(x, y) for x, y in zip(a, b))


# -- block tables equal slot mappings bit for bit -------------------------------------------------
@pytest.mark.parametrize("case", ["flash_attn_nhd", "flash_attn_hnd", "blocks_first_nhd", "packed", "mla"])
def test_block_table_store_and_retrieve_equal_slot_mapping_bit_for_bit(make_rig, case):
    rig_table = make_rig(case_name=case, seed=5)
    rig_slots = make_rig(case_name=case, seed=5)  # same contents, independent engine
    assert _all_equal(rig_table.snapshot(), rig_slots.snapshot())
    tokens = rig_table.tokens(100)
    table = random_table(rig_table, 7, seed=6)  # 7 blocks of 16 = 112 slots for 100 tokens
    slots = table_to_slots(table, BLOCK, 100)

    stored_t = rig_table.engine.store(tokens, block_ids=table, block_size=BLOCK)
    stored_s = rig_slots.engine.store(tokens, slots)
    assert stored_t == stored_s == 96
    assert stored_t.as_dict().keys() == stored_s.as_dict().keys()
    assert {k: v for k, v in stored_t.as_dict().items() if k != "elapsed_ns"} == \
        {k: v for k, v in stored_s.as_dict().items() if k != "elapsed_ns"}

    # Retrieve into another block table (with a -1 block and a short table) on both engines, each from
    # its own cache; the KV memory must end up identical, untouched slots included.
    for rig in (rig_table, rig_slots):
        for layer in rig.layers:
            layer.physical.fill_(-3.0)
    destination = random_table(rig_table, 5, seed=7)
    destination[2] = -1  # tokens 32..47: no slot
    # table of 5 blocks: tokens 80..99 are past the table (no slot either)
    before = rig_table.snapshot()
    got_t = rig_table.engine.retrieve(tokens, block_ids=destination, block_size=BLOCK, first_token_to_write=3)
    got_s = rig_slots.engine.retrieve(tokens, table_to_slots(destination, BLOCK, 100), first_token_to_write=3)
    assert got_t == got_s == 96
    assert got_t.tokens_copied == got_s.tokens_copied == 80 - 16 - 3  # written: tokens 3..79 minus 32..47
    assert _all_equal(rig_table.snapshot(), rig_slots.snapshot())

    # Guards: only the slots of written tokens changed, and they hold the stored KV: start from the
    # memory before the retrieve, write the expected KV with the oracle, compare everything.
    expected = [layer.clone() for layer in before]
    written = [t for t in range(3, 80) if not 32 <= t < 48]
    source_slots = torch.tensor([int(slots[t]) for t in written])
    destination_slots = table_to_slots(destination, BLOCK, 100)[written]
    source_kv = make_rig(case_name=case, seed=5).read(source_slots)  # the original contents
    reference = make_rig(case_name=case, seed=99)
    for ref_layer, old in zip(reference.layers, expected):
        ref_layer.physical.copy_(old)
    for ref_layer, values in zip(reference.layers, source_kv):
        kv_oracle.write_tokens(ref_layer, destination_slots, BLOCK, values)
    assert _all_equal(reference.snapshot(), rig_table.snapshot()), "a slot outside the written tokens changed"


def test_block_table_store_stops_at_a_minus_one_block(make_rig):
    rig = make_rig()
    tokens = rig.tokens(64)
    table = random_table(rig, 4, seed=1)
    table[2] = -1  # tokens 32..47 have no slot: the chunk 32..47 and everything after it is not stored
    result = rig.engine.store(tokens, block_ids=table, block_size=BLOCK)
    assert result == 32 and result.tokens_copied == 32
    assert rig.engine.lookup(tokens) == 32
    # A short table: tokens past it have no slot either.
    other = rig.tokens(64)
    assert rig.engine.store(other, block_ids=table[:1], block_size=BLOCK) == 16


def test_a_table_block_size_other_than_the_layers_block_size(make_rig):
    # table_block_size is the table's unit; slots are block_id * table_block_size + offset, whatever
    # the registered layers' block_size is.
    rig = make_rig(seed=3)
    tokens = rig.tokens(64)
    table = [5, 0, 9, 2, 7, 1, 30, 3]  # blocks of 8 tokens
    assert rig.engine.store(tokens, block_ids=table, block_size=8) == 64
    destination = make_rig(seed=4, fill="sentinel")
    assert destination.engine.retrieve(tokens, table_to_slots(table, 8, 64)) == 0  # another engine: a miss
    rig2 = make_rig(seed=3)
    assert rig2.engine.store(tokens, table_to_slots(table, 8, 64)) == 64
    for rig_x in (rig, rig2):
        for layer in rig_x.layers:
            layer.physical.fill_(0.5)
        rig_x.engine.retrieve(tokens, block_ids=[40, 41, 42, 43], block_size=16)
    assert _all_equal(rig.snapshot(), rig2.snapshot())


@pytest.mark.parametrize("form", ["list", "tuple", "array-i", "array-q", "numpy-int32", "numpy-int64",
                                  "numpy-strided", "torch-int32", "torch-int64"])
def test_block_ids_forms_are_equivalent(make_rig, form):
    rig = make_rig(seed=2)
    tokens = rig.tokens(64)
    table = random_table(rig, 4, seed=8)
    converted = {
        "list": lambda: list(table),
        "tuple": lambda: tuple(table),
        "array-i": lambda: array.array("i", table),
        "array-q": lambda: array.array("q", table),
        "numpy-int32": lambda: np.array(table, dtype=np.int32),
        "numpy-int64": lambda: np.array(table, dtype=np.int64),
        "numpy-strided": lambda: np.repeat(np.array(table, dtype=np.int64), 2)[::2],
        "torch-int32": lambda: torch.tensor(table, dtype=torch.int32),
        "torch-int64": lambda: torch.tensor(table, dtype=torch.int64),
    }[form]()
    assert rig.engine.store(tokens, block_ids=converted, block_size=BLOCK) == 64
    assert rig.engine.lookup(tokens) == 64
    for layer in rig.layers:
        layer.physical.fill_(0.0)
    assert rig.engine.retrieve(tokens, block_ids=converted, block_size=BLOCK).tokens_copied == 64
    reference = make_rig(seed=2)
    expected = reference.read(table_to_slots(table, BLOCK, 64))
    assert all(kv_oracle.bit_equal(a, b) for a, b in zip(rig.read(table_to_slots(table, BLOCK, 64)), expected))


def test_destination_arguments_are_checked(make_rig):
    rig = make_rig()
    tokens = rig.tokens(32)
    slots = rig.slots(32)
    with pytest.raises(TypeError):
        rig.engine.store(tokens)  # no destination
    with pytest.raises(TypeError):
        rig.engine.retrieve(tokens, slots, block_ids=[0, 1], block_size=BLOCK)  # both
    with pytest.raises(TypeError):
        rig.engine.store(tokens, block_ids=[0, 1])  # no block_size
    with pytest.raises(TypeError):
        rig.engine.store(tokens, block_size=BLOCK)  # no block_ids
    with pytest.raises(TypeError):
        rig.engine.store(tokens, block_ids=[0, 1], block_size=16.0)
    for block_size in (0, -1):
        with pytest.raises(ValueError) as caught:  # LmcInvalidArgument from the library
            rig.engine.store(tokens, block_ids=[0, 1], block_size=block_size)
        assert isinstance(caught.value, LmcInvalidArgument)
    with pytest.raises(OverflowError):
        rig.engine.store(tokens, block_ids=[0, 1], block_size=2**31)
    with pytest.raises(OverflowError):
        rig.engine.store(tokens, block_ids=[0, 2**31], block_size=BLOCK)
    with pytest.raises(OverflowError):
        rig.engine.store(tokens, block_ids=np.array([0, 2**40]), block_size=BLOCK)
    with pytest.raises(OverflowError):
        rig.engine.store(tokens, block_ids=torch.tensor([0, -2**40]), block_size=BLOCK)
    with pytest.raises(LmcInvalidArgument):
        rig.engine.store(tokens, block_ids=[0, rig.num_blocks], block_size=BLOCK)  # past the cache
    with pytest.raises(LmcInvalidArgument):
        rig.engine.store(tokens, block_ids=[0, -2], block_size=BLOCK)
    with pytest.raises(OverflowError):
        rig.engine.retrieve(tokens, slots, first_token_to_write=2**63)
    assert rig.engine.stats()["store_requests"] == 0, "a refused call stored something"


# -- results ---------------------------------------------------------------------------------------
def test_transfer_and_lookup_results(make_rig):
    rig = make_rig()
    tokens, slots = rig.tokens(72), rig.slots(72)
    first = rig.engine.store(tokens, slots)
    assert isinstance(first, TransferResult) and isinstance(first, int)
    assert first == 72 - 72 % CHUNK == first.tokens_matched == first.tokens_copied
    assert first.bytes_copied == 64 * rig.bytes_per_token
    assert first.chunks_by_tier == (0, 0, 0, 0) and first.chunks_skipped_for_space == 0
    assert first.elapsed_ns >= 0
    again = rig.engine.store(tokens, slots)
    assert again == 64 and again.tokens_copied == 0 and again.bytes_copied == 0
    assert again.chunks_by_tier == (4, 0, 0, 0), "store: [0] = chunks already cached"
    skipped = rig.engine.store(tokens, slots, skip_leading_tokens=40)
    assert skipped == 64 - 32, "from the rounded-down skip point"

    hit = rig.engine.lookup(tokens)
    assert isinstance(hit, LookupResult) and hit == 64 == hit.hit_tokens
    assert hit.tokens_by_tier == (64, 0, 0, 0) and sum(hit.tokens_by_tier) == hit
    assert hit.elapsed_ns >= 0
    miss = rig.engine.lookup(rig.tokens(72))
    assert miss == 0 and miss.tokens_by_tier == (0, 0, 0, 0)

    got = rig.engine.retrieve(tokens, rig.slots(72), first_token_to_write=20)
    assert got == 64 and got.tokens_copied == 44 and got.bytes_copied == 44 * rig.bytes_per_token
    assert got.chunks_by_tier == (4, 0, 0, 0)

    # They behave as ints and survive repr and pickling.
    assert got + 1 == 65 and {got: "x"}[64] == "x" and f"{got}" == "64"
    assert "tokens_copied=44" in repr(got) and "tokens_by_tier=(64, 0, 0, 0)" in repr(hit)
    for value in (got, hit):
        copy = pickle.loads(pickle.dumps(value))
        assert type(copy) is type(value) and copy == value and copy.as_dict() == value.as_dict()


def test_per_tier_counts_cpu_versus_disk(make_rig, tmp_path):
    config = {"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "local_disk": str(tmp_path),
              "max_local_disk_size": 0.05}
    rig = make_rig(config)
    tokens, slots = rig.tokens(64), rig.slots(64)
    assert rig.engine.store(tokens, slots) == 64
    rig.engine.flush(30)
    in_cpu = rig.engine.lookup(tokens)
    assert in_cpu == 64 and in_cpu.tokens_by_tier == (64, 0, 0, 0)
    rig.engine.clear()  # the CPU tier forgets; the disk keeps its records
    on_disk = rig.engine.lookup(tokens)
    assert on_disk == 64 and on_disk.tokens_by_tier == (0, 64, 0, 0)
    got = rig.engine.retrieve(tokens, rig.slots(64))
    assert got == 64 and got.chunks_by_tier == (0, 4, 0, 0), got
    back_in_cpu = rig.engine.lookup(tokens)
    assert back_in_cpu.tokens_by_tier == (64, 0, 0, 0), "a retrieve promotes into the CPU tier"
    # Half in each tier: drop the CPU tier, prefetch the head only, look up the whole.
    rig.engine.clear()
    with rig.engine.prefetch(tokens[:32]) as job:
        fetched = job.wait(30)
    assert fetched == 32 and fetched.chunks_by_tier == (0, 2, 0, 0)
    mixed = rig.engine.lookup(tokens)
    assert mixed == 64 and mixed.tokens_by_tier == (32, 32, 0, 0)
    got = rig.engine.retrieve(tokens, rig.slots(64))
    assert got.chunks_by_tier == (2, 2, 0, 0)


def test_tokens_in_a_token_buffer_are_not_converted_again(make_rig, monkeypatch):
    rig = make_rig()
    tokens = lmcache_native.as_int32_buffer(rig.tokens(32).tolist())
    calls = []
    original = TokenBuffer.from_values.__func__
    monkeypatch.setattr(TokenBuffer, "from_values", classmethod(lambda cls, v: calls.append(v) or original(cls, v)))
    rig.engine.store(tokens, rig.slots(32))
    rig.engine.lookup(tokens)
    rig.engine.retrieve(tokens, block_ids=[0, 1], block_size=BLOCK)
    with rig.engine.prefetch(tokens) as job:
        job.wait()
    assert calls == []


# -- config_schema ---------------------------------------------------------------------------------
def test_config_schema_lists_the_engine_keys():
    schema = config_schema()
    assert isinstance(schema, list) and all(isinstance(entry, dict) for entry in schema)
    by_name = {entry["name"]: entry for entry in schema}
    assert len(by_name) == len(schema), "a key is listed twice"
    assert by_name["chunk_size"]["default"] == 256 and by_name["chunk_size"]["type"] == "integer"
    for name in ("local_cpu", "max_local_cpu_size", "save_unfull_chunk", "pre_caching_hash_algorithm"):
        assert name in by_name
    for entry in schema:
        assert {"name", "type", "default", "nullable", "description"} <= set(entry), entry
        assert entry["type"] in ("integer", "number", "boolean", "string", "object"), entry
    for connector_only in ("save_decode_cache", "min_retrieve_tokens", "enable_async_loading", "lookup_timeout_ms",
                           "priority_limit"):
        assert connector_only not in by_name


@pytest.mark.parametrize("key, value", [("save_decode_cache", True), ("min_retrieve_tokens", 0),
                                        ("enable_async_loading", False), ("lookup_timeout_ms", 100),
                                        ("priority_limit", 1)])
def test_connector_only_keys_are_refused_by_the_engine(key, value):
    with pytest.raises(LmcInvalidArgument) as caught:
        Engine({key: value})
    assert key in caught.value.message


def test_config_schema_defaults_are_what_an_engine_resolves():
    with Engine() as engine:
        resolved = engine.config()
    for entry in config_schema():
        if entry["name"] in resolved:
            assert resolved[entry["name"]] == entry["default"], entry["name"]


def test_config_schema_is_cached_and_returns_copies():
    first = config_schema()
    first.append({"name": "mutated"})
    assert {"name": "mutated"} not in config_schema()
    assert lmcache_native.config_schema is config_schema
