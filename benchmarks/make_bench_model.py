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

Usage: python benchmarks/make_bench_model.py OUT_DIR [--types q8_0,q4_k] [--wide]
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
    swiglu_limit=10.0, context_length=65536,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--types", default="q8_0,q4_k")
    ap.add_argument("--wide", action="store_true", help="the full-width stack (GPU benchmark)")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for t in args.types.split(","):
        path = os.path.join(args.out_dir, f"dsv4-{'wide' if args.wide else 'bench'}-{t}.gguf")
        t0 = time.time()
        write_tiny_model(path, seed=0, weight_type=t, **(WIDE if args.wide else BENCH))
        print(f"wrote {path}: {os.path.getsize(path) / 2**20:.0f} MiB in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
