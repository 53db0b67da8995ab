"""The binding layer itself: library loading, the ABI gate, versions, struct layouts, and that every
function of the header is bound."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

import lmcache_native
from conftest import REPO_ROOT, run_child
from lmcache_native import _bindings as b

HEADER = REPO_ROOT / "include" / "lmcache_native.h"


def header_prototypes() -> dict[str, tuple[str, int]]:
    """name -> (return type, number of parameters), parsed from the header's LMC_API declarations."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    prototypes = {}
    for return_type, name, parameters in re.findall(r"LMC_API\s+([^;(]*?)\s*\b(lmc_\w+)\s*\(([^)]*)\)\s*;", text):
        parameters = parameters.strip()
        count = 0 if parameters in ("", "void") else parameters.count(",") + 1
        prototypes[name] = (" ".join(return_type.replace("*", " * ").split()), count)
    return prototypes


def header_define(name: str) -> int:
    return int(re.search(rf"#define {name} \(?(-?\d+)\)?", HEADER.read_text()).group(1))


def test_every_header_function_is_bound_with_its_prototype():
    prototypes = header_prototypes()
    assert len(prototypes) == 26
    assert set(prototypes) == set(b.ALL_FUNCTION_NAMES)
    expected_restype = {"lmc_status": ctypes.c_int32, "int32_t": ctypes.c_int32, "const char *": ctypes.c_char_p,
                        "void": None}
    for name, (return_type, parameter_count) in prototypes.items():
        function = getattr(b, name)
        assert function.restype is expected_restype[return_type], name
        assert len(function.argtypes) == parameter_count, name


def test_status_constants_match_the_header():
    for name, value in b.STATUS_NAMES.items():
        assert header_define(value) == name
    assert header_define("LMC_ABI_VERSION") == b.ABI_VERSION
    assert header_define("LMC_DEVICE_HOST") == b.LMC_DEVICE_HOST
    assert header_define("LMC_DEVICE_CUDA") == b.LMC_DEVICE_CUDA


def test_versions():
    major, minor, patch = (header_define(f"LMC_VERSION_{part}") for part in ("MAJOR", "MINOR", "PATCH"))
    assert b.lmc_abi_version() == b.ABI_VERSION == 1
    assert b.lmc_version_number() == major * 10000 + minor * 100 + patch
    assert b.lmc_version_string().decode() == f"{major}.{minor}.{patch}" == lmcache_native.__version__


# Field offsets read off the header: ten 4-byte fields, then two uint64 and four int64.
LAYER_DESC_OFFSETS = {
    "struct_size": 0, "device_kind": 4, "device_index": 8, "elem_size": 12, "kv_count": 16,
    "num_blocks": 20, "block_size": 24, "num_kv_heads": 28, "head_size": 32, "reserved": 36,
    "base_address": 40, "span_bytes": 48, "kv_stride": 56, "block_stride": 64, "token_stride": 72,
    "head_stride": 80,
}


