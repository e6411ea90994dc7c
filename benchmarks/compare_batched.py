#!/usr/bin/env python3
"""Several sequences at once: dsv4-ggml (`dsv4-ggml bench --seqs`) against llama.cpp's
llama-batched-bench, on the same GGUF files, same threads, the two engines alternating in one run.

Both follow batched-bench's protocol: N sequences (-npl) each get their own prompt of PP tokens,
prefilled together (S_PP: aggregate prompt tokens/s), then TG decode steps of one token per
sequence (S_TG: aggregate generated tokens/s); PP is the depth the decode runs at. llama.cpp runs
with its default settings (on this machine its repacked weights work: no AMX); pass --llama-args
to change them. llama-batched-bench is built from the same pinned sdist as vendor/ggml, outside
this repository (default ../llamacpp-build; benchmarks/compare_llamacpp.py documents the build:
`ninja llama-batched-bench`). Prints one table per model: aggregate decode and prefill t/s of both
engines (every run, then the mean), the ratio, the weight bytes a decode step reads and the
bandwidth floor (benchmarks/membw.c).

Usage: python benchmarks/compare_batched.py [--threads 2] [--npl 1,2,4,8] [--npp 128,4096]
       [--ntg 64] [--reps 2] [--models ../bench-models] [--llama-build ../llamacpp-build]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from compare_llamacpp import membw  # noqa: E402


def llama_batched(exe: Path, model: Path, threads: int, npl: list[int], npp: list[int], ntg: int,
                  extra: list[str]) -> dict:
    n_ctx = max(npl) * (max(npp) + ntg) + 256
    cmd = [str(exe), "-m", str(model), "-c", str(n_ctx), "-b", "2048", "-ub", "512", "-t", str(threads),
           "-npp", ",".join(map(str, npp)), "-ntg", str(ntg), "-npl", ",".join(map(str, npl)),
           "--output-format", "jsonl", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    rows = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows[(r["pl"], r["pp"])] = {"pp": r["speed_pp"], "tg": r["speed_tg"]}
    return rows


def ours(model: Path, threads: int, npl: list[int], npp: list[int], ntg: int, bw: float) -> dict:
    cmd = [sys.executable, "-m", "dsv4_ggml.cli", "bench", "-m", str(model), "-t", str(threads),
           "--seqs", ",".join(map(str, npl)), "-d", ",".join(map(str, npp)), "-n", str(ntg), "-r", "1",
           "--bandwidth", f"{bw:.2f}", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if out.returncode != 0:
        raise SystemExit(f"dsv4-ggml bench failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout)
    return {(r["n_seq"], r["depth"]): {"pp": r["pp_mean"], "tg": r["tg_mean"], "bytes": r["step_weight_bytes"],
                                       "floor": r.get("floor_tokens_per_s")} for r in res["seqs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--npl", default="1,2,4,8")
    ap.add_argument("--npp", default="128,4096")
    ap.add_argument("--ntg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--models", default=str(REPO.parent / "bench-models"))
    ap.add_argument("--llama-build", default=str(REPO.parent / "llamacpp-build"))
    ap.add_argument("--llama-args", default="", help="extra llama-batched-bench arguments (default: none)")
    args = ap.parse_args()
    npl = [int(x) for x in args.npl.split(",")]
    npp = [int(x) for x in args.npp.split(",")]
    build = Path(args.llama_build)
    exe = build / "bin" / "llama-batched-bench"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: build it from the pinned sdist (`ninja -C {build} llama-batched-bench`)")
    bw = membw(args.threads, build)
    print(f"memory read bandwidth ({args.threads} threads): {bw:.1f} GB/s")
    models = sorted(Path(args.models).glob("dsv4-bench-*.gguf"))
    t0 = time.time()
    for model in models:
        runs = {"ours": [], "llama": []}
        for rep in range(args.reps):
            order = ["ours", "llama"] if rep % 2 == 0 else ["llama", "ours"]
            for who in order:
                t = time.time()
                if who == "ours":
                    runs[who].append(ours(model, args.threads, npl, npp, args.ntg, bw))
                else:
                    runs[who].append(llama_batched(exe, model, args.threads, npl, npp, args.ntg,
                                                   args.llama_args.split()))
                print(f"  {model.name} rep {rep} {who}: {time.time() - t:.0f} s", file=sys.stderr)
        print(f"\n{model.name} (threads {args.threads}, TG {args.ntg} steps; every run, then the mean)")
        print("| N | depth (PP) | tg t/s ours | tg t/s llama.cpp | tg ratio | weights/step | floor t/s | ours of floor "
              "| pp t/s ours | pp t/s llama.cpp | pp ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n in npl:
            for d in npp:
                o = [r[(n, d)] for r in runs["ours"]]
                ll = [r[(n, d)] for r in runs["llama"] if (n, d) in r]
                if not ll:
                    continue
                mo_tg = statistics.fmean(x["tg"] for x in o)
                ml_tg = statistics.fmean(x["tg"] for x in ll)
                mo_pp = statistics.fmean(x["pp"] for x in o)
                ml_pp = statistics.fmean(x["pp"] for x in ll)
                fmt = lambda xs, k: " / ".join(f"{x[k]:.1f}" for x in xs)  # noqa: E731
                print(f"| {n} | {d} | {fmt(o, 'tg')} → **{mo_tg:.1f}** | {fmt(ll, 'tg')} → {ml_tg:.1f} | "
                      f"**{mo_tg / ml_tg:.2f}×** | {o[0]['bytes'] / 2**20:.0f} MiB | {o[0]['floor']:.0f} | "
                      f"{mo_tg / o[0]['floor']:.0%} | {mo_pp:.0f} | {ml_pp:.0f} | {mo_pp / ml_pp:.2f}× |")
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
