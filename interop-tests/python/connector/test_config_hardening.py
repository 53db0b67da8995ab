"""Hostile configuration input: whatever a configuration source holds, resolving it either succeeds
or raises ConfigError -- quickly, naming the source and the key, and quoting at most a short,
credential-free excerpt of the value. Never MemoryError, RecursionError, OverflowError,
UnicodeDecodeError or a minute of CPU."""

import json
import math
import time

import pytest

import fakevllm
from fakevllm import V0_14
from lmcache_native import _connector_config as cfg
from lmcache_native._connector_config import ConfigError
from sim import Spec

FAST_S = 1.0  # every refusal is immediate


def resolve_timed(extra=None, environ=None):
    """resolve() with its elapsed time; warnings are collected, not logged."""
    start = time.monotonic()
    try:
        return cfg.resolve(extra or {}, environ or {}, warn=lambda message: None), time.monotonic() - start
    finally:
        assert time.monotonic() - start < FAST_S, f"resolve took {time.monotonic() - start:.2f} s"


def refusal(extra=None, environ=None) -> str:
    """The ConfigError message for a configuration that must be refused (and nothing else)."""
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        cfg.resolve(extra or {}, environ or {}, warn=lambda message: None)
    elapsed = time.monotonic() - start
    assert elapsed < FAST_S, f"refusing took {elapsed:.2f} s"
    return str(caught.value)


def config_file(tmp_path, content) -> dict:
    path = tmp_path / "lmcache.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return {"LMCACHE_CONFIG_FILE": str(path)}


