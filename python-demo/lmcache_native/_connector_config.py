"""Configuration of the vLLM connector, resolved the way LMCache does it.

Sources, lowest precedence first (a later source overrides an earlier one key by key):

  1. the YAML file named by ``LMCACHE_CONFIG_FILE``;
  2. environment variables ``LMCACHE_<UPPER_KEY>`` (``LMCACHE_CHUNK_SIZE=8``);
  3. vLLM's ``kv_connector_extra_config`` keys prefixed ``lmcache.`` (``"lmcache.chunk_size": 8``).

Keys are LMCache's, each declared once. The engine's keys (types, ranges, choices, defaults, the values
this build refuses) come from the library's schema (``config_schema()``, read on first use) and are
passed to it; the connector's own keys live in ``CONNECTOR_KEYS`` and never reach the engine (it
refuses them). A key LMCache has but this build ignores, or a key nobody knows, is a warning that
names it and is dropped (the library refuses unknown keys, so they must not reach it). A value of the wrong type or out of range is a ``ValueError``
at start-up. Environment values are text and are parsed by the key's type; YAML and extra-config values
must already have the right type (numbers may be given for floats, and text that parses is accepted).

Every problem with a source is a ``ConfigError`` that names the source and, where there is one, the
key -- never another exception type, whatever the input: the YAML file is bounded in size and nesting
and may not use anchors or aliases (an alias bomb of a few hundred bytes expands to gigabytes), and
values quoted in messages are shortened and have their credentials hidden (``_redact``).

Importing this module loads nothing (the schema is read when ``resolve`` or ``ENGINE_KEYS`` is first
used); no torch. The connector and the tests use it alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ._redact import redact_text, redact_value

logger = logging.getLogger("lmcache_native.vllm_connector")

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
EXTRA_CONFIG_PREFIX = "lmcache."

# LMCACHE_* environment variables that are not configuration keys (LMCache reads them elsewhere).
NON_KEY_ENV_VARS = frozenset({
    "LMCACHE_CONFIG_FILE", "LMCACHE_LOG_LEVEL", "LMCACHE_FORCE_SKIP_SAVE", "LMCACHE_USE_EXPERIMENTAL",
    "LMCACHE_TRACK_USAGE",
})


# Bounds on what a configuration source may hold. Real configurations are a few KiB and 2-3 levels
# deep; the bounds keep a hostile or broken file from costing memory, time or the interpreter's stack.
MAX_DOCUMENT_BYTES = 1 << 20
MAX_NESTING = 32
MAX_JSON_VALUES = 1 << 18  # values in an extra_config object (a Python object may share its parts)
# A value quoted in an error message is cut to this many characters.
MAX_SHOWN_CHARS = 80


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the source."""


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 3] + "..."


_value_repr = reprlib.Repr()
_value_repr.maxlevel = 3
_value_repr.maxstring = _value_repr.maxother = MAX_SHOWN_CHARS
_value_repr.maxlist = _value_repr.maxtuple = _value_repr.maxdict = _value_repr.maxset = 6


