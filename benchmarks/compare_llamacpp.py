#!/usr/bin/env python3
"""Run dsv4-ggml and llama.cpp's llama-bench on the same GGUF files, same threads, one run.

llama-bench is built from the same pinned sdist as vendor/ggml (llama-cpp-python 0.3.36), in a
directory OUTSIDE this repository (default ../llamacpp-build); nothing of it is committed. The
bench models come from benchmarks/make_bench_model.py (default ../bench-models). Prints, per
model, pp512, tg128 and tg128 at depth 16k for both engines and the ratio ours / llama.cpp,
plus the memory bandwidth floor (benchmarks/membw.c).

Usage: python benchmarks/compare_llamacpp.py [--threads 2] [--depth 16384] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def read_pin() -> dict[str, str]:
    pin = {}
    for line in (REPO / "vendor" / "ggml" / "PIN").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            pin[k.strip()] = v.strip()
    return pin


def build_llama_bench(build_dir: Path) -> Path:
    exe = build_dir / "bin" / "llama-bench"
    if exe.exists():
        return exe
    pin = read_pin()
    sdist = REPO / "vendor" / "ggml" / ".download" / pin["sdist"]
    if not sdist.exists():
        subprocess.run([sys.executable, str(REPO / "vendor" / "ggml" / "fetch_ggml.py"), "--force"], check=True)
    src = build_dir / "src"
    if not (src / "CMakeLists.txt").exists():
        src.mkdir(parents=True, exist_ok=True)
        prefix = pin["sdist"][:-len(".tar.gz")] + "/vendor/llama.cpp/"
        import tarfile
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(src, members=[m for m in members if m.name])
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_CCACHE=OFF"], check=True)
    subprocess.run(["ninja", "-C", str(build_dir), "llama-bench"], check=True)
    return exe


def membw(threads: int, build_dir: Path) -> float:
    exe = build_dir / "membw"
    if not exe.exists():
        subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", str(HERE / "membw.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "2048", "10"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads))).stdout
    return float(re.search(r"best ([0-9.]+) GB/s", out).group(1))


NO_REPACK: list[str] = []   # becomes ["--repack", "0"] once llama-bench aborts with its repacked weights


def llama_bench(exe: Path, model: Path, threads: int, n_prompt: int, n_gen: int, depth: int, reps: int) -> dict:
    """llama-bench's t/s. On CPUs where its extra (repacked / AMX) weight buffers cannot run the
    DeepSeek-V4 graph, llama.cpp aborts in the scheduler (GGML_ASSERT(*cur_backend_id != -1), seen
    on a Sapphire Rapids host with AMX): then it is run, and reported, with `--repack 0`."""
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-d", str(depth), "-r", str(reps), "-o", "json"]
    r = subprocess.run(cmd + NO_REPACK, capture_output=True, text=True)
    if r.returncode != 0 and not NO_REPACK:
        print("llama-bench aborted with repacked weights; running it with --repack 0 "
              f"({(r.stderr.strip().splitlines() or ['?'])[0][:160]})")
        NO_REPACK.extend(["--repack", "0"])
        r = subprocess.run(cmd + NO_REPACK, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed ({r.returncode}):\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout)
    return {(r["n_prompt"], r["n_gen"]): r["avg_ts"] for r in res}


def llama_graph_nodes(exe: Path, model: Path, threads: int) -> int | None:
    """llama.cpp's graph node count, from its scheduler's debug log."""
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", "0", "-n", "1", "-r", "1", "-v", *NO_REPACK],
                         capture_output=True, text=True, errors="replace", env=dict(os.environ, GGML_SCHED_DEBUG="1"))
    m = re.search(r"graph: nodes = (\d+)", out.stdout + out.stderr)
    return int(m.group(1)) if m else None


def ours(model: Path, threads: int, n_prompt: int, n_gen: int, depths: list[int], reps: int, bw: float) -> dict:
    cmd = [sys.executable, "-m", "dsv4_ggml.cli", "bench", "-m", str(model), "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-d", ",".join(map(str, depths)), "-r", str(reps),
           "--bandwidth", str(bw), "--json"]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--depth", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default=str(REPO.parent / "bench-models"))
    ap.add_argument("--llama-build", default=str(REPO.parent / "llamacpp-build"))
    args = ap.parse_args()

    build_dir = Path(args.llama_build)
    exe = build_llama_bench(build_dir)
    models = sorted(Path(args.models).glob("dsv4-bench-*.gguf"))
    if not models:
        subprocess.run([sys.executable, str(HERE / "make_bench_model.py"), args.models], check=True)
        models = sorted(Path(args.models).glob("dsv4-bench-*.gguf"))
    bw = membw(args.threads, build_dir)
    print(f"memory read bandwidth ({args.threads} threads): {bw:.1f} GB/s")
    for model in models:
        print(f"\n## {model.name} ({model.stat().st_size / 2**20:.0f} MiB), {args.threads} threads")
        ref = llama_bench(exe, model, args.threads, 512, 128, 0, args.reps)
        ref_d = llama_bench(exe, model, args.threads, 0, 128, args.depth, 1) if args.depth else {}
        mine = ours(model, args.threads, 512, 128, [0] + ([args.depth] if args.depth else []), args.reps, bw)
        res = {(r["test"], r["depth"]): r["mean"] for r in mine["results"]}
        rows = [("pp512", res[("pp512", 0)], ref[(512, 0)]), ("tg128", res[("tg128", 0)], ref[(0, 128)])]
        if args.depth:
            rows.append((f"tg128 @ d{args.depth}", res[("tg128", args.depth)], ref_d[(0, 128)]))
        print("| test | dsv4-ggml t/s | llama.cpp t/s | ratio |")
        print("|---|---|---|---|")
        for name, a, b in rows:
            print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
        if args.depth:
            print(f"tg at depth {args.depth} / depth 0: {res[('tg128', args.depth)] / res[('tg128', 0)]:.2f}")
        w = mine["decode_weight_bytes"]["total"]
        print(f"weights read per token {w / 2**20:.1f} MiB; floor {mine['bandwidth_floor_tokens_per_s']:.1f} t/s; "
              f"tg reaches {mine['bandwidth_fraction']:.0%}")
        c = mine["cache_bytes_per_token"]
        print(f"cache bytes per context token: measured {c['measured']:.0f}, theoretical {c['theoretical']:.0f}")
        nodes = llama_graph_nodes(exe, model, args.threads)
        print(f"graph nodes: dsv4-ggml {mine['graph_nodes']} ({mine['graph_nodes_per_layer']:.0f} per layer, "
              f"decode graph); llama.cpp {nodes} ({nodes / mine['n_layer']:.0f} per layer, its reserve graph)"
              if nodes else f"graph nodes: dsv4-ggml {mine['graph_nodes']}")


if __name__ == "__main__":
    if shutil.which("ninja") is None and shutil.which("cmake") is None:
        sys.exit("needs cmake and ninja")
    main()
