"""The checkpoint's tensors: safetensors shards (parsed here: header length, JSON header, raw
little-endian bytes; tensors read with positioned reads, row block by row block), the Checkpoint of
a directory (index + shards, or one file), and one source weight decoded to float32 (`_Source`)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import (CorruptFileError, FileError, InternalError, MissingTensorError, ModelFormatError,
                      TensorShapeError, TensorTypeError)
from .formats import FP4_BLOCK, FP8_BLOCK, bf16_to_f32, dequant_fp4, dequant_fp8, e8m0_to_f32, fp4_to_mxfp4

_CHUNK_ELEMS = 1 << 22   # values per row block (16 MiB as float32)

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
