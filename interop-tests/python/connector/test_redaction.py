"""Credentials never reach a log line or an error message: URL passwords (remote_url
redis://user:PASSWORD@host) and values of secret-named keys are shown as ***, in the connector's
"LMCache Configuration: {...}" line, in ConfigError messages and in the library's error messages."""

import json

import pytest

import fakevllm
from fakevllm import V0_10, V0_14
from lmcache_native import _redact
from lmcache_native._connector_config import ConfigError
from sim import Cluster, Req, Spec

PASSWORD = "Hunter2-S3cret"


# ------------------------------------------------------------------------------------------------
# The redactor
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("url,shown", [
    (f"redis://default:{PASSWORD}@host:6379/0", "redis://default:***@host:6379/0"),
    (f"redis://:{PASSWORD}@host:6379", "redis://:***@host:6379"),
    (f"rediss://user:{PASSWORD}@cache.example:6380/2", "rediss://user:***@cache.example:6380/2"),
    (f"valkey://:{PASSWORD}@h", "valkey://:***@h"),
    (f"redis-sentinel://:{PASSWORD}@s1:26379,s2:26379,s3:26379/mymaster",
     "redis-sentinel://:***@s1:26379,s2:26379,s3:26379/mymaster"),
    (f"redis://u:{PASSWORD}@h1:1/0,redis://v:{PASSWORD}@h2:2/0", "redis://u:***@h1:1/0,redis://v:***@h2:2/0"),
    (f"redis://u:{PASSWORD}@h1 redis://h2", "redis://u:***@h1 redis://h2"),
    (f"redis://{PASSWORD}@h", "redis://***@h"),  # a lone user-info may be a token
    (f"redis://:pa@ss/w,rd{PASSWORD}@h:1/0", "redis://:***@h:1/0"),  # unencoded @ / , in the password
    (f"redis://h:6379/0?password={PASSWORD}&db=1", "redis://h:6379/0?password=***&db=1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis-sentinel://s1:26379,s2:26379/mymaster", "redis-sentinel://s1:26379,s2:26379/mymaster"),
    ("/var/cache/lmcache", "/var/cache/lmcache"),
    ("", ""),
])
def test_redact_url(url, shown):
    assert _redact.redact_url(url) == shown
    assert PASSWORD not in _redact.redact_url(url)


def test_redact_text_ends_a_url_at_a_quote():
    message = f'config: "remote_url" "redis://default:{PASSWORD}@h:notaport/0" is not a URL'
    assert _redact.redact_text(message) == 'config: "remote_url" "redis://default:***@h:notaport/0" is not a URL'


@pytest.mark.parametrize("key", ["password", "PASSWORD", "passwd", "redis_password", "redisPassword", "secret",
                                 "client-secret", "token", "auth_token", "hf_token", "auth", "Authorization",
                                 "credential", "credentials", "api_key", "apiKey", "API-KEY", "private_key",
                                 "access_key_id"])
def test_secret_key_names(key):
    assert _redact.is_secret_key(key)
    assert _redact.redact_config({key: PASSWORD}) == {key: "***"}


@pytest.mark.parametrize("key", ["chunk_size", "min_retrieve_tokens", "skip_last_n_tokens", "remote_url",
                                 "lookup_timeout_ms", "author", "tokenizer", "max_local_cpu_size", 7, None])
def test_ordinary_key_names(key):
    assert not _redact.is_secret_key(key)
    assert _redact.redact_config({key: 5}) == {key: 5}


def test_redact_config_hides_nested_secrets_and_keeps_everything_else():
    config = {
        "chunk_size": 256, "remote_url": f"redis://default:{PASSWORD}@h:6379/0", "min_retrieve_tokens": 4,
        "extra_config": {"redis_password": PASSWORD, "nested": {"apiKey": PASSWORD, "depth": [1, 2]},
                         "urls": [f"rediss://:{PASSWORD}@a:1"], "password": None},
        "local_disk": None, "save_unfull_chunk": False,
    }
    shown = _redact.redact_config(config)
    assert PASSWORD not in json.dumps(shown)
    assert shown == {
        "chunk_size": 256, "remote_url": "redis://default:***@h:6379/0", "min_retrieve_tokens": 4,
        "extra_config": {"redis_password": "***", "nested": {"apiKey": "***", "depth": [1, 2]},
                         "urls": ["rediss://:***@a:1"], "password": None},  # unset stays visible as unset
        "local_disk": None, "save_unfull_chunk": False,
    }
    assert config["remote_url"].endswith(f"{PASSWORD}@h:6379/0")  # the input is not modified


