"""The GGUF output types: the names `outtype` / `experts` accept, float32 rows -> the bytes of a
ggml type, the fallback for rows a type's blocks do not fit, and a tensor's size in a type."""
from __future__ import annotations

import math

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from ..errors import InternalError, ModelFormatError

OUTTYPES = ("f32", "bf16", "f16", "q8_0", "q4_k", "q2_k")
EXPERT_TYPES = ("auto", "mxfp4") + OUTTYPES

T = GGMLQuantizationType
_GTYPE = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "q2_k": T.Q2_K,
          "mxfp4": T.MXFP4}


def _encode(x: np.ndarray, gtype: GGMLQuantizationType, name: str) -> np.ndarray:
    """float32 rows -> the bytes of those rows in `gtype`."""
    if gtype == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if gtype == T.F16:
        if np.abs(x).max(initial=0.0) > 65504.0:
            raise ModelFormatError(f"'{name}' holds values beyond the F16 range; convert with --outtype bf16 or f32")
        return x.astype(np.float16)
    if gtype in (T.BF16, T.Q8_0):
        return gguf_quants.quantize(np.ascontiguousarray(x, dtype=np.float32), gtype)
    if gtype in (T.Q4_K, T.Q2_K):       # ggml's own K-quant quantizers, through our library
        from ..quantize import quantize
        return quantize(x, gtype)
    raise InternalError(f"no encoder for {gtype.name}")


def _fit(g: GGMLQuantizationType, row_len: int) -> GGMLQuantizationType:
    """`g`, or for rows its blocks do not fit, Q8_0 and then F16 (as llama-quantize falls back)."""
    for cand in (g, T.Q8_0, T.F16):
        if cand in (T.F32, T.F16, T.BF16) or row_len % GGML_QUANT_SIZES[cand][0] == 0:
            return cand
    return T.F16


def _nbytes(shape: tuple[int, ...], gtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[gtype]
    n_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    if shape[-1] % block:
        raise InternalError(f"row of {shape[-1]} values does not fit {gtype.name} blocks")
    return n_rows * (shape[-1] // block) * size