def _shown(value, key=None) -> str:
    """``value`` for an error message: credentials hidden, at most MAX_SHOWN_CHARS characters, and
    never an exception (a huge int has no decimal repr, a deep container would exhaust the stack)."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
            return f"<an integer of {value.bit_length()} bits>"
        # the redacted copy holds at most what the repr can show (6 items on each of 3 levels)
        return _shorten(_value_repr.repr(redact_value(key, value, max_items=300)))
    except Exception:
        return f"<a {type(value).__name__}>"


def _shown_key(key) -> str:
    return _shorten(redact_text(str(key)))


# ------------------------------------------------------------------------------------------------
# Value parsers: (value, from_text) -> parsed value, or ConfigError. from_text is True for
# environment variables, whose values are always strings.
# ------------------------------------------------------------------------------------------------
def _bool(value, from_text):
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError("must be true or false")


def _int(minimum=None, maximum=None):
    def parse(value, from_text):
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, str):
            try:
                value = int(value.strip(), 10)
            except ValueError:
                raise ValueError("must be an integer") from None
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("must be an integer")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise ValueError(f"must be in [{minimum}, {maximum}]")
        return value

    return parse


def _float(minimum=None, maximum=None, exclusive_minimum=False):
    def parse(value, from_text):
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError("must be a number") from None
        if not isinstance(value, (int, float)):
            raise ValueError("must be a finite number")
        try:
            value = float(value)  # an int beyond the float range raises OverflowError
        except OverflowError:
            raise ValueError("must be a finite number") from None
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            raise ValueError(f"must be {'>' if exclusive_minimum else '>='} {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum}")
        return value

    return parse


def _text(choices=None):
    def parse(value, from_text):
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if choices is not None and value not in choices:
            raise ValueError(f"must be one of {sorted(choices)}")
        return value

    return parse


def _optional(inner):
    def parse(value, from_text):
        if value is None or (from_text and value.strip().lower() in ("", "none", "null")):
            return None
        return inner(value, from_text)

    return parse


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def _check_json_value(value) -> None:
    """``value`` must be plain JSON data, at most MAX_NESTING deep: it is passed to the library as
    JSON. Iterative, so a deep (or self-containing) value cannot exhaust the stack."""
    pending = [(value, 1)]
    for _ in range(MAX_JSON_VALUES):
        if not pending:
            return
        item, depth = pending.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > MAX_NESTING:
                raise ValueError(f"must not be nested deeper than {MAX_NESTING} levels")
            if isinstance(item, dict):
                if not all(isinstance(key, str) for key in item):
                    raise ValueError("must have string keys only")
                pending.extend((child, depth + 1) for child in item.values())
            else:
                pending.extend((child, depth + 1) for child in item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("must hold finite numbers only")
        elif not (item is None or isinstance(item, (str, int, bool))):
            raise ValueError(f"must hold JSON values only, not {type(item).__name__}")
    if pending:
        raise ValueError(f"must hold at most {MAX_JSON_VALUES} values")


def _json_object(value, from_text):
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"must be at most {MAX_DOCUMENT_BYTES} characters of JSON")
        try:
            value = json.loads(value, parse_constant=_refuse_constant)
        except RecursionError:
            raise ValueError(f"must not be nested deeper than {MAX_NESTING} levels") from None
        except ValueError as error:
            raise ValueError(f"must be a JSON object: {_shorten(str(error))}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a mapping (JSON object)")
    _check_json_value(value)
    return value


@dataclass(frozen=True)
class KeySpec:
    parse: Callable[[Any, bool], Any]
    default: Any
    doc: str
    plain: bool = False  # a kv_connector_extra_config key without the "lmcache." prefix (no env variable)


# ------------------------------------------------------------------------------------------------
# The engine's keys: read from the library's published schema (lmc_config_schema), never repeated
# here. Loaded on first use (the module itself stays free of the library: importing the connector
# must load nothing).
# ------------------------------------------------------------------------------------------------
def _bool_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _unsupported_check(name: str, entry: dict, inner):
    """Refuses the values the library accepts from LMCache files but does not implement. A string key
    without ``choices`` marks any value other than its default as unsupported (e.g. ``gds_path``)."""
    unsupported = entry.get("unsupported_values") or ()
    if not unsupported:
        return inner
    any_value = entry.get("type") == "string" and not entry.get("choices")
    default = entry.get("default")
    listed = frozenset(str(value) for value in unsupported)

    def parse(value, from_text):
        parsed = inner(value, from_text)
        if parsed is None or parsed == default:
            return parsed
        if any_value or _bool_text(parsed) in listed:
            raise ValueError(f"{_shown(parsed, name)} is not supported by this build of LMCacheNative "
                             "(LMCacheNative refused the configuration)")
        return parsed

    return parse


def _spec_from_schema(entry: dict) -> KeySpec:
    name, kind = entry["name"], entry.get("type")
    if kind == "integer":
        parse = _int(entry.get("minimum"), entry.get("maximum"))
    elif kind == "number":
        parse = _float(entry.get("minimum"), entry.get("maximum"), bool(entry.get("exclusive_minimum")))
    elif kind == "boolean":
        parse = _bool
    elif kind == "string":
        choices = entry.get("choices")
        # LMCache's names this build lacks pass the choice check, to be refused by name below
        parse = _text(frozenset(choices) | frozenset(entry.get("unsupported_values") or ()) if choices else None)
    elif kind == "object":
        parse = _json_object
    else:  # a type this connector does not know: pass text through, the engine validates it
        parse = _text()
    if entry.get("nullable") and kind != "object":
        parse = _optional(parse)
    parse = _unsupported_check(name, entry, parse)
    default = entry.get("default")
    if kind == "number" and isinstance(default, int) and not isinstance(default, bool):
        default = float(default)
    return KeySpec(parse, default, str(entry.get("description") or ""))


_engine_keys: dict | None = None


def engine_keys() -> dict:
    """{name: KeySpec} of the keys the engine accepts, from ``lmcache_native.config_schema()`` (the
    library is loaded on the first call)."""
    global _engine_keys
    if _engine_keys is None:
        from . import config_schema  # loads the library

        _engine_keys = {entry["name"]: _spec_from_schema(entry) for entry in config_schema()}
    return _engine_keys


def __getattr__(name: str):
    """``ENGINE_KEYS`` is computed from the library's schema on first use (PEP 562)."""
    if name == "ENGINE_KEYS":
        return engine_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# The connector's own keys: one table, one default each. Prefixed keys come from all three sources
