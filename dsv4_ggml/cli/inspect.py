"""`dsv4-ggml inspect`: validate a model file and print what it holds."""
from __future__ import annotations

import os

from .common import _human


def add_arguments(i) -> None:
    i.add_argument("model", help="a DeepSeek-V4 .gguf file (or any part of a split one: "
                                 "PREFIX-00001-of-00003.gguf ...)")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.add_argument("--seqs", type=int, default=1, help="sequence slots of the session (default 1)")
    i.add_argument("--ctx", type=int, nargs="*", default=[4096, 32768],
                   help="context lengths to estimate memory for (default 4096 32768)")


def run(args) -> int:
    from codegen.tables import gguf_key

    from ..model import Model

    import time

    from ..memory import rss_bytes

    t0 = time.perf_counter()
    m = Model(args.model, n_ctx=1, repack=False)  # describes the file: no copies of its weights
    opened, rss = time.perf_counter() - t0, rss_bytes()
    hp = m.hparams
    print(f"{args.model}: DeepSeek-V4 (deepseek4), {hp['n_layer']} layers"
          f"{' + MTP' if hp['n_nextn'] else ''}, vocab {m.n_vocab}")
    tensors = m.tensors
    files = m.files
    if len(files) > 1:
        print(f"files: a split GGUF of {len(files)} parts (each mapped in place)")
        for i, f in enumerate(files):
            held = [t for t in tensors if t.file == i]
            print(f"  part {i + 1}/{len(files)}  {f}  {_human(os.path.getsize(f))}, {len(held)} tensors "
                  f"({_human(sum(t.nbytes for t in held))})")
    width = max(len(k) for k in hp)
    for k, v in hp.items():
        print(f"  {k:<{width}}  {v}")
    total = sum(t.nbytes for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.type] = by_type.get(t.type, 0) + t.nbytes
    print(f"tensors: {len(tensors)}, {_human(total)} "
          + "(" + ", ".join(f"{k} {_human(v)}" for k, v in sorted(by_type.items())) + ")")
    if hp["n_nextn"]:   # the MTP block (spec §3.10): blk.{n_layer}, optional, read only when used
        mtp = [t for t in tensors if t.name.startswith(f"blk.{hp['n_layer']}.")]
        print(f"MTP block: blk.{hp['n_layer']}, {len(mtp)} tensors ({_human(sum(t.nbytes for t in mtp))}); "
              f"used only with Model(mtp=True) / --draft mtp (no step computes with it otherwise)")
    ignored = [t for t in tensors if t.placement == "ignored"]
    if ignored:   # another model's tensors that converters bundle (codegen/v4.py foreign_family)
        names = ", ".join(t.name for t in ignored[:6]) + (", ..." if len(ignored) > 6 else "")
        print(f"ignored: {len(ignored)} tensors ({_human(sum(t.nbytes for t in ignored))}) of a bundled "
              f"DSpark/DFlash draft head ({names}); no step computes with them")
    n_ratios = m.metadata_array_length(gguf_key("compress_ratios")) or 0
    if n_ratios > hp["n_layer_all"]:
        print(f"compress_ratios: {n_ratios} entries for {hp['n_layer_all']} blocks; the entries after the "
              f"first {hp['n_layer_all']} are not read")
    for n_ctx in args.ctx:
        if n_ctx > hp["n_ctx_train"]:
            print(f"n_ctx {n_ctx}: exceeds the model's context length {hp['n_ctx_train']}")
            continue
        slot = m.estimate_state_bytes(n_ctx, per_slot=True)
        state = m.estimate_state_bytes(n_ctx, n_seq=args.seqs)
        mapped = "the files" if len(files) > 1 else "the file"
        print(f"memory at n_ctx {n_ctx}: weights {_human(total)} (mapped from {mapped}) + session state "
              f"{_human(state)} for {args.seqs} sequence{'s' if args.seqs > 1 else ''} ({_human(slot)} per "
              f"sequence slot, {slot / n_ctx:.0f} bytes/token incl. fixed windows and rollback rings) + "
              f"compute buffer")
    print(f"opened in {opened:.2f} s" + ("" if rss is None else f", RSS {rss / 2**20:.1f} MiB") +
          " (weights mapped, not read: the first evaluation reads the pages it needs; a session with "
          "repack copies what it repacks at load, Model(prefetch=True) reads every page at load)")
    if args.tensors:
        nw = max(len(t.name) for t in tensors)
        for t in tensors:
            shape = "{" + ", ".join(str(x) for x in t.shape) + "}"
            part = f"  part {t.file + 1}" if len(files) > 1 else ""
            print(f"  {t.name:<{nw}}  {t.type:<8} {shape:<22} {_human(t.nbytes):>10}{part}")
    m.close()
    return 0
