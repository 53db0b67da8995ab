"""The binding layer itself: library loading, the ABI gate, versions, struct layouts, and that every
function of the header is bound."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

import lmcache_native
from conftest import HEADER, header_statuses, run_child
from lmcache_native import _bindings as b



def header_prototypes() -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, parameter types), in header order, parsed from the LMC_API declarations."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    prototypes = {}
    for return_type, name, parameters in re.findall(r"LMC_API\s+([^;(]*?)\s*\b(lmc_\w+)\s*\(([^)]*)\)\s*;", text):
        parameters = parameters.strip()
        types = [] if parameters in ("", "void") else [
            " ".join(re.sub(r"\w+$", "", p.strip()).replace("*", " * ").split()) for p in parameters.split(",")]
        prototypes[name] = (" ".join(return_type.replace("*", " * ").split()), types)
    return prototypes


def header_define(name: str) -> int:
    return int(re.search(rf"#define {name} \(?(-?\d+)\)?", HEADER.read_text()).group(1))


# C parameter type -> the ctypes types a binding may declare for it.
SCALAR_TYPES = {"int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64, "uint32_t": ctypes.c_uint32, "lmc_status": ctypes.c_int32}


def _is_pointer_type(ctype) -> bool:
    return ctype in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(ctype, ctypes._Pointer)


def test_every_header_function_is_bound_with_its_prototype():
    prototypes = header_prototypes()
    assert len(prototypes) == 30
    # One table, in header order; the exported-name list is derived from it.
    assert list(prototypes) == list(b.ALL_FUNCTION_NAMES) == list(b.FUNCTION_SIGNATURES)
    expected_restype = {"lmc_status": ctypes.c_int32, "int32_t": ctypes.c_int32, "const char *": ctypes.c_char_p,
                        "void": None}
    for name, (return_type, parameter_types) in prototypes.items():
        function = getattr(b, name)
        assert function.restype is expected_restype[return_type], name
        assert [list(function.argtypes), function.restype] == \
            [list(b.FUNCTION_SIGNATURES[name][0]), b.FUNCTION_SIGNATURES[name][1]], name
        assert len(function.argtypes) == len(parameter_types), name
        for index, (c_type, ctype) in enumerate(zip(parameter_types, function.argtypes)):
            if c_type.endswith("*"):
                assert _is_pointer_type(ctype), f"{name} parameter {index}: {c_type} bound as {ctype}"
            else:
                assert ctype is SCALAR_TYPES[c_type], f"{name} parameter {index}: {c_type} bound as {ctype}"


def test_the_library_exports_exactly_the_bound_functions():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm to list the library's exports")
    from lmcache_native._lib import LIB_PATH

    output = subprocess.run([nm, "-D", "--defined-only", str(LIB_PATH)], capture_output=True, text=True,
                            check=True).stdout
    exported = {line.split()[-1].split("@")[0] for line in output.splitlines() if " T " in line}
    assert {name for name in exported if name.startswith("lmc_")} == set(b.ALL_FUNCTION_NAMES)


def test_statuses_are_read_from_the_library_and_equal_the_header():
    header = header_statuses()
    assert header  # the header defines them
    assert b.STATUS_VALUES == header
    assert b.STATUS_NAMES == {value: name for name, value in header.items()}
    assert sorted(b.STATUS_NAMES) == list(range(-(len(header) - 1), 1)), "0, -1, -2, ... without gaps"
    for name, value in header.items():
        assert getattr(b, name) == value  # module attributes (b.LMC_OK, ...) keep working
        assert b.lmc_status_name(value).decode() == name
        assert b.status_name(value) == name
    past_the_last = min(header.values()) - 1
    assert b.lmc_status_name(past_the_last) == b"LMC_E_UNKNOWN"
    assert b.status_name(past_the_last) == "LMC_E_UNKNOWN"
    with pytest.raises(AttributeError):
        b.LMC_E_NO_SUCH_STATUS


def test_other_constants_match_the_header():
    assert header_define("LMC_ABI_VERSION") == b.ABI_VERSION
    assert header_define("LMC_DEVICE_HOST") == b.LMC_DEVICE_HOST
    assert header_define("LMC_DEVICE_CUDA") == b.LMC_DEVICE_CUDA
    assert header_define("LMC_DESTINATION_SLOTS") == b.LMC_DESTINATION_SLOTS
    assert header_define("LMC_DESTINATION_BLOCK_TABLE") == b.LMC_DESTINATION_BLOCK_TABLE
    assert header_define("LMC_MAX_TIERS") == b.LMC_MAX_TIERS


def test_versions():
    major, minor, patch = (header_define(f"LMC_VERSION_{part}") for part in ("MAJOR", "MINOR", "PATCH"))
    assert b.lmc_abi_version() == b.ABI_VERSION == 2
    assert b.lmc_version_number() == major * 10000 + minor * 100 + patch
    assert b.lmc_version_string().decode() == f"{major}.{minor}.{patch}" == lmcache_native.__version__


# Field offsets read off the header: ten 4-byte fields, then two uint64 and four int64.
LAYER_DESC_OFFSETS = {
    "struct_size": 0, "device_kind": 4, "device_index": 8, "elem_size": 12, "kv_count": 16,
    "num_blocks": 20, "block_size": 24, "num_kv_heads": 28, "head_size": 32, "reserved": 36,
    "base_address": 40, "span_bytes": 48, "kv_stride": 56, "block_stride": 64, "token_stride": 72,
    "head_stride": 80,
}
REQUEST_OFFSETS = {
    "struct_size": 0, "destination_kind": 4, "tokens": 8, "num_tokens": 16, "extra_key": 24, "extra_key_len": 32,
    "first_token": 40, "slot_mapping": 48, "block_ids": 56, "num_block_ids": 64, "table_block_size": 72,
    "reserved": 76, "stream": 80,
}
TRANSFER_RESULT_OFFSETS = {
    "struct_size": 0, "reserved": 4, "tokens_matched": 8, "tokens_copied": 16, "bytes_copied": 24,
    "chunks_skipped_for_space": 32, "chunks_by_tier": 40, "elapsed_ns": 72,
}
LOOKUP_RESULT_OFFSETS = {"struct_size": 0, "reserved": 4, "hit_tokens": 8, "tokens_by_tier": 16, "elapsed_ns": 48}

# ctypes struct -> (C name, size)
STRUCTS = {
    b.LmcKvLayerDesc: ("lmc_kv_layer_desc", 88),
    b.LmcStats: ("lmc_stats", 128),
    b.LmcTierStats: ("lmc_tier_stats", 136),
    b.LmcRequest: ("lmc_request", 88),
    b.LmcTransferResult: ("lmc_transfer_result", 80),
    b.LmcLookupResult: ("lmc_lookup_result", 56),
}


def _offsets(struct) -> dict:
    return {name: getattr(struct, name).offset for name, _ in struct._fields_}


def test_struct_layouts():
    for struct, (_, size) in STRUCTS.items():
        assert ctypes.sizeof(struct) == size, struct.__name__
        assert struct().struct_size == size, struct.__name__  # the constructor sets struct_size
        assert b.STRUCT_SIZES[struct] == size
    assert _offsets(b.LmcKvLayerDesc) == LAYER_DESC_OFFSETS
    assert _offsets(b.LmcRequest) == REQUEST_OFFSETS
    assert _offsets(b.LmcTransferResult) == TRANSFER_RESULT_OFFSETS
    assert _offsets(b.LmcLookupResult) == LOOKUP_RESULT_OFFSETS
    assert [name for name, _ in b.LmcStats._fields_][:2] == ["struct_size", "reserved"]
    assert all(getattr(b.LmcStats, name).offset == 8 + 8 * index
               for index, (name, _) in enumerate(b.LmcStats._fields_[2:]))
    assert len(b.LmcTransferResult().chunks_by_tier) == len(b.LmcLookupResult().tokens_by_tier) == b.LMC_MAX_TIERS


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to cross-check offsetof")
def test_struct_layouts_match_the_c_compiler(tmp_path):
    source = tmp_path / "offsets.c"
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "lmcache_native.h"', "int main(void) {"]
    expected = []
    for struct, (c_name, _) in STRUCTS.items():
        lines.append(f'printf("%zu\\n", sizeof({c_name}));')
        expected.append(ctypes.sizeof(struct))
        for field, _ in struct._fields_:
            lines.append(f'printf("%zu\\n", offsetof({c_name}, {field}));')
            expected.append(getattr(struct, field).offset)
    source.write_text("\n".join(lines + ["return 0; }"]))
    subprocess.run(["cc", "-std=c11", f"-I{HEADER.parent}", str(source), "-o", str(tmp_path / "offsets")], check=True)
    output = subprocess.run([str(tmp_path / "offsets")], capture_output=True, text=True, check=True).stdout.split()
    assert [int(x) for x in output] == expected


def test_missing_library_gives_an_actionable_import_error(tmp_path):
    result = run_child("from lmcache_native import Engine", env={"LMC_LIB_PATH": str(tmp_path / "nope.so")})
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "build.sh" in result.stderr and "nope.so" in result.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build a stub library")
def test_abi_mismatch_refuses_to_import(tmp_path):
    stub = tmp_path / "stub.c"
    # A stub whose lmc_abi_version() says 1 (the gate runs before anything else is bound, so the
    # stub needs no other export: a library of another ABI may lack the functions of this one).
    stub.write_text("""
#include "lmcache_native.h"
int32_t lmc_version_number(void) { return 100; }
int32_t lmc_abi_version(void) { return 1; }
const char *lmc_version_string(void) { return "0.1.0"; }
""")
    library = tmp_path / "libstub.so"
    subprocess.run(["cc", "-shared", "-fPIC", f"-I{HEADER.parent}", str(stub), "-o", str(library)], check=True)
    result = run_child("from lmcache_native import Engine", env={"LMC_LIB_PATH": str(library)})
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "ABI version 1" in result.stderr and "ABI version 2" in result.stderr


def test_library_is_loaded_from_a_documented_location():
    from lmcache_native import _lib

    assert _lib.LIB_PATH in _lib.candidate_paths()
    assert _lib.LIB_PATH.name == "liblmcache_native.so" or "LMC_LIB_PATH" in __import__("os").environ


def test_importing_the_package_loads_nothing(tmp_path):
    # vLLM imports the package (for its connector) in processes that never use it: no library, no threads.
    code = ("import lmcache_native, threading;"
            "maps = open('/proc/self/maps').read();"
            "print('liblmcache_native' in maps, threading.active_count())")
    result = run_child(code, env={"LMC_LIB_PATH": str(tmp_path / "not-needed.so")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "1"]
