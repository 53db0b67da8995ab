#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_exports.c into interop-tests/fuzz/corpus/ (one file per seed).

    /usr/bin/python3 interop-tests/fuzz/make_corpus.py

Each seed is a small program in the harness's input format: an operation byte (`code % 28` picks the
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

# operation codes (code % 28, N_OPS in fuzz_exports.c)
CREATE, DESTROY, REGISTER, LOOKUP, STORE, RETRIEVE, ROUNDTRIP = 0, 2, 3, 5, 6, 7, 8
PREFETCH, JOB_WAIT, JOB_DESTROY, STORE_JOB, RETRIEVE_JOB = 10, 11, 12, 13, 14
GET_CONFIG, STATS, TIER_COUNT, TIER_STATS, FLUSH, CLEAR, SERVER_START = 15, 16, 17, 18, 19, 20, 21
GET_METRICS = 15 + 5 * 28  # 155: operation 15 with the high bit set
GET_TIER_NODES = 18 + 4 * 28  # 130: operation 18 with the high bit set
REMOTE_LOOKUP, SERVER_STOP, MISC = 22, 22 + 28 * 4, 23  # SERVER_STOP: 22 with bit 7 set (134)
JOB_POLL, JOB_RESULT, SCHEMA, TWIN = 24, 25, 26, 27
POLL_EVENTS = 20 + 28 * 4  # CLEAR with bit 7 set (132)

KEYS = ["chunk_size", "local_cpu", "max_local_cpu_size", "save_unfull_chunk", "save_decode_cache",
        "pre_caching_hash_algorithm", "cache_policy", "min_retrieve_tokens", "enable_async_loading",
        "lookup_timeout_ms", "blocking_timeout_secs", "max_local_disk_size", "remote_serde", "priority_limit",
        "extra_config", "local_disk", "remote_url", "gds_path", "use_layerwise", "enable_blending", "enable_pd",
        "enable_p2p", "enable_controller", "local_cpu_use_hugepages", "enable_lazy_memory_allocator",
        "use_gpu_connector_v3", "enable_kv_events", "kv_events_queue_size"]

LIVE = b"\x00"  # pick_handle: the first live handle of the expected kind
OTHER_KIND = b"\x09"  # pick_handle: a live handle of the other kind
DEAD_ENGINE = b"\x0a\x00"  # pick_handle: a destroyed engine of this input
DEAD_JOB = b"\x0b\x00"  # pick_handle: a destroyed job of this input
NULL_HANDLE = b"\x0c"  # pick_handle: NULL

# k_interesting32 indexes (any32 with a selector byte < 200)
I32 = {0: 0, 1: 1, -1: 2, 2: 3, 3: 4, 4: 5, 7: 6, 8: 7, 16: 8, 64: 9, 255: 10, 256: 11, 4096: 12, 65535: 13,
       65536: 14, 2**31 - 1: 15, 2**31 - 2: 16, -2**31: 17, -2**31 + 1: 18, -2: 19}
# k_interesting64 indexes used below
I64_1, I64_MINUS1, I64_4097 = 1, 2, 16


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
             slack=0, mutation: bytes = b"", handle: bytes = LIVE) -> bytes:
    out = bytes([REGISTER]) + handle + bytes([0])  # struct_size 88
    out += bytes([elem, 1 if kv == 2 else 0, blocks - 1, block_size - 1, heads - 1, head_size - 1, layers - 1,
                  layout, placement, slack])
    out += mutation if mutation else bytes(layers)  # no mutation per layer
    return out + bytes([0])  # count = layers


def mut(field: int) -> int:
    """The per-layer mutation byte that sets field `field` (m >= 160, m % 18 == field); it is always
    followed by the value's bytes (any64: one selector byte, or 200+ and 8 raw bytes)."""
    return 162 + field


def tokens(n: int, mode: int = 2, seed: int = 7) -> bytes:
    """pick_tokens without slots (lmc_remote_lookup): count, fill, real pointer, num_tokens = n."""
    return bytes([100]) + u16(n) + bytes([mode]) + u64(seed) + bytes([0, 0])


