"""Official DeepSeek-V4 safetensors checkpoint -> GGUF in llama.cpp's DeepSeek-V4 format (arch "deepseek4").

    from dsv4_ggml.convert import convert
    stats = convert("DeepSeek-V4-Flash/", "dsv4-flash-q8_0.gguf", outtype="q8_0")

    python -m dsv4_ggml.convert HF_DIR OUT.gguf --outtype q8_0 [--experts auto|mxfp4|f32|bf16|f16|q8_0] [--mtp]

Input (spec §1.1, §2, §6.1): `config.json` (+ `inference/config.json` as a fallback for missing keys),
`model.safetensors.index.json` + shards (or one `model.safetensors`), `tokenizer.json`
(+ `tokenizer_config.json` / `chat_template.jinja` when present). The safetensors files are parsed here
(header JSON + raw bytes) because NumPy has no FP8/E8M0/BF16 dtypes; tensors are read with plain
positioned reads, row block by row block, so neither the checkpoint nor the output is ever held in
memory: at most one source tensor's row block (one routed expert while stacking) is alive at a time.

Decoding (§6.1): FP8 e4m3 weights with UE8M0 128x128 block scales, `W = e4m3(q) * 2^(s-127)` (edge
blocks ragged, grid `ceil(out/128) x ceil(in/128)`); FP4 e2m1 routed experts, two codes per byte (element
2k in the low nibble), UE8M0 scale per 32 inputs; BF16/F16/F32 as stored. All decodes are exact in
float32.

Output types:
* `outtype` (f32, bf16, f16, q8_0, q4_k, q2_k): token_embd, output, the attention projections, the
  indexer query, the shared expert and MTP eh_proj. Rows a type's blocks do not fit fall back to Q8_0
  (K-quants: 256 values per block), then F16 (Q8_0: 32), as llama-quantize does. K-quants use ggml's
  own quantizers through our library.
* routed experts: `experts="auto"` = lossless MXFP4 repack when the checkpoint's experts are FP4 and
  `outtype` is not f32, else `outtype`; `"mxfp4"` forces the repack; any outtype name forces that type.
* always F32: 1-D tensors, `hc_*`, `*_ape`, the router `ffn_gate_inp`, `exp_probs_b`.
* compressor kv/gate and `indexer.proj`: F32 for outtype f32, F16 for f16, else BF16 (their checkpoint
  type; F16 if the checkpoint holds them in another float type).
* `ffn_gate_tid2eid`: I32.

Metadata: exactly the key set (names and value types) of `dsv4_ggml.tiny.write_tiny_model`, i.e. what
llama.cpp's converter writes for the model, plus `tokenizer.chat_template` when the checkpoint has one.
With `mtp=True` the MTP block is written as `blk.{n_layer}` (block_count n_layer+1, nextn_predict_layers
1) like `write_tiny_model(n_mtp_layers=1)`; that single-file layout has no slot for the MTP block's own
HC head (`mtp.0.hc_head_*`), so those tensors are dropped (listed in the stats) and the root
`output_hc_*` (the trunk's) is the only HC head in the file, as in llama.cpp's merged files (spec §7 #22).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

from .errors import (BadKeyError, CancelledError, CorruptFileError, FileError, InternalError, InvalidArgumentError,
                     MissingKeyError, MissingTensorError, ModelFormatError, TensorShapeError, TensorTypeError,
                     UnexpectedTensorError)
from .tiny import ARCH

OUTTYPES = ("f32", "bf16", "f16", "q8_0", "q4_k", "q2_k")
EXPERT_TYPES = ("auto", "mxfp4") + OUTTYPES

T = GGMLQuantizationType
_GTYPE = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "q2_k": T.Q2_K,
          "mxfp4": T.MXFP4}

# gguf TokenType values (llama.cpp)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

FP8_BLOCK = 128    # FP8 weight scale grid: 128 x 128
FP4_BLOCK = 32     # FP4 expert scale: one per 32 inputs
_CHUNK_ELEMS = 1 << 22   # values per row block (16 MiB as float32)

# ------------------------------------------------------------------------------------------------
# bit-level decoders (NumPy has no float8 / bfloat16)


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


# ------------------------------------------------------------------------------------------------
# safetensors (parsed here: header length, JSON header, raw little-endian bytes)

# dtype -> (numpy storage dtype, bytes per stored element)
_ST_STORAGE = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "F8_E4M3": ("u1", 1), "F8_E8M0": ("u1", 1), "F4": ("u1", 1),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1), "BOOL": ("u1", 1),
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_INT_DTYPES = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")
_MAX_HEADER = 256 << 20


@dataclass
class _Entry:
    shard: "_Shard"
    name: str
    dtype: str
    shape: tuple[int, ...]       # as stored (F4: bytes per row are shape[-1] // 2, see storage_shape)
    begin: int                   # absolute file offset
    nbytes: int

    @property
    def storage_shape(self) -> tuple[int, ...]:
        if self.dtype == "F4" and self.shape and self.nbytes * 2 == math.prod(self.shape):
            return self.shape[:-1] + (self.shape[-1] // 2,)   # F4 counts 4-bit elements
        return self.shape


class _Shard:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = open(path, "rb")
        except FileNotFoundError:
            raise FileError(f"checkpoint shard '{path}' is missing") from None
        except OSError as e:
            raise FileError(f"cannot open checkpoint shard '{path}': {e}") from None
        size = os.fstat(self.f.fileno()).st_size
        head = self.f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"'{path}' is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise CorruptFileError(f"'{path}': safetensors header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(self.f.read(n))
        except ValueError as e:
            raise CorruptFileError(f"'{path}': safetensors header is not JSON ({e})") from None
        start = 8 + n
        self.entries: dict[str, _Entry] = {}
        for name, d in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, e) = d["dtype"], tuple(int(x) for x in d["shape"]), d["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CorruptFileError(f"'{path}': malformed header entry for '{name}'") from None
            if not 0 <= b <= e <= size - start:
                raise CorruptFileError(f"'{path}': data of '{name}' lies outside the file (truncated download?)")
            ent = _Entry(self, name, dtype, shape, start + b, e - b)
            if dtype in _ST_STORAGE:
                want = math.prod(ent.storage_shape) * _ST_STORAGE[dtype][1]
                if want != ent.nbytes:
                    raise CorruptFileError(f"'{path}': '{name}' ({dtype} {list(shape)}) needs {want} bytes, "
                                           f"the header gives {ent.nbytes}")
            self.entries[name] = ent

    def read(self, ent: _Entry, r0: int | None = None, r1: int | None = None) -> np.ndarray:
        """Rows r0..r1 (first axis) of a tensor in its storage dtype, or the whole tensor."""
        if ent.dtype not in _ST_STORAGE:
            raise TensorTypeError(f"checkpoint tensor '{ent.name}' has unsupported dtype {ent.dtype} "
                                  f"({self.path.name})")
        np_dtype, size = _ST_STORAGE[ent.dtype]
        shape = ent.storage_shape
        if r0 is None:
            r0, r1 = 0, (shape[0] if shape else 1)
        row = math.prod(shape[1:]) * size if shape else size
        self.f.seek(ent.begin + r0 * row)
        n = (r1 - r0) * row
        buf = self.f.read(n)
        if len(buf) != n:
            raise CorruptFileError(f"'{self.path}' ends inside tensor '{ent.name}'")
        arr = np.frombuffer(buf, dtype=np_dtype)
        return arr.reshape((r1 - r0,) + tuple(shape[1:])) if shape else arr.reshape(())

    def close(self) -> None:
        self.f.close()


class Checkpoint:
    """The tensors of a safetensors checkpoint directory (index + shards, or one file)."""

    def __init__(self, hf_dir: str | os.PathLike):
        d = Path(hf_dir)
        if not d.is_dir():
            raise FileError(f"checkpoint directory '{d}' does not exist")
        self.dir = d
        self.shards: dict[str, _Shard] = {}
        self.entries: dict[str, _Entry] = {}
        index = d / "model.safetensors.index.json"
        try:
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CorruptFileError(f"'{index}' is not a safetensors index (no weight_map: {e})") from None
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not (d / f).is_file()]
                if missing:
                    raise FileError(f"checkpoint shard(s) listed in {index.name} are missing in '{d}': "
                                    + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
                for f in files:
                    self.shards[f] = _Shard(d / f)
                for name, f in weight_map.items():
                    ent = self.shards[f].entries.get(name)
                    if ent is None:
                        raise MissingTensorError(f"{index.name} lists '{name}' in '{f}', "
                                                 "but that shard does not hold it")
                    self.entries[name] = ent
            else:
                files = ["model.safetensors"] if (d / "model.safetensors").is_file() else \
                    sorted(p.name for p in d.glob("*.safetensors"))
                if not files:
                    raise FileError(f"'{d}' holds neither model.safetensors.index.json nor any .safetensors file")
                for f in files:
                    self.shards[f] = _Shard(d / f)
                    for name, ent in self.shards[f].entries.items():
                        if name in self.entries:
                            raise CorruptFileError(f"tensor '{name}' is in both "
                                                   f"'{self.entries[name].shard.path.name}' and '{f}'")
                        self.entries[name] = ent
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> _Entry:
        ent = self.entries.get(name)
        if ent is None:
            raise MissingTensorError(f"checkpoint tensor '{name}' is missing (not in the index of '{self.dir}')")
        return ent

    def read(self, name: str, r0: int | None = None, r1: int | None = None) -> np.ndarray:
        ent = self.entry(name)
        return ent.shard.read(ent, r0, r1)

    def close(self) -> None:
        for s in self.shards.values():
            s.close()


# ------------------------------------------------------------------------------------------------
# one source weight, decoded to float32 row block by row block


class _Source:
    """A checkpoint weight in any supported encoding: 'float' (F32/F16/BF16/F64), 'fp8' (F8_E4M3 +
    `.scale` 128x128 grid) or 'fp4' (packed I8/U8/F4 + `.scale` per 32 inputs). `shape` is logical."""

    def __init__(self, ck: Checkpoint, name: str, consumed: set[str]):
        self.ck, self.name = ck, name
        ent = ck.entry(name)
        self.dtype = ent.dtype
        scale_name = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
        has_scale = scale_name is not None and scale_name in ck
        consumed.add(name)
        if ent.dtype in _FLOAT_DTYPES:
            self.fmt, self.shape = "float", ent.shape
            return
        if ent.dtype == "F8_E4M3":
            if not has_scale:
                raise MissingTensorError(f"FP8 checkpoint tensor '{name}' has no block scale '{scale_name}'")
            if len(ent.shape) != 2:
                raise TensorShapeError(f"FP8 tensor '{name}' has shape {list(ent.shape)}, expected 2 dimensions")
            self.fmt, self.shape = "fp8", ent.shape
            out, n_in = ent.shape
            want = (-(-out // FP8_BLOCK), -(-n_in // FP8_BLOCK))
        elif ent.dtype in ("I8", "U8", "F4") and has_scale:
            packed = ent.storage_shape
            if len(packed) != 2:
                raise TensorShapeError(f"FP4 tensor '{name}' has shape {list(ent.shape)}, expected 2 dimensions")
            self.fmt, self.shape = "fp4", (packed[0], packed[1] * 2)
            if self.shape[1] % FP4_BLOCK:
                raise TensorShapeError(f"FP4 tensor '{name}' has rows of {self.shape[1]} values, not a multiple of 32")
            want = (self.shape[0], self.shape[1] // FP4_BLOCK)
        else:
            raise TensorTypeError(f"checkpoint tensor '{name}' has dtype {ent.dtype}, which is not a supported weight "
                                  "encoding (F32/F16/BF16, F8_E4M3 + .scale, packed FP4 I8/U8 + .scale)")
        sent = ck.entry(scale_name)
        consumed.add(scale_name)
        if tuple(sent.shape) != want:
            raise TensorShapeError(f"scale '{scale_name}' has shape {list(sent.shape)}, expected {list(want)} for "
                                   f"{self.fmt.upper()} weight '{name}' of shape {list(self.shape)}")
        if sent.dtype not in ("F8_E8M0", "U8", "F32", "BF16"):
            raise TensorTypeError(f"scale '{scale_name}' has dtype {sent.dtype}; expected F8_E8M0 (or F32/BF16)")
        if self.fmt == "fp4" and sent.dtype not in ("F8_E8M0", "U8"):
            raise TensorTypeError(f"FP4 scale '{scale_name}' has dtype {sent.dtype}; expected F8_E8M0")
        self.scale_name, self.scale_dtype = scale_name, sent.dtype
        self._fp8_scale = None

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_len(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else (self.shape[0] if self.shape else 1)

    def _scale_f32(self, raw: np.ndarray) -> np.ndarray:
        if self.scale_dtype in ("F8_E8M0", "U8"):
            if (raw == 255).any():
                raise ModelFormatError(f"scale '{self.scale_name}' holds the E8M0 NaN code 255")
            return e8m0_to_f32(raw)
        return bf16_to_f32(raw) if self.scale_dtype == "BF16" else raw.astype(np.float32)

    def read(self, r0: int, r1: int) -> np.ndarray:
        """float32 rows r0..r1 (2-D `[n, row_len]`; 1-D tensors are one row)."""
        if self.fmt == "float":
            if len(self.shape) <= 1:
                raw = self.ck.read(self.name).reshape(1, -1)
            else:
                raw = self.ck.read(self.name, r0, r1).reshape(r1 - r0, -1)
            x = bf16_to_f32(raw) if self.dtype == "BF16" else raw.astype(np.float32)
        elif self.fmt == "fp8":
            if self._fp8_scale is None:   # the whole grid: ceil(out/128) x ceil(in/128), small
                self._fp8_scale = self._scale_f32(self.ck.read(self.scale_name))
            q = self.ck.read(self.name, r0, r1)
            if ((q & 0x7F) == 0x7F).any():
                raise ModelFormatError(f"FP8 tensor '{self.name}' holds NaN codes")
            x = dequant_fp8(q, self._fp8_scale, r0)
        else:
            x = dequant_fp4(self.ck.read(self.name, r0, r1).view(np.uint8),
                            self._check_e8m0(self.ck.read(self.scale_name, r0, r1)))
        if not np.isfinite(x).all():
            raise ModelFormatError(f"checkpoint tensor '{self.name}' decodes to non-finite values (rows {r0}..{r1})")
        return x

    def _check_e8m0(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.view(np.uint8)
        if (raw == 255).any():
            raise ModelFormatError(f"scale '{self.scale_name}' holds the E8M0 NaN code 255")
        return raw

    def read_mxfp4(self, r0: int, r1: int) -> np.ndarray:
        if self.fmt != "fp4":
            raise InternalError(f"'{self.name}' is not FP4")
        packed = self.ck.read(self.name, r0, r1).view(np.uint8)
        return fp4_to_mxfp4(packed, self._check_e8m0(self.ck.read(self.scale_name, r0, r1)))


def _row_blocks(n_rows: int, row_len: int) -> Iterator[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMS // max(1, row_len))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


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
        from .quantize import quantize
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


# ------------------------------------------------------------------------------------------------
# configuration

_REQ = object()
# field, config.json keys, inference/config.json (ModelArgs) keys, type, default
_CONFIG_FIELDS = [
    ("n_vocab", ("vocab_size",), ("vocab_size",), int, _REQ),
    ("n_embd", ("hidden_size",), ("dim",), int, _REQ),
    ("n_layer", ("num_hidden_layers",), ("n_layers",), int, _REQ),
    ("n_mtp", ("num_nextn_predict_layers",), ("n_mtp_layers",), int, 0),
    ("n_head", ("num_attention_heads",), ("n_heads",), int, _REQ),
    ("n_head_kv", ("num_key_value_heads",), (), int, 1),
    ("head_dim", ("head_dim",), ("head_dim",), int, _REQ),
    ("n_rot", ("qk_rope_head_dim",), ("rope_head_dim",), int, _REQ),
    ("q_lora_rank", ("q_lora_rank",), ("q_lora_rank",), int, _REQ),
    ("o_groups", ("o_groups",), ("o_groups",), int, _REQ),
    ("o_lora_rank", ("o_lora_rank",), ("o_lora_rank",), int, _REQ),
    ("n_swa", ("sliding_window",), ("window_size",), int, _REQ),
    ("compress_ratios", ("compress_ratios",), ("compress_ratios",), list, _REQ),
    ("rope_freq_base", ("rope_theta",), ("rope_theta",), float, _REQ),
    ("compress_rope_freq_base", ("compress_rope_theta",), ("compress_rope_theta",), float, _REQ),
    ("context_length", ("max_position_embeddings",), ("max_seq_len",), int, _REQ),
    ("n_expert", ("n_routed_experts",), ("n_routed_experts",), int, _REQ),
    ("n_expert_shared", ("n_shared_experts",), ("n_shared_experts",), int, 1),
    ("n_expert_used", ("num_experts_per_tok",), ("n_activated_experts",), int, _REQ),
    ("expert_ff", ("moe_intermediate_size",), ("moe_inter_dim",), int, _REQ),
    ("ff_length", ("intermediate_size",), (), int, None),
    ("expert_weights_scale", ("routed_scaling_factor",), ("route_scale",), float, _REQ),
    ("expert_weights_norm", ("norm_topk_prob",), (), bool, True),
    ("scoring_func", ("scoring_func",), ("score_func",), str, "sqrtsoftplus"),
    ("n_hash_layers", ("num_hash_layers",), ("n_hash_layers",), int, 0),
    ("swiglu_limit", ("swiglu_limit",), ("swiglu_limit",), float, _REQ),
    ("indexer_n_head", ("index_n_heads",), ("index_n_heads",), int, _REQ),
    ("indexer_head_dim", ("index_head_dim",), ("index_head_dim",), int, _REQ),
    ("indexer_top_k", ("index_topk",), ("index_topk",), int, _REQ),
    ("hc_mult", ("hc_mult",), ("hc_mult",), int, _REQ),
    ("hc_sinkhorn_iters", ("hc_sinkhorn_iters",), ("hc_sinkhorn_iters",), int, _REQ),
    ("hc_eps", ("hc_eps",), ("hc_eps",), float, _REQ),
    ("norm_eps", ("rms_norm_eps",), ("norm_eps",), float, _REQ),
    ("bos_id", ("bos_token_id",), (), int, None),
    ("eos_id", ("eos_token_id",), (), int, None),
]
# rope_scaling sub-keys: field, config.json rope_scaling key(s), ModelArgs key, type, default
_ROPE_FIELDS = [
    ("rope_scaling_factor", ("factor",), "rope_factor", float, _REQ),
    ("rope_orig_ctx", ("original_max_position_embeddings",), "original_seq_len", int, _REQ),
    ("yarn_beta_fast", ("beta_fast",), "beta_fast", float, 32.0),
    ("yarn_beta_slow", ("beta_slow",), "beta_slow", float, 1.0),
]


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CorruptFileError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"'{path}' does not hold a JSON object")
    return data


def read_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """Hyperparameters from config.json (HF names, spec §1.1), falling back to inference/config.json
    (ModelArgs names) for absent keys. Raises MissingKeyError / BadKeyError with the key's name."""
    d = Path(hf_dir)
    path = d / "config.json"
    inf_path = d / "inference" / "config.json"
    if not path.is_file() and not inf_path.is_file():
        raise FileError(f"'{d}' has no config.json")
    cfg = _load_json(path) if path.is_file() else {}
    if isinstance(cfg.get("text_config"), dict):   # multimodal wrappers nest the text model's config
        cfg = {**cfg, **cfg["text_config"]}
    inf = _load_json(inf_path) if inf_path.is_file() else {}

    def cast(field_name, key, value, typ):
        try:
            if typ is list:
                if not isinstance(value, (list, tuple)):
                    raise TypeError
                return [int(v) for v in value]
            if typ is bool:
                if not isinstance(value, bool):
                    raise TypeError
                return value
            if typ is int and isinstance(value, (list, tuple)) and value:   # eos_token_id may be a list
                value = value[0]
            if typ is int and (isinstance(value, bool) or float(value) != int(value)):
                raise TypeError
            return typ(value)
        except (TypeError, ValueError):
            raise BadKeyError(f"config key '{key}' = {value!r} is not a valid {typ.__name__}") from None

    hp: dict[str, Any] = {}
    for fname, hf_keys, inf_keys, typ, default in _CONFIG_FIELDS:
        for src, keys in ((cfg, hf_keys), (inf, inf_keys)):
            hit = next((k for k in keys if src.get(k) is not None), None)
            if hit is not None:
                hp[fname] = cast(fname, hit, src[hit], typ)
                break
        else:
            if default is _REQ:
                alt = f" (or '{inf_keys[0]}' in inference/config.json)" if inf_keys else ""
                raise MissingKeyError(f"config.json key '{hf_keys[0]}'{alt} is missing")
            hp[fname] = default

    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise BadKeyError(f"config key 'rope_scaling' = {rs!r} is not an object")
    rtype = rs.get("type") or rs.get("rope_type") or ("yarn" if inf.get("rope_factor") is not None else None)
    if rtype is None:
        raise MissingKeyError("config.json key 'rope_scaling.type' is missing (DeepSeek-V4 uses YaRN)")
    if rtype != "yarn":
        raise BadKeyError(f"config key 'rope_scaling.type' is '{rtype}'; DeepSeek-V4 needs 'yarn'")
    hp["rope_scaling_type"] = "yarn"
    for fname, keys, inf_key, typ, default in _ROPE_FIELDS:
        hit = next((k for k in keys if rs.get(k) is not None), None)
        if hit is not None:
            hp[fname] = cast(fname, f"rope_scaling.{hit}", rs[hit], typ)
        elif inf.get(inf_key) is not None:
            hp[fname] = cast(fname, inf_key, inf[inf_key], typ)
        elif default is _REQ:
            raise MissingKeyError(f"config.json key 'rope_scaling.{keys[0]}' (or '{inf_key}' in inference/config.json) "
                                  "is missing")
        else:
            hp[fname] = default

    if hp["ff_length"] is None:
        hp["ff_length"] = hp["expert_ff"]
    if hp["n_head_kv"] != 1:
        raise BadKeyError(f"config key 'num_key_value_heads' is {hp['n_head_kv']}; "
                          "DeepSeek-V4 has one shared K = V head")
    if hp["scoring_func"] != "sqrtsoftplus":
        raise BadKeyError(f"config key 'scoring_func' is '{hp['scoring_func']}'; "
                          "DeepSeek-V4 routes with 'sqrtsoftplus'")
    if hp["n_head"] % hp["o_groups"]:
        raise BadKeyError("num_attention_heads must be divisible by o_groups")
    ratios = hp["compress_ratios"]
    n_layer = hp["n_layer"]
    if len(ratios) < n_layer:
        raise BadKeyError(f"config key 'compress_ratios' has {len(ratios)} entries for {n_layer} layers")
    if any(r not in (0, 4, 128) for r in ratios[: n_layer + 1]):
        raise BadKeyError(f"config key 'compress_ratios' may hold only 0, 4 and 128, got {ratios[: n_layer + 1]}")
    if not 0 <= hp["n_hash_layers"] <= n_layer:
        raise BadKeyError(f"config key 'num_hash_layers' = {hp['n_hash_layers']} is outside [0, {n_layer}]")
    return hp


