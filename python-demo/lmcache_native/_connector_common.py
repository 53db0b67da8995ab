"""What the connector's scheduler and worker parts share: its logger and log format, the lookup
socket names, the registry of in-process worker engines, and the request's extra key. Pure Python:
no library, no torch, no vLLM."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from typing import Any

from . import _socket_dir

logger = logging.getLogger("lmcache_native.vllm_connector")

LOG_FORMAT = "[%(asctime)s] LMCache %(levelname)s: %(message)s (%(filename)s:%(lineno)d:%(name)s)"
module_lock = threading.Lock()
_logging_configured = False

# Extra-key encoding version; bump if the field encoding below ever changes (old keys then miss).
EXTRA_KEY_MAGIC = b"LMCNX\x01"

# In-process worker engines by lookup namespace: {namespace: {rank: engine}}. With TP=1 and vLLM's
# in-process executor the scheduler-side connector asks the worker's engine directly.
LOCAL_ENGINES: dict[str, dict[int, Any]] = {}


def configure_logging() -> None:
    """LMCache prints its lines with its own handler ("LMCache INFO: ..."); vLLM only configures the
    "vllm" logger tree, so without a handler our INFO lines would vanish. Done once, at the first
    connector construction (never at import). LMCACHE_LOG_LEVEL sets the level (default INFO)."""
    global _logging_configured
    with module_lock:
        if _logging_configured:
            return
        _logging_configured = True
        package_logger = logging.getLogger("lmcache_native")
        level = os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper()
        package_logger.setLevel(getattr(logging, level, logging.INFO))
        if not package_logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            package_logger.addHandler(handler)
            package_logger.propagate = False


def lookup_socket_path(model: str, rpc_port: int, dp_rank: int, rank: int) -> str:
    """Where rank ``rank``'s engine serves lookups. LMCache names its ZMQ sockets by
    ``lmcache_rpc_port`` and ranks under VLLM_RPC_BASE_PATH; the model is folded in as well so two
    vLLM instances serving different models on one machine never collide. Without
    VLLM_RPC_BASE_PATH the directory is private to this user (``_socket_dir``); raises
    ``UnsafeSocketDirectoryError`` when that directory is not safe."""
    digest = hashlib.sha256(f"{model}|{rpc_port}|{dp_rank}".encode("utf-8")).hexdigest()[:16]
    return _socket_dir.default_socket_path(f"lmcn-{digest}-r{rank}.sock")


def _encode_field(name: str, value) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode("utf-8")
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    encoded_name = name.encode("utf-8")
    return struct.pack("<I", len(encoded_name)) + encoded_name + struct.pack("<I", len(data)) + data


def build_extra_key(request) -> bytes:
    """The canonical extra key bytes of a request: everything besides the tokens that decides
    whether cached KV applies -- cache salt, LoRA adapter, multimodal inputs (hash and placeholder
    position) and ``lmcache.tag.*`` entries of ``kv_transfer_params``. Each field is a
    length-prefixed UTF-8 name and value, in a fixed order, so every byte counts (no truncation to
    16 bits as LMCache's placeholder rewrite does). Empty for a plain request."""
    fields: list[bytes] = []
    salt = getattr(request, "cache_salt", None)
    if salt:
        fields.append(_encode_field("cache_salt", salt))
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        name = getattr(lora, "lora_name", None) or getattr(lora, "name", None)
        path = getattr(lora, "lora_path", None) or getattr(lora, "path", None)
        identity = name if name else getattr(lora, "lora_int_id", None)
        fields.append(_encode_field("lora", {"name": identity, "path": path}))
    features = getattr(request, "mm_features", None)
    if features:
        for feature in features:
            identifier = getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)
            position = getattr(feature, "mm_position", None)
            fields.append(_encode_field("mm", {
                "hash": identifier,
                "offset": getattr(position, "offset", None),
                "length": getattr(position, "length", None),
            }))
    else:  # vLLM before mm_features: parallel lists
        hashes = getattr(request, "mm_hashes", None) or []
        positions = getattr(request, "mm_positions", None) or []
        for index, identifier in enumerate(hashes):
            position = positions[index] if index < len(positions) else None
            fields.append(_encode_field("mm", {
                "hash": identifier,
                "offset": getattr(position, "offset", None),
                "length": getattr(position, "length", None),
            }))
    params = getattr(request, "kv_transfer_params", None)
    if isinstance(params, dict):
        for key in sorted(k for k in params if isinstance(k, str) and k.startswith("lmcache.tag.")):
            fields.append(_encode_field(key, params[key]))
    if not fields:
        return b""
    return EXTRA_KEY_MAGIC + b"".join(fields)


def has_prompt_embeds(request) -> bool:
    return getattr(request, "prompt_embeds", None) is not None


def kv_params(request) -> dict:
    params = getattr(request, "kv_transfer_params", None)
    return params if isinstance(params, dict) else {}
