"""The Pythonic Engine wrapper: construction forms, registration forms, lifetimes."""

from __future__ import annotations

import json

import pytest
import torch

import lmcache_native
from conftest import run_child_json
from lmcache_native import Engine, LmcInvalidHandle


def test_config_as_json_text_equals_config_as_dict():
    as_dict = {"chunk_size": 64, "save_unfull_chunk": True}
    with Engine(as_dict) as from_dict, Engine(json.dumps(as_dict)) as from_text:
        assert from_dict.config() == from_text.config()
        assert from_dict.config()["chunk_size"] == 64


def test_config_of_another_type_is_a_type_error():
    with pytest.raises(TypeError):
        Engine(["chunk_size", 16])


def test_model_name_and_ranks_are_accepted():
    with Engine({"chunk_size": 16}, model_name="meta-llama/Llama-3.1-8B ü", world_size=4, worker_id=3) as engine:
        assert engine.stats()["cached_chunks"] == 0


def test_register_a_vllm_style_dict_with_inferred_layout():
    kv_caches = {f"model.layers.{i}.self_attn.attn": torch.randn(2, 8, 16, 2, 8) for i in range(3)}
    kv_caches["model.layers.3.self_attn.attn"] = kv_caches["model.layers.1.self_attn.attn"]  # KV sharing
    tokens, slots = torch.arange(64, dtype=torch.int32), torch.arange(64)
    with Engine({"chunk_size": 16}) as engine:
        engine.register_layers(kv_caches)
        assert engine.bytes_per_token == 4 * 2 * 2 * 8 * 4
        assert engine.store(tokens, slots) == 64
        assert engine.stats()["stored_bytes"] == 64 * engine.bytes_per_token
        originals = {name: tensor.clone() for name, tensor in kv_caches.items()}
        for tensor in kv_caches.values():
            tensor.zero_()
        assert engine.retrieve(tokens, slots) == 64
    for name, tensor in kv_caches.items():
        assert torch.equal(tensor[:, :4], originals[name][:, :4]), name  # blocks 0-3 hold tokens 0-63


def test_repr_and_closed_state():
    engine = Engine()
    assert "closed" not in repr(engine) and not engine.closed
    engine.close()
    assert "closed" in repr(engine) and engine.closed
    with pytest.raises(LmcInvalidHandle):
        engine.handle


LIFETIME_SCRIPT = r"""
import gc, json, ctypes
import torch
from lmcache_native import Engine, _bindings as b

# An engine dropped without close() is destroyed by the garbage collector.
engine = Engine({"chunk_size": 16})
handle = engine.handle
del engine
gc.collect()
stats = b.LmcStats()
status_after_gc = b.lmc_engine_get_stats(handle, ctypes.byref(stats))

# An engine still open at interpreter exit, with registered layers, must not crash the exit.
kv = torch.zeros(2, 4, 16, 2, 8)
leaked = Engine({"chunk_size": 16})
leaked.register_layers([kv])
leaked.store(list(range(16)), list(range(16)))
print(json.dumps({"status_after_gc": status_after_gc}))
"""


def test_engine_lifetime_without_close():
    report = run_child_json(LIFETIME_SCRIPT)
    assert report["status_after_gc"] == lmcache_native._bindings.LMC_E_INVALID_HANDLE
