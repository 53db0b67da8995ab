"""lmcache_native: Python bindings of liblmcache_native.so (LMCache's KV-cache layer in C#/NativeAOT).

    from lmcache_native import Engine
    with Engine({"chunk_size": 256}) as engine:
        engine.register_layers(kv_caches, layout="flash_attn")   # list/dict of torch tensors
        engine.store(tokens, slot_mapping)                    # or block_ids=..., block_size=...
        hit_tokens = engine.lookup(tokens)                    # LookupResult: an int, per tier too
        engine.retrieve(tokens, slot_mapping)                 # TransferResult: an int, with details
        with engine.retrieve_async(tokens, slot_mapping) as job:
            result = job.wait()

``import lmcache_native`` (and ``import lmcache_native.vllm_connector``, vLLM's
``kv_connector_module_path``) loads nothing: vLLM imports its connector in processes that never use
it, and loading the library there (the .NET runtime starts threads) must not be a side effect of an
import. The library is loaded when a name of this package is first used, e.g.
``from lmcache_native import Engine``; that first use refuses to continue (ImportError) when the
library's ABI version differs from the one these bindings were written for, since a silent ABI
mismatch would corrupt memory.
"""

from importlib import import_module as _import_module

# Public name -> the private module that defines it. Importing _bindings loads the library and
# checks its ABI version before anything else is bound.
_DEFINED_IN = {
    "ABI_VERSION": "_bindings",
    "LmcKvLayerDesc": "_bindings",
    "LmcLookupResult": "_bindings",
    "LmcRequest": "_bindings",
    "LmcTransferResult": "_bindings",
    "LmcStats": "_bindings",
    "LmcTierStats": "_bindings",
    "LmcKvEvent": "_bindings",
    **{name: "_errors" for name in (
        "LmcBufferTooSmall", "LmcCudaError", "LmcError", "LmcInternalError", "LmcInvalidArgument",
        "LmcInvalidHandle", "LmcIOError", "LmcNoDevice", "LmcNotFound", "LmcOutOfMemory", "LmcTimeout",
        "LmcUnsupported", "check")},
    **{name: "engine" for name in (
        "BlockIdBuffer", "Engine", "Job", "KvEvent", "LookupResult", "PolledEvents", "SlotBuffer", "TokenBuffer",
        "TransferResult",
        "as_int32_buffer", "as_int64_buffer", "config_schema", "cuda_device_count", "remote_lookup")},
}

__all__ = sorted(_DEFINED_IN)


def __getattr__(name: str):
    """Loads the library on the first use of one of its names (PEP 562), then caches the name."""
    if name == "__version__":
        value = _import_module("._bindings", __name__).lmc_version_string().decode("ascii")
    elif name in _DEFINED_IN:
        value = getattr(_import_module("." + _DEFINED_IN[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_DEFINED_IN) | {"__version__"})
