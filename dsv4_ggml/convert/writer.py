"""The converter: plan the tensors, write the GGUF (metadata, tensor infos, then every tensor's
bytes block by block) to `out_path + ".part"`, rename when complete, return statistics."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFWriter

from ..errors import (BadKeyError, CancelledError, InternalError, InvalidArgumentError, MissingKeyError,
                      UnexpectedTensorError)
from ..split import part_path as split_part_path
from ..tiny import ARCH
from .checkpoint import Checkpoint
from .config import read_config
from .encode import EXPERT_TYPES, OUTTYPES
from ..memory import peak_rss_bytes, rss_bytes
from .metadata import _write_metadata
from .plan import _Planner
from .tokenizer import read_tokenizer


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike | None, outtype: str = "q8_0", experts: str = "auto",
            mtp: bool = False, progress: Callable[[float], Any] | None = None, split_max_size: int = 0,
            split_max_tensors: int = 0, dry_run: bool = False, holes: bool = False) -> dict[str, Any]:
    """Convert the official DeepSeek-V4 checkpoint in `hf_dir` to a GGUF at `out_path`.

    `progress(fraction)` is called after every written block of data; returning False cancels
    (CancelledError, no output file). The output is written to `out_path + ".part"` and renamed
    when complete. `split_max_size` (bytes of tensor data) / `split_max_tensors` (0: no limit)
    split the output into parts as llama.cpp's gguf-split does (x.gguf -> x-00001-of-0000N.gguf
    …, see dsv4_ggml.split; one file, as without them, when the model fits one part), each
    written as `x.part-0000K-of-0000N.gguf` first. Returns statistics: path (the first part's),
    files (every part), tensors, bytes (all files), data_bytes, types (ggml type -> tensor count),
    experts (the routed experts' type), skipped (checkpoint tensors not converted on purpose),
    seconds, rss_start_bytes, peak_rss_bytes (the process's VmHWM at the end), table (every
    tensor as (name, ggml ne, ggml type name, bytes), in file order).

    `dry_run=True` reads only the checkpoint's headers, plans the tensors and returns the
    statistics (path None, files [], bytes the data alone) without writing anything. `holes=True`
    writes the complete file but not the tensor data: the file is extended to its full size as a
    sparse file whose data read as zeros (a full-size model's header for checking loaders and
    memory planning without the weights; its logits mean nothing)."""
    t0 = time.perf_counter()
    rss0 = rss_bytes()
    outtype = str(outtype).lower()
    experts = str(experts).lower()
    if outtype not in OUTTYPES:
        raise InvalidArgumentError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if experts not in EXPERT_TYPES:
        raise InvalidArgumentError(f"experts must be one of {', '.join(EXPERT_TYPES)}, got {experts!r}")
    for name, value in (("split_max_size", split_max_size), ("split_max_tensors", split_max_tensors)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"{name} must be a non-negative integer, got {value!r}")
    split = split_max_size > 0 or split_max_tensors > 0
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

    if out_path is None and not dry_run:
        raise InvalidArgumentError("out_path is needed (None only with dry_run=True)")
    ck = Checkpoint(hf_dir)
    if not dry_run:
        out_path = Path(out_path)
        # gguf-py names the parts after its path's stem: x.part.gguf -> x.part-00001-of-00003.gguf
        part = out_path.with_name(out_path.stem + ".part.gguf" if split else out_path.name + ".part")
    w = None
    written: list[Path] = []
    try:
        planner = _Planner(ck, hp, outtype, experts, mtp)
        planner.plan()
        skipped, unexpected = planner.leftovers()
        if unexpected:
            raise UnexpectedTensorError(f"{len(unexpected)} checkpoint tensor(s) have no GGUF counterpart: "
                                        + ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else ""))
        items = planner.items
        if dry_run:
            return _stats(items, [], outtype, skipped, t0, rss0)

        w = GGUFWriter(os.fspath(part), ARCH, split_max_tensors=split_max_tensors, split_max_size=split_max_size)
        _write_metadata(w, hp, tok, mtp)
        for it in items:
            w.add_tensor_info(it.name, it.shape, np.dtype(np.float32), it.nbytes, raw_dtype=it.gtype)
        written = w.format_shard_names(part)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        by_name = {it.name: it for it in items}
        total = sum(it.nbytes for it in items) or 1
        done = 0
        for fout, tensors in zip(w.fout, w.tensors):   # each part's tensors, in order
            w.write_padding(fout, fout.tell())
            if holes:   # the data as a hole: extend the file to the size the tensors would give it
                align = w.data_alignment
                fout.truncate(fout.tell() + sum(-(-by_name[n].nbytes // align) * align for n in tensors))
                continue
            for name in tensors:
                done = _write_tensor(w, fout, by_name[name], done, total, progress)
        w.close()
        w = None
        final = [out_path] if len(written) == 1 else \
            [split_part_path(out_path, i + 1, len(written)) for i in range(len(written))]
        for src, dst in zip(written, final):
            os.replace(src, dst)
    except BaseException:
        if w is not None:
            w.close()
        for p in written or [part]:
            try:
                p.unlink()
            except OSError:
                pass
        raise
    finally:
        ck.close()

    return _stats(items, final, outtype, skipped, t0, rss0)


def _stats(items, final: list[Path], outtype: str, skipped, t0: float, rss0) -> dict[str, Any]:
    types: dict[str, int] = {}
    for it in items:
        types[it.gtype.name] = types.get(it.gtype.name, 0) + 1
    exp_types = {it.gtype.name for it in items if it.name.endswith("_exps.weight")}
    data_bytes = sum(it.nbytes for it in items)
    return dict(
        path=os.fspath(final[0]) if final else None, files=[os.fspath(p) for p in final], tensors=len(items),
        bytes=sum(p.stat().st_size for p in final) if final else data_bytes,
        data_bytes=data_bytes, types=types, outtype=outtype,
        experts=",".join(sorted(exp_types)), skipped=skipped, seconds=time.perf_counter() - t0,
        rss_start_bytes=rss0, peak_rss_bytes=peak_rss_bytes(),
        table=[(it.name, tuple(reversed(it.shape)), it.gtype.name, it.nbytes) for it in items])


def _write_tensor(w: GGUFWriter, fout, it, done: int, total: int, progress) -> int:
    """Streams one planned tensor into `fout` block by block (then its padding); returns the bytes
    done so far, reporting them to `progress` (which may cancel)."""
    n = 0
    for chunk in it.produce():
        chunk = np.ascontiguousarray(chunk)
        fout.write(memoryview(chunk).cast("B"))
        n += chunk.nbytes
        done += chunk.nbytes
        if progress is not None and progress(done / total) is False:
            raise CancelledError("conversion cancelled by the progress callback")
    if n != it.nbytes:
        raise InternalError(f"'{it.name}': wrote {n} bytes, planned {it.nbytes}")
    w.write_padding(fout, it.nbytes)
    return done
