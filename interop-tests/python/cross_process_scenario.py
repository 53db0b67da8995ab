"""A fixed scenario whose every observable result is recorded, for comparing separate processes.

``run_scenario`` stores several requests (with and without extra keys, into a pool small enough to
evict), looks up prefixes, retrieves into a sentinel-filled cache, and returns hit lengths, stored
counts, the engine's statistics and a SHA-256 of the destination bytes. Inputs depend only on the
seed, so two processes must return identical dicts.
"""

from __future__ import annotations

import hashlib

import torch

import kv_oracle
from lmcache_native import Engine


def run_scenario(seed: int, hash_algorithm: str) -> dict:
    generator = torch.Generator().manual_seed(seed)
    case = kv_oracle.GQA_CASES["flash_attn_hnd"]
    num_blocks, block_size, heads, head_size = 96, 16, 2, 64

    def layer(fill):
        return kv_oracle.allocate_layer(case, num_blocks, block_size, heads, head_size, torch.bfloat16, fill, generator)

    source, destination = [layer("random") for _ in range(2)], [layer("sentinel") for _ in range(2)]
    # 2 layers x K/V x 2 heads x 64 x 2 bytes = 1 KiB per token, 16 KiB per chunk; 0.0002 GB holds 13 chunks.
    config = {"chunk_size": 16, "save_unfull_chunk": True, "max_local_cpu_size": 0.0002,
              "pre_caching_hash_algorithm": hash_algorithm}
    requests = [torch.randint(0, 50000, (length,), dtype=torch.int32, generator=generator)
                for length in (100, 75, 130)]
    requests.append(torch.cat((requests[0][:40], requests[2][:50])))  # shares a 2-chunk prefix with 0
    extra_keys = [b"", b"tenant-a", b"", b"tenant-b" * 5]
    result = {"stored": [], "hits": [], "retrieved": []}
    with Engine(config, model_name="cross-process") as engine:
        engine.register_layers([l.logical for l in source], layout=case.lmc_layout)
        for tokens, key in zip(requests, extra_keys):
            slots = kv_oracle.random_slot_mapping(len(tokens), num_blocks, block_size, generator)
            result["stored"].append(engine.store(tokens, slots, extra_key=key))
        for tokens, key in zip(requests, extra_keys):
            for extra in (key, b"other"):
                for length in (len(tokens), 50, 16, 15):
                    result["hits"].append(engine.lookup(tokens[:length], extra_key=extra))
        engine.register_layers([l.logical for l in destination], layout=case.lmc_layout)
        for tokens, key in zip(requests, extra_keys):
            slots = kv_oracle.random_slot_mapping(len(tokens), num_blocks, block_size, generator, 0.1)
            result["retrieved"].append(engine.retrieve(tokens, slots, extra_key=key))
        result["stats"] = engine.stats()
    digest = hashlib.sha256()
    for l in destination:
        digest.update(kv_oracle.bits(l.physical).numpy().tobytes())
    result["destination_sha256"] = digest.hexdigest()
    return result