# (file, LMCACHE_<KEY>, "lmcache.<key>"); plain keys only from kv_connector_extra_config, unprefixed,
# as LMCache's vLLM adapter reads them. None of them reaches the engine (it refuses them).
# ------------------------------------------------------------------------------------------------
CONNECTOR_KEYS: dict[str, KeySpec] = {
    "save_decode_cache": KeySpec(_bool, False, "keep storing chunks completed during decode"),
    "min_retrieve_tokens": KeySpec(_int(0, 2**31 - 1), 0, "below this many tokens to load, do not load"),
    "enable_async_loading": KeySpec(_bool, True, "load asynchronously (vLLM load_kv_async); false: every "
                                                 "load is synchronous"),
    "lookup_timeout_ms": KeySpec(_float(0, 3_600_000, exclusive_minimum=True), 3000.0,
                                 "bound of a cross-process lookup; a timeout is a miss"),
    "priority_limit": KeySpec(_optional(_int(-(2**31), 2**31 - 1)), None,
                              "requests with a priority above this are not stored"),
    "async_saving": KeySpec(_bool, True, "stores run as jobs; request_finished delays freeing the blocks "
                                         "while they read them (false: stores finish inside wait_for_save)"),
    "discard_partial_chunks": KeySpec(_bool, False, "never store a partial chunk (overrides save_unfull_chunk)",
                                      plain=True),
    "skip_last_n_tokens": KeySpec(_int(0, 2**31 - 1), 0, "leave the last n tokens of a prompt out of lookups",
                                  plain=True),
    "lmcache_rpc_port": KeySpec(_int(0, 2**31 - 1), 0, "names the lookup sockets (several vLLM instances on one "
                                                       "machine need different values)", plain=True),
}

# kv_connector_extra_config keys without the "lmcache." prefix (a view of CONNECTOR_KEYS).
PLAIN_EXTRA_SPECS: dict[str, KeySpec] = {key: spec for key, spec in CONNECTOR_KEYS.items() if spec.plain}
PLAIN_EXTRA_KEYS = frozenset(PLAIN_EXTRA_SPECS)
# Prefixed keys the connector reads itself (a view of CONNECTOR_KEYS).
PREFIXED_CONNECTOR_KEYS: dict[str, KeySpec] = {key: spec for key, spec in CONNECTOR_KEYS.items() if not spec.plain}

