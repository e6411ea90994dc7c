"""Bit-level decoders of the checkpoint's encodings (NumPy has no float8 / bfloat16): FP8 e4m3 with
UE8M0 128x128 block scales, FP4 e2m1 with a UE8M0 scale per 32 inputs, BF16, and the lossless FP4 ->
ggml MXFP4 repack. All decodes are exact in float32."""
from __future__ import annotations

import numpy as np

FP8_BLOCK = 128    # FP8 weight scale grid: 128 x 128
FP4_BLOCK = 32     # FP4 expert scale: one per 32 inputs


def _fp8_e4m3_table() -> np.ndarray:
    c = np.arange(256)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp = (c >> 3) & 0xF
    man = (c & 0x7).astype(np.float64)
    mag = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    val = sign * mag
    val[(c & 0x7F) == 0x7F] = np.nan    # e4m3fn: S.1111.111 is NaN, there is no infinity
    return val.astype(np.float32)


FP8_E4M3_VALUES = _fp8_e4m3_table()
# e2m1 codes 0..15 (bit 3 sign, bits 2-1 exponent, bit 0 mantissa)
FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def fp8_e4m3_to_f32(codes: np.ndarray) -> np.ndarray:
    return FP8_E4M3_VALUES[np.asarray(codes, dtype=np.uint8)]


def e8m0_to_f32(codes: np.ndarray) -> np.ndarray:
    """UE8M0 scale bytes -> 2^(s-127) (s = 255, NaN in the format, is rejected by the callers)."""
    return np.ldexp(1.0, np.asarray(codes, dtype=np.int32) - 127).astype(np.float32)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequant_fp8(q: np.ndarray, scale: np.ndarray, row0: int = 0) -> np.ndarray:
    """FP8 e4m3 rows `q [n, in]` (rows row0..row0+n-1 of the weight) with the weight's block scale
    multipliers `scale [ceil(out/128), ceil(in/128)]` (float32) -> float32 `[n, in]`."""
    n, n_in = q.shape
    vals = fp8_e4m3_to_f32(q)
    srow = scale[np.arange(row0, row0 + n) // FP8_BLOCK]    # [n, ceil(in/128)]
    for j in range(srow.shape[1]):                          # the last column block may be ragged
        vals[:, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] *= srow[:, j:j + 1]
    return vals


def dequant_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """FP4 e2m1 `packed [n, in/2]` (element 2k in the low nibble) with UE8M0 `scale [n, in/32]`
    -> float32 `[n, in]`."""
    n, half = packed.shape
    codes = np.empty((n, half, 2), dtype=np.uint8)
    codes[..., 0] = packed & 0x0F
    codes[..., 1] = packed >> 4
    vals = FP4_E2M1_VALUES[codes.reshape(n, 2 * half)]
    return (vals.reshape(n, -1, FP4_BLOCK) * e8m0_to_f32(scale)[..., None]).reshape(n, 2 * half)


def fp4_to_mxfp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Lossless repack of FP4 rows into ggml MXFP4 blocks: `[n, in/32 * 17]` bytes. A block is the
    E8M0 byte, then 16 bytes whose byte j holds element j (low nibble) and element j+16 (high nibble).
    ggml's MXFP4 table is the doubled e2m1 table and its scale is 2^(s-128), so the codes and the scale
    byte carry over unchanged."""
    n, half = packed.shape
    nb = half * 2 // FP4_BLOCK
    src = packed.reshape(n, nb, 16)
    codes = np.empty((n, nb, 16, 2), dtype=np.uint8)
    codes[..., 0] = src & 0x0F
    codes[..., 1] = src >> 4
    codes = codes.reshape(n, nb, 32)
    out = np.empty((n, nb, 17), dtype=np.uint8)
    out[..., 0] = scale
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out.reshape(n, nb * 17)
