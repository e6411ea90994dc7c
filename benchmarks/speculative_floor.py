#!/usr/bin/env python3
"""What enabling speculative decoding costs when no draft is ever accepted (issue 18's floor:
adaptive K never below 0.95x plain decoding at 0% acceptance).

Alternates, `--rounds` times on one machine: plain greedy decoding of a model opened without its
MTP block (what a user who never asked for drafts runs), plain decoding of the model opened with
mtp=True (the MTP state kept, no drafts), and adaptive K with the MTP drafter (the random-weight
bench model's MTP block never agrees: 0% acceptance). Prints each round and the median ratios
with their spread.

    python benchmarks/speculative_floor.py MODEL_WITH_MTP.gguf [-n 256] [-t 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from dsv4_ggml import Model  # noqa: E402
from dsv4_ggml.bench_draft import _decode  # noqa: E402
from dsv4_ggml.speculative import Drafting  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("-n", type=int, default=256, help="tokens generated per run")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-draft", type=int, default=4)
    args = ap.parse_args()
    n_prompt = 64
    base = Model(args.model, n_ctx=n_prompt + args.n + 16, n_threads=args.threads)
    mtp = Model(args.model, n_ctx=n_prompt + args.n + 16, n_threads=args.threads, mtp=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(10, base.n_vocab, n_prompt)]
    _decode(base, prompt, 16)
    _decode(mtp, prompt, 16)                                           # warm both
    rows = []
    for r in range(args.rounds):
        toks, t_base = _decode(base, prompt, args.n)
        _, t_mtp = _decode(mtp, prompt, args.n)
        d = Drafting.of("mtp", args.n_draft, adaptive=True)
        got, t_spec = _decode(mtp, prompt, args.n, d)
        s = d.stats
        rows.append((len(toks) / t_base, len(toks) / t_mtp, len(got) / t_spec))
        print(f"round {r + 1}: plain (no MTP block) {rows[-1][0]:.1f} t/s, plain (MTP state kept) {rows[-1][1]:.1f} t/s, "
              f"adaptive MTP drafts {rows[-1][2]:.1f} t/s (acceptance {s['acceptance']:.0%}, {s['proposed']} drafts)",
              flush=True)
    for label, i in (("MTP state kept, no drafts", 1), ("adaptive MTP drafts at 0% acceptance", 2)):
        ratios = [row[i] / row[0] for row in rows]
        print(f"{label} vs plain without the MTP block: median {statistics.median(ratios):.3f}x "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
    ratios = [row[2] / row[1] for row in rows]
    print(f"adaptive MTP drafts vs plain with the MTP state kept: median {statistics.median(ratios):.3f}x "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
