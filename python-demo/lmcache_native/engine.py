"""Pythonic owner of one lmc_engine handle, plus the int32/int64 buffer helpers its calls use.

Torch stays at the edge: this module never imports torch or numpy. Tensors and arrays are recognised
by duck typing (``data_ptr``/``__array_interface__``), and KV tensors are turned into layer
descriptions by ``torch_layout`` only when ``register_layers`` is given tensors.
"""

from __future__ import annotations

import array
import ctypes
import json
import operator
import os
import struct
import sys
import threading
from ctypes import byref, c_int32, c_int64, c_uint64, c_void_p
from dataclasses import dataclass
from typing import NamedTuple

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
    def _check_range(cls, values) -> None:
        """Refuses integers that do not fit the buffer's width before a narrowing cast would wrap
        them (one vectorised min/max, no per-element Python work)."""
        if len(values) == 0:
            return
        limit = 1 << (8 * cls.itemsize - 1)
        low, high = int(values.min()), int(values.max())
        if low < -limit or high >= limit:
            raise OverflowError(
                f"{cls.__name__}: values in [{low}, {high}] do not fit int{8 * cls.itemsize}"
            )

    @classmethod
    def _from_numpy(cls, values) -> "_IntBuffer":
        import numpy  # only reached when the caller already uses numpy

        if values.ndim != 1:
            raise LmcInvalidArgument(
                _b.LMC_E_INVALID_ARGUMENT, f"expected a 1-D array, got shape {values.shape}"
            )
        if values.dtype != numpy.dtype(cls.numpy_dtype_name) or not values.flags.c_contiguous:
            if values.dtype.kind in "iu" and values.dtype.itemsize >= cls.itemsize:
                cls._check_range(values)
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
            values = values.to(device="cpu")
            if values.dtype == torch.int64 and cls.itemsize < 8:
                cls._check_range(values)
            values = values.to(dtype=wanted_dtype).contiguous()
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


class BlockIdBuffer(_IntBuffer):
    """A block table as contiguous int32 (``const int32_t *block_ids``); -1 = no block."""

    __slots__ = ()
    itemsize = 4
    typecode = _INT32_TYPECODE
    numpy_dtype_name = "int32"
    torch_dtype_name = "int32"

    @classmethod
    def from_values(cls, values) -> "BlockIdBuffer":
        if type(values) is list or type(values) is tuple:
            # Block tables are short (tokens / block_size entries); array.array converts at C speed
            # and raises OverflowError on ids that do not fit int32.
            converted = array.array(cls.typecode, values)
            address, length = converted.buffer_info()
            return cls(address, length, converted)
        return super().from_values(values)


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


_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class _ResultInt(int):
    """A library result struct read as an int (the value of ``_VALUE_FIELD``) with every field as
    an attribute; fixed arrays become tuples. Pickles as its fields."""

    _FIELDS: tuple = ()
    _VALUE_FIELD = ""

    @classmethod
    def _from_fields(cls, values: dict):
        result = int.__new__(cls, values[cls._VALUE_FIELD])
        for name in cls._FIELDS:
            value = values[name]
            setattr(result, name, value if isinstance(value, int) else tuple(value))
        return result

    @classmethod
    def _from_c(cls, struct):
        return cls._from_fields({name: getattr(struct, name) for name in cls._FIELDS})

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._FIELDS}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"{type(self).__name__}({inner})"

    __str__ = int.__repr__  # str(), f"{result}" and "%d" read like the plain count

    def __reduce__(self):
        return (type(self)._from_fields, (self.as_dict(),))