# Keys of LMCache's configuration (lmcache/v1/config.py) that this build does not implement: they are
# accepted with a warning naming them and otherwise ignored, so LMCache configuration files load.
IGNORED_LMCACHE_KEYS = frozenset({
    "py_enable_gc", "reserve_local_cpu_size", "numa_mode",
    "cost_aware_half_life_seconds", "cost_aware_ewma_alpha", "lazy_memory_initial_ratio",
    "lazy_memory_expand_trigger_ratio", "lazy_memory_step_ratio", "lazy_memory_safe_size",
    "pin_timeout_sec", "pin_check_interval_sec", "local_disk_path_sharding", "gds_buffer_size",
    "gds_path_sharding", "use_gds", "gds_backend", "maru_path", "maru_pool_size",
    "remote_storage_plugins", "storage_plugins", "runtime_plugin_locations", "store_location",
    "retrieve_locations", "blend_recompute_ratios", "blend_thresholds", "blend_check_layers",
    "blend_min_tokens", "blend_special_str", "p2p_host", "p2p_init_ports", "p2p_lookup_ports",
    "transfer_channel", "nixl_backends", "nixl_buffer_size", "nixl_buffer_device", "mp_host", "mp_port",
    "pd_role", "pd_buffer_size", "pd_buffer_device", "pd_peer_host", "pd_peer_init_port",
    "pd_peer_alloc_port", "pd_peer_query_port", "pd_proxy_host", "pd_proxy_port",
    "pd_allocation_timeout_sec", "pd_shutdown_timeout_sec", "pd_condition_poll_interval_sec",
    "pd_max_prefill_len", "pd_backend_mode", "pd_skip_proxy_notification", "pd_bidirectional",
    "lmcache_instance_id", "controller_pull_url", "controller_reply_url", "lmcache_worker_ports",
    "lmcache_worker_ids", "lmcache_worker_heartbeat_delay_time", "lmcache_worker_heartbeat_time",
    "lookup_server_worker_ids", "enable_scheduler_bypass_lookup", "external_lookup_client",
    "hit_miss_ratio", "internal_api_server_enabled", "internal_api_server_host",
    "internal_api_server_port_start", "internal_api_server_include_index_list",
    "internal_api_server_socket_path_prefix", "script_allowed_imports", "enable_chunk_statistics",
    "chunk_statistics_strategy", "remote_config_url", "app_id", "enable_hidden_state_cache",
    "max_hidden_state_cpu_size", "hidden_state_layers", "hidden_states_retrieve_mode",
    "enable_xpyd", "nixl_peer_host", "nixl_peer_init_port", "nixl_peer_alloc_port", "nixl_proxy_host",
    "nixl_proxy_port", "nixl_role", "controller_url", "lmcache_worker_port", "plugin_locations",
    "external_backends", "enable_nixl", "nixl_receiver_host", "nixl_receiver_port", "lookup_url",
    "distributed_url", "error_handling", "weka_path",
})

@dataclass
class ResolvedConfig:
    """The outcome of :func:`resolve`."""

    engine: dict = field(default_factory=dict)  # keys to pass to the engine (explicitly set ones)
    connector: dict = field(default_factory=dict)  # prefixed connector keys explicitly set
    values: dict = field(default_factory=dict)  # every engine and prefixed connector key, effective value
    plain: dict = field(default_factory=dict)  # PLAIN_EXTRA_SPECS values
    sources: dict = field(default_factory=dict)  # key -> "file" | "env" | "extra_config"
    warnings: list = field(default_factory=list)  # the warnings logged, for tests

    def get(self, key, default=None):
        return self.values.get(key, default)


