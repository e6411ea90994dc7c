#!/usr/bin/env python3
"""Write the bench models: DeepSeek-V4-shaped, scaled to a 2-core machine.

hidden 1024, 8 layers (compress ratios 0, 0, 4, 128, 4, 128, 4, 128: both kinds, hash-routed
first two), 8 heads x 512 (rope 64, real head width), q low-rank 256, 4 output groups x 256,
window 128, indexer 16 heads x 128 top-512 (the real top-k), 64 routed experts / 6 active +
1 shared (ff 512), vocab 32768, context 65536. Variants: Q8_0 and Q4_K weights (HC, router,
compressor and indexer projections stay F32, like a llama.cpp conversion).

`--wide`: the full-width stack of the CUDA benchmark (issue 8): hidden 4096, 64 heads x 512,
q low-rank 1024, 8 output groups x 1024, indexer 64 x 128 top-512, 256 routed experts / 6 active
(ff 2048) + 1 shared, vocab 129280, 2 layers (ratios 4, 128), written as dsv4-wide-<type>.gguf.
Its 256 routed experts are 8 drawn ones repeated (`distinct_experts`): every expert still has its
own bytes in the file and in memory, so a step reads what it would read, and the 7 GB file is
written in about a minute instead of half an hour.

`--wide --layers N` writes N such layers (ratios 4, 128 in turn) as dsv4-wideN-<type>.gguf: the
difference between two depths is the cost of a layer, apart from the embedding and the head.

`--head-dim 256`: the same stack with 16 heads x 256 (the query width and everything else
unchanged), written as dsv4-bench256-<type>.gguf: a shape whose head width llama.cpp's repacked
(AMX) CPU weights can run, so both engines are compared at their defaults on it (issue 21).

Usage: python benchmarks/make_bench_model.py OUT_DIR [--types q8_0,q4_k] [--wide [--layers N]] [--head-dim 256]
"""
from __future__ import annotations

import argparse
import os
import time

from dsv4_ggml.tiny import write_tiny_model

BENCH = dict(
    n_vocab=32768, n_embd=1024, n_layer=8, compress_ratios=[0, 0, 4, 128, 4, 128, 4, 128],
    n_hash_layers=2, n_head=8, head_dim=512, n_rot=64, q_lora_rank=256, o_groups=4, o_lora_rank=256,
    n_swa=128, indexer_n_head=16, indexer_head_dim=128, indexer_top_k=512, n_expert=64,
    n_expert_used=6, expert_ff=512, swiglu_limit=10.0, context_length=65536,
)

WIDE = dict(
    n_vocab=129280, n_embd=4096, n_layer=2, compress_ratios=[4, 128], n_hash_layers=0, n_head=64,
    head_dim=512, n_rot=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, n_swa=128, indexer_n_head=64,
    indexer_head_dim=128, indexer_top_k=512, n_expert=256, n_expert_used=6, expert_ff=2048,
    swiglu_limit=10.0, context_length=65536, distinct_experts=8,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--types", default="q8_0,q4_k")
    ap.add_argument("--wide", action="store_true", help="the full-width stack (GPU benchmark)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the full-width stack (default 2)")
    ap.add_argument("--mtp", action="store_true", help="with the MTP block (spec §3.10; same trunk weights)")
    ap.add_argument("--head-dim", type=int, default=512, choices=(512, 256),
                    help="head width of the bench stack: 512 (8 heads, the real width) or 256 (16 heads)")
    args = ap.parse_args()
    if args.layers < 1 or (args.layers != 2 and not args.wide):
        ap.error("--layers takes a positive count and goes with --wide")
    os.makedirs(args.out_dir, exist_ok=True)
    shape = dict(BENCH)
    name = "bench"
    if args.wide:
        shape = dict(WIDE, n_layer=args.layers, compress_ratios=[(4, 128)[i % 2] for i in range(args.layers)])
        name = "wide" if args.layers == 2 else f"wide{args.layers}"
    if args.head_dim != 512:
        if args.wide:
            ap.error("--head-dim goes with the bench stack, not --wide")
        shape.update(n_head=8 * 512 // args.head_dim, head_dim=args.head_dim)
        name = f"bench{args.head_dim}"
    for t in args.types.split(","):
        path = os.path.join(args.out_dir, f"dsv4-{name}-{t}{'-mtp' if args.mtp else ''}.gguf")
        t0 = time.time()
        write_tiny_model(path, seed=0, weight_type=t, n_mtp_layers=1 if args.mtp else 0, **shape)
        print(f"wrote {path}: {os.path.getsize(path) / 2**20:.0f} MiB in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