def test_struct_layouts():
    assert ctypes.sizeof(b.LmcKvLayerDesc) == 88
    assert {name: getattr(b.LmcKvLayerDesc, name).offset for name, _ in b.LmcKvLayerDesc._fields_} == \
        LAYER_DESC_OFFSETS
    assert ctypes.sizeof(b.LmcStats) == 128
    assert [name for name, _ in b.LmcStats._fields_][:2] == ["struct_size", "reserved"]
    assert all(getattr(b.LmcStats, name).offset == 8 + 8 * index
               for index, (name, _) in enumerate(b.LmcStats._fields_[2:]))
    assert b.LmcKvLayerDesc().struct_size == 88 and b.LmcStats().struct_size == 128


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to cross-check offsetof")
def test_struct_layouts_match_the_c_compiler(tmp_path):
    fields = [name for name, _ in b.LmcKvLayerDesc._fields_]
    stats_fields = [name for name, _ in b.LmcStats._fields_]
    source = tmp_path / "offsets.c"
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "lmcache_native.h"', "int main(void) {",
             'printf("%zu %zu\\n", sizeof(lmc_kv_layer_desc), sizeof(lmc_stats));']
    lines += [f'printf("%zu\\n", offsetof(lmc_kv_layer_desc, {f}));' for f in fields]
    lines += [f'printf("%zu\\n", offsetof(lmc_stats, {f}));' for f in stats_fields]
    source.write_text("\n".join(lines + ["return 0; }"]))
    subprocess.run(["cc", "-std=c11", f"-I{HEADER.parent}", str(source), "-o", str(tmp_path / "offsets")], check=True)
    output = subprocess.run([str(tmp_path / "offsets")], capture_output=True, text=True, check=True).stdout.split()
    assert output[:2] == ["88", "128"]
    c_offsets = [int(x) for x in output[2:]]
    ctypes_offsets = [getattr(b.LmcKvLayerDesc, f).offset for f in fields] + \
                     [getattr(b.LmcStats, f).offset for f in stats_fields]
    assert c_offsets == ctypes_offsets


def test_missing_library_gives_an_actionable_import_error(tmp_path):
    result = run_child("from lmcache_native import Engine", env={"LMC_LIB_PATH": str(tmp_path / "nope.so")})
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "build.sh" in result.stderr and "nope.so" in result.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build a stub library")
def test_abi_mismatch_refuses_to_import(tmp_path):
    # A stub exporting every function of the header, whose lmc_abi_version() says 2.
    stub = tmp_path / "stub.c"
    stub.write_text("""
#include "lmcache_native.h"
int32_t lmc_version_number(void) { return 100; }
int32_t lmc_abi_version(void) { return 2; }
const char *lmc_version_string(void) { return "0.1.0"; }
const char *lmc_status_name(lmc_status s) { (void)s; return "LMC_OK"; }
const char *lmc_last_error_message(void) { return ""; }
lmc_status lmc_engine_create(lmc_engine **o, const char *c, const char *m, int32_t w, int32_t i)
{ (void)o; (void)c; (void)m; (void)w; (void)i; return -1; }
void lmc_engine_destroy(lmc_engine *e) { (void)e; }
lmc_status lmc_engine_get_config(int64_t *n, lmc_engine *e, char *b, int64_t c) { (void)n; (void)e; (void)b; (void)c; return -2; }
lmc_status lmc_engine_register_layers(lmc_engine *e, const lmc_kv_layer_desc *l, int32_t n) { (void)e; (void)l; (void)n; return -2; }
lmc_status lmc_lookup(int64_t *o, lmc_engine *e, const int32_t *t, int64_t n, const uint8_t *x, int64_t xl)
{ (void)o; (void)e; (void)t; (void)n; (void)x; (void)xl; return -2; }
lmc_status lmc_store(int64_t *o, lmc_engine *e, const int32_t *t, const int64_t *s, int64_t n, int64_t k, const uint8_t *x, int64_t xl)
{ (void)o; (void)e; (void)t; (void)s; (void)n; (void)k; (void)x; (void)xl; return -2; }
lmc_status lmc_retrieve(int64_t *o, lmc_engine *e, const int32_t *t, const int64_t *s, int64_t n, int64_t f, const uint8_t *x, int64_t xl)
{ (void)o; (void)e; (void)t; (void)s; (void)n; (void)f; (void)x; (void)xl; return -2; }
lmc_status lmc_engine_get_stats(lmc_engine *e, lmc_stats *s) { (void)e; (void)s; return -2; }
lmc_status lmc_engine_clear(lmc_engine *e) { (void)e; return -2; }
""")
    library = tmp_path / "libstub.so"
    subprocess.run(["cc", "-shared", "-fPIC", f"-I{HEADER.parent}", str(stub), "-o", str(library)], check=True)
    result = run_child("from lmcache_native import Engine", env={"LMC_LIB_PATH": str(library)})
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "ABI version 2" in result.stderr


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