def _read_bounded(path: str, source: str) -> bytes:
    """At most MAX_DOCUMENT_BYTES of the file. O_NONBLOCK keeps open() from waiting for the writer
    of a FIFO (reads then block as usual); /dev/zero and the like end at the size bound."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{source}: cannot open the file: {getattr(error, 'strerror', None) or error}") from None
    try:
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= MAX_DOCUMENT_BYTES:
            chunk = os.read(fd, MAX_DOCUMENT_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise ConfigError(f"{source}: cannot read the file: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if size > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{source}: the file is larger than {MAX_DOCUMENT_BYTES} bytes")
    return b"".join(chunks)


def _top_level_key_before(text: str) -> str | None:
    """The block-style top-level key in force at the end of ``text`` (for naming the key of an
    error that has only a position), or None."""
    for line in reversed(text.split("\n")):
        if line[:1] and line[:1] not in " \t#-?:" and ":" in line:
            return line.partition(":")[0].strip().strip("'\"")
    return None


def _where(key, mark) -> str:
    """``key 'k' (line n)`` for an error at a YAML position (``mark``: anything with a 0-based
    ``line``, or None)."""
    at = f" (line {mark.line + 1})" if mark is not None else ""
    return f"key '{_shown_key(key)}'{at}" if key is not None else f"the document{at}"


@dataclass(frozen=True)
class _Line:
    line: int  # 0-based, as in a YAML mark


def _check_yaml_events(text: str, source: str, yaml, loader_class) -> None:
    """Refuses anchors and aliases and nesting beyond MAX_NESTING, from the event stream, before any
    node is built. Events stream one at a time, so an alias bomb fails at its first alias. Errors
    name the top-level key they are under."""
    open_collections: list = []  # per open collection: [is_mapping, next node is a key]
    top_key = None
    try:
        for event in yaml.parse(text, Loader=loader_class):
            if isinstance(event, yaml.CollectionEndEvent):
                open_collections.pop()
                continue
            if not isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent, yaml.AliasEvent)):
                continue
            if open_collections and open_collections[-1][0]:
                is_key = open_collections[-1][1]
                open_collections[-1][1] = not is_key
                if is_key and len(open_collections) == 1:
                    top_key = event.value if isinstance(event, yaml.ScalarEvent) else "?"
            if isinstance(event, yaml.AliasEvent) or event.anchor is not None:
                raise ConfigError(f"{source}: {_where(top_key, event.start_mark)}: YAML anchors and aliases "
                                  "are not accepted in an LMCache configuration")
            if isinstance(event, yaml.CollectionStartEvent):
                open_collections.append([isinstance(event, yaml.MappingStartEvent), True])
                if len(open_collections) > MAX_NESTING:
                    raise ConfigError(f"{source}: {_where(top_key, event.start_mark)}: nested deeper than "
                                      f"{MAX_NESTING} levels")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or type(error).__name__
        # Only the problem and its position: PyYAML's own text quotes the document, which may hold secrets.
        raise ConfigError(f"{source}: {_where(top_key, mark)}: not valid YAML: "
                          f"{_shorten(redact_text(str(problem)))}") from None


def _read_yaml(path: str) -> dict:
    source = f"{CONFIG_FILE_ENV}={path}"
    try:
        import yaml  # python3-yaml; only needed when a file is named
    except ImportError as error:  # pragma: no cover - yaml is present on the project machines
        raise ConfigError(f"{source}: reading YAML needs PyYAML ({error})") from None
    raw = _read_bounded(path, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        prefix = raw[:error.start].decode("utf-8")  # valid up to the first bad byte
        where = _where(_top_level_key_before(prefix), _Line(prefix.count("\n")))
        raise ConfigError(f"{source}: {where}: not UTF-8 text (byte {error.start})") from None
    loader_class = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where installed: faster
    _check_yaml_events(text, source, yaml, loader_class)
    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{source}: expected a mapping of LMCache keys, got a YAML "
                              f"{'sequence' if isinstance(root, yaml.SequenceNode) else 'scalar'}")
        # Built key by key, so that a value that cannot be built (a timestamp with month 13, bad
        # !!binary, an unhashable key) is reported with its key.
        data = {}
        for key_node, value_node in root.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            try:
                data[loader.construct_object(key_node, deep=True)] = loader.construct_object(value_node, deep=True)
            except Exception as error:
                problem = getattr(error, "problem", None) or str(error) or type(error).__name__
                raise ConfigError(f"{source}: {_where(key, key_node.start_mark)}: invalid YAML value: "
                                  f"{_shorten(redact_text(str(problem)))}") from None
        return data
    except yaml.YAMLError as error:  # not expected after the event check; a safety net
        raise ConfigError(f"{source}: not valid YAML: {_shorten(redact_text(str(error)))}") from None
    finally:
        loader.dispose()


def resolve(extra_config: Mapping | None, environ: Mapping | None = None, *,
            warn: Callable[[str], None] | None = None) -> ResolvedConfig:
    """Resolves the configuration from the three sources; raises ``ConfigError`` on a bad value."""
    environ = os.environ if environ is None else environ
    if extra_config is not None and not isinstance(extra_config, Mapping):
        raise ConfigError(f"kv_connector_extra_config must be a mapping, got {type(extra_config).__name__}")
    extra_config = dict(extra_config or {})
    result = ResolvedConfig()

    def warning(message: str) -> None:
        result.warnings.append(message)
        (warn or logger.warning)(message)

    raw: dict[str, tuple[Any, bool, str]] = {}  # key -> (value, from_text, source description)

    engine_specs = engine_keys()
    specs = {**engine_specs, **PREFIXED_CONNECTOR_KEYS}

    def offer(key: str, value, from_text: bool, source: str) -> None:
        if key in specs:
            raw[key] = (value, from_text, source)
        elif key in IGNORED_LMCACHE_KEYS:
            warning(f"LMCache config key '{key}' (from {source}) is not supported by LMCacheNative and is ignored")
        else:
            warning(f"unknown LMCache config key '{_shown_key(key)}' (from {source}) is ignored")

    path = environ.get(CONFIG_FILE_ENV)
    if path:
        for key, value in _read_yaml(path).items():
            offer(str(key), value, False, f"{CONFIG_FILE_ENV} {path}")

    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in NON_KEY_ENV_VARS:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key.startswith("ec_"):  # LMCache's encoder-cache clone reads these; not ours
            continue
        offer(key, environ[name], True, f"environment variable {name}")

    for name, value in extra_config.items():
        if isinstance(name, str) and name.startswith(EXTRA_CONFIG_PREFIX):
            offer(name[len(EXTRA_CONFIG_PREFIX):], value, False, f"kv_connector_extra_config '{_shown_key(name)}'")

    for key, (value, from_text, source) in raw.items():
        try:
            parsed = specs[key].parse(value, from_text)
        except ValueError as error:
            raise ConfigError(f"LMCache config key '{key}' (from {source}): {error}, "
                              f"got {_shown(value, key)}") from None
        except Exception as error:  # a value no parser foresaw: still a configuration error
            raise ConfigError(f"LMCache config key '{key}' (from {source}): invalid value "
                              f"({type(error).__name__}), got {_shown(value, key)}") from None
        (result.engine if key in engine_specs else result.connector)[key] = parsed
        result.sources[key] = source
    for key, spec in specs.items():
        result.values[key] = result.engine[key] if key in result.engine else result.connector.get(key, spec.default)

    for key, spec in PLAIN_EXTRA_SPECS.items():
        value = extra_config.get(key, spec.default)
        try:
            result.plain[key] = spec.parse(value, False)
        except ValueError as error:
            raise ConfigError(f"kv_connector_extra_config '{key}': {error}, got {_shown(value, key)}") from None
        except Exception as error:
            raise ConfigError(f"kv_connector_extra_config '{key}': invalid value ({type(error).__name__}), "
                              f"got {_shown(value, key)}") from None
    # extra_config keys that are neither lmcache.* nor known plain keys belong to vLLM or other
    # connectors (MultiConnector shares one dict): not ours to warn about.
    return result
