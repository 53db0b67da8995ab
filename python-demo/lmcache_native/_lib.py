"""Finds and loads liblmcache_native.so exactly once per process.

Search order:
  1. the file named by the environment variable ``LMC_LIB_PATH``;
  2. ``lib/liblmcache_native.so`` inside this package (``./build.sh`` stages the library there);
  3. ``build/publish/liblmcache_native.so`` of the repository this package sits in (a developer
     checkout that ran the publish step but not the staging step).

The library is loaded with ``ctypes.CDLL`` (not ``PyDLL``), so the GIL is released during every
foreign call. It is never unloaded: a NativeAOT library cannot be unloaded safely, and the module-level
``LIB`` reference keeps the handle alive for the life of the process.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

LIBRARY_FILE_NAME = "liblmcache_native.so"
LIB_PATH_ENV_VAR = "LMC_LIB_PATH"

_PACKAGE_DIR = Path(__file__).resolve().parent
# python-demo/lmcache_native/_lib.py -> the repository root is two levels above the package.
_REPO_ROOT = _PACKAGE_DIR.parent.parent


def candidate_paths() -> list[Path]:
    """Paths tried, in order. An explicit LMC_LIB_PATH is the only candidate when it is set, so a
    typo in it fails loudly instead of silently loading some other build."""
    override = os.environ.get(LIB_PATH_ENV_VAR)
    if override:
        return [Path(override)]
    return [
        _PACKAGE_DIR / "lib" / LIBRARY_FILE_NAME,
        _REPO_ROOT / "build" / "publish" / LIBRARY_FILE_NAME,
    ]


def _load() -> tuple[ctypes.CDLL, Path]:
    tried = candidate_paths()
    for path in tried:
        if not path.is_file():
            continue
        try:
            return ctypes.CDLL(str(path)), path
        except OSError as load_error:
            raise ImportError(
                f"lmcache_native: found {path} but could not load it: {load_error}. "
                "Rebuild it with ./build.sh (NativeAOT publish for linux-x64)."
            ) from load_error
    tried_text = ", ".join(str(p) for p in tried)
    raise ImportError(
        f"lmcache_native: {LIBRARY_FILE_NAME} not found (tried: {tried_text}). "
        f"Run ./build.sh in the repository root to build and stage it, "
        f"or set {LIB_PATH_ENV_VAR} to the library file."
    )


LIB, LIB_PATH = _load()