def test_redact_value_is_bounded_on_request():
    shared: list = [f"redis://:{PASSWORD}@h"]
    for _ in range(60):  # 2**60 strings, in 61 lists
        shared = [shared, shared]
    shown = _redact.redact_value("x", {"password": PASSWORD, "nested": shared}, max_items=50)
    assert shown["password"] == "***" and PASSWORD not in repr(shown) and "..." in repr(shown)


def test_redaction_of_long_text_is_linear():
    import time

    start = time.monotonic()
    for text in ("x" * 1_000_000, "?" * 1_000_000, "a:" * 500_000, "h://" * 250_000):
        _redact.redact_url(text)
        _redact.redact_text(text)
    assert time.monotonic() - start < 2.0


# ------------------------------------------------------------------------------------------------
# The connector
# ------------------------------------------------------------------------------------------------
def _assert_no_password(logs, *texts):
    for line in logs.lines:
        assert PASSWORD not in line, line
    for text in texts:
        assert PASSWORD not in text, text


def test_configuration_log_line_hides_the_remote_password(logs):
    remote_url = f"redis://default:{PASSWORD}@127.0.0.1:1/0"  # nothing listens on port 1
    # V0_10: lookups are synchronous, so the run does not race the remote tier's timeouts
    spec = Spec(era=V0_10, extra_config={
        "lmcache.chunk_size": 16, "lmcache.remote_url": remote_url, "lmcache.blocking_timeout_secs": 1,
        "lmcache.lookup_timeout_ms": 500, "lmcache.extra_config": {"auth_token": PASSWORD, "region": "eu"}})
    cluster = Cluster(spec)
    errors = []
    try:
        cluster.add(Req("a", list(range(100, 140)), max_tokens=1))
        cluster.run()
    except Exception as error:  # noqa: BLE001 -- an error must not carry the password either
        errors.append(str(error))
    finally:
        cluster.shutdown()
    logged = logs.matching("LMCache Configuration: ")
    assert len(logged) == 1
    shown = json.loads(logged[0][len("LMCache Configuration: "):])
    # the same keys and values as the resolved configuration, only the secrets hidden
    assert shown["remote_url"] == "redis://default:***@127.0.0.1:1/0"
    assert shown["extra_config"] == {"auth_token": "***", "region": "eu"}
    assert shown["chunk_size"] == 16 and shown["blocking_timeout_secs"] == 1.0
    assert set(shown) == set(cluster.conn._config.values) | set(cluster.conn._config.plain)
    assert cluster.conn._config.values["remote_url"] == remote_url  # the engine still gets the real URL
    _assert_no_password(logs, *errors)
    assert not errors, errors


@pytest.mark.parametrize("extra,problem", [
    ({"lmcache.remote_url": [f"redis://:{PASSWORD}@h:6379/0"]}, "'remote_url'"),
    ({"lmcache.extra_config": {"password": PASSWORD, "x": float("nan")}}, "'extra_config'"),
    ({"lmcache.extra_config": f'{{"url": "redis://:{PASSWORD}@h", "bad": NaN}}'}, "'extra_config'"),
])
@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
def test_config_errors_hide_the_password(logs, extra, problem, role):
    fakevllm.install(V0_14)
    spec = Spec(era=V0_14, extra_config=extra)
    with pytest.raises(ConfigError) as caught:
        fakevllm.create_connector(spec.vllm_config(), fakevllm.role(role), spec.kv_cache_config())
    assert problem in str(caught.value)
    _assert_no_password(logs, str(caught.value))


def test_an_environment_password_is_hidden_in_the_config_error(monkeypatch, logs):
    monkeypatch.setenv("LMCACHE_EXTRA_CONFIG", f'{{"redis_password": "{PASSWORD}", "n": Infinity}}')
    fakevllm.install(V0_14)
    spec = Spec(era=V0_14)
    with pytest.raises(ConfigError) as caught:
        fakevllm.create_connector(spec.vllm_config(), fakevllm.role("WORKER"), spec.kv_cache_config())
    assert "LMCACHE_EXTRA_CONFIG" in str(caught.value) and '"redis_password": "***"' in str(caught.value)
    _assert_no_password(logs, str(caught.value))


def test_a_url_the_library_refuses_is_quoted_without_its_password(logs):
    """The library quotes remote_url when it refuses it; the worker's engine is created with it."""
    spec = Spec(era=V0_14, extra_config={"lmcache.remote_url": f"redis://default:{PASSWORD}@127.0.0.1:notaport/0"})
    with pytest.raises(Exception) as caught:
        Cluster(spec)
    message = str(caught.value)
    assert "remote_url" in message and "redis://default:***@127.0.0.1:notaport/0" in message
    _assert_no_password(logs, message, repr(caught.value), getattr(caught.value, "message", ""))
