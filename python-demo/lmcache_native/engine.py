"""Pythonic owner of one lmc_engine handle, plus the int32/int64 buffer helpers its calls use.

Torch stays at the edge: this module never imports torch or numpy. Tensors and arrays are recognised
by duck typing (``data_ptr``/``__array_interface__``), and KV tensors are turned into layer
descriptions by ``torch_layout`` only when ``register_layers`` is given tensors.
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import struct
import sys
from ctypes import byref, c_int32, c_int64, c_void_p

from . import _bindings as _b
from ._errors import LmcInvalidArgument, LmcInvalidHandle, check, error_for_status, last_error_message

# array.array type codes for the C integer widths the ABI uses. 'i' and 'q' are int and long long,
# which are 32 and 64 bits on every platform NativeAOT targets; asserted so a surprise is loud.
_INT32_TYPECODE = "i"
_INT64_TYPECODE = "q"
assert array.array(_INT32_TYPECODE).itemsize == 4
assert array.array(_INT64_TYPECODE).itemsize == 8


class _IntBuffer:
    """A contiguous buffer of native-endian signed integers of one width, ready to pass to C.

    ``address`` is the address of element 0 (``None`` when empty, which the ABI accepts as NULL for
    length 0), ``length`` the number of elements, and ``owner`` the Python object that owns the memory.
    Holding the buffer holds ``owner``, so the memory stays valid for as long as the buffer is used.
    """

    __slots__ = ("address", "length", "owner")
    itemsize = 0
    typecode = ""
    numpy_dtype_name = ""
    torch_dtype_name = ""

    def __init__(self, address, length: int, owner):
        self.address = address if length else None
        self.length = length
        self.owner = owner

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length}, owner={type(self.owner).__name__})"

    @classmethod
    def from_values(cls, values) -> "_IntBuffer":
        """Wraps ``values`` without copying when it already is a contiguous 1-D buffer of the right
        width (array.array, numpy array or CPU torch tensor); otherwise converts it once."""
        if isinstance(values, cls):
            return values
        if type(values) is list or type(values) is tuple:
            # struct.pack converts a list of ints about twice as fast as array.array (8192 tokens:
            # ~85 us vs ~150 us here). The bytes object is immutable and never moves, so its data
            # address stays valid while the buffer holds it; the C side only reads it.
            try:
                packed = struct.pack(f"{len(values)}{cls.typecode}", *values)
            except struct.error:
                pass  # out of range or not an int: array.array below raises the precise error
            else:
                return cls(ctypes.cast(packed, c_void_p).value, len(values), packed)
        if isinstance(values, array.array):
            if values.itemsize != cls.itemsize or values.typecode not in "bhilq":
                values = array.array(cls.typecode, values)
            address, length = values.buffer_info()
            return cls(address, length, values)
        if hasattr(values, "__array_interface__") and hasattr(values, "dtype"):  # numpy.ndarray
            return cls._from_numpy(values)
        if hasattr(values, "data_ptr") and hasattr(values, "dtype"):  # torch.Tensor
            return cls._from_torch(values)
        # Any other iterable of ints (range, generator, ...); array.array raises OverflowError on
        # ints that do not fit the width instead of wrapping them.
        converted = array.array(cls.typecode, values)
        address, length = converted.buffer_info()
        return cls(address, length, converted)

    @classmethod
    def _from_numpy(cls, values) -> "_IntBuffer":
        import numpy  # only reached when the caller already uses numpy

        if values.ndim != 1:
            raise LmcInvalidArgument(
                _b.LMC_E_INVALID_ARGUMENT, f"expected a 1-D array, got shape {values.shape}"
            )
        if values.dtype != numpy.dtype(cls.numpy_dtype_name) or not values.flags.c_contiguous:
            values = numpy.ascontiguousarray(values, dtype=cls.numpy_dtype_name)
        return cls(values.__array_interface__["data"][0], values.shape[0], values)

    @classmethod
    def _from_torch(cls, values) -> "_IntBuffer":
        import torch  # only reached when the caller already uses torch

        if values.dim() != 1:
            raise LmcInvalidArgument(
                _b.LMC_E_INVALID_ARGUMENT, f"expected a 1-D tensor, got shape {tuple(values.shape)}"
            )
        wanted_dtype = getattr(torch, cls.torch_dtype_name)
        if values.device.type != "cpu" or values.dtype != wanted_dtype or not values.is_contiguous():
            values = values.to(device="cpu", dtype=wanted_dtype).contiguous()
        return cls(values.data_ptr(), values.shape[0], values)


class TokenBuffer(_IntBuffer):
    """Token ids as contiguous int32 (``const int32_t *tokens``)."""

    __slots__ = ()
    itemsize = 4
    typecode = _INT32_TYPECODE
    numpy_dtype_name = "int32"
    torch_dtype_name = "int32"


class SlotBuffer(_IntBuffer):
    """Slot mapping as contiguous int64 (``const int64_t *slot_mapping``); -1 = no slot."""

    __slots__ = ()
    itemsize = 8
    typecode = _INT64_TYPECODE
    numpy_dtype_name = "int64"
    torch_dtype_name = "int64"


def as_int32_buffer(tokens) -> TokenBuffer:
    """Converts token ids once so they can be passed to many calls without further conversion."""
    return TokenBuffer.from_values(tokens)


def as_int64_buffer(slots) -> SlotBuffer:
    """Converts a slot mapping once so it can be passed to many calls without further conversion."""
    return SlotBuffer.from_values(slots)


def _as_key_bytes(extra_key) -> bytes:
    if isinstance(extra_key, bytes):
        return extra_key
    if isinstance(extra_key, str):
        return extra_key.encode("utf-8")
    return bytes(extra_key)  # bytearray, memoryview, ...


def _closed_engine_error() -> LmcInvalidHandle:
    return LmcInvalidHandle(_b.LMC_E_INVALID_HANDLE, "the engine is closed")


def _check_lengths(tokens: TokenBuffer, slots: SlotBuffer) -> None:
    # The C call takes one length for both arrays, so a shorter slot mapping would be read past its
    # end. This is the one check that must happen on the Python side.
    if slots.length != tokens.length:
        raise LmcInvalidArgument(
            _b.LMC_E_INVALID_ARGUMENT,
            f"slot_mapping has {slots.length} entries but tokens has {tokens.length}",
        )


def _transfer_args(tokens, slot_mapping, extra_key) -> tuple[TokenBuffer, SlotBuffer, bytes]:
    """The converted arguments of a store or retrieve, their lengths checked against each other."""
    tokens = TokenBuffer.from_values(tokens)
    slots = SlotBuffer.from_values(slot_mapping)
    _check_lengths(tokens, slots)
    return tokens, slots, _as_key_bytes(extra_key)


class Engine:
    """One LMCacheNative engine: a CPU KV cache keyed by token prefixes.

    ``config`` is a dict (serialised to JSON), a JSON string, or None for all defaults; keys are
    LMCache's (chunk_size, max_local_cpu_size, save_unfull_chunk, pre_caching_hash_algorithm, ...).
    Use as a context manager or call ``close()``; a closed engine raises ``LmcInvalidHandle``.
    """

    def __init__(self, config: dict | str | None = None, model_name: str = "", world_size: int = 1,
                 worker_id: int = 0):
        self._handle = None  # int address of the lmc_engine, None once closed
        self._registered_owners = []  # tensors whose memory the engine reads and writes
        self._bytes_per_token = 0
        if isinstance(config, dict):
            config_json = json.dumps(config).encode("utf-8")
        elif isinstance(config, str):
            config_json = config.encode("utf-8")
        elif config is None:
            config_json = None
        else:
            raise TypeError(f"config must be a dict, a JSON string or None, not {type(config).__name__}")
        handle = c_void_p()
        check(_b.lmc_engine_create(byref(handle), config_json, model_name.encode("utf-8"),
                                   world_size, worker_id))
        self._handle = handle.value

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroys the engine (idempotent). The registered KV memory is released by the caller only
        after this, which is why the tensor references are dropped after the destroy."""
        handle, self._handle = self._handle, None
        if handle is not None:
            _b.lmc_engine_destroy(handle)
        self._registered_owners = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        # During interpreter shutdown the bindings module may already be torn down.
        if not sys.is_finalizing():
            self.close()

    @property
    def closed(self) -> bool:
        return self._handle is None

    @property
    def handle(self) -> int:
        """The raw lmc_engine address, for the raw bindings."""
        if self._handle is None:
            raise _closed_engine_error()
        return self._handle

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else hex(self._handle)
        return f"<lmcache_native.Engine {state}>"

    # -- configuration and layers -----------------------------------------------------------------
    def config(self) -> dict:
        """The resolved configuration, via the size-query protocol of lmc_engine_get_config."""
        handle = self.handle
        needed = c_int64(0)
        status = _b.lmc_engine_get_config(byref(needed), handle, None, 0)
        if status not in (_b.LMC_OK, _b.LMC_E_BUFFER_TOO_SMALL):
            raise error_for_status(status, last_error_message())
        while True:
            buffer = ctypes.create_string_buffer(max(needed.value, 1))
            status = _b.lmc_engine_get_config(byref(needed), handle, buffer, len(buffer))
            if status != _b.LMC_E_BUFFER_TOO_SMALL:  # a concurrent change could make it grow
                check(status)
                return json.loads(buffer.value.decode("utf-8"))

    def register_layers(self, layers, layout: str | None = None) -> None:
        """Registers the KV layers in model layer order. ``layers`` is a list of ``LmcKvLayerDesc``
        and/or torch tensors (converted with ``torch_layout.layer_desc_from_tensor(t, layout)``), or
        a dict of layer name -> tensor as vLLM's ``register_kv_caches`` receives it. Tensors are kept
        referenced until the engine is closed or re-registered, since the engine writes into them."""
        if isinstance(layers, dict):
            layers = list(layers.values())
        descs, owners = [], []
        for layer in layers:
            if isinstance(layer, _b.LmcKvLayerDesc):
                descs.append(layer)
            else:
                from .torch_layout import layer_desc_from_tensor

                descs.append(layer_desc_from_tensor(layer, layout))
                owners.append(layer)
        handle = self.handle
        array_type = _b.LmcKvLayerDesc * len(descs)
        check(_b.lmc_engine_register_layers(handle, array_type(*descs), len(descs)))
        self._registered_owners = owners
        self._bytes_per_token = sum(
            d.kv_count * d.num_kv_heads * d.head_size * d.elem_size for d in descs
        )

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token over all registered layers (what store/retrieve move per token)."""
        return self._bytes_per_token

    # -- lookup, store, retrieve ------------------------------------------------------------------
    def lookup(self, tokens, extra_key=b"") -> int:
        """Number of leading tokens whose KV is cached. Pass a ``TokenBuffer`` to skip conversion."""
        handle = self._handle
        if handle is None:
            raise _closed_engine_error()
        if type(tokens) is not TokenBuffer:
            tokens = TokenBuffer.from_values(tokens)
        if type(extra_key) is not bytes:
            extra_key = _as_key_bytes(extra_key)
        hit_tokens = c_int64()
        status = _b.lmc_lookup(byref(hit_tokens), handle, tokens.address, tokens.length,
                               extra_key, len(extra_key))
        if status:
            check(status)
        return hit_tokens.value

    def store(self, tokens, slot_mapping, skip_leading_tokens: int = 0, extra_key=b"") -> int:
        """Stores the KV of ``tokens`` found at ``slot_mapping``; returns the tokens from the
        rounded-down skip point whose chunks are cached after the call."""
        handle = self.handle
        tokens, slots, extra_key = _transfer_args(tokens, slot_mapping, extra_key)
        stored_tokens = c_int64()
        check(_b.lmc_store(byref(stored_tokens), handle, tokens.address, slots.address,
                           tokens.length, skip_leading_tokens, extra_key, len(extra_key)))
        return stored_tokens.value

    def retrieve(self, tokens, slot_mapping, first_token_to_write: int = 0, extra_key=b"") -> int:
        """Writes the longest cached prefix into the registered layers at ``slot_mapping`` (only
        tokens from ``first_token_to_write`` on, and not slots -1); returns the prefix length."""
        handle = self.handle
        tokens, slots, extra_key = _transfer_args(tokens, slot_mapping, extra_key)
        retrieved_tokens = c_int64()
        check(_b.lmc_retrieve(byref(retrieved_tokens), handle, tokens.address, slots.address,
                              tokens.length, first_token_to_write, extra_key, len(extra_key)))
        return retrieved_tokens.value

    def store_async(self, tokens, slot_mapping, skip_leading_tokens: int = 0, extra_key=b"",
                    stream: int = 0) -> tuple["Job", int]:
        """``store`` with the copy enqueued on the CUDA ``stream`` of the registered device layers
        (``torch.cuda.current_stream().cuda_stream``; 0 = the legacy default stream). Returns the job
        (its ``wait()`` gives the stored tokens once the device is done) and the tokens that will be
        cached when it succeeds. With host layers the copy is done when this returns."""
        handle = self.handle
        tokens, slots, extra_key = _transfer_args(tokens, slot_mapping, extra_key)
        job, stored_tokens = c_void_p(), c_int64()
        check(_b.lmc_store_async(byref(job), byref(stored_tokens), handle, tokens.address, slots.address,
                                 tokens.length, skip_leading_tokens, extra_key, len(extra_key), stream))
        return Job(job.value), stored_tokens.value

    def retrieve_async(self, tokens, slot_mapping, first_token_to_write: int = 0, extra_key=b"",
                       stream: int = 0) -> tuple["Job", int]:
        """``retrieve`` with the copy into the layers enqueued on the CUDA ``stream``: work enqueued on
        that stream afterwards sees the KV; other streams and the host must ``wait()`` for the job.
        Returns the job and the length of the prefix being retrieved."""
        handle = self.handle
        tokens, slots, extra_key = _transfer_args(tokens, slot_mapping, extra_key)
        job, retrieved_tokens = c_void_p(), c_int64()
        check(_b.lmc_retrieve_async(byref(job), byref(retrieved_tokens), handle, tokens.address,
                                    slots.address, tokens.length, first_token_to_write, extra_key,
                                    len(extra_key), stream))
        return Job(job.value), retrieved_tokens.value

    # -- statistics and maintenance ---------------------------------------------------------------
    def stats(self) -> dict:
        """Counters since creation and pool gauges, keyed by the lmc_stats field names."""
        stats = _b.LmcStats()
        check(_b.lmc_engine_get_stats(self.handle, byref(stats)))
        return stats.as_dict()

    def tier_stats(self) -> list[dict]:
        """Counters of each lower tier (local disk, then remote), keyed by lmc_tier_stats field names."""
        handle = self.handle
        count = c_int32()
        check(_b.lmc_engine_tier_count(byref(count), handle))
        tiers = []
        for index in range(count.value):
            stats = _b.LmcTierStats()
            check(_b.lmc_engine_get_tier_stats(handle, index, byref(stats)))
            tiers.append(stats.as_dict())
        return tiers

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until the lower tiers have written everything stored so far (None: no limit);
        raises ``LmcTimeout`` when the time runs out first."""
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000))
        check(_b.lmc_engine_flush(self.handle, timeout_ms))

    def start_lookup_server(self, socket_path: str) -> None:
        """Serves this engine's lookups to other processes on a Unix-domain socket (see
        ``remote_lookup``); stopped by ``stop_lookup_server`` or ``close``."""
        check(_b.lmc_lookup_server_start(self.handle, os.fsencode(socket_path)))

    def stop_lookup_server(self) -> None:
        check(_b.lmc_lookup_server_stop(self.handle))

    def prefetch(self, tokens, extra_key=b"") -> "Job":
        """Starts bringing the cached prefix of ``tokens`` from disk or remote into the CPU tier in
        the background; ``Job.wait()`` returns the leading tokens then in memory."""
        handle = self.handle
        tokens = TokenBuffer.from_values(tokens)
        extra_key = _as_key_bytes(extra_key)
        job = c_void_p()
        check(_b.lmc_prefetch_start(byref(job), handle, tokens.address, tokens.length, extra_key,
                                    len(extra_key)))
        return Job(job.value)

    def clear(self) -> None:
        """Drops every chunk of the CPU tier that is not being read; lower tiers keep their records
        and counters are kept."""
        check(_b.lmc_engine_clear(self.handle))


