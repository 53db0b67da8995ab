"""Loading, construction and configuration: a side-effect-free import, the factory of every era, the
interface (abstract and optional methods), configuration precedence, warnings and start-up errors."""

import inspect
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

import fakevllm
from fakevllm import ERAS, NEW, V0_10, V0_14
from sim import Cluster, Req, Spec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent


def run_child(code: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "python-demo"), str(HERE.parent), str(HERE)])
    result = subprocess.run(["/usr/bin/python3", "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_no_library_and_starts_no_thread():
    state = run_child("""
        import json, os, sys
        import fakevllm
        fakevllm.install(fakevllm.NEW)
        def threads(): return len(os.listdir("/proc/self/task"))
        before = threads()
        import importlib
        module = importlib.import_module("lmcache_native.vllm_connector")   # what vLLM's factory does
        cls = getattr(module, "LMCacheNativeConnector")
        # the classmethods vLLM calls without an instance
        layout = cls.get_required_kvcache_layout(None)
        piecewise = cls.requires_piecewise_for_cudagraph({})
        stats = cls.build_kv_connector_stats({"stored_tokens": 3})
        maps = open("/proc/self/maps").read()
        after_import = {"library_mapped": "liblmcache_native" in maps, "threads": threads() - before,
                        "bindings": "lmcache_native._bindings" in sys.modules, "torch": "torch" in sys.modules,
                        "layout": layout, "piecewise": piecewise, "stats": stats.reduce()["stored_tokens"]}
        import lmcache_native
        engine_class = lmcache_native.Engine   # first use of a library name loads it now
        after_use = "liblmcache_native" in open("/proc/self/maps").read()
        print(json.dumps({"after_import": after_import, "after_use": after_use}))
    """)
    assert state["after_import"] == {"library_mapped": False, "threads": 0, "bindings": False, "torch": False,
                                     "layout": None, "piecewise": False, "stats": 3}
    assert state["after_use"] is True


def test_the_package_loads_the_library_on_first_use_of_a_name():
    state = run_child("""
        import json, sys
        import lmcache_native
        before = "lmcache_native._bindings" in sys.modules
        version = lmcache_native.__version__
        print(json.dumps({"before": before, "after": "lmcache_native._bindings" in sys.modules, "version": version}))
    """)
    assert state["before"] is False and state["after"] is True and state["version"]


@pytest.mark.parametrize("era", list(ERAS), ids=list(ERAS))
def test_factory_constructs_both_roles_in_every_era(era):
    fakevllm.install(era)
    from lmcache_native import vllm_connector

    cls = vllm_connector.LMCacheNativeConnector
    parameters = list(inspect.signature(cls.__init__).parameters)
    assert parameters == ["self", "vllm_config", "role", "kv_cache_config"]
    assert inspect.signature(cls.__init__).parameters["kv_cache_config"].default is None
    spec = Spec(era=ERAS[era])
    for role in ("SCHEDULER", "WORKER"):
        conn = fakevllm.create_connector(spec.vllm_config(), fakevllm.role(role), spec.kv_cache_config())
        assert conn.role == fakevllm.role(role)
        assert conn._kv_cache_config is not None or ERAS[era] < (0, 12)
        assert conn._connector_metadata is None
        conn.shutdown()
        conn.shutdown()


def test_every_abstract_method_with_vllm_signature():
    base = fakevllm.install(NEW)
    from lmcache_native import vllm_connector

    cls = vllm_connector.LMCacheNativeConnector
    assert not inspect.isabstract(cls)
    expected = {
        "start_load_kv": ["self", "forward_context", "kwargs"],
        "wait_for_layer_load": ["self", "layer_name"],
        "save_kv_layer": ["self", "layer_name", "kv_layer", "attn_metadata", "kwargs"],
        "wait_for_save": ["self"],
        "get_num_new_matched_tokens": ["self", "request", "num_computed_tokens"],
        "update_state_after_alloc": ["self", "request", "blocks", "num_external_tokens"],
        "build_connector_meta": ["self", "scheduler_output"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(cls, name)).parameters) == parameters, name
        assert name in base.KVConnectorBase_V1.__abstractmethods__
    for name in ("register_kv_caches", "set_host_xfer_buffer_ops", "handle_preemptions", "get_finished",
                 "get_block_ids_with_load_errors", "update_connector_output", "request_finished", "take_events",
                 "get_finished_count", "get_kv_connector_stats", "build_kv_connector_stats", "shutdown",
                 "get_required_kvcache_layout", "requires_piecewise_for_cudagraph", "reset_cache"):
        assert name in cls.__dict__, f"{name} is not implemented"
    # a unique class name, not one of vLLM's built-in connectors
    assert cls.__name__ not in ("LMCacheConnectorV1", "LMCacheMPConnector", "ExampleConnector",
                                "SharedStorageConnector", "OffloadingConnector", "NixlConnector")


def test_handle_preemptions_takes_ids_or_metadata_and_metadata_pickles():
    fakevllm.install(NEW)
    import pickle

    from lmcache_native import vllm_connector

    spec = Spec(era=NEW)
    conn = fakevllm.create_connector(spec.vllm_config(), fakevllm.role("WORKER"), spec.kv_cache_config())
    meta = vllm_connector.LMCacheNativeConnectorMetadata(16, [vllm_connector.LoadSpec("r", [1, 2], [3], 0, 2, True)])
    conn.handle_preemptions({"a", "b"})
    conn.handle_preemptions(meta)
    conn.handle_preemptions(None)
    again = pickle.loads(pickle.dumps(meta))
    assert again.loads[0].token_ids == [1, 2] and again.block_size == 16
    # no metadata bound (a dummy run): every worker hook is a no-op
    conn.start_load_kv(fakevllm.ForwardContext({}, None))
    conn.wait_for_layer_load("x")
    conn.wait_for_save()
    assert conn.get_finished(set()) == (None, None)
    assert conn.get_block_ids_with_load_errors() == set()
    conn.shutdown()


def test_hma_with_several_groups_is_refused():
    fakevllm.install(V0_14)
    spec = Spec(era=V0_14)
    config = spec.kv_cache_config()
    config.kv_cache_groups = config.kv_cache_groups * 2
    with pytest.raises(ValueError, match="disable-hybrid-kv-cache-manager"):
        fakevllm.create_connector(spec.vllm_config(), fakevllm.role("SCHEDULER"), config)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
def test_precedence_file_then_environment_then_extra_config(monkeypatch, tmp_path, logs):
    config_file = tmp_path / "lmcache.yaml"
    config_file.write_text("chunk_size: 64\nsave_unfull_chunk: true\nmin_retrieve_tokens: 5\nmax_local_cpu_size: 0.5\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "32")
    monkeypatch.setenv("LMCACHE_MIN_RETRIEVE_TOKENS", "7")
    spec = Spec(era=V0_14, extra_config={"lmcache.chunk_size": 8, "discard_partial_chunks": False})
    cluster = Cluster(spec)
    try:
        resolved = cluster.workers[0].conn._worker.engine.config()
        # extra config beats the environment, which beats the file; the file alone sets the rest
        assert resolved["chunk_size"] == 8
        assert resolved["save_unfull_chunk"] is True
        assert resolved["max_local_cpu_size"] == 0.5
        # the connector's own keys never reach the engine (it refuses them); the connector reads them
        assert "min_retrieve_tokens" not in resolved and "enable_async_loading" not in resolved
        own = cluster.workers[0].conn._config
        assert own.get("min_retrieve_tokens") == 7 and cluster.conn._settings.min_retrieve_tokens == 7
        assert own.get("enable_async_loading") is True  # the connector's default
        assert own.get("async_saving") is True and cluster.conn._settings.save_async is True
        cluster.add(Req("a", list(range(100, 127)), max_tokens=1))
        cluster.run()
        assert logs.matching("[req_id=a] Stored 27 out of total 27 tokens")  # chunk 8, unfull chunk kept
        cluster.assert_empty()
    finally:
        cluster.shutdown()


def test_unknown_and_unsupported_keys_warn_by_name_and_are_dropped(monkeypatch, tmp_path, logs):
    config_file = tmp_path / "lmcache.yaml"
    config_file.write_text("chunk_size: 16\nno_such_key: 1\nnuma_mode: auto\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("LMCACHE_BOGUS_SETTING", "x")
    spec = Spec(era=V0_14, extra_config={"lmcache.another_unknown": 3, "unrelated_key_of_vllm": 1})
    cluster = Cluster(spec)  # the library refuses unknown keys: they never reach it
    try:
        warnings = "\n".join(logs.lines)
        assert "unknown LMCache config key 'no_such_key'" in warnings
        assert "unknown LMCache config key 'bogus_setting' (from environment variable LMCACHE_BOGUS_SETTING)" in warnings
        assert "unknown LMCache config key 'another_unknown' (from kv_connector_extra_config 'lmcache.another_unknown')" \
            in warnings
        assert "'numa_mode'" in warnings and "not supported by LMCacheNative" in warnings
        assert "unrelated_key_of_vllm" not in warnings
        assert cluster.workers[0].conn._worker.engine.config()["chunk_size"] == 16
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
@pytest.mark.parametrize("source,value,message", [
    ("env", "abc", "'chunk_size' (from environment variable LMCACHE_CHUNK_SIZE): must be an integer"),
    ("extra", 0, "'chunk_size' (from kv_connector_extra_config 'lmcache.chunk_size'): must be in"),
    ("extra_cpu", -1.0, "'max_local_cpu_size'"),
    ("extra_hash", "md5", "'pre_caching_hash_algorithm'"),
])
def test_invalid_values_fail_at_start_up(monkeypatch, role, source, value, message):
    fakevllm.install(V0_14)
    extra = {}
    if source == "env":
        monkeypatch.setenv("LMCACHE_CHUNK_SIZE", value)
    elif source == "extra":
        extra["lmcache.chunk_size"] = value
    elif source == "extra_cpu":
        extra["lmcache.max_local_cpu_size"] = value
    else:
        extra["lmcache.pre_caching_hash_algorithm"] = value
    spec = Spec(era=V0_14, extra_config=extra)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fakevllm.create_connector(spec.vllm_config(), fakevllm.role(role), spec.kv_cache_config())


@pytest.mark.parametrize("role", ["SCHEDULER", "WORKER"])
@pytest.mark.parametrize("key,value", [("cache_policy", "LFU"), ("use_layerwise", True), ("gds_path", "/mnt/gds")])
def test_a_value_only_the_library_rejects_fails_in_the_scheduler_too(monkeypatch, role, key, value):
    """LMCache names this build does not implement: refused from the library's schema in both roles,
    without building a throw-away engine."""
    fakevllm.install(V0_14)
    from lmcache_native import Engine

    created = []
    monkeypatch.setattr(Engine, "__init__", lambda self, *a, **k: created.append(a) or (_ for _ in ()).throw(
        AssertionError("no engine may be created to validate a configuration")))
    spec = Spec(era=V0_14, extra_config={f"lmcache.{key}": value})
    with pytest.raises(ValueError, match=f"'{key}'.*LMCacheNative refused the configuration"):
        fakevllm.create_connector(spec.vllm_config(), fakevllm.role(role), spec.kv_cache_config())
    assert not created


def test_the_scheduler_builds_no_engine(monkeypatch):
    fakevllm.install(V0_14)
    from lmcache_native import Engine

    def refuse(self, *args, **kwargs):
        raise AssertionError("the scheduler must not build an engine")

    monkeypatch.setattr(Engine, "__init__", refuse)
    spec = Spec(era=V0_14, extra_config={"lmcache.chunk_size": 8})
    conn = fakevllm.create_connector(spec.vllm_config(), fakevllm.role("SCHEDULER"), spec.kv_cache_config())
    conn.shutdown()


def test_resolved_configuration_is_logged_once_per_process():
    state = run_child("""
        import json, logging
        import fakevllm, sim
        fakevllm.install(fakevllm.V0_14)
        lines = []
        class H(logging.Handler):
            def emit(self, record): lines.append(record.getMessage())
        logging.getLogger("lmcache_native").addHandler(H())
        cluster = sim.Cluster(sim.Spec(extra_config={"lmcache.chunk_size": 32}))   # a worker and a scheduler
        cluster.shutdown()
        logged = [l for l in lines if l.startswith("LMCache Configuration: ")]
        print(json.dumps({"count": len(logged), "config": json.loads(logged[0][len("LMCache Configuration: "):])}))
    """)
    assert state["count"] == 1
    assert state["config"]["chunk_size"] == 32 and state["config"]["enable_async_loading"] is True


def test_shutdown_is_idempotent_and_a_closed_connector_degrades_to_misses(logs):
    cluster = Cluster(Spec(era=V0_14, extra_config={"lmcache.chunk_size": 8}))
    cluster.add(Req("a", list(range(50, 77)), max_tokens=1))
    cluster.run()
    worker = cluster.workers[0].conn
    cluster.shutdown()
    worker.shutdown()
    assert worker._worker.engine is None and not any(worker.internal_state_sizes().values())
    # the scheduler-side instance still answers (a miss), never raises
    assert cluster.conn.get_num_new_matched_tokens(Req("b", list(range(50, 77))), 0) == (0, False)
