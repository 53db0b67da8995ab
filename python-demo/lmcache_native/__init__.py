"""lmcache_native: Python bindings of liblmcache_native.so (LMCache's KV-cache layer in C#/NativeAOT).

    from lmcache_native import Engine
    with Engine({"chunk_size": 256}) as engine:
        engine.register_layers(kv_caches, layout="flash_attn")   # list/dict of torch tensors
        engine.store(tokens, slot_mapping)
        hit_tokens = engine.lookup(tokens)
        engine.retrieve(tokens, slot_mapping)

Importing the package loads the library and refuses to continue (ImportError) when its ABI version
differs from the one these bindings were written for: a silent ABI mismatch would corrupt memory.
"""

# _bindings checks the library's ABI version before it binds anything else (ImportError on a
# mismatch), so a library of another ABI, possibly lacking functions, fails with the clear message.
from . import _bindings
from ._bindings import ABI_VERSION, LmcKvLayerDesc, LmcStats, LmcTierStats

from ._errors import (  # noqa: E402  (after the ABI gate on purpose)
    LmcBufferTooSmall,
    LmcCudaError,
    LmcError,
    LmcInternalError,
    LmcInvalidArgument,
    LmcInvalidHandle,
    LmcIOError,
    LmcNoDevice,
    LmcNotFound,
    LmcOutOfMemory,
    LmcTimeout,
    LmcUnsupported,
    check,
)
from .engine import (  # noqa: E402
    Engine,
    Job,
    SlotBuffer,
    TokenBuffer,
    as_int32_buffer,
    as_int64_buffer,
    remote_lookup,
)

__version__ = _bindings.lmc_version_string().decode("ascii")

__all__ = [
    "ABI_VERSION",
    "Engine",
    "Job",
    "LmcKvLayerDesc",
    "LmcStats",
    "LmcTierStats",
    "TokenBuffer",
    "SlotBuffer",
    "as_int32_buffer",
    "as_int64_buffer",
    "remote_lookup",
    "check",
    "LmcError",
    "LmcInvalidArgument",
    "LmcInvalidHandle",
    "LmcUnsupported",
    "LmcOutOfMemory",
    "LmcNotFound",
    "LmcIOError",
    "LmcCudaError",
    "LmcNoDevice",
    "LmcBufferTooSmall",
    "LmcInternalError",
    "LmcTimeout",
]
