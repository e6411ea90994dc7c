#!/usr/bin/env python3
"""Per weight type on the tiny model: file size, worst relative logit error vs the float64
reference on the same file (300-token prompt), greedy agreement over 64 decode steps, and decode
tokens/s (the numbers issue 6 asks for; tests/test_quant.py asserts the error bounds).

Uses tests/test_quant.py's "smooth" tiny config (every indexer block and expert selected, so a
type's rounding cannot flip a near-tie). Greedy agreement: the engine decodes 64 greedy tokens;
the reference, fed the same tokens, must pick each of them as its own argmax; at a miss the table
shows how far (relative to max|logit|) the reference ranks the engine's token below its own.

Usage: python benchmarks/quant_table.py [--types f32,f16,...] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import dsv4_ggml
from dsv4_ggml.reference import Reference
from dsv4_ggml.tiny import write_tiny_model

SMOOTH = dict(indexer_top_k=512, n_expert_used=8, expert_ff=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q4_k,q2_k,iq2_xxs,mxfp4")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    prompt = np.random.default_rng(0).integers(2, 512, 300)
    print("| weights | file size | max rel. logit error (300 tokens) | greedy agreement (64 steps) "
          "| reference top-2 gap at the misses | tg t/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for wtype in args.types.split(","):
            path = os.path.join(d, f"{wtype}.gguf")
            kw = dict(expert_type="mxfp4") if wtype == "mxfp4" else dict(weight_type=wtype)
            write_tiny_model(path, seed=0, **kw, **SMOOTH)
            m = dsv4_ggml.Model(path, n_ctx=512, n_threads=args.threads, cache_type="f32")
            ref = Reference(path)
            got = m.eval(prompt)
            want = ref.eval(prompt)
            err = (np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)).max()
            tok, agree, times, gaps = int(got[-1].argmax()), 0, [], []
            for _ in range(64):
                t0 = time.perf_counter()
                row = m.eval([tok], logits="last")[0]
                times.append(time.perf_counter() - t0)
                r = ref.eval([tok])[0]
                nxt = int(row.argmax())
                hit = int(r.argmax()) == nxt
                agree += int(hit)
                if not hit:     # how far apart the reference puts its own choice and the engine's
                    gaps.append((r.max() - r[nxt]) / np.abs(r).max())
                tok = nxt
            tg = 1.0 / np.median(times)
            gap = ", ".join(f"{g:.1e}" for g in gaps) or "-"
            print(f"| {wtype} | {os.path.getsize(path) / 2**20:.1f} MiB | {err:.2e} | {agree}/64 | {gap} | {tg:.0f} |",
                  flush=True)
            m.close()


if __name__ == "__main__":
    main()
