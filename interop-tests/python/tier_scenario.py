"""Deterministic KV sources and requests for the storage-tier tests, shared by parent and child processes.

Everything derives from integer seeds, so a child process can store a request and exit, and the
parent recomputes the very same source KV (plain torch, ``kv_oracle``) to know what a retrieve must
write, without trusting anything the child or the engine reports. The parent retrieves into another
layout (and another block size) than the child stored from: chunks are layout-free.

Geometry (unless a test passes its own): 2 layers, 2 KV heads, head size 64, bfloat16, i.e. 1 KiB of
KV per token and 16 KiB per 16-token chunk.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import kv_oracle

LAYERS, HEADS, HEAD_SIZE, DTYPE = 2, 2, 64, torch.bfloat16
SOURCE_CASE, SOURCE_BLOCKS, SOURCE_BLOCK_SIZE = "flash_attn_nhd", 96, 16
CHUNK = 16


class Geometry:
    """Layer count, heads, head size and dtype: what the key namespace is made of (with the model)."""

    def __init__(self, layers=LAYERS, heads=HEADS, head_size=HEAD_SIZE, dtype=DTYPE):
        self.layers, self.heads, self.head_size, self.dtype = layers, heads, head_size, dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.heads * self.head_size * torch.empty(0, dtype=self.dtype).element_size()

    def as_dict(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "head_size": self.head_size,
                "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_dict(cls, values: dict) -> "Geometry":
        return cls(values["layers"], values["heads"], values["head_size"], getattr(torch, values["dtype"]))


def source_layers(seed: int, geometry: Geometry = Geometry(), case_name: str = SOURCE_CASE,
                  num_blocks: int = SOURCE_BLOCKS, block_size: int = SOURCE_BLOCK_SIZE) -> list[kv_oracle.KvLayer]:
    """Random-bit KV layers (NaN payloads included) that depend only on the seed and the geometry."""
    generator = torch.Generator().manual_seed(seed)
    case = kv_oracle.ALL_CASES[case_name]
    return [kv_oracle.allocate_layer(case, num_blocks, block_size, geometry.heads, geometry.head_size,
                                     geometry.dtype, "random", generator)
            for _ in range(geometry.layers)]


def request(seed: int, index: int, num_tokens: int, num_blocks: int = SOURCE_BLOCKS,
            block_size: int = SOURCE_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and source slots of request ``index`` of ``seed``."""
    generator = torch.Generator().manual_seed(seed * 100003 + index)
    tokens = torch.randint(0, 120000, (num_tokens,), dtype=torch.int32, generator=generator)
    slots = kv_oracle.random_slot_mapping(num_tokens, num_blocks, block_size, generator)
    return tokens, slots


def expected_values(layers: list[kv_oracle.KvLayer], slots: torch.Tensor,
                    block_size: int = SOURCE_BLOCK_SIZE) -> list[torch.Tensor]:
    """Per layer [T, kv, H, D] of the source at ``slots``: what a retrieve must write, token by token."""
    return [kv_oracle.read_tokens(layer, slots, block_size) for layer in layers]


