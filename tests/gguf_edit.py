"""Rewrite a GGUF with edits: the tool the malformed-file tests are built with.

`rewrite(src, dst, ...)` reads every key (with its exact GGUF value type) and tensor of `src`
and writes them to `dst` with keys dropped/replaced and tensors dropped/replaced/added.
Byte-level damage (truncation, bad magic, absurd counts) is done on the written bytes.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

VIRTUAL = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def read_model(path: str | Path):
    r = GGUFReader(str(path))
    kv: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {}
    for key, field in r.fields.items():
        if key in VIRTUAL:
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        kv[key] = (field.contents(), vtype, sub)
    tensors = []
    for t in r.tensors:
        tensors.append((t.name, np.array(t.data), t.tensor_type))
    return kv, tensors


def write_model(path: str | Path, kv, tensors) -> None:
    arch = kv["general.architecture"][0] if "general.architecture" in kv else "deepseek4"
    w = GGUFWriter(str(path), arch)
    w.kv_data[0].pop("general.architecture", None)  # re-added below in file order (or dropped)
    for key, (value, vtype, sub) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, data, qtype in tensors:
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.I32):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rewrite(src, dst, *, drop_keys=(), set_keys=None, drop_tensors=(), replace_tensors=None,
            add_tensors=None) -> Path:
    """set_keys: key -> (value, vtype[, subtype]); replace_tensors: name -> ndarray (F32/F16/I32
    by dtype) ; add_tensors: name -> ndarray."""
    kv, tensors = read_model(src)
    for k in drop_keys:
        assert k in kv, f"{k} not in {src}"
        del kv[k]
    for k, spec in (set_keys or {}).items():
        value, vtype, *sub = spec
        kv[k] = (value, vtype, sub[0] if sub else None)
    out = []
    names = {n for n, _, _ in tensors}
    for n in drop_tensors:
        assert n in names, f"{n} not in {src}"
    for name, data, qtype in tensors:
        if name in drop_tensors:
            continue
        if replace_tensors and name in replace_tensors:
            data = replace_tensors[name]
            qtype = _qtype_of(data)
        out.append((name, data, qtype))
    for name, data in (add_tensors or {}).items():
        out.append((name, data, _qtype_of(data)))
    write_model(dst, kv, out)
    return Path(dst)


def _qtype_of(data: np.ndarray) -> GGMLQuantizationType:
    return {np.dtype(np.float32): GGMLQuantizationType.F32,
            np.dtype(np.float16): GGMLQuantizationType.F16,
            np.dtype(np.int32): GGMLQuantizationType.I32}[data.dtype]


# --- byte-level damage -----------------------------------------------------------------------

def header_layout(path: str | Path) -> dict[str, int]:
    """Byte offsets of the GGUF sections: kv start, tensor-info start, data start."""
    r = GGUFReader(str(path))
    kv_start = 4 + 4 + 8 + 8
    first_tensor_field = r.tensors[0].field if r.tensors else None
    ti_start = int(first_tensor_field.offset) if first_tensor_field is not None else None
    return {"kv_start": kv_start, "tensor_info_start": ti_start,
            "data_start": int(r.data_offset), "size": Path(path).stat().st_size}


def truncate(src, dst, size: int) -> Path:
    data = Path(src).read_bytes()[:size]
    Path(dst).write_bytes(data)
    return Path(dst)


def patch_bytes(src, dst, offset: int, new: bytes) -> Path:
    data = bytearray(Path(src).read_bytes())
    data[offset:offset + len(new)] = new
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def set_counts(src, dst, n_tensors: int | None = None, n_kv: int | None = None) -> Path:
    data = bytearray(Path(src).read_bytes())
    if n_tensors is not None:
        data[8:16] = struct.pack("<Q", n_tensors)
    if n_kv is not None:
        data[16:24] = struct.pack("<Q", n_kv)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)
