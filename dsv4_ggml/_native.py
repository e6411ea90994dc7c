"""cffi (ABI mode) binding of the native library, loaded on first use.

The declarations come from the installed C header (the part between `cffi-begin` and
`cffi-end`), so the binding cannot drift from the library it loads.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

from cffi import FFI

from .errors import InternalError, from_status

_PKG = Path(__file__).resolve().parent
_REPO = _PKG.parent
_LIB_NAMES = {"linux": "libdsv4.so", "darwin": "libdsv4.dylib", "win32": "dsv4.dll"}

_lock = threading.Lock()
_state: dict = {}


def _library_path() -> Path:
    env = os.environ.get("DSV4_LIBRARY")
    if env:
        return Path(env)
    name = _LIB_NAMES.get(sys.platform, "libdsv4.so")
    local = _PKG / name
    if local.exists():
        return local
    # Imported from a source checkout (e.g. `python -m pytest` in the repo root): use the
    # library of the installed distribution.
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        installed = Path(distribution("dsv4-ggml").locate_file(f"dsv4_ggml/{name}"))
        if installed.exists():
            return installed
    except PackageNotFoundError:
        pass
    return local


def _header_path(lib: Path) -> Path:
    for cand in (lib.parent / "dsv4.h", _PKG / "dsv4.h", _REPO / "native" / "include" / "dsv4.h"):
        if cand.exists():
            return cand
    raise InternalError(f"cannot find dsv4.h next to {lib} or in the source tree")


def _cdef_text(header: str) -> str:
    m = re.search(r"/\* cffi-begin.*?\*/(.*)/\* cffi-end \*/", header, re.S)
    if m is None:
        raise InternalError("dsv4.h has no cffi-begin/cffi-end section")
    return m.group(1).replace("DSV4_API ", "")


def load():
    """Returns (ffi, lib), loading the library once per process."""
    with _lock:
        if "lib" not in _state:
            path = _library_path()
            if not path.exists():
                raise InternalError(
                    f"the native library {path} is missing: install the package with "
                    "`pip install .` (it builds the library), or set DSV4_LIBRARY to a built "
                    "libdsv4")
            ffi = FFI()
            ffi.cdef(_cdef_text(_header_path(path).read_text()))
            _state["lib"] = ffi.dlopen(str(path))
            _state["ffi"] = ffi
        return _state["ffi"], _state["lib"]


def check(status: int) -> None:
    """Raises the exception for a non-zero dsv4_status, with dsv4_last_error()'s message."""
    if status == 0:
        return
    ffi, lib = load()
    message = ffi.string(lib.dsv4_last_error()).decode("utf-8", "replace")
    raise from_status(int(status), message or ffi.string(lib.dsv4_status_name(status)).decode())


def version() -> str:
    ffi, lib = load()
    return ffi.string(lib.dsv4_version()).decode()
