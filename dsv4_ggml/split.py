"""Split GGUFs in llama.cpp's gguf-split format: one model in several files.

gguf-split and gguf-py's `GGUFWriter(split_max_tensors=, split_max_size=)` write the parts
`PREFIX-00001-of-00003.gguf` … (numbered from 1). Each part is a whole GGUF with its own tensor
table and data section; every part carries `split.no` (u16, from 0), `split.count` (u16) and
`split.tensors.count` (i32, the tensors of all parts); only the first carries the model's other
metadata. `Model` opens a split model from any part's name (the native loader maps every part).

`split_gguf` rewrites an existing single GGUF into such parts (the same keys in the same order,
the same tensors, their bytes copied as they are); `parse_size` reads the sizes the options
take ("50G"), as llama.cpp's tools do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InvalidArgumentError

SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_DEFAULT_ALIGNMENT = 32


def parse_size(text: str | int) -> int:
    """Bytes of a size such as 50G, 500M, 64K or 123 (decimal units, as gguf-split's
    --split-max-size and convert_hf_to_gguf.py read them)."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise InvalidArgumentError(f"a size must be a number of bytes with an optional K, M, G or T suffix "
                                       f"(e.g. 50G), got {text!r}")
        n = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise InvalidArgumentError(f"a size must be positive, got {text!r}")
    return n


def part_path(path: str | os.PathLike, no: int, count: int) -> Path:
    """The name of part `no` (from 1) of `count` of the model written at `path` (x.gguf ->
    x-00001-of-00003.gguf), as gguf-py and gguf-split name them."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{no:05d}-of-{count:05d}.gguf")


def split_gguf(src: str | os.PathLike, dst_prefix: str | os.PathLike, max_tensors: int = 0, max_bytes: int = 0,
               small_first_part: bool = False) -> list[Path]:
    """Rewrites the GGUF `src` as parts `{dst_prefix}-00001-of-0000N.gguf` … with gguf-py's
    writer: a new part once one holds `max_tensors` tensors or would exceed `max_bytes` of
    tensor data (0: no limit; a part holds at least one tensor); `small_first_part`: the first
    part holds the metadata and no tensor (gguf-py's small_first_shard). Returns the paths
    written, in order (one file `{dst_prefix}.gguf`, without split keys, when no limit splits)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    for name, value in (("max_tensors", max_tensors), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    r = GGUFReader(os.fspath(src))
    fields = [(k, f) for k, f in r.fields.items() if not k.startswith("GGUF.")]   # GGUF.*: the header
    keys = [k for k, _ in fields]
    if any(k in SPLIT_KEYS for k in keys):
        raise InvalidArgumentError(f"{src} is already a part of a split GGUF")
    if "general.architecture" not in keys:
        raise InvalidArgumentError(f"{src} has no general.architecture")
    if r.alignment != _DEFAULT_ALIGNMENT:
        # gguf-py writes general.alignment into the first part only: the others would be read
        # with the default alignment
        raise InvalidArgumentError(f"{src} has general.alignment {r.alignment}; only the default "
                                   f"{_DEFAULT_ALIGNMENT} can be split with gguf-py")

    w = GGUFWriter(Path(f"{os.fspath(dst_prefix)}.gguf"), str(r.fields["general.architecture"].contents()),
                   split_max_tensors=max_tensors, split_max_size=max_bytes, small_first_shard=small_first_part)
    w.kv_data[0].clear()   # the writer's own general.architecture: every key is re-added in src's order
    for key, field in fields:
        vtype = field.types[0]
        w.add_key_value(key, field.contents(), vtype,
                        sub_type=field.types[1] if vtype == GGUFValueType.ARRAY else None)
    by_name = {}
    for t in r.tensors:
        by_name[t.name] = t
        # the writer takes numpy order (slowest axis first); the reader gives ggml order
        w.add_tensor_info(t.name, [int(x) for x in reversed(t.shape)], np.dtype(np.float32), int(t.n_bytes),
                          raw_dtype=t.tensor_type)
    paths = w.format_shard_names(w.path)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for fout, tensors in zip(w.fout, w.tensors):
            w.write_padding(fout, fout.tell())   # the data section starts aligned, even when empty
            for name in tensors:
                t = by_name[name]
                fout.write(memoryview(r.data[t.data_offset:t.data_offset + t.n_bytes]))
                w.write_padding(fout, int(t.n_bytes))
        w.close()
    except BaseException:
        w.close()
        for p in paths:
            p.unlink(missing_ok=True)
        raise
    return paths