def request(n: int, op: str = "store", kind: str = "slots", first: int = 0, key: bytes = b"", tbs: int | None = None,
            block_mode: int = 0, nids: str = "needed", fewer: int = 0, struct_size: int | None = None,
            reserved: int | None = None, stream: bool = False, null: bool = False, seed: int = 7, slot_mode: int = 2,
            extra: bytes | None = None, np: int = 0, bad_kind: int | None = None) -> bytes:
    """pick_request: tokens, destination, block table, lengths, first_token, extra key, reserved, stream,
    struct_size, tail bytes, NULL. tbs None = the layers' block size; 1..64; 0 or negative via any32."""
    out = bytes([100]) + u16(n) + bytes([2]) + u64(seed)
    if bad_kind is not None:
        out += bytes([224, I32[bad_kind]])
    else:
        out += bytes([0 if kind == "slots" else 112])
    out += bytes([slot_mode]) + u64(seed * 3 + 1)
    if tbs is None:
        out += bytes([0])
    elif 1 <= tbs <= 64:
        out += bytes([160, tbs - 1])
    else:
        out += bytes([215, I32[tbs]])
    out += bytes([block_mode]) + u64(seed * 5 + 2)
    out += bytes([np, 0])  # pointers; num_tokens = n
    out += {"needed": bytes([0]), "fewer": bytes([150]) + u16(fewer), "more": bytes([180]), "zero": bytes([210])}[nids]
    if op in ("lookup", "prefetch"):
        out += bytes([0]) if first == 0 else bytes([224, I64_1 if first == 1 else I64_4097])
    else:
        out += bytes([0, first])  # first % 64
    if extra is not None:
        out += extra
    elif key:
        out += bytes([150, len(key)]) + key + bytes([0])
    else:
        out += bytes([0])
    out += bytes([0]) if reserved is None else bytes([240, I32[reserved]])
    out += bytes([240 if stream else 0])
    sizes = [0, 4, 8, 80, 87, 89, 96, 128, 256, 4096]
    out += bytes([0]) if struct_size is None else bytes([200 + sizes.index(struct_size)])
    out += bytes([192 if struct_size and struct_size > 88 else 0])  # garbage past sizeof(lmc_request)
    return out + bytes([255 if null else 0])


def poll_events(handle: bytes = LIVE, cap: int = 16, stride: int = 0, tokens: int = 255, sel: int | None = None) -> bytes:
    """op_poll_events: capacity cap (sel % 17 when the capacity byte is < 200), stride index into
    its table (0: sizeof(lmc_kv_event), 6: 160), token capacity (< 64 as given, else the whole buffer)."""
    sel = cap if sel is None else sel
    return bytes([POLL_EVENTS]) + handle + bytes([sel, stride, 0, tokens if tokens < 64 else 64])


RESULT = bytes([0, 0])  # result struct of the real size, not NULL
RESULT_SIZES = {0: 240, 4: 241, 7: 242, 8: 243, 16: 244, 40: 245, 48: 246, 56: 247}  # sel % 15 picks


def result(size: int | None = None, null: bool = False) -> bytes:
    return bytes([0 if size is None else RESULT_SIZES[size], 255 if null else 0])


def roundtrip(n: int, seed: int = 11, key: bytes = b"", first: int = 0, mode: int = 0) -> bytes:
    """op_roundtrip; mode bit 0 block table, bit 1 table_block_size 1, bit 2 store job, bit 3 retrieve job."""
    out = bytes([ROUNDTRIP]) + LIVE + u16(n - 1) + bytes([mode, 2]) + u64(seed) + u64(seed * 5 + 3)
    out += bytes([132 + len(key)]) + key if key else bytes([0])  # 132 % 33 == 0
    return out + (bytes([192]) + u16(first) if first else bytes([0]))


def twin(n: int, mode: int = 0, tbs: int | None = None, block_mode: int = 0, fewer: int | None = None,
         store_first: int = 0, retrieve_first: int = 0, key: bytes = b"", seed: int = 5) -> bytes:
    """op_twin: block table vs its slot mapping. mode bit 0/1: block table / slots side as jobs, bit 2: slots first."""
    out = bytes([TWIN]) + LIVE + u16(n - 1) + bytes([mode, 2]) + u64(seed)
    out += bytes([0]) if tbs is None else bytes([160, tbs - 1])
    out += bytes([block_mode]) + u64(seed * 7 + 1)
    out += bytes([0]) if fewer is None else bytes([176]) + u16(fewer)
    out += bytes([192]) + u16(store_first) if store_first else bytes([0])
    out += bytes([192]) + u16(retrieve_first) if retrieve_first else bytes([0])
    return out + bytes([len(key)]) + key + u64(seed * 11 + 3)


def store(n: int, first: int = 0, job: bool = False, **kw) -> bytes:
    return bytes([STORE_JOB if job else STORE]) + LIVE + request(n, "store", first=first, **kw) + RESULT


def retrieve(n: int, first: int = 0, job: bool = False, **kw) -> bytes:
    return bytes([RETRIEVE_JOB if job else RETRIEVE]) + LIVE + request(n, "retrieve", first=first, **kw) + RESULT