def cuda_device_count() -> int:
    """CUDA devices the library can use; raises ``LmcNoDevice`` without a driver or a GPU."""
    count = c_int32()
    check(_b.lmc_cuda_device_count(byref(count)))
    return count.value


def remote_lookup(socket_path: str, tokens, extra_key=b"", timeout_s: float | None = 3.0) -> int:
    """Leading tokens cached by the engine serving on ``socket_path`` (in any process). Raises
    ``LmcTimeout`` when it does not answer within ``timeout_s`` (None: no bound) and ``LmcIOError``
    when no server is there; callers such as vLLM's scheduler treat both as a miss."""
    tokens = TokenBuffer.from_values(tokens)
    extra_key = _as_key_bytes(extra_key)
    timeout_ms = -1 if timeout_s is None else max(1, int(timeout_s * 1000))
    hit_tokens = c_int64()
    check(_b.lmc_remote_lookup(byref(hit_tokens), os.fsencode(socket_path), tokens.address,
                               tokens.length, extra_key, len(extra_key), timeout_ms))
    return hit_tokens.value


class Job:
    """A background operation (lmc_job). ``wait`` returns its result; ``close`` (idempotent, also on
    ``__exit__``) releases the handle, and a job still running then goes on unobserved."""

    def __init__(self, handle: int):
        self._handle = handle

    def wait(self, timeout_s: float | None = None) -> int:
        """The job's result; raises ``LmcTimeout`` if it is still running after ``timeout_s``
        (None waits as long as it takes), or the error the job failed with."""
        if self._handle is None:
            raise LmcInvalidHandle(_b.LMC_E_INVALID_HANDLE, "the job has been closed")
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000))
        result = c_int64()
        check(_b.lmc_job_wait(byref(result), self._handle, timeout_ms))
        return result.value

    def done(self) -> bool:
        """Whether the job has finished (successfully or not)."""
        if self._handle is None:
            return True
        result = c_int64()
        return _b.lmc_job_wait(byref(result), self._handle, 0) != _b.LMC_E_TIMEOUT

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            _b.lmc_job_destroy(handle)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if not sys.is_finalizing():
            self.close()
