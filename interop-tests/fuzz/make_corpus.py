#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_exports.c into interop-tests/fuzz/corpus/ (one file per seed).

    /usr/bin/python3 interop-tests/fuzz/make_corpus.py

Each seed is a small program in the harness's input format: an operation byte (`code % 24` picks the
operation, see LLVMFuzzerTestOneInput) followed by the bytes that operation reads. The encoders below
mirror the reads of fuzz_exports.c one for one; running out of bytes reads zeros, so a seed only
needs the bytes that differ from zero. When fuzz_exports.c changes how an operation reads its
arguments, update the encoder here and rerun (the seeds stay valid inputs either way, only less
meaningful). The fuzzer never writes into this directory: run.sh works on a copy.
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

# operation codes (code % 24)
CREATE, DESTROY, REGISTER, LOOKUP, STORE, RETRIEVE, ROUNDTRIP = 0, 2, 3, 5, 6, 7, 8
PREFETCH, JOB_WAIT, JOB_DESTROY, STORE_ASYNC, RETRIEVE_ASYNC = 10, 11, 12, 13, 14
GET_CONFIG, STATS, TIER_COUNT, TIER_STATS, FLUSH, CLEAR, SERVER_START = 15, 16, 17, 18, 19, 20, 21
REMOTE_LOOKUP, SERVER_STOP, MISC = 22, 22 + 24 * 5, 23  # SERVER_STOP: 22 with bit 7 set (142)

KEYS = ["chunk_size", "local_cpu", "max_local_cpu_size", "save_unfull_chunk", "save_decode_cache",
        "pre_caching_hash_algorithm", "cache_policy", "min_retrieve_tokens", "enable_async_loading",
        "lookup_timeout_ms", "blocking_timeout_secs", "max_local_disk_size", "remote_serde", "priority_limit",
        "extra_config", "local_disk", "remote_url"]

LIVE = b"\x00"  # pick_handle: the first live handle of the expected kind
OTHER_KIND = b"\x09"  # pick_handle: a live handle of the other kind
DEAD_ENGINE = b"\x0a\x00"  # pick_handle: a destroyed engine of this input


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def good(key: str, v: int) -> bytes:
    """json_any_value choosing json_good_value (sel < 128) with byte v."""
    return bytes([KEYS.index(key), 0, v])


def create(*entries: bytes, raw: bytes | None = None, model: int = 6, tail: int = 0) -> bytes:
    """lmc_engine_create with a config object of the given entries (from good()/extreme())."""
    if raw is not None:
        return bytes([CREATE, 2, len(raw)]) + raw + bytes([model, 0, 0])
    out = bytes([CREATE, 6, len(entries)])
    for e in entries:
        out += e
    return out + bytes([tail, model, 0, 0])


def extreme(key: str, index: int) -> bytes:
    """json_any_value choosing k_extreme_values[index] (sel 128..199)."""
    return bytes([KEYS.index(key), 128, index])


def register(elem=1, kv=2, blocks=8, block_size=4, heads=2, head_size=4, layers=2, layout=0, placement=0,
             slack=0, mutation: bytes = b"") -> bytes:
    out = bytes([REGISTER]) + LIVE + bytes([0])  # struct_size 88
    out += bytes([elem, 1 if kv == 2 else 0, blocks - 1, block_size - 1, heads - 1, head_size - 1, layers - 1,
                  layout, placement, slack])
    out += mutation if mutation else bytes(layers)  # no mutation per layer
    return out + bytes([0])  # count = layers


def mut(field: int) -> int:
    """The per-layer mutation byte that sets field `field` (m >= 160, m % 18 == field); it is always
    followed by the value's bytes (any64: one selector byte, or 200+ and 8 raw bytes)."""
    return 162 + field


def tokens(n: int, mode: int = 2, seed: int = 7, slots: bool = True, slot_mode: int = 2) -> bytes:
    out = bytes([100]) + u16(n) + bytes([mode]) + u64(seed)
    if slots:
        out += bytes([slot_mode]) + u64(seed * 3 + 1)
    return out + bytes([0, 0])  # real pointers, num_tokens = n


def roundtrip(n: int, seed: int = 11, key: bytes = b"", first: int = 0) -> bytes:
    out = bytes([ROUNDTRIP]) + LIVE + u16(n - 1) + bytes([2]) + u64(seed) + u64(seed * 5 + 3)
    out += bytes([132 + len(key)]) + key if key else bytes([0])  # 132 % 33 == 0
    return out + (bytes([192]) + u16(first) if first else bytes([0]))