class TransferResult(_ResultInt):
    """What a store, retrieve or prefetch did (lmc_transfer_result). Its int value is
    ``tokens_matched`` (store: tokens from the rounded-down skip point now cached; retrieve: the
    cached prefix length; prefetch: leading tokens now in the CPU tier), so it compares like the
    token count the v1 calls returned. ``chunks_by_tier[0]`` is the CPU tier, ``[i]`` the lower tier
    i - 1 (store: ``[0]`` = chunks already cached)."""

    _FIELDS = ("tokens_matched", "tokens_copied", "bytes_copied", "chunks_skipped_for_space",
               "chunks_by_tier", "elapsed_ns")
    _VALUE_FIELD = "tokens_matched"
    tokens_matched: int
    tokens_copied: int
    bytes_copied: int
    chunks_skipped_for_space: int
    chunks_by_tier: tuple
    elapsed_ns: int


class LookupResult(_ResultInt):
    """What a lookup found (lmc_lookup_result). Its int value is ``hit_tokens``; ``tokens_by_tier``
    says how many of them each tier holds ([0] CPU, [i] lower tier i - 1; they add up)."""

    _FIELDS = ("hit_tokens", "tokens_by_tier", "elapsed_ns")
    _VALUE_FIELD = "hit_tokens"
    hit_tokens: int
    tokens_by_tier: tuple
    elapsed_ns: int


def _check_int(name: str, value, low: int, high: int) -> int:
    # ctypes stores integers into struct fields modulo 2**bits without complaint; refuse instead.
    if not low <= value <= high:
        raise OverflowError(f"{name}={value} is outside [{low}, {high}]")
    return value


def _request(tokens, extra_key, first_token: int = 0, slot_mapping=None, block_ids=None,
             block_size=None, stream=0, destination_required: bool = True):
    """Builds an lmc_request. Returns (request, owners): the converted buffers the request points
    into, which the caller holds until the call has returned."""
    if type(tokens) is not TokenBuffer:
        tokens = TokenBuffer.from_values(tokens)
    if type(extra_key) is not bytes:
        extra_key = _as_key_bytes(extra_key)
    request = _b.LmcRequest()
    request.tokens = tokens.address
    request.num_tokens = tokens.length
    if extra_key:
        request.extra_key = extra_key
        request.extra_key_len = len(extra_key)
    if first_token:
        request.first_token = _check_int("first_token", operator.index(first_token), _INT64_MIN,
                                         _INT64_MAX)
    if stream:
        request.stream = operator.index(stream)
    destination = None
    if block_ids is not None or block_size is not None:
        if slot_mapping is not None:
            raise TypeError("pass either slot_mapping or block_ids (with block_size), not both")
        if block_ids is None or block_size is None:
            raise TypeError("block_ids and block_size go together: pass both")
        destination = BlockIdBuffer.from_values(block_ids)
        request.destination_kind = _b.LMC_DESTINATION_BLOCK_TABLE
        request.block_ids = destination.address
        request.num_block_ids = destination.length
        # Values < 1 go to the library, which refuses them (LmcInvalidArgument, a ValueError).
        request.table_block_size = _check_int("block_size", operator.index(block_size), _INT32_MIN,
                                              _INT32_MAX)
    elif slot_mapping is not None:
        destination = SlotBuffer.from_values(slot_mapping)
        # The request carries one length for tokens and slots, so a shorter slot mapping would be
        # read past its end. This is the one check that must happen on the Python side.
        if destination.length != tokens.length:
            raise LmcInvalidArgument(
                _b.LMC_E_INVALID_ARGUMENT,
                f"slot_mapping has {destination.length} entries but tokens has {tokens.length}",
            )
        request.slot_mapping = destination.address
    elif destination_required:
        raise TypeError("pass slot_mapping or block_ids (with block_size)")
    return request, (tokens, destination, extra_key)


_KV_EVENT_KINDS = {
    _b.LMC_KV_EVENT_BLOCK_STORED: "BlockStored",
    _b.LMC_KV_EVENT_BLOCK_REMOVED: "BlockRemoved",
    _b.LMC_KV_EVENT_ALL_BLOCKS_CLEARED: "AllBlocksCleared",
}
# vLLM's medium strings.
_KV_EVENT_MEDIA = {_b.LMC_KV_MEDIUM_CPU: "CPU", _b.LMC_KV_MEDIUM_DISK: "DISK", _b.LMC_KV_MEDIUM_REMOTE: "REMOTE"}