def lookup(n: int, res: bytes = RESULT, **kw) -> bytes:
    return bytes([LOOKUP]) + LIVE + request(n, "lookup", **kw) + res


def prefetch(n: int, **kw) -> bytes:
    return bytes([PREFETCH]) + LIVE + request(n, "prefetch", **kw) + bytes([0])


def job_wait(handle: bytes = LIVE, timeout: int = 0, res: bytes = RESULT) -> bytes:
    """timeout byte: < 96 gives sel % 4 - 1 (0: -1, 1: 0, 2: 1, 3: 2)."""
    return bytes([JOB_WAIT]) + handle + bytes([timeout]) + res


SMALL = [good("chunk_size", 4), good("max_local_cpu_size", 3)]  # chunk_size 8, 0.01 GB

SEEDS: dict[str, bytes] = {
    "roundtrip_nhd": create(*SMALL) + register() + roundtrip(40) + bytes([STATS]) + LIVE + bytes([0, 0]),
    "roundtrip_hnd_fp32": create(*SMALL) + register(elem=2, layout=1, heads=3) + roundtrip(33, key=b"salt", first=9),
    "roundtrip_blocks_first": create(*SMALL, good("save_unfull_chunk", 0)) + register(layout=2, layers=3) + roundtrip(29, mode=1),
    "roundtrip_packed_fp8": create(*SMALL) + register(elem=0, layout=3) + roundtrip(24, mode=3),
    "roundtrip_mla": create(*SMALL) + register(kv=1, layout=4, heads=1, head_size=16) + roundtrip(17, mode=4),
    "roundtrip_shared_layers": create(*SMALL) + register(placement=1, layers=4) + roundtrip(32, mode=9),
    "roundtrip_interleaved": create(*SMALL) + register(placement=2, layers=3) + roundtrip(32, mode=12, first=5),
    "roundtrip_xxh3": create(*SMALL, good("pre_caching_hash_algorithm", 1)) + register() + roundtrip(64, mode=1),
    "store_retrieve_lookup": create(*SMALL) + register() + store(40) + lookup(40) + retrieve(40, first=8),
    "block_table_requests": create(*SMALL) + register() + store(32, kind="bt") + lookup(32, kind="bt")
    + retrieve(32, kind="bt", first=3) + store(30, kind="bt", nids="fewer", fewer=3, seed=9)
    + store(20, kind="bt", nids="more", block_mode=2, seed=10) + retrieve(20, kind="bt", tbs=1, seed=10)
    + store(16, kind="bt", tbs=0) + store(16, kind="bt", tbs=-1) + store(16, kind="bt", tbs=2**31 - 1)
    + store(16, kind="bt", block_mode=7) + store(16, kind="bt", block_mode=5) + store(16, kind="bt", nids="zero"),
    "request_edges": create(*SMALL) + register() + store(16, struct_size=0) + store(16, struct_size=87)
    + store(16, struct_size=4096) + retrieve(16, struct_size=96) + store(16, reserved=1) + store(16, bad_kind=2)
    + store(16, bad_kind=-1) + lookup(16, bad_kind=-2) + store(16, stream=True) + store(16, null=True)
    + lookup(16, first=1) + prefetch(16, first=1) + store(8, first=9) + retrieve(16, np=255) + store(16, np=254)
    + store(16, kind="bt", np=253) + lookup(0, np=255),
    "result_sizes": create(*SMALL) + register() + store(16) + lookup(16, res=result(0)) + lookup(16, res=result(4))
    + lookup(16, res=result(8)) + lookup(16, res=result(40)) + lookup(16, res=result(null=True))
    + bytes([STORE]) + LIVE + request(16) + result(8) + bytes([RETRIEVE]) + LIVE + request(16, "retrieve") + result(48)
    + bytes([RETRIEVE]) + LIVE + request(16, "retrieve") + result(null=True)
    + bytes([STORE_JOB]) + LIVE + request(16) + result(null=True) + bytes([STORE_JOB]) + LIVE + request(16) + result(7)
    + job_wait(res=result(16)) + job_wait(res=result(4)) + job_wait(res=result(null=True)),
    "async_jobs": create(*SMALL) + register() + store(32, job=True) + retrieve(32, job=True)
    + bytes([JOB_POLL]) + LIVE + bytes([0]) + bytes([JOB_RESULT]) + LIVE + RESULT
    + job_wait(timeout=0) + bytes([JOB_DESTROY]) + LIVE
    + job_wait(timeout=2) + bytes([JOB_POLL]) + DEAD_JOB + bytes([0]) + bytes([JOB_RESULT]) + DEAD_JOB + RESULT
    + retrieve(32, job=True, kind="bt") + bytes([JOB_POLL, 0, 255]) + bytes([JOB_WAIT, 0, 128, 37]) + RESULT,  # timeout INT64_MIN
    "prefetch_wrong_kinds": create(*SMALL) + register() + store(16)
    + prefetch(16)
    + bytes([MISC, 3]) + LIVE + LIVE  # job to engine functions, engine to job functions
    + job_wait(OTHER_KIND) + bytes([JOB_POLL]) + OTHER_KIND + bytes([0]) + bytes([JOB_RESULT]) + OTHER_KIND + RESULT
    + bytes([DESTROY]) + OTHER_KIND + bytes([STATS]) + LIVE + bytes([0, 0]),
    "destroyed_engine": create(*SMALL) + register() + store(16, job=True) + bytes([DESTROY]) + LIVE
    + bytes([STATS]) + DEAD_ENGINE + bytes([0, 0]) + job_wait(timeout=0) + bytes([JOB_POLL]) + LIVE + bytes([0])
    + create() + bytes([CLEAR]) + DEAD_ENGINE + bytes([FLUSH]) + LIVE + bytes([1])
    + bytes([LOOKUP]) + DEAD_ENGINE + request(8, "lookup") + RESULT,
    "twin_block_table": create(*SMALL) + register() + twin(32) + twin(30, fewer=2, block_mode=2)
    + twin(24, tbs=1, store_first=8, retrieve_first=3) + twin(20, tbs=3, mode=5, block_mode=8),
    "twin_jobs_disk": create(*SMALL, good("local_disk", 0), good("max_local_disk_size", 1)) + register(layout=2)
    + twin(40, mode=3, key=b"k") + twin(17, mode=6, block_mode=3) + twin(33, block_mode=7),
    "config_schema": bytes([SCHEMA, 0]) + bytes([SCHEMA, 2]) + bytes([SCHEMA, 3]) + bytes([SCHEMA, 4])
    + bytes([SCHEMA, 255]) + bytes([SCHEMA, 1, I64_MINUS1]) + bytes([SCHEMA, 7, 0]) + bytes([SCHEMA, 5]) + u16(10),
    "config_and_stats": create(*SMALL, good("priority_limit", 3), good("extra_config", 0))
    + bytes([GET_CONFIG]) + LIVE + bytes([64]) + bytes([GET_CONFIG]) + LIVE + bytes([130]) + u16(20)
    + bytes([TIER_COUNT]) + LIVE + bytes([0]) + bytes([TIER_STATS]) + LIVE + bytes([0, 1, 0, 0]),
    "disk_tier": create(*SMALL, good("local_disk", 0), good("max_local_disk_size", 1)) + register() + store(32)
    + bytes([FLUSH]) + LIVE + bytes([0]) + bytes([CLEAR]) + LIVE
    + prefetch(32) + job_wait(timeout=0) + retrieve(32)
    + bytes([TIER_STATS]) + LIVE + bytes([0, 1, 0, 0]),
    "remote_tier_down": create(*SMALL, good("remote_url", 0), good("blocking_timeout_secs", 1)) + register()
    + store(16) + lookup(16) + bytes([TIER_STATS]) + LIVE + bytes([0, 1, 0, 0]),
    "lookup_server": create(*SMALL) + register() + store(24)
    + bytes([SERVER_START]) + LIVE + bytes([0])
    + bytes([REMOTE_LOOKUP]) + bytes([0]) + tokens(24) + bytes([0, 50, 0])
    + bytes([SERVER_START]) + LIVE + bytes([0])
    + bytes([REMOTE_LOOKUP]) + bytes([1]) + tokens(24) + bytes([0, 0, 0])
    + bytes([SERVER_STOP]) + LIVE,
    "two_engines": create(*SMALL) + create(good("chunk_size", 5), good("max_local_cpu_size", 2)) + register()
    + bytes([REGISTER]) + bytes([16]) + bytes([0, 1, 1, 7, 3, 1, 3, 0, 0, 0, 0, 0, 0])
    + roundtrip(16) + bytes([DESTROY]) + bytes([16]) + roundtrip(16, mode=15),
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
    + bytes([MISC, 0, 250]) + struct.pack("<i", -2147483648) + bytes([MISC, 0, 0, 1]),  # -12: LMC_E_UNKNOWN
    "timeouts_and_handles": create(*SMALL) + bytes([FLUSH]) + LIVE + bytes([1])
    + bytes([JOB_WAIT]) + bytes([14, 5]) + bytes([99]) + RESULT + bytes([STATS, 13, 16, 0, 0])
    + bytes([JOB_POLL, 15]) + u64(0x10010) + bytes([0]),
    # Regression seeds: each one reached LMC_E_INTERNAL or a crash once (one defect per seed, so each
    # is its own check in run.sh). k_interesting64[30] = 3e14, [31] = 1e15.
    "regress_flush_timeout_3e14": create(*SMALL) + bytes([FLUSH]) + LIVE + bytes([200, 30]),
    "regress_remote_lookup_timeout_1e15": bytes([REMOTE_LOOKUP, 0]) + tokens(8) + bytes([0, 200, 31, 0]),
    "regress_lone_surrogate_key": create(raw=b'{"\\ud800": 1}'),
    "regress_lone_surrogate_value": create(raw=b'{"cache_policy": "\\udfff"}'),
    "regress_remote_ttl_1e300": create(*SMALL, good("remote_url", 0), good("blocking_timeout_secs", 1),
                                       bytes([KEYS.index("extra_config"), 0, 2, 8])),  # {"remote_ttl_secs": 1e300}
    # The process's very first call into the library is lmc_engine_get_tier_stats (run.sh runs every
    # seed in a process of its own): it died in RhFailFast (SIGABRT) before the runtime was set up.
    "regress_tier_stats_as_first_call": bytes([TIER_STATS, 12, 0, 1, 0, 0]),  # NULL handle, tier 0
    # The same hazard in v2's exports that fill a struct with a fixed buffer (WriteResult in
    # RequestExports.cs): each the first call of its process.
    "regress_store_as_first_call": bytes([STORE]) + NULL_HANDLE + request(4) + RESULT,
    "regress_lookup_as_first_call": bytes([LOOKUP]) + NULL_HANDLE + request(4, "lookup") + RESULT,
    "regress_job_result_as_first_call": bytes([JOB_RESULT]) + NULL_HANDLE + RESULT,
    # An extra key of 0x7FFFFFC7 bytes (read-only zero pages): refused before it is copied; the
    # request's extra key, and prefetch's (a job copies the request).
    # KV events: stores into a pool of a few chunks (evictions), polls with small arrays, a caller's
    # larger stride, too few token slots, NULLs, a clear, a queue of 2 that overflows.
    "kv_events": create(good("chunk_size", 4), good("max_local_cpu_size", 5), good("enable_kv_events", 1)) + register()
    + store(32) + store(32, seed=9) + poll_events(cap=2) + poll_events(cap=16, stride=6) + poll_events(cap=3, tokens=7)
    + poll_events(sel=0xC0 | 4) + bytes([CLEAR]) + LIVE + poll_events(cap=16) + poll_events(cap=0)
    + bytes([DESTROY]) + LIVE
    + create(*SMALL, good("enable_kv_events", 1), good("kv_events_queue_size", 1)) + register()
    + store(40) + poll_events(cap=16) + poll_events(handle=DEAD_ENGINE, cap=1),
    "regress_poll_events_as_first_call": poll_events(handle=NULL_HANDLE, cap=1),
    "regress_extra_key_0x7FFFFFC7": create(*SMALL) + register() + lookup(8, extra=bytes([112, 0]))
    + prefetch(8, extra=bytes([112, 0])) + store(8, job=True, extra=bytes([112, 0])),
    # lmc_engine_get_tier_nodes (operation 18 with the high bit: 130): tier 0 and tier -1 of a live
    # engine, with a full buffer and a size query.
    "tier_nodes": create(*SMALL) + register() + store(24)
    + bytes([GET_TIER_NODES]) + LIVE + bytes([0, 1, 64]) + bytes([GET_TIER_NODES]) + LIVE + bytes([0, 0, 0]),
    # lmc_engine_get_metrics (operation 15 with the high bit: 155): a full buffer, a size query, a
    # small buffer, then on a destroyed engine.
    "metrics": create(*SMALL) + register() + store(24) + lookup(24)
    + bytes([GET_METRICS]) + LIVE + bytes([64]) + bytes([GET_METRICS]) + LIVE + bytes([0])
    + bytes([GET_METRICS]) + LIVE + bytes([130]) + u16(20) + bytes([2]) + LIVE
    + bytes([GET_METRICS]) + DEAD_ENGINE + bytes([64]),
}


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.iterdir():
        # Regression inputs saved from a fuzzer's crash (regress_* with no entry here) are kept.
        if old.is_file() and not (old.name.startswith("regress_") and old.name not in SEEDS):
            old.unlink()
    for name, data in SEEDS.items():
        (CORPUS / name).write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds into {CORPUS}")


if __name__ == "__main__":
    main()