def alias_bomb(levels: int) -> str:
    """The "billion laughs" document: every level is nine aliases of the previous one, so the value of
    chunk_size stands for 9**levels strings while the text stays a few hundred bytes."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    lines.append(f"chunk_size: *l{levels}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The YAML file
# ------------------------------------------------------------------------------------------------
def test_an_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path):
    # 9**6 = 531441 strings: its repr alone is megabytes (the real attack uses 9 levels and more)
    document = alias_bomb(6)
    assert len(document) < 1024
    environ = config_file(tmp_path, document)
    message = refusal(environ=environ)
    assert "LMCACHE_CONFIG_FILE" in message and str(tmp_path / "lmcache.yaml") in message
    assert "key 'l0' (line 1)" in message  # the first anchor is where it fails
    assert "anchors and aliases are not accepted" in message
    assert len(message) < 400 and "lol" not in message


def test_an_alias_alone_is_refused_and_named_by_its_key(tmp_path):
    environ = config_file(tmp_path, "chunk_size: 16\nlocal_cpu: true\nmax_local_cpu_size: !!float 1\n"
                                    "extra_config: {a: [1, 2]}\nsave_decode_cache: &flag true\n")
    message = refusal(environ=environ)
    assert "key 'save_decode_cache' (line 5)" in message and "anchors and aliases" in message


@pytest.mark.parametrize("depth,refused", [(cfg.MAX_NESTING - 2, False), (cfg.MAX_NESTING - 1, True),
                                           (200_000, True)])
def test_yaml_nesting_is_bounded(tmp_path, depth, refused):
    # the document's mapping and extra_config's are two levels; the flow sequences add `depth` more
    environ = config_file(tmp_path, "chunk_size: 16\nextra_config: {x: " + "[" * depth + "]" * depth + "}\n")
    if refused:
        message = refusal(environ=environ)
        assert f"key 'extra_config' (line 2): nested deeper than {cfg.MAX_NESTING} levels" in message
    else:
        result, _ = resolve_timed(environ=environ)
        value = result.engine["extra_config"]["x"]
        for _ in range(depth - 1):
            value = value[0]
        assert value == []


def test_a_file_that_is_not_utf8_is_a_config_error_naming_the_key(tmp_path):
    environ = config_file(tmp_path, "chunk_size: 16\nremote_url: redis://caf\xe9:6379\n".encode("latin-1"))
    message = refusal(environ=environ)
    assert "LMCACHE_CONFIG_FILE" in message and "key 'remote_url' (line 2)" in message
    assert "not UTF-8" in message


def test_a_file_larger_than_the_bound_is_refused_without_parsing(tmp_path):
    environ = config_file(tmp_path, "chunk_size: 16\n" + "#" * cfg.MAX_DOCUMENT_BYTES)
    assert f"larger than {cfg.MAX_DOCUMENT_BYTES} bytes" in refusal(environ=environ)


@pytest.mark.parametrize("document,where,problem", [
    ("chunk_size: 16\nlocal_disk: 2020-13-01\n", "key 'local_disk' (line 2)", "invalid YAML value"),
    ("chunk_size: 16\nremote_url: !!binary 'a'\n", "key 'remote_url' (line 2)", "invalid YAML value"),
    ("chunk_size: 16\n? [a, b]\n: 1\n", "line 2", "invalid YAML value"),
    ("chunk_size: 16\nremote_url: redis://:hunter2@h\n  bad: [\n", "key 'remote_url' (line 3)", "not valid YAML"),
    ("- chunk_size\n", "", "expected a mapping of LMCache keys"),
])
def test_yaml_that_cannot_be_built_is_a_config_error(tmp_path, document, where, problem):
    message = refusal(environ=config_file(tmp_path, document))
    assert where in message and problem in message
    assert "hunter2" not in message  # PyYAML's own text would quote the offending line


def test_a_valid_file_still_loads(tmp_path):
    environ = config_file(tmp_path, "chunk_size: 64\nsave_unfull_chunk: true\nmax_local_cpu_size: 0.5\n"
                                    "extra_config: {a: [1, 2, {b: c}], d: null}\n")
    result, _ = resolve_timed(environ=environ)
    assert result.engine == {"chunk_size": 64, "save_unfull_chunk": True, "max_local_cpu_size": 0.5,
                             "extra_config": {"a": [1, 2, {"b": "c"}], "d": None}}


def test_the_connector_refuses_an_alias_bomb_with_config_error(monkeypatch, tmp_path):
    fakevllm.install(V0_14)
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", config_file(tmp_path, alias_bomb(6))["LMCACHE_CONFIG_FILE"])
    spec = Spec(era=V0_14)
    with pytest.raises(ConfigError, match="anchors and aliases"):
        fakevllm.create_connector(spec.vllm_config(), fakevllm.role("WORKER"), spec.kv_cache_config())


# ------------------------------------------------------------------------------------------------
# LMCACHE_EXTRA_CONFIG (JSON text) and extra_config objects
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # beyond the interpreter's recursion limit
    '{"a": ' * (cfg.MAX_NESTING + 1) + "1" + "}" * (cfg.MAX_NESTING + 1),  # beyond the bound only
])
def test_deep_extra_config_json_is_a_config_error(text):
    message = refusal(environ={"LMCACHE_EXTRA_CONFIG": text})
    assert "'extra_config' (from environment variable LMCACHE_EXTRA_CONFIG)" in message
    assert f"nested deeper than {cfg.MAX_NESTING} levels" in message
    assert len(message) < 400


@pytest.mark.parametrize("value,problem", [
    ('{"a": NaN}', "NaN is not a number JSON allows"),
    ('{"a": Infinity}', "Infinity is not a number JSON allows"),
    ('{"a": 1e999}', "finite numbers only"),
    ({"a": b"bytes"}, "JSON values only"),
    ({"a": float("nan")}, "finite numbers only"),
    ({1: "x"}, "string keys only"),
])
def test_extra_config_must_be_plain_json_data(value, problem):
    if isinstance(value, str):
        message = refusal(environ={"LMCACHE_EXTRA_CONFIG": value})
    else:
        message = refusal(extra={"lmcache.extra_config": value})
    assert "'extra_config'" in message and problem in message


def test_a_self_containing_extra_config_is_refused():
    loop: dict = {}
    loop["self"] = loop
    message = refusal(extra={"lmcache.extra_config": loop})
    assert "nested deeper than" in message


def test_an_extra_config_that_shares_its_parts_is_bounded():
    # 25 levels (within MAX_NESTING) of lists of two references to one list: 2**25 leaves
    message = refusal(extra={"lmcache.extra_config": {"a": _shared_bomb(25)}})
    assert f"must hold at most {cfg.MAX_JSON_VALUES} values" in message and len(message) < 400


# ------------------------------------------------------------------------------------------------
# Scalar keys
# ------------------------------------------------------------------------------------------------
def test_a_huge_integer_for_a_float_key_is_a_config_error():
    message = refusal(extra={"lmcache.max_local_cpu_size": 10**400})
    assert "'max_local_cpu_size' (from kv_connector_extra_config 'lmcache.max_local_cpu_size')" in message
    assert "must be a finite number" in message and len(message) < 300


def test_a_long_value_is_shortened_in_the_message():
    message = refusal(extra={"lmcache.pre_caching_hash_algorithm": "x" * 100_000})
    assert "'pre_caching_hash_algorithm'" in message
    assert len(message) < 400 and "x" * (cfg.MAX_SHOWN_CHARS + 1) not in message


def _deep_list(depth):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _self_list():
    value: list = []
    value.append(value)
    return value


def _shared_bomb(levels=60):
    """A Python-object alias bomb: 2**levels leaves in `levels` lists that share their parts."""
    value: list = [0]
    for _ in range(levels):
        value = [value, value]
    return value


class _HostileRepr:
    def __repr__(self):
        raise RuntimeError("repr refused")


HOSTILE_VALUES = [
    float("nan"), float("inf"), -float("inf"), 10**400, -(10**400), 2**63, 2**31, -(2**31) - 1, 1e308, -0.0, 0.5,
    True, False, None, b"16", bytearray(b"16"), [16], (16,), {"value": 16}, {16}, complex(1, 2), object(),
    _HostileRepr(), _deep_list(100_000), _self_list(), _shared_bomb(), {"a": _shared_bomb(25)}, "", " ", "16",
    "1e999", "-1e999", "nan", "inf", "9" * 5000, "0x10", "1_0", "\x00", "\udcff", "x" * 1_000_000, "true", "redis://:pw@h",
]
HOSTILE_TEXT = [
    "", " ", "16", " 16 ", "-1", "1e999", "-1e999", "nan", "NaN", "inf", "9" * 5000, "0x10", "1_0", "\udcff",
    "x" * 100_000, "true", "none", "null", "[" * 50_000, '{"a": ' * 40 + "1" + "}" * 40, "{}", "1.5",
]


def _assert_usable(result):
    """What resolve accepts must be passable to the library as JSON, with finite numbers."""
    json.dumps(result.engine, allow_nan=False)
    assert not set(result.engine) & set(cfg.CONNECTOR_KEYS)  # the engine refuses the connector's keys
    for value in list(result.engine.values()) + list(result.connector.values()) + list(result.plain.values()):
        assert not (isinstance(value, float) and not math.isfinite(value))


@pytest.mark.parametrize("key", sorted(cfg.ENGINE_KEYS) + sorted(cfg.CONNECTOR_KEYS))
def test_every_key_gives_success_or_config_error_for_hostile_values(key):
    name = key if key in cfg.PLAIN_EXTRA_SPECS else f"lmcache.{key}"
    for value in HOSTILE_VALUES:
        start = time.monotonic()
        try:
            result = cfg.resolve({name: value}, {}, warn=lambda message: None)
        except ConfigError as error:
            message = str(error)
            assert f"'{key}'" in message, message
            assert len(message) < 400, (key, message[:400])
        else:
            _assert_usable(result)
        assert time.monotonic() - start < FAST_S, (key, type(value).__name__)
    if key in cfg.PLAIN_EXTRA_SPECS:
        return  # plain keys have no environment variable
    for text in HOSTILE_TEXT:
        start = time.monotonic()
        try:
            result = cfg.resolve({}, {f"LMCACHE_{key.upper()}": text}, warn=lambda message: None)
        except ConfigError as error:
            message = str(error)
            assert f"'{key}' (from environment variable LMCACHE_{key.upper()})" in message, message
            assert len(message) < 400, (key, message[:400])
        else:
            _assert_usable(result)
        assert time.monotonic() - start < FAST_S, (key, text[:20])


@pytest.mark.parametrize("document", [
    "chunk_size: .nan\n", "max_local_cpu_size: .inf\n", "chunk_size: 1e400\n",
    "max_local_cpu_size: " + "9" * 500 + "\n", "chunk_size: !!binary aGVsbG8=\n", "chunk_size: 2020-01-01\n",
    "chunk_size: [16]\n", "chunk_size: {a: 1}\n", "? [a]\n: 1\n", "chunk_size:\n", "\x00: 1\n",
    "local_disk: !!python/object:os.system 1\n", "extra_config: !!set {a, b}\n", "extra_config: {1: x}\n",
])
def test_hostile_yaml_values_give_success_or_config_error(tmp_path, document):
    try:
        result, _ = resolve_timed(environ=config_file(tmp_path, document))
    except ConfigError as error:
        assert "LMCACHE_CONFIG_FILE" in str(error) and len(str(error)) < 400
    else:
        _assert_usable(result)


def test_a_config_file_that_is_a_directory_or_missing_is_a_config_error(tmp_path):
    assert "cannot" in refusal(environ={"LMCACHE_CONFIG_FILE": str(tmp_path)})
    assert "cannot open the file" in refusal(environ={"LMCACHE_CONFIG_FILE": str(tmp_path / "absent.yaml")})


def test_a_non_mapping_extra_config_is_a_config_error():
    with pytest.raises(ConfigError, match="must be a mapping"):
        cfg.resolve(["lmcache.chunk_size"], {}, warn=lambda message: None)