@dataclass(frozen=True)
class KvEvent:
    """One KV event of ``Engine.poll_events`` (lmc_kv_event). Hashable: equal events compare equal.

    ``kind``: "BlockStored", "BlockRemoved" or "AllBlocksCleared"; ``medium``: "CPU", "DISK" or
    "REMOTE" (vLLM's strings; a clear is "CPU"). ``block_hash`` / ``parent_hash``: the chunk's and
    the previous chunk's hash (32 bytes for sha256 keys, 16 for xxh3_128); ``parent_hash`` is None
    for a prefix's first chunk and for removals, ``block_hash`` None for a clear. ``token_ids``: the
    chunk's tokens (BlockStored only, else None); ``token_count`` its length."""

    kind: str
    medium: str
    block_hash: bytes | None
    parent_hash: bytes | None
    token_count: int
    token_ids: tuple[int, ...] | None

    @classmethod
    def _from_c(cls, event, token_ids) -> "KvEvent":
        kind = _KV_EVENT_KINDS.get(event.kind, f"unknown({event.kind})")
        medium = _KV_EVENT_MEDIA.get(event.medium, f"unknown({event.medium})")
        block_hash = bytes(event.block_hash[:event.hash_len]) if event.hash_len else None
        parent_hash = bytes(event.parent_hash[:event.parent_hash_len]) if event.parent_hash_len else None
        ids = None
        if event.kind == _b.LMC_KV_EVENT_BLOCK_STORED:
            start = event.token_ids_offset
            ids = tuple(token_ids[start:start + event.token_ids_count])
        return cls(kind, medium, block_hash, parent_hash, event.token_count, ids)


