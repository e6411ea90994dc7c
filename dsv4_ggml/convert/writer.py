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
from ..tiny import ARCH
from .checkpoint import Checkpoint
from .config import read_config
from .encode import EXPERT_TYPES, OUTTYPES
from .memory import peak_rss_bytes, rss_bytes
from .metadata import _write_metadata
from .plan import _Planner
from .tokenizer import read_tokenizer


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