class Destination:
    """Sentinel-filled KV layers in another layout to retrieve into, plus the guard check: after a
    retrieve of ``hit`` tokens, exactly the slots of tokens [first, hit) that are not -1 hold the
    expected values and every other byte still holds the sentinel."""

    def __init__(self, geometry: Geometry = Geometry(), case_name: str = "blocks_first_hnd",
                 num_blocks: int = 160, block_size: int = 8):
        self.case = kv_oracle.ALL_CASES[case_name]
        self.num_blocks, self.block_size, self.geometry = num_blocks, block_size, geometry
        self.layers = [self._sentinel_layer() for _ in range(geometry.layers)]
        self.generator = torch.Generator().manual_seed(4242)

    def _sentinel_layer(self) -> kv_oracle.KvLayer:
        return kv_oracle.allocate_layer(self.case, self.num_blocks, self.block_size, self.geometry.heads,
                                        self.geometry.head_size, self.geometry.dtype, "sentinel")

    def register(self, engine) -> None:
        engine.register_layers([layer.logical for layer in self.layers], layout=self.case.lmc_layout)

    def slots(self, num_tokens: int, unmapped_fraction: float = 0.0) -> torch.Tensor:
        return kv_oracle.random_slot_mapping(num_tokens, self.num_blocks, self.block_size, self.generator,
                                             unmapped_fraction)

    def reset(self) -> None:
        for layer in self.layers:
            kv_oracle.bits(layer.physical).fill_(kv_oracle.SENTINEL_BITS[layer.element_size])

    def mismatch(self, values: list[torch.Tensor], slots: torch.Tensor, hit: int, first: int = 0) -> str | None:
        """None when the destination is exactly sentinel + ``values`` at the mapped slots of tokens
        [first, hit); otherwise a description of the first difference."""
        positions = torch.arange(len(slots))
        written = (positions >= first) & (positions < hit) & (slots != -1)
        for index, (layer, layer_values) in enumerate(zip(self.layers, values)):
            expected = self._sentinel_layer()
            if written.any():
                kv_oracle.write_tokens(expected, slots[written], self.block_size, layer_values[written])
            if not kv_oracle.bit_equal(layer.physical, expected.physical):
                differing = (kv_oracle.bits(layer.physical) != kv_oracle.bits(expected.physical)).sum().item()
                return f"layer {index}: {differing} elements differ from the oracle (hit {hit}, first {first})"
        return None


def wait_for_remote(engine, timeout: float = 30.0) -> float:
    """Waits until the engine's Redis tier is connected; returns the seconds waited. The bound is
    generous because a Sentinel or cluster handshake on a loaded 2-core machine can take seconds.

    Workaround, see test_tiers.py::test_fresh_engine_waits_for_its_first_connection: the tier
    connects in the background and, until it is connected, every lookup is a miss and every write is
    skipped (counted as an error), even with a healthy server. A lookup of a chunk nobody stores
    counts an error exactly while the tier is not connected. Needs registered layers.
    """
    started = time.monotonic()
    probe = torch.arange(CHUNK, dtype=torch.int32) + 2_000_000_000
    while True:
        remote = [t for t in engine.tier_stats() if t["name"] == "RemoteBackend"][0]
        engine.lookup(probe, extra_key=b"lmcn connection probe")
        after = [t for t in engine.tier_stats() if t["name"] == "RemoteBackend"][0]
        if after["errors"] == remote["errors"]:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the Redis tier did not connect within {timeout} s: {after}")
        time.sleep(0.01)


def store_requests(config: dict, model_name: str, seed: int, requests: list[tuple[int, int, str]],
                   geometry: Geometry = Geometry(), flush: bool = False, close: bool = True,
                   announce: bool = False, wait_remote: bool = True) -> dict:
    """Stores requests (index, num_tokens, extra key) of ``seed`` from the source layers; returns
    the stored counts and tier counters. ``announce`` prints "storing" first (for a parent that
    kills this process during the write-behind); ``wait_remote`` waits for the Redis connection
    before storing (see ``wait_for_remote``)."""
    from lmcache_native import Engine

    layers = source_layers(seed, geometry)
    engine = Engine(config, model_name=model_name)
    engine.register_layers([layer.logical for layer in layers], layout="flash_attn")
    if wait_remote and config.get("remote_url"):
        wait_for_remote(engine)
    if announce:
        print("storing", flush=True)
    stored = []
    for index, num_tokens, extra_key in requests:
        tokens, slots = request(seed, index, num_tokens)
        stored.append(engine.store(tokens, slots, extra_key=extra_key.encode()))
    if flush:
        engine.flush(60)
    result = {"stored": stored, "tiers": engine.tier_stats(), "stats": engine.stats()}
    if close:
        engine.close()  # destroying the engine finishes the queued writes
    return result


def main() -> None:
    """``python tier_scenario.py '<json>'``: runs ``store_requests`` with the JSON's arguments and
    prints its result as the last stdout line."""
    args = json.loads(sys.argv[1])
    geometry = Geometry.from_dict(args.pop("geometry")) if "geometry" in args else Geometry()
    args["requests"] = [tuple(r) for r in args["requests"]]
    result = store_requests(geometry=geometry, **args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