def store(n: int, seed: int = 7, skip: int = 0) -> bytes:
    return bytes([STORE]) + LIVE + tokens(n, seed=seed) + bytes([0, skip]) + bytes([0])


def retrieve(n: int, seed: int = 7, first: int = 0) -> bytes:
    return bytes([RETRIEVE]) + LIVE + tokens(n, seed=seed) + bytes([0, first]) + bytes([0])


def lookup(n: int, seed: int = 7) -> bytes:
    return bytes([LOOKUP]) + LIVE + tokens(n, seed=seed, slots=False) + bytes([0])


SMALL = [good("chunk_size", 4), good("max_local_cpu_size", 3)]  # chunk_size 8, 0.01 GB

SEEDS: dict[str, bytes] = {
    "roundtrip_nhd": create(*SMALL) + register() + roundtrip(40) + bytes([STATS]) + LIVE + bytes([0, 0]),
    "roundtrip_hnd_fp32": create(*SMALL) + register(elem=2, layout=1, heads=3) + roundtrip(33, key=b"salt", first=9),
    "roundtrip_blocks_first": create(*SMALL, good("save_unfull_chunk", 0)) + register(layout=2, layers=3) + roundtrip(29),
    "roundtrip_packed_fp8": create(*SMALL) + register(elem=0, layout=3) + roundtrip(24),
    "roundtrip_mla": create(*SMALL) + register(kv=1, layout=4, heads=1, head_size=16) + roundtrip(17),
    "roundtrip_shared_layers": create(*SMALL) + register(placement=1, layers=4) + roundtrip(32),
    "roundtrip_interleaved": create(*SMALL) + register(placement=2, layers=3) + roundtrip(32),
    "roundtrip_xxh3": create(*SMALL, good("pre_caching_hash_algorithm", 1)) + register() + roundtrip(64),
    "store_retrieve_lookup": create(*SMALL) + register() + store(40) + lookup(40) + retrieve(40, first=8),
    "async_jobs": create(*SMALL) + register()
    + bytes([STORE_ASYNC]) + LIVE + tokens(32) + bytes([0, 0, 0, 0])
    + bytes([RETRIEVE_ASYNC]) + LIVE + tokens(32) + bytes([0, 0, 0])
    + bytes([JOB_WAIT]) + LIVE + bytes([0]) + bytes([JOB_DESTROY]) + LIVE
    + bytes([JOB_WAIT]) + LIVE + bytes([2]),
    "prefetch_wrong_kinds": create(*SMALL) + register() + store(16)
    + bytes([PREFETCH]) + LIVE + tokens(16, slots=False) + bytes([0, 0])
    + bytes([MISC, 3]) + LIVE + LIVE  # job to engine functions, engine to job functions
    + bytes([JOB_WAIT]) + OTHER_KIND + bytes([0])
    + bytes([DESTROY]) + OTHER_KIND + bytes([STATS]) + LIVE + bytes([0, 0]),
    "destroyed_engine": create(*SMALL) + bytes([DESTROY]) + LIVE + bytes([STATS]) + DEAD_ENGINE + bytes([0, 0])
    + create() + bytes([CLEAR]) + DEAD_ENGINE + bytes([FLUSH]) + LIVE + bytes([1]),
    "config_and_stats": create(*SMALL, good("priority_limit", 3), good("extra_config", 0))
    + bytes([GET_CONFIG]) + LIVE + bytes([64]) + bytes([GET_CONFIG]) + LIVE + bytes([130]) + u16(20)
    + bytes([TIER_COUNT]) + LIVE + bytes([0]) + bytes([TIER_STATS]) + LIVE + bytes([0, 1, 0, 0]),
    "disk_tier": create(*SMALL, good("local_disk", 0), good("max_local_disk_size", 1)) + register() + store(32)
    + bytes([FLUSH]) + LIVE + bytes([0]) + bytes([CLEAR]) + LIVE
    + bytes([PREFETCH]) + LIVE + tokens(32, slots=False) + bytes([0, 0])
    + bytes([JOB_WAIT]) + LIVE + bytes([0]) + retrieve(32)
    + bytes([TIER_STATS]) + LIVE + bytes([0, 1, 0, 0]),
    "remote_tier_down": create(*SMALL, good("remote_url", 0), good("blocking_timeout_secs", 1)) + register()
    + store(16) + lookup(16) + bytes([TIER_STATS]) + LIVE + bytes([0, 1, 0, 0]),
    "lookup_server": create(*SMALL) + register() + store(24)
    + bytes([SERVER_START]) + LIVE + bytes([0])
    + bytes([REMOTE_LOOKUP]) + bytes([0]) + tokens(24, slots=False) + bytes([0, 50, 0])
    + bytes([SERVER_START]) + LIVE + bytes([0])
    + bytes([REMOTE_LOOKUP]) + bytes([1]) + tokens(24, slots=False) + bytes([0, 0, 0])
    + bytes([SERVER_STOP]) + LIVE,
    "two_engines": create(*SMALL) + create(good("chunk_size", 5), good("max_local_cpu_size", 2)) + register()
    + bytes([REGISTER]) + bytes([16]) + bytes([0, 1, 1, 7, 3, 1, 3, 0, 0, 0, 0, 0, 0])
    + roundtrip(16) + bytes([DESTROY]) + bytes([16]) + roundtrip(16),
    "extreme_config": create(extreme("max_local_cpu_size", 8)) + create(extreme("chunk_size", 19))
    + create(extreme("lookup_timeout_ms", 27)) + create(extreme("extra_config", 66)),
    "raw_config": create(raw=b'{"chunk_size": 16, "local_cpu": true}')
    + create(raw=b'{"chunk_size": 1e400}') + create(raw=b"[[[[[[[[[[[[[[[[[[["),
    "nested_config": bytes([CREATE, 3]) + u16(3000) + bytes([0, 6, 0, 0]),
    "register_mutations": create(*SMALL)
    + register(mutation=bytes([mut(6), 2, 0]))  # kv_stride = -1 (k_interesting64[2]) on layer 0
    + register(mutation=bytes([mut(13), 0, 0]))  # misaligned base (every mutation reads a value)
    + register(mutation=bytes([mut(17), 200]) + u64(96) + bytes([0]))  # struct_size 96 on layer 0
    + register(),
    "misc_status_versions": bytes([MISC, 0, 0, 5]) + bytes([MISC, 1]) + bytes([MISC, 2, 0])
    + bytes([MISC, 0, 250]) + struct.pack("<i", -2147483648),
    "timeouts_and_handles": create(*SMALL) + bytes([FLUSH]) + LIVE + bytes([1])
    + bytes([JOB_WAIT]) + bytes([14, 5]) + bytes([99]) + bytes([STATS, 13, 16, 0, 0]),
    # Regression seeds: each one reached LMC_E_INTERNAL once (one defect per seed, so each is its own
    # check in run.sh). k_interesting64[30] = 3e14, [31] = 1e15.
    "regress_flush_timeout_3e14": create(*SMALL) + bytes([FLUSH]) + LIVE + bytes([200, 30]),
    "regress_remote_lookup_timeout_1e15": bytes([REMOTE_LOOKUP, 0]) + tokens(8, slots=False) + bytes([0, 200, 31, 0]),
    "regress_lone_surrogate_key": create(raw=b'{"\\ud800": 1}'),
    "regress_lone_surrogate_value": create(raw=b'{"cache_policy": "\\udfff"}'),
    "regress_remote_ttl_1e300": create(*SMALL, good("remote_url", 0), good("blocking_timeout_secs", 1),
                                       bytes([KEYS.index("extra_config"), 0, 2, 8])),  # {"remote_ttl_secs": 1e300}
    # The process's very first call into the library is lmc_engine_get_tier_stats (run.sh runs every
    # seed in a process of its own): it died in RhFailFast (SIGABRT) before the runtime was set up.
    "regress_tier_stats_as_first_call": bytes([TIER_STATS, 12, 0, 1, 0, 0]),  # NULL handle, tier 0
    "regress_extra_key_0x7FFFFFC7": create(*SMALL) + register() + bytes([LOOKUP]) + LIVE + tokens(8, slots=False)
    + bytes([112, 0]),  # extra key: 0x7FFFFFC7 bytes of read-only zero pages
}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.iterdir():
        if old.is_file():
            old.unlink()
    for name, data in SEEDS.items():
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds into {CORPUS}")


if __name__ == "__main__":
    main()