class PolledEvents(NamedTuple):
    """What one ``Engine.poll_events`` returned: the events, oldest first, and how many were dropped
    (queue full) since the previous poll."""

    events: list
    dropped: int


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
        self._events_lock = threading.Lock()
        self._event_buffers = None  # (lmc_kv_event array, int32 token array), reused by poll_events
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
        return json.loads(_read_sized_text(_b.lmc_engine_get_config, self.handle))

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
    def lookup(self, tokens, extra_key=b"") -> LookupResult:
        """How many leading tokens are cached (the int value) and in which tier. Pass a
        ``TokenBuffer`` to skip conversion."""
        handle = self._handle
        if handle is None:
            raise _closed_engine_error()
        request, owners = _request(tokens, extra_key, destination_required=False)
        result = _b.LmcLookupResult()
        status = _b.lmc_lookup(byref(result), handle, byref(request))
        if status:
            check(status)
        return LookupResult._from_c(result)

    def _transfer(self, function, tokens, slot_mapping, first_token, extra_key, block_ids,
                  block_size, stream, asynchronous: bool):
        handle = self.handle
        request, owners = _request(tokens, extra_key, first_token, slot_mapping, block_ids,
                                   block_size, stream)
        if asynchronous:
            job = c_void_p()
            check(function(None, handle, byref(request), byref(job)))
            return Job(job.value, self)
        result = _b.LmcTransferResult()
        check(function(byref(result), handle, byref(request), None))
        return TransferResult._from_c(result)

    def store(self, tokens, slot_mapping=None, skip_leading_tokens: int = 0, extra_key=b"", *,
              block_ids=None, block_size=None, stream=0) -> TransferResult:
        """Stores the KV of ``tokens`` found at ``slot_mapping`` (or in the block table
        ``block_ids`` of ``block_size`` tokens per block). The result's int value is the number of
        tokens from the rounded-down skip point whose chunks are cached after the call."""
        return self._transfer(_b.lmc_store, tokens, slot_mapping, skip_leading_tokens, extra_key,
                              block_ids, block_size, stream, False)

    def retrieve(self, tokens, slot_mapping=None, first_token_to_write: int = 0, extra_key=b"", *,
                 block_ids=None, block_size=None, stream=0) -> TransferResult:
        """Writes the longest cached prefix into the registered layers at ``slot_mapping`` (or the
        block table ``block_ids``), only tokens from ``first_token_to_write`` on and never slots -1.
        The result's int value is the prefix length."""
        return self._transfer(_b.lmc_retrieve, tokens, slot_mapping, first_token_to_write,
                              extra_key, block_ids, block_size, stream, False)

    def store_async(self, tokens, slot_mapping=None, skip_leading_tokens: int = 0, extra_key=b"", *,
                    block_ids=None, block_size=None, stream=0) -> "Job":
        """``store`` in the background (the request is copied, so the buffers may be reused at
        once): on the engine's workers for host layers, on the CUDA ``stream`` (0 = the library's
        own) for device layers. ``Job.wait()`` gives the ``TransferResult`` ``store`` would have."""
        return self._transfer(_b.lmc_store, tokens, slot_mapping, skip_leading_tokens, extra_key,
                              block_ids, block_size, stream, True)

    def retrieve_async(self, tokens, slot_mapping=None, first_token_to_write: int = 0, extra_key=b"",
                       *, block_ids=None, block_size=None, stream=0) -> "Job":
        """``retrieve`` in the background. For CUDA layers work enqueued on ``stream`` afterwards
        sees the KV; other streams and the host must wait for the job first."""
        return self._transfer(_b.lmc_retrieve, tokens, slot_mapping, first_token_to_write,
                              extra_key, block_ids, block_size, stream, True)

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

    def metrics(self) -> str:
        """The engine's metrics in the Prometheus text exposition format (lmc_engine_get_metrics):
        LMCache's ``lmcache:*`` names, labels model_name / worker_id / role and buckets; serve it as
        ``text/plain; version=0.0.4``. docs/metrics.md lists every metric."""
        # Room for counters that gain digits between the size query and the read.
        return _read_sized_text(_b.lmc_engine_get_metrics, self.handle, slack=1024)

    def metric_families(self) -> dict:
        """``metrics()`` parsed with prometheus_client's parser: family name -> Metric (its
        ``.samples`` have ``.name``, ``.labels``, ``.value``). Needs prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        return {family.name: family for family in text_string_to_metric_families(self.metrics())}

    def tier_nodes(self, tier_index: int) -> list[dict]:
        """Per-node counters of lower tier ``tier_index`` (lmc_engine_get_tier_nodes): one dict per
        remote node with endpoint, role, connected, bytes_read, bytes_written, errors, reconnects,
        redirects and last_error; [] for local tiers."""
        return json.loads(_read_sized_text(_b.lmc_engine_get_tier_nodes, self.handle, tier_index))

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
        the background; ``Job.wait()`` gives a ``TransferResult`` whose value is the leading tokens
        then in memory and whose ``chunks_by_tier`` says where they were found."""
        handle = self.handle
        request, owners = _request(tokens, extra_key, destination_required=False)
        job = c_void_p()
        check(_b.lmc_prefetch_start(byref(job), handle, byref(request)))
        return Job(job.value, self)

    def clear(self) -> None:
        """Drops every chunk of the CPU tier that is not being read; lower tiers keep their records
        and counters are kept."""
        check(_b.lmc_engine_clear(self.handle))

    # -- KV events (enable_kv_events) -------------------------------------------------------------
    def poll_events(self, max_events: int = 256) -> "PolledEvents":
        """Takes up to ``max_events`` queued KV events, oldest first, without waiting (none when
        ``enable_kv_events`` is off). ``dropped``: events lost because the queue was full since
        the previous poll; nonzero means the caller's view is incomplete and should be rebuilt."""
        max_events = _check_int("max_events", operator.index(max_events), 1, 1 << 20)
        handle = self.handle
        with self._events_lock:
            if self._event_buffers is None or len(self._event_buffers[0]) < max_events:
                chunk_size = int(self.config()["chunk_size"])
                # Room for every event's tokens: a poll never stops early for want of token space.
                self._event_buffers = ((_b.LmcKvEvent * max_events)(), (c_int32 * (max_events * chunk_size))())
            events, token_ids = self._event_buffers
            count, num_tokens, dropped = c_int64(), c_int64(), c_uint64()
            check(_b.lmc_engine_poll_events(byref(count), byref(num_tokens), byref(dropped), handle, events,
                                            ctypes.sizeof(_b.LmcKvEvent), max_events, token_ids, len(token_ids)))
            return PolledEvents([KvEvent._from_c(events[i], token_ids) for i in range(count.value)], dropped.value)


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