# ------------------------------------------------------------------------------------------------
# tokenizer


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or (tok.startswith("<｜") and tok.endswith("｜>"))


def read_tokenizer(hf_dir: str | os.PathLike, n_vocab: int) -> dict[str, Any]:
    """tokenizer.json (HF byte-level BPE) -> GGUF token list (id order, `[PAD{i}]` for unassigned ids),
    token types (added special or special-looking: CONTROL; other added: USER_DEFINED; missing: UNUSED;
    else NORMAL), merges ("a b"), the text->id map, and the chat template when there is one."""
    d = Path(hf_dir)
    path = d / "tokenizer.json"
    if not path.is_file():
        raise FileError(f"'{d}' has no tokenizer.json (the GGUF vocabulary comes from it)")
    tj = _load_json(path)
    model = tj.get("model") or {}
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise BadKeyError(f"'{path}' is not a byte-level BPE tokenizer (model.type {model.get('type')!r})")
    id_to_tok: dict[int, str] = {}
    for tok, i in model["vocab"].items():
        id_to_tok[int(i)] = tok
    added = {}
    for a in tj.get("added_tokens") or []:
        added[int(a["id"])] = a
        id_to_tok[int(a["id"])] = a["content"]
    if id_to_tok and max(id_to_tok) >= n_vocab:
        raise BadKeyError(f"tokenizer.json has token id {max(id_to_tok)}, beyond the config's vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(tok)
        if i in added:
            types.append(TOKEN_CONTROL if added[i].get("special") or _looks_special(tok) else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise BadKeyError(f"'{path}': malformed merge {m!r}")

    template = None
    tc_path = d / "tokenizer_config.json"
    tc = _load_json(tc_path) if tc_path.is_file() else {}
    ct = tc.get("chat_template")
    if isinstance(ct, list):   # [{name, template}, ...]
        named = {t.get("name"): t.get("template") for t in ct if isinstance(t, dict)}
        ct = named.get("default") or next(iter(named.values()), None)
    if isinstance(ct, str) and ct:
        template = ct
    elif (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif (d / "chat_template.json").is_file():
        ct = _load_json(d / "chat_template.json").get("chat_template")
        template = ct if isinstance(ct, str) and ct else None

    def special_id(key):
        v = tc.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return {t: i for i, t in enumerate(tokens)}.get(v) if isinstance(v, str) else None

    return dict(tokens=tokens, types=types, merges=merges, chat_template=template,
                bos_id=special_id("bos_token"), eos_id=special_id("eos_token"))


# ------------------------------------------------------------------------------------------------
# the tensor plan


@dataclass
class _Item:
    name: str                                   # GGUF tensor name
    shape: tuple[int, ...]                      # NumPy order (ggml ne reversed)
    gtype: GGMLQuantizationType
    produce: Callable[[], Iterator[np.ndarray]]
    nbytes: int = 0


@dataclass
class _Planner:
    ck: Checkpoint
    hp: dict[str, Any]
    outtype: str
    experts: str
    mtp: bool
    consumed: set[str] = field(default_factory=set)
    dropped: list[str] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)

    # --- output types
    def _w_type(self, row_len: int, name: str | None = None) -> GGMLQuantizationType:
        return _fit(_GTYPE[name or self.outtype], row_len)

    def _hp_type(self, src: _Source) -> GGMLQuantizationType:
        if self.outtype in ("f32", "f16"):
            return _GTYPE[self.outtype]
        return T.BF16 if src.dtype == "BF16" else T.F16

    # --- helpers
    def _check_shape(self, src: _Source, want: tuple[int, ...]) -> None:
        if tuple(src.shape) != tuple(want):
            raise TensorShapeError(f"checkpoint tensor '{src.name}' has shape {list(src.shape)}, expected {list(want)} "
                                   "from config.json")

    def _find(self, name: str) -> str | None:
        for n in (name, name + ".weight", name[: -len(".weight")] if name.endswith(".weight") else None):
            if n is not None and n in self.ck:
                return n
        return None

    def _source(self, name: str, want: tuple[int, ...], optional: bool = False) -> _Source | None:
        found = self._find(name)
        if found is None:
            if optional:
                return None
            raise MissingTensorError(f"checkpoint tensor '{name}' is missing (needed for the GGUF with this config)")
        src = _Source(self.ck, found, self.consumed)
        self._check_shape(src, want)
        return src

    def _add(self, name: str, shape: tuple[int, ...], gtype: GGMLQuantizationType, produce) -> None:
        self.items.append(_Item(name, tuple(shape), gtype, produce, _nbytes(tuple(shape), gtype)))

    # --- kinds
    def float_tensor(self, gname: str, sname: str, want: tuple[int, ...], kind: str, optional: bool = False) -> None:
        """kind: 'w' (outtype), 'hp' (compressor / indexer.proj), 'f32'."""
        src = self._source(sname, want, optional)
        if src is None:
            return
        if kind == "f32":
            gtype = T.F32
        elif kind == "hp":
            gtype = self._hp_type(src)
        else:
            gtype = self._w_type(want[-1])

        def produce(src=src, gtype=gtype, gname=gname):
            if len(src.shape) <= 1:
                yield _encode(src.read(0, 1), gtype, gname).reshape(-1)
                return
            for r0, r1 in _row_blocks(src.rows, src.row_len):
                yield _encode(src.read(r0, r1), gtype, gname)
        self._add(gname, want, gtype, produce)

    def tid2eid(self, gname: str, sname: str, want: tuple[int, ...]) -> None:
        found = self._find(sname)
        if found is None:
            raise MissingTensorError(f"checkpoint tensor '{sname}' is missing (hash-routed layer)")
        ent = self.ck.entry(found)
        self.consumed.add(found)
        if ent.dtype not in _INT_DTYPES:
            raise TensorTypeError(f"checkpoint tensor '{found}' has dtype {ent.dtype}; expected an integer table")
        if tuple(ent.shape) != tuple(want):
            raise TensorShapeError(f"checkpoint tensor '{found}' has shape {list(ent.shape)}, expected {list(want)}")
        n_expert = self.hp["n_expert"]

        def produce(found=found):
            table = self.ck.read(found)
            if table.size and (table.min() < 0 or table.max() >= n_expert):
                raise ModelFormatError(f"'{found}' holds expert ids outside [0, {n_expert})")
            yield table.astype(np.int32)
        self._add(gname, want, T.I32, produce)

    def experts_tensor(self, gname: str, prefix: str, proj: str, want: tuple[int, ...]) -> None:
        """Routed experts `{prefix}ffn.experts.{e}.{proj}` stacked in id order: NumPy [E, out, in]."""
        n_expert, (out, n_in) = want[0], want[1:]
        srcs = [self._source(f"{prefix}ffn.experts.{e}.{proj}.weight", (out, n_in)) for e in range(n_expert)]
        all_fp4 = all(s.fmt == "fp4" for s in srcs)
        if self.experts == "mxfp4" or (self.experts == "auto" and all_fp4 and self.outtype != "f32"):
            if not all_fp4:
                bad = next(s for s in srcs if s.fmt != "fp4")
                raise InvalidArgumentError(f"experts='mxfp4' needs FP4 routed experts; '{bad.name}' is {bad.dtype}")
            gtype = T.MXFP4
        else:
            gtype = self._w_type(n_in, None if self.experts == "auto" else self.experts)

        def produce(srcs=srcs, gtype=gtype, gname=gname):
            for src in srcs:     # one expert at a time, in id order (E is the slowest axis)
                for r0, r1 in _row_blocks(src.rows, src.row_len):
                    if gtype == T.MXFP4:
                        yield src.read_mxfp4(r0, r1)
                    else:
                        yield _encode(src.read(r0, r1), gtype, gname)
        self._add(gname, want, gtype, produce)

    def eh_proj(self, gname: str, prefix: str) -> None:
        D = self.hp["n_embd"]
        e = self._source(f"{prefix}e_proj.weight", (D, D))
        h = self._source(f"{prefix}h_proj.weight", (D, D))
        gtype = self._w_type(2 * D)

        def produce(e=e, h=h, gtype=gtype):
            for r0, r1 in _row_blocks(D, 2 * D):
                yield _encode(np.concatenate([e.read(r0, r1), h.read(r0, r1)], axis=1), gtype, gname)
        self._add(gname, (D, 2 * D), gtype, produce)

    # --- the model
    def plan(self) -> None:
        hp = self.hp
        V, D, HC = hp["n_vocab"], hp["n_embd"], hp["hc_mult"]
        self.float_tensor("token_embd.weight", "embed.weight", (V, D), "w")
        self.float_tensor("output_norm.weight", "norm.weight", (D,), "f32")
        self.float_tensor("output.weight", "head.weight", (V, D), "w")
        self.float_tensor("output_hc_fn.weight", "hc_head_fn", (HC, HC * D), "f32")
        self.float_tensor("output_hc_base.weight", "hc_head_base", (HC,), "f32")
        self.float_tensor("output_hc_scale.weight", "hc_head_scale", (1,), "f32")
        for il in range(hp["n_layer"]):
            self.layer(il, f"layers.{il}.", hp["compress_ratios"][il], il < hp["n_hash_layers"], mtp=False)
        if self.mtp:
            self.layer(hp["n_layer"], "mtp.0.", 0, False, mtp=True)

    def layer(self, il: int, p: str, ratio: int, hashed: bool, mtp: bool) -> None:
        hp = self.hp
        D, H, Dh, HC = hp["n_embd"], hp["n_head"], hp["head_dim"], hp["hc_mult"]
        QL, G, R = hp["q_lora_rank"], hp["o_groups"], hp["o_lora_rank"]
        E, K, F = hp["n_expert"], hp["n_expert_used"], hp["expert_ff"] * hp["n_expert_shared"]
        mix = (2 + HC) * HC
        b = f"blk.{il}."
        ft = self.float_tensor
        if mtp:
            self.eh_proj(b + "nextn.eh_proj.weight", p)
            ft(b + "nextn.enorm.weight", p + "enorm.weight", (D,), "f32")
            ft(b + "nextn.hnorm.weight", p + "hnorm.weight", (D,), "f32")
            ft(b + "nextn.shared_head_norm.weight", p + "norm.weight", (D,), "f32")
        ft(b + "attn_norm.weight", p + "attn_norm.weight", (D,), "f32")
        ft(b + "attn_sinks.weight", p + "attn.attn_sink", (H,), "f32")
        ft(b + "attn_q_a.weight", p + "attn.wq_a.weight", (QL, D), "w")
        ft(b + "attn_q_a_norm.weight", p + "attn.q_norm.weight", (QL,), "f32")
        ft(b + "attn_q_b.weight", p + "attn.wq_b.weight", (H * Dh, QL), "w")
        ft(b + "attn_kv.weight", p + "attn.wkv.weight", (Dh, D), "w")
        ft(b + "attn_kv_a_norm.weight", p + "attn.kv_norm.weight", (Dh,), "f32")
        ft(b + "attn_output_a.weight", p + "attn.wo_a.weight", (G * R, H * Dh // G), "w")
        ft(b + "attn_output_b.weight", p + "attn.wo_b.weight", (D, G * R), "w")
        for site in ("attn", "ffn"):
            ft(b + f"hc_{site}_fn.weight", p + f"hc_{site}_fn", (mix, HC * D), "f32")
            ft(b + f"hc_{site}_base.weight", p + f"hc_{site}_base", (mix,), "f32")
            ft(b + f"hc_{site}_scale.weight", p + f"hc_{site}_scale", (3,), "f32")
        if ratio:
            c = 2 if ratio == 4 else 1
            ft(b + "attn_compressor_kv.weight", p + "attn.compressor.wkv.weight", (c * Dh, D), "hp")
            ft(b + "attn_compressor_gate.weight", p + "attn.compressor.wgate.weight", (c * Dh, D), "hp")
            ft(b + "attn_compressor_ape.weight", p + "attn.compressor.ape", (ratio, c * Dh), "f32")
            ft(b + "attn_compressor_norm.weight", p + "attn.compressor.norm.weight", (Dh,), "f32")
        if ratio == 4:
            HI, DI = hp["indexer_n_head"], hp["indexer_head_dim"]
            ft(b + "indexer.proj.weight", p + "attn.indexer.weights_proj.weight", (HI, D), "hp")
            ft(b + "indexer.attn_q_b.weight", p + "attn.indexer.wq_b.weight", (HI * DI, QL), "w")
            ft(b + "indexer_compressor_kv.weight", p + "attn.indexer.compressor.wkv.weight", (2 * DI, D), "hp")
            ft(b + "indexer_compressor_gate.weight", p + "attn.indexer.compressor.wgate.weight", (2 * DI, D), "hp")
            ft(b + "indexer_compressor_ape.weight", p + "attn.indexer.compressor.ape", (ratio, 2 * DI), "f32")
            ft(b + "indexer_compressor_norm.weight", p + "attn.indexer.compressor.norm.weight", (DI,), "f32")
        ft(b + "ffn_gate_inp.weight", p + "ffn.gate.weight", (E, D), "f32")
        if hashed:
            self.tid2eid(b + "ffn_gate_tid2eid.weight", p + "ffn.gate.tid2eid", (hp["n_vocab"], K))
            if self._find(p + "ffn.gate.bias"):   # unused on hash layers (llama.cpp drops it too)
                self.dropped.append(self._find(p + "ffn.gate.bias"))
        else:
            ft(b + "exp_probs_b.bias", p + "ffn.gate.bias", (E,), "f32")
        ft(b + "exp_probs_b_vl.bias", p + "ffn.gate.bias_vl", (E,), "f32", optional=True)
        ft(b + "ffn_norm.weight", p + "ffn_norm.weight", (D,), "f32")
        Fe = hp["expert_ff"]
        self.experts_tensor(b + "ffn_gate_exps.weight", p, "w1", (E, Fe, D))
        self.experts_tensor(b + "ffn_up_exps.weight", p, "w3", (E, Fe, D))
        self.experts_tensor(b + "ffn_down_exps.weight", p, "w2", (E, D, Fe))
        ft(b + "ffn_gate_shexp.weight", p + "ffn.shared_experts.w1.weight", (F, D), "w")
        ft(b + "ffn_up_shexp.weight", p + "ffn.shared_experts.w3.weight", (F, D), "w")
        ft(b + "ffn_down_shexp.weight", p + "ffn.shared_experts.w2.weight", (D, F), "w")

    def leftovers(self) -> tuple[list[str], list[str]]:
        """(skipped on purpose, unexpected) checkpoint tensors."""
        skipped, unexpected = list(self.dropped), []
        for name in self.ck.entries:
            if name in self.consumed or name in self.dropped:
                continue
            if name.startswith(("vision.", "aligner.", "image_")) or \
                    (name.startswith("mtp.") and (not self.mtp or name.startswith("mtp.0.hc_head_")
                                                   or not name.startswith("mtp.0."))):
                skipped.append(name)
            else:
                unexpected.append(name)
        return skipped, unexpected


# ------------------------------------------------------------------------------------------------
# metadata


def _write_metadata(w: GGUFWriter, hp: dict[str, Any], tok: dict[str, Any], mtp: bool) -> None:
    U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
    ARR, I32 = GGUFValueType.ARRAY, GGUFValueType.INT32
    n_layer = hp["n_layer"]
    n_blocks = n_layer + (1 if mtp else 0)
    ratios = list(hp["compress_ratios"][:n_layer])
    ratios.append(hp["compress_ratios"][n_layer] if len(hp["compress_ratios"]) > n_layer else 0)  # MTP entry
    k = f"{ARCH}."
    for key, value, vtype in [
        ("block_count", n_blocks, U32),
        ("context_length", hp["context_length"], U32),
        ("embedding_length", hp["n_embd"], U32),
        ("embedding_length_out", hp["hc_mult"] * hp["n_embd"], U32),
        ("feed_forward_length", hp["ff_length"], U32),
        ("attention.head_count", hp["n_head"], U32),
        ("attention.head_count_kv", 1, U32),
        ("attention.key_length", hp["head_dim"], U32),
        ("attention.value_length", hp["head_dim"], U32),
        ("rope.dimension_count", hp["n_rot"], U32),
        ("rope.freq_base", hp["rope_freq_base"], F32),
        ("rope.scaling.type", hp["rope_scaling_type"], STR),
        ("rope.scaling.factor", hp["rope_scaling_factor"], F32),
        ("rope.scaling.original_context_length", hp["rope_orig_ctx"], U32),
        ("rope.scaling.yarn_beta_fast", hp["yarn_beta_fast"], F32),
        ("rope.scaling.yarn_beta_slow", hp["yarn_beta_slow"], F32),
        ("attention.layer_norm_rms_epsilon", hp["norm_eps"], F32),
        ("attention.q_lora_rank", hp["q_lora_rank"], U32),
        ("attention.sliding_window", hp["n_swa"], U32),
        ("expert_count", hp["n_expert"], U32),
        ("expert_used_count", hp["n_expert_used"], U32),
        ("expert_feed_forward_length", hp["expert_ff"], U32),
        ("expert_shared_count", hp["n_expert_shared"], U32),
        ("expert_weights_scale", hp["expert_weights_scale"], F32),
        ("expert_weights_norm", hp["expert_weights_norm"], BOOL),
        ("expert_gating_func", 4, U32),   # SQRT_SOFTPLUS (checked in read_config)
    ]:
        w.add_key_value(k + key, value, vtype)
    w.add_key_value(k + "swiglu_clamp_exp", [hp["swiglu_limit"]] * n_blocks, ARR, sub_type=F32)
    w.add_key_value(k + "swiglu_clamp_shexp", [hp["swiglu_limit"]] * n_blocks, ARR, sub_type=F32)
    for key, value, vtype in [
        ("attention.indexer.head_count", hp["indexer_n_head"], U32),
        ("attention.indexer.key_length", hp["indexer_head_dim"], U32),
        ("attention.indexer.top_k", hp["indexer_top_k"], U32),
        ("attention.output_group_count", hp["o_groups"], U32),
        ("attention.output_lora_rank", hp["o_lora_rank"], U32),
    ]:
        w.add_key_value(k + key, value, vtype)
    w.add_key_value(k + "attention.compress_ratios", ratios, ARR, sub_type=I32)
    w.add_key_value(k + "attention.compress_rope_freq_base", hp["compress_rope_freq_base"], F32)
    w.add_key_value(k + "hyper_connection.count", hp["hc_mult"], U32)
    w.add_key_value(k + "hyper_connection.sinkhorn_iterations", hp["hc_sinkhorn_iters"], U32)
    w.add_key_value(k + "hyper_connection.epsilon", hp["hc_eps"], F32)
    w.add_key_value(k + "hash_layer_count", hp["n_hash_layers"], U32)
    if mtp:
        w.add_key_value(k + "nextn_predict_layers", 1, U32)

    w.add_key_value("tokenizer.ggml.model", "gpt2", STR)
    w.add_key_value("tokenizer.ggml.pre", "deepseek-v3", STR)
    w.add_key_value("tokenizer.ggml.tokens", tok["tokens"], ARR, sub_type=STR)
    w.add_key_value("tokenizer.ggml.token_type", tok["types"], ARR, sub_type=I32)
    w.add_key_value("tokenizer.ggml.merges", tok["merges"], ARR, sub_type=STR)
    w.add_key_value("tokenizer.ggml.bos_token_id", hp["bos_id"], U32)
    w.add_key_value("tokenizer.ggml.eos_token_id", hp["eos_id"], U32)
    w.add_key_value("tokenizer.ggml.add_bos_token", True, BOOL)
    if tok.get("chat_template"):
        w.add_key_value("tokenizer.chat_template", tok["chat_template"], STR)


# ------------------------------------------------------------------------------------------------
# memory


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; ru_maxrss where /proc is absent)."""
    v = _proc_status_bytes("VmHWM")
    if v is not None:
        return v
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def rss_bytes() -> int | None:
    return _proc_status_bytes("VmRSS")


# ------------------------------------------------------------------------------------------------
# the converter


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "q8_0", experts: str = "auto",
            mtp: bool = False, progress: Callable[[float], Any] | None = None) -> dict[str, Any]:
    """Convert the official DeepSeek-V4 checkpoint in `hf_dir` to a GGUF at `out_path`.

    `progress(fraction)` is called after every written block of data; returning False cancels
    (CancelledError, no output file). The output is written to `out_path + ".part"` and renamed
    when complete. Returns statistics: tensors, bytes (file size), data_bytes, types (ggml type ->
    tensor count), experts (the routed experts' type), skipped (checkpoint tensors not converted on
    purpose), seconds, rss_start_bytes, peak_rss_bytes (the process's VmHWM at the end)."""
    t0 = time.perf_counter()
    rss0 = rss_bytes()
    outtype = str(outtype).lower()
    experts = str(experts).lower()
    if outtype not in OUTTYPES:
        raise InvalidArgumentError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if experts not in EXPERT_TYPES:
        raise InvalidArgumentError(f"experts must be one of {', '.join(EXPERT_TYPES)}, got {experts!r}")
    hp = read_config(hf_dir)
    if mtp:
        if hp["n_mtp"] < 1:
            raise InvalidArgumentError("mtp=True, but config.json has num_nextn_predict_layers = 0")
        if len(hp["compress_ratios"]) > hp["n_layer"] and hp["compress_ratios"][hp["n_layer"]] != 0:
            raise BadKeyError("the MTP block's compress ratio (compress_ratios[num_hidden_layers]) must be 0")
    tok = read_tokenizer(hf_dir, hp["n_vocab"])
    for key, name in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        if hp[key] is None:
            hp[key] = tok[key]
        if hp[key] is None:
            raise MissingKeyError(f"config.json key '{name}' is missing "
                                  "(and tokenizer_config.json names no such token)")
        if not 0 <= hp[key] < hp["n_vocab"]:
            raise BadKeyError(f"config key '{name}' = {hp[key]} is outside the vocabulary")

    ck = Checkpoint(hf_dir)
    out_path = Path(out_path)
    part = out_path.with_name(out_path.name + ".part")
    w = None
    try:
        planner = _Planner(ck, hp, outtype, experts, mtp)
        planner.plan()
        skipped, unexpected = planner.leftovers()
        if unexpected:
            raise UnexpectedTensorError(f"{len(unexpected)} checkpoint tensor(s) have no GGUF counterpart: "
                                        + ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else ""))
        items = planner.items

        w = GGUFWriter(os.fspath(part), ARCH)
        _write_metadata(w, hp, tok, mtp)
        for it in items:
            w.add_tensor_info(it.name, it.shape, np.dtype(np.float32), it.nbytes, raw_dtype=it.gtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        total = sum(it.nbytes for it in items) or 1
        done = 0
        for it in items:
            w.write_padding(fout, fout.tell())
            written = 0
            for chunk in it.produce():
                chunk = np.ascontiguousarray(chunk)
                fout.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
                done += chunk.nbytes
                if progress is not None and progress(done / total) is False:
                    raise CancelledError("conversion cancelled by the progress callback")
            if written != it.nbytes:
                raise InternalError(f"'{it.name}': wrote {written} bytes, planned {it.nbytes}")
            w.write_padding(fout, it.nbytes)
        w.close()
        w = None
        os.replace(part, out_path)
    except BaseException:
        if w is not None:
            w.close()
        try:
            part.unlink()
        except OSError:
            pass
        raise
    finally:
        ck.close()

    types: dict[str, int] = {}
    for it in items:
        types[it.gtype.name] = types.get(it.gtype.name, 0) + 1
    exp_types = {it.gtype.name for it in items if it.name.endswith("_exps.weight")}
    return dict(
        path=os.fspath(out_path), tensors=len(items), bytes=out_path.stat().st_size,
        data_bytes=sum(it.nbytes for it in items), types=types, outtype=outtype,
        experts=",".join(sorted(exp_types)), skipped=skipped, seconds=time.perf_counter() - t0,
        rss_start_bytes=rss0, peak_rss_bytes=peak_rss_bytes())


# ------------------------------------------------------------------------------------------------
# command line (`dsv4-ggml convert` wires the same arguments)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="directory of the official checkpoint (config.json, safetensors, tokenizer.json)")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--outtype", default="q8_0", choices=OUTTYPES,
                   help="type of the projection matrices, embedding and LM head (default q8_0)")
    p.add_argument("--experts", default="auto", choices=EXPERT_TYPES,
                   help="routed expert type: auto (lossless MXFP4 repack of FP4 experts unless --outtype f32), "
                        "mxfp4, or a float/q8_0 type (default auto)")
    p.add_argument("--mtp", action="store_true", help="also write the MTP block as blk.{n_layer}")


def run_args(args: argparse.Namespace) -> int:
    from .cli_options import ProgressBar

    st = convert(args.hf_dir, args.out, outtype=args.outtype, experts=args.experts, mtp=args.mtp,
                 progress=ProgressBar("converting"))
    types = ", ".join(f"{k} {v}" for k, v in sorted(st["types"].items()))
    print(f"wrote {st['path']}: {st['tensors']} tensors ({types}), {st['bytes'] / 2**30:.2f} GiB, experts "
          f"{st['experts']}, {st['seconds']:.1f} s, peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB"
          + (f"; skipped {len(st['skipped'])} checkpoint tensors (MTP/vision/unused)" if st["skipped"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv4_ggml.convert ...`: the same as `dsv4-ggml convert ...`."""
    from .cli_options import run_parsed

    parser = argparse.ArgumentParser(prog="dsv4-ggml convert", description="Convert an official DeepSeek-V4 "
                                     "checkpoint (safetensors) to GGUF.")
    add_arguments(parser)
    parser.set_defaults(fn=run_args)
    return run_parsed(parser, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
