"""`dsv4-ggml tiny`: write a tiny random DeepSeek-V4 model for tests and demos."""
from __future__ import annotations

import os

from .common import _human


def add_arguments(t) -> None:
    t.add_argument("out", help="output .gguf path")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--n-mtp-layers", type=int, default=0, choices=(0, 1),
                   help="add the MTP block (default 0)")
    t.add_argument("--type", default="f32", metavar="TYPE",
                   help="ggml type of the matrices (f32, f16, bf16, q8_0, q4_k, iq2_xxs, mxfp4, ...; default f32)")
    t.add_argument("--recipe", default=None, metavar="NAME",
                   help="a per-tensor type mix like the published quants (iq1_m, iq1_s, iq2, iq3, k, mxfp4, legacy)")


def run(args) -> int:
    from ..tiny import write_tiny_model

    overrides = {"weight_type": args.type, "recipe": args.recipe}
    if args.n_mtp_layers:
        overrides["n_mtp_layers"] = args.n_mtp_layers
    try:
        cfg = write_tiny_model(args.out, seed=args.seed, **overrides)
    except ValueError as e:
        raise SystemExit(f"dsv4-ggml tiny: {e}") from None
    size = os.path.getsize(args.out)
    layers = cfg.get("n_layer") if isinstance(cfg, dict) else None
    print(f"wrote {args.out} ({_human(size)}, seed {args.seed}"
          + (f", {layers} layers" if layers is not None else "") + ")")
    return 0