_config_schema_cache = None


def _read_sized_text(function, *args, slack: int = 0) -> str:
    """Calls an export with the size-query protocol of lmc_engine_get_config,
    ``function(needed_out, *args, buffer, capacity)``: asks for the size, then reads, asking again
    when the text grew in between (a concurrent change); returns the text."""
    needed = c_int64(0)
    status = function(byref(needed), *args, None, 0)
    if status not in (_b.LMC_OK, _b.LMC_E_BUFFER_TOO_SMALL):
        raise error_for_status(status, last_error_message())
    while True:
        buffer = ctypes.create_string_buffer(max(needed.value, 1) + slack)
        status = function(byref(needed), *args, buffer, len(buffer))
        if status != _b.LMC_E_BUFFER_TOO_SMALL:
            check(status)
            return buffer.value.decode("utf-8")


def config_schema() -> list[dict]:
    """The configuration keys ``Engine`` accepts (lmc_config_schema), one dict per key with "name",
    "type", "default", "nullable", "description" and, where they apply, "minimum", "maximum",
    "exclusive_minimum", "choices", "unsupported_values". Read once per process; each call returns a
    fresh copy."""
    global _config_schema_cache
    if _config_schema_cache is None:
        _config_schema_cache = _read_sized_text(_b.lmc_config_schema)
    return json.loads(_config_schema_cache)


class Job:
    """A background operation (lmc_job): ``done()`` polls, ``wait()`` / ``result()`` give its
    ``TransferResult``; ``close()`` (idempotent, also on ``__exit__`` and ``__del__``) releases the
    handle, and a job still running then goes on unobserved. The job keeps its engine object alive
    (an engine waits for its jobs when destroyed anyway)."""

    def __init__(self, handle: int, engine: "Engine | None" = None):
        self._handle = handle
        self._engine = engine

    @property
    def handle(self) -> int:
        """The raw lmc_job address, for the raw bindings."""
        if self._handle is None:
            raise _closed_job_error()
        return self._handle

    @property
    def closed(self) -> bool:
        return self._handle is None

    def wait(self, timeout_s: float | None = None) -> TransferResult:
        """The job's result; raises ``LmcTimeout`` if it is still running after ``timeout_s``
        (None waits as long as it takes), or the error the job failed with."""
        handle = self.handle
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000))
        result = _b.LmcTransferResult()
        check(_b.lmc_job_wait(byref(result), handle, timeout_ms))
        return TransferResult._from_c(result)

    def result(self) -> TransferResult:
        """The result of a finished job without waiting; ``LmcTimeout`` while it runs, or the error
        the job failed with."""
        handle = self.handle
        result = _b.LmcTransferResult()
        check(_b.lmc_job_result(byref(result), handle))
        return TransferResult._from_c(result)

    def done(self) -> bool:
        """Whether the job has finished, successfully or not (lmc_job_poll); True once closed."""
        handle = self._handle
        if handle is None:
            return True
        finished = c_int32()
        status = _b.lmc_job_poll(byref(finished), handle)
        if status:
            check(status)
        return finished.value != 0

    def close(self) -> None:
        handle, self._handle = self._handle, None
        self._engine = None
        if handle is not None:
            _b.lmc_job_destroy(handle)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if not sys.is_finalizing():
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else hex(self._handle)
        return f"<lmcache_native.Job {state}>"


def _closed_job_error() -> LmcInvalidHandle:
    return LmcInvalidHandle(_b.LMC_E_INVALID_HANDLE, "the job has been closed")
