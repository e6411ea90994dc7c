"""ggml's own quantizers through the native library (all ggml weight types, incl. K-quants,
IQ types and MXFP4), for writing quantized GGUFs."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from . import _native
from .errors import InvalidArgumentError

TYPES = {t.name.lower(): t for t in GGMLQuantizationType}


def ggml_type(name: str) -> GGMLQuantizationType:
    t = TYPES.get(name.lower())
    if t is None:
        raise InvalidArgumentError(f"unknown ggml type {name!r}")
    return t


def block_size(qtype: GGMLQuantizationType) -> int:
    ffi, lib = _native.load()
    blck, nbytes = ffi.new("int64_t *"), ffi.new("size_t *")
    _native.check(lib.dsv4_type_size(int(qtype), blck, nbytes))
    if blck[0] == 0:
        raise InvalidArgumentError(f"ggml type {qtype.name} does not exist")
    return int(blck[0])


def quantize(array: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 `[..., n]` -> uint8 `[..., row_bytes]` in ggml type `qtype` (rows along the last
    axis, n a multiple of the type's block size). IQ2_XXS/IQ2_XS/IQ1_S (and IQ1_M) need an importance
    vector of n weights; None uses uniform importance."""
    ffi, lib = _native.load()
    x = np.ascontiguousarray(array, dtype=np.float32)
    n = x.shape[-1]
    rows = x.size // n
    blck, nbytes = ffi.new("int64_t *"), ffi.new("size_t *")
    _native.check(lib.dsv4_type_size(int(qtype), blck, nbytes))
    if blck[0] == 0 or n % blck[0]:
        raise InvalidArgumentError(f"{qtype.name} needs rows that are a multiple of {blck[0]} values, got {n}")
    row_bytes = n // blck[0] * nbytes[0]
    out = np.empty(x.shape[:-1] + (row_bytes,), dtype=np.uint8)
    if imatrix is None and qtype.name in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
        imatrix = np.ones(n, dtype=np.float32)
    imat = ffi.NULL
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        imat = ffi.cast("const float *", imatrix.ctypes.data)
    written = ffi.new("size_t *")
    _native.check(lib.dsv4_quantize(int(qtype), ffi.cast("const float *", x.ctypes.data), rows, n, imat,
                                    ffi.cast("void *", out.ctypes.data), out.nbytes, written))
    if written[0] != out.nbytes:
        raise InvalidArgumentError(f"quantizing to {qtype.name} wrote {written[0]} of {out.nbytes} bytes")
    return out
