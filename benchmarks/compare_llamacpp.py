#!/usr/bin/env python3
"""Run dsv4-ggml and llama.cpp's llama-bench on the same GGUF files, same threads, alternating runs.

llama-bench is built from the same pinned sdist as vendor/ggml (llama-cpp-python 0.3.36), in a
directory OUTSIDE this repository (default ../llamacpp-build); nothing of it is committed. The
bench models come from benchmarks/make_bench_model.py (default ../bench-models). Prints, per
model, pp512, tg128 and tg128 at depth 16k for both engines and the ratio ours / llama.cpp,
plus the memory bandwidth floor (benchmarks/membw.c).

llama.cpp runs at its best working configuration per file: its defaults first, then the fallback
(printed). The two engines alternate test by test, --reps times; the table gives the median and the
spread. Also: the compute roof (benchmarks/computeroof.c) and the fraction of it pp512 reaches.

Usage: python benchmarks/compare_llamacpp.py [--threads 2] [--depth 16384] [--long 4096,16384] [--reps 3] [--only q8_0]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
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


def computeroof(threads: int, build_dir: Path) -> dict[str, float]:
    """Peak multiply-accumulates per second of each matrix unit (benchmarks/computeroof.c)."""
    exe = build_dir / "computeroof"
    if not exe.exists():
        subprocess.run(["cc", "-O2", "-march=native", "-fopenmp", str(HERE / "computeroof.c"), "-o", str(exe)],
                       check=True)
    out = subprocess.run([str(exe), "1"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(threads))).stdout
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+) ([0-9.]+) GMAC/s", out, re.MULTILINE)}


# llama.cpp's configurations, best first: its defaults (repacked / AMX CPU weights where the CPU has
# them), then weights read as they are. On a CPU with AMX its defaults abort in the scheduler on every
# DeepSeek-V4 file with AMX-able weights (the grouped wo_a product; benchmarks/RESULTS.md, "Why
# llama.cpp's defaults abort"); the first configuration that runs is used for that file and printed.
LLAMA_CONFIGS = [("defaults", []), ("--repack 0 (weights as they are)", ["--repack", "0"])]


def llama_bench(exe: Path, model: Path, threads: int, n_prompt: int, n_gen: int, depth: int,
                config: int | None) -> tuple[float, int]:
    """llama-bench's t/s for one test, and the index of the configuration that ran it (tried in
    LLAMA_CONFIGS order from `config`, or from the first when None)."""
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-d", str(depth), "-r", "1", "-o", "json"]
    for i in range(config or 0, len(LLAMA_CONFIGS)):
        r = subprocess.run(cmd + LLAMA_CONFIGS[i][1], capture_output=True, text=True)
        if r.returncode == 0:
            return json.loads(r.stdout)[0]["avg_ts"], i
        lines = r.stderr.strip().splitlines() or ["?"]
        why = next((ln for ln in lines if "GGML_ASSERT" in ln or "error" in ln.lower()), lines[-1])
        print(f"  llama-bench with {LLAMA_CONFIGS[i][0]} failed ({r.returncode}): {why.strip()[:200]}")
    raise SystemExit(f"llama-bench failed with every configuration on {model}")


def llama_graph_nodes(exe: Path, model: Path, threads: int, config: int) -> int | None:
    """llama.cpp's graph node count, from its scheduler's debug log."""
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", "0", "-n", "1", "-r", "1", "-v",
                          *LLAMA_CONFIGS[config][1]],
                         capture_output=True, text=True, errors="replace", env=dict(os.environ, GGML_SCHED_DEBUG="1"))
    m = re.search(r"graph: nodes = (\d+)", out.stdout + out.stderr)
    return int(m.group(1)) if m else None


def ours(model: Path, threads: int, n_prompt: int, n_gen: int, depth: int, bw: float, roof: float | None) -> dict:
    cmd = [sys.executable, "-m", "dsv4_ggml.cli", "bench", "-m", str(model), "-t", str(threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-d", str(depth), "-r", "1", "--bandwidth", str(bw), "--json"]
    if roof:
        cmd += ["--compute-roof", str(roof)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)


def spread(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs):.2f} ({xs[0]:.2f}-{xs[-1]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--depth", type=int, default=16384, help="tg at this depth too (0: not)")
    ap.add_argument("--long", default="", help="comma-separated long prompts, e.g. 4096,16384 (pp each)")
    ap.add_argument("--reps", type=int, default=3, help="alternating runs of the two engines (default 3)")
    ap.add_argument("--models", default=str(REPO.parent / "bench-models"))
    ap.add_argument("--only", default="", help="substring the model file names must contain")
    ap.add_argument("--llama-build", default=str(REPO.parent / "llamacpp-build"))
    args = ap.parse_args()

    build_dir = Path(args.llama_build)
    exe = build_llama_bench(build_dir)
    models = sorted(p for p in Path(args.models).glob("dsv4-bench*.gguf") if args.only in p.name)
    if not models:
        subprocess.run([sys.executable, str(HERE / "make_bench_model.py"), args.models], check=True)
        models = sorted(Path(args.models).glob("dsv4-bench-*.gguf"))
    bw = membw(args.threads, build_dir)
    roofs = computeroof(args.threads, build_dir)
    roof = roofs.get("amx_int8") or roofs.get("avx512_vnni_int8")
    print(f"memory read bandwidth ({args.threads} threads): {bw:.1f} GB/s; compute roof: "
          + ", ".join(f"{k} {v:.0f} GMAC/s" for k, v in roofs.items()))
    tests = [("pp512", 512, 0, 0), ("tg128", 0, 128, 0)]
    tests += [(f"pp{n}", int(n), 0, 0) for n in args.long.split(",") if n]
    if args.depth:
        tests.append((f"tg128 @ d{args.depth}", 0, 128, args.depth))
    for model in models:
        print(f"\n## {model.name} ({model.stat().st_size / 2**20:.0f} MiB), {args.threads} threads, "
              f"{args.reps} alternating runs (median, min-max)")
        config = None
        mine: dict[str, list[float]] = {t[0]: [] for t in tests}
        theirs: dict[str, list[float]] = {t[0]: [] for t in tests}
        last = None
        for _ in range(args.reps):
            for name, n_p, n_g, depth in tests:
                out = ours(model, args.threads, n_p, n_g, depth, bw, roof)
                mine[name].append(out["results"][0]["mean"])
                last = out if name == "tg128" else last    # its decode graph, weights and cache
                ts, config = llama_bench(exe, model, args.threads, n_p, n_g, depth, config)
                theirs[name].append(ts)
        print(f"llama.cpp ran with: {LLAMA_CONFIGS[config][0]}")
        print("| test | dsv4-ggml t/s | llama.cpp t/s | ratio (median) |")
        print("|---|---|---|---|")
        for name, *_ in tests:
            ratio = statistics.median(mine[name]) / statistics.median(theirs[name])
            print(f"| {name} | {spread(mine[name])} | {spread(theirs[name])} | {ratio:.2f}x |")
        if args.depth:
            d = f"tg128 @ d{args.depth}"
            print(f"tg at depth {args.depth} / depth 0: {statistics.median(mine[d]) / statistics.median(mine['tg128']):.2f}")
        floor = bw * 1e9 / last["decode_weight_bytes"]["total"]
        print(f"weights read per token {last['decode_weight_bytes']['total'] / 2**20:.1f} MiB; floor {floor:.1f} t/s; "
              f"tg reaches {statistics.median(mine['tg128']) / floor:.0%}")
        macs = last["prefill_macs_per_token"]
        if roof:
            print(f"prefill: {macs / 1e6:.1f} M MAC per token; pp512 reaches "
                  f"{statistics.median(mine['pp512']) * macs / (roof * 1e9):.1%} of the {roof:.0f} GMAC/s roof")
        c = last["cache_bytes_per_token"]
        print(f"cache bytes per context token: measured {c['measured']:.0f}, theoretical {c['theoretical']:.0f}")
        nodes = llama_graph_nodes(exe, model, args.threads, config)
        print(f"graph nodes: dsv4-ggml {last['graph_nodes']} ({last['graph_nodes_per_layer']:.0f} per layer, "
              f"decode graph); llama.cpp {nodes} ({nodes / last['n_layer']:.0f} per layer, its reserve graph)"
              if nodes else f"graph nodes: dsv4-ggml {last['graph_nodes']}")


if __name__ == "__main__":
    if shutil.which("ninja") is None and shutil.which("cmake") is None:
        sys.exit("needs cmake and ninja")
    main()
