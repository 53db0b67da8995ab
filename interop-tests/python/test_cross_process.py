"""Across processes.

The header promises seed-free keys, identical across processes and restarts. Two checks:

1. ``test_persistent_tier_is_shared_across_processes``: a child process stores into a local_disk
   tier and exits; the parent, a fresh engine on the same directory, must hit the very same tokens
   (and retrieve them bit-exact into another layout) with sha256 and with xxh3_128 chunk hashing, and
   miss with another extra key, another hash algorithm or another model. A hit is only possible if
   the parent computed the same key bytes as the child: this is the real cross-process key check.
2. ``test_same_inputs_give_identical_results_in_separate_processes``: the same scenario (stores with
   and without extra keys, evictions, partial hits, retrieves) run in this process and in two child
   processes with different PYTHONHASHSEED values must give identical hit lengths, stored counts,
   statistics and destination bytes. This proves the engine's behaviour carries no per-process state
   (random seeds, address-dependent ordering).

test_tiers.py does the same through Redis, and across writers killed mid-write.
"""

from __future__ import annotations

import json
import re

import pytest

import tier_scenario
from conftest import run_child_json
from cross_process_scenario import run_scenario
from lmcache_native import Engine


@pytest.mark.parametrize("hash_algorithm", ["sha256", "xxh3_128"])
def test_same_inputs_give_identical_results_in_separate_processes(hash_algorithm):
    here = json.loads(json.dumps(run_scenario(7, hash_algorithm)))
    assert here["stats"]["evicted_chunks"] > 0, "the scenario is meant to exercise eviction"
    assert any(here["hits"]) and 0 in here["hits"]
    code = f"import json; from cross_process_scenario import run_scenario; " \
           f"print(json.dumps(run_scenario(7, {hash_algorithm!r})))"
    for hash_seed in ("1", "12345"):
        child = run_child_json(code, env={"PYTHONHASHSEED": hash_seed})
        assert child == here


@pytest.mark.parametrize("hash_algorithm", ["sha256", "xxh3_128"])
def test_persistent_tier_is_shared_across_processes(tmp_path, hash_algorithm):
    config = {"chunk_size": 16, "max_local_cpu_size": 0.05, "local_disk": f"file://{tmp_path}/",
              "max_local_disk_size": 0.05, "pre_caching_hash_algorithm": hash_algorithm}
    requests = [(0, 150, ""), (1, 64, "salt")]
    # The child stores and exits without flushing: destroying its engine finishes the disk writes.
    child = run_child_json(f"""
        import json, tier_scenario
        print(json.dumps(tier_scenario.store_requests({config!r}, "cross-process-disk", 21, {requests!r})))
    """)
    assert child["stored"] == [144, 64]

    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lmcache-native"))
    assert len(names) == 9 + 4 and all(re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{64}\.lmcc", n) for n in names), names
    assert len({name[:16] for name in names}) == 1, "one namespace prefix"
    chunk_bytes = 16 * tier_scenario.Geometry().bytes_per_token
    for name in names:
        record = (tmp_path / name).read_bytes()
        assert len(record) == 128 + chunk_bytes and record[:8] == b"LMCNREC1"

    source_layers = tier_scenario.source_layers(21)
    destination = tier_scenario.Destination(case_name="packed", num_blocks=40, block_size=8)
    tokens0, source_slots0 = tier_scenario.request(21, 0, 150)
    tokens1, source_slots1 = tier_scenario.request(21, 1, 64)
    with Engine(config, model_name="cross-process-disk") as engine:
        destination.register(engine)
        assert engine.lookup(tokens0) == 144
        assert engine.lookup(tokens0, extra_key=b"salt") == 0
        assert engine.lookup(tokens1, extra_key=b"salt") == 64
        assert engine.lookup(tokens1) == 0
        assert engine.lookup(tokens1, extra_key=b"salt!") == 0
        for tokens, source_slots, key, hit in ((tokens0, source_slots0, b"", 144), (tokens1, source_slots1, b"salt", 64)):
            destination.reset()
            slots = destination.slots(len(tokens), unmapped_fraction=0.1)
            assert engine.retrieve(tokens, slots, extra_key=key) == hit
            problem = destination.mismatch(tier_scenario.expected_values(source_layers, source_slots), slots, hit)
            assert problem is None, problem
        disk = [t for t in engine.tier_stats() if t["name"] == "LocalDiskBackend"][0]
        assert (disk["hits"], disk["corrupt_records"]) == (13, 0)

        # Same directory, other namespaces: never a hit (read-only engines, the first one owns it).
        other_hash = "xxh3_128" if hash_algorithm == "sha256" else "sha256"
        for other_config, model in (({**config, "pre_caching_hash_algorithm": other_hash}, "cross-process-disk"),
                                    (config, "another-model")):
            with Engine(other_config, model_name=model) as other:
                destination.register(other)
                assert other.lookup(tokens0) == 0 and other.lookup(tokens1, extra_key=b"salt") == 0
