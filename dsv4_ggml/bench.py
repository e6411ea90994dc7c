"""`dsv4-ggml bench`: prompt processing and token generation throughput, llama-bench style.

pp<N>: one prefill of N tokens from an empty session. tg<N>: N single-token decode steps after a
prefill of `depth` tokens (not timed). `--seqs 1,2,4,8`: N sequences together (llama-batched-bench
style): N prompts prefilled together, then decode steps of one token per sequence; aggregate
tokens/s, weight bytes a step reads and the floor they set. Each test runs once to warm up, then
`repetitions` times;
results are mean ± standard deviation of tokens/s. Also reported: the persistent cache bytes
per context token (measured from the allocator vs the theoretical value of spec §4.1), the
weight bytes a decode step reads, and (given a memory bandwidth) the bandwidth floor.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .cli_options import backend_kwargs
from .memory import rss_bytes
from .model import CACHE_TYPES, Model

ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


@dataclass
class BenchResult:
    test: str
    depth: int
    n_tokens: int
    tokens_per_s: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tokens_per_s)

    @property
    def std(self) -> float:
        return statistics.stdev(self.tokens_per_s) if len(self.tokens_per_s) > 1 else 0.0


def theoretical_cache_bytes_per_token(hp: dict, cache_type: str) -> float:
    """Bytes of compressed cache each context token adds (§4.1): per CSA layer (Dh + Di)/4
    elements, per HCA layer Dh/128; the fixed windows and compressor rings do not grow."""
    per_token = 0.0
    for r in hp["compress_ratios"][:hp["n_layer"]]:
        if r == 4:
            per_token += (hp["head_dim"] + hp["indexer_head_dim"]) / 4
        elif r == 128:
            per_token += hp["head_dim"] / 128
    return per_token * ELEMENT_BYTES[cache_type]


def decode_bytes_per_token(model: Model) -> dict[str, float]:
    """Weight bytes one decode step reads: every attention/HC/compressor/indexer/router/shared
    expert tensor of the trunk, the routed experts actually used (K of E per layer), one row of
    the embedding, and the whole LM head."""
    hp = model.hparams
    k, e = hp["n_expert_used"], hp["n_expert"]
    parts = {"attention+hc": 0.0, "shared expert": 0.0, "routed experts": 0.0, "lm head": 0.0, "embedding": 0.0}
    for t in model.tensors:
        name = t.name
        if name.startswith("blk."):
            il = int(name.split(".")[1])
            if il >= hp["n_layer"] or "nextn" in name or "tid2eid" in name:
                continue
            if "_exps." in name:
                parts["routed experts"] += t.nbytes * k / e
            elif "_shexp." in name:
                parts["shared expert"] += t.nbytes
            else:
                parts["attention+hc"] += t.nbytes
        elif name == "output.weight":
            parts["lm head"] += t.nbytes
        elif name == "token_embd.weight":
            parts["embedding"] += t.nbytes / hp["n_vocab"]
        else:
            parts["attention+hc"] += t.nbytes
    parts["total"] = sum(parts.values())
    return parts


def prefill_macs_per_token(model: Model) -> float:
    """Multiply-accumulates of the weight matrices per prompt token: every matrix of the trunk that
    multiplies activations (attention, HC mixes, compressors, indexer, router, shared expert) and K of
    the E routed experts; not the embedding (rows are looked up), the LM head (one row of logits per
    prompt), norms, biases and positional terms, nor attention over the context (which grows with
    depth; at pp512 it is a few percent of the matrices)."""
    hp = model.hparams
    k, e = hp["n_expert_used"], hp["n_expert"]
    macs = 0.0
    for t in model.tensors:
        if t.name == "output_hc_fn.weight":   # the output HC mix
            macs += float(np.prod(t.shape))
        if len(t.shape) < 2 or not t.name.startswith("blk.") or "_ape" in t.name or "tid2eid" in t.name:
            continue
        if int(t.name.split(".")[1]) >= hp["n_layer"] or "nextn" in t.name:
            continue
        n = float(np.prod(t.shape))
        macs += n * k / e if "_exps." in t.name else n
    return macs


def expected_experts(n_expert: int, n_used: int, n_tokens: int) -> float:
    """Expected number of distinct routed experts n_tokens tokens select in one layer (each picks
    n_used of n_expert; modelled as independent and uniform, which the bench models' random
    routers come close to)."""
    return n_expert * (1.0 - (1.0 - n_used / n_expert) ** n_tokens)


def step_weight_bytes(model: Model, n_tokens: int) -> dict[str, float]:
    """Weight bytes a decode step of n_tokens tokens (one per sequence) reads: every non-expert
    weight once, the union of the routed experts the tokens select (expected), n_tokens rows of the
    embedding."""
    hp = model.hparams
    parts = decode_bytes_per_token(model)
    union = expected_experts(hp["n_expert"], hp["n_expert_used"], n_tokens)
    parts["routed experts"] *= union / hp["n_expert_used"]
    parts["embedding"] *= n_tokens
    parts["total"] = sum(v for k, v in parts.items() if k != "total")
    return parts


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_bench(path: str, n_prompt: int | list[int] = 512, n_gen: int = 128, threads: int | None = None,
              depths: list[int] = (0,), repetitions: int = 3, cache_type: str = "f16",
              n_ubatch: int = 512, bandwidth_gbs: float | None = None, flash_attn: bool = True,
              log=sys.stderr, compute_roof_gmacs: float | None = None, **model_kwargs) -> dict:
    prompts = [n for n in ([n_prompt] if isinstance(n_prompt, int) else list(n_prompt)) if n > 0]
    max_depth = max(depths) if depths else 0
    n_ctx = max(max(prompts, default=0), max_depth + n_gen) + 8
    t_load = time.perf_counter()
    m = Model(path, n_ctx=n_ctx, n_threads=threads, cache_type=cache_type, n_ubatch=n_ubatch, prefetch=True,
              flash_attn=flash_attn, **model_kwargs)
    load = {"seconds": time.perf_counter() - t_load, "rss_bytes": rss_bytes()}
    rng = np.random.default_rng(0)
    vocab = m.n_vocab
    results: list[BenchResult] = []

    for n_p in prompts:
        res = BenchResult(f"pp{n_p}", 0, n_p)
        toks = rng.integers(2, vocab, n_p)
        for rep in range(repetitions + 1):
            m.reset()
            dt = _timed(lambda: m.eval(toks, logits="last"))
            if rep:
                res.tokens_per_s.append(n_p / dt)
        results.append(res)
        print(f"  pp{n_p}: {res.mean:.2f} ± {res.std:.2f} t/s ({n_p / res.mean:.2f} s)", file=log)

    compute_bytes = {}
    if n_gen > 0:
        for depth in depths:
            res = BenchResult(f"tg{n_gen}", depth, n_gen)
            ctx_toks = rng.integers(2, vocab, depth)
            gen = rng.integers(2, vocab, n_gen)
            for rep in range(repetitions + 1):
                m.reset()
                if depth:
                    m.eval(ctx_toks, logits="last")

                def decode():
                    for t in gen:
                        m.eval([int(t)], logits="last")
                dt = _timed(decode)
                if rep:
                    res.tokens_per_s.append(n_gen / dt)
            compute_bytes[depth] = m.stats()["compute_bytes"]
            results.append(res)
            label = f"tg{n_gen} @ d{depth}"
            print(f"  {label}: {res.mean:.2f} ± {res.std:.2f} t/s", file=log)

    hp = m.hparams
    lo, hi = 4096, 4096 + 4096
    measured = (m.estimate_state_bytes(hi) - m.estimate_state_bytes(lo)) / (hi - lo)
    theory = theoretical_cache_bytes_per_token(hp, cache_type)
    stats = m.stats()
    out = {
        "model": path,
        "threads": m.n_threads,
        "cache_type": cache_type,
        "n_layer": hp["n_layer"],
        "graph_nodes": stats["n_graph_nodes"],
        "graph_nodes_per_layer": stats["n_graph_nodes"] / max(1, hp["n_layer"]),
        "graph_splits": stats["n_graph_splits"],
        "graph_copies": stats["n_graph_copies"],
        "cache_bytes_per_token": {"measured": measured, "theoretical": theory},
        "compute_bytes_by_depth": compute_bytes,
        "decode_weight_bytes": decode_bytes_per_token(m),
        "prefill_macs_per_token": prefill_macs_per_token(m),
        "results": [dict(asdict(r), mean=r.mean, std=r.std, seconds=r.n_tokens / r.mean if r.test.startswith("pp")
                         else None) for r in results],
        "load": load,
    }
    if bandwidth_gbs:
        floor = bandwidth_gbs * 1e9 / out["decode_weight_bytes"]["total"]
        out["bandwidth_gbs"] = bandwidth_gbs
        out["bandwidth_floor_tokens_per_s"] = floor
        tg0 = next((r for r in results if r.test.startswith("tg") and r.depth == min(depths)), None)
        if tg0 is not None:
            out["bandwidth_fraction"] = tg0.mean / floor
    if compute_roof_gmacs:
        out["compute_roof_gmacs"] = compute_roof_gmacs
        out["compute_fraction"] = {r.test: r.mean * out["prefill_macs_per_token"] / (compute_roof_gmacs * 1e9)
                                   for r in results if r.test.startswith("pp")}
    return out


def run_seqs_bench(path: str, seqs: list[int], n_prompt: int = 128, n_gen: int = 128, threads: int | None = None,
                   depths: list[int] = (0,), repetitions: int = 3, cache_type: str = "f16", n_ubatch: int = 512,
                   bandwidth_gbs: float | None = None, flash_attn: bool = True, log=sys.stderr,
                   **model_kwargs) -> dict:
    """N sequences together, llama-batched-bench style: for each N and each depth (the prompt
    length per sequence; depth 0: n_prompt), the N prompts prefilled together (pp, timed), then
    n_gen decode steps of N tokens, one per sequence (tg, timed). Aggregate tokens/s."""
    lengths = [d if d > 0 else n_prompt for d in depths]
    n_ctx = max(lengths) + n_gen + 8
    m = Model(path, n_ctx=n_ctx, n_threads=threads, cache_type=cache_type, n_ubatch=n_ubatch, prefetch=True,
              flash_attn=flash_attn, n_seq=max(seqs), **model_kwargs)
    rng = np.random.default_rng(0)
    vocab = m.n_vocab
    rows = []
    for n in seqs:
        for length in lengths:
            pp, tg = [], []
            prompts = {i: rng.integers(2, vocab, length) for i in range(n)}
            gen = rng.integers(2, vocab, (n_gen, n))
            for rep in range(repetitions + 1):
                m.reset()
                dt_pp = _timed(lambda: m.eval_batch(prompts, logits="last"))

                def decode():
                    for step in gen:
                        m.eval_batch({i: [int(step[i])] for i in range(n)}, logits="last")
                dt_tg = _timed(decode)
                if rep:
                    pp.append(n * length / dt_pp)
                    tg.append(n * n_gen / dt_tg)
            w = step_weight_bytes(m, n)
            row = {"n_seq": n, "depth": length, "pp_tokens_per_s": pp, "tg_tokens_per_s": tg,
                   "pp_mean": statistics.fmean(pp), "tg_mean": statistics.fmean(tg),
                   "tg_std": statistics.stdev(tg) if len(tg) > 1 else 0.0, "step_weight_bytes": w["total"]}
            if bandwidth_gbs:
                row["floor_tokens_per_s"] = n * bandwidth_gbs * 1e9 / w["total"]
                row["floor_fraction"] = row["tg_mean"] / row["floor_tokens_per_s"]
            rows.append(row)
            print(f"  N={n} depth {length}: pp {row['pp_mean']:.1f} t/s, tg {row['tg_mean']:.1f} ± "
                  f"{row['tg_std']:.1f} t/s", file=log)
    return {"model": path, "threads": m.n_threads, "cache_type": cache_type, "n_gen": n_gen, "seqs": rows,
            "bandwidth_gbs": bandwidth_gbs}


def print_seqs_report(out: dict, stream=sys.stdout) -> None:
    print(f"model: {out['model']}  threads: {out['threads']}  cache: {out['cache_type']}  "
          f"tg: {out['n_gen']} steps", file=stream)
    floor = out.get("bandwidth_gbs") is not None
    print("| sequences | depth | pp t/s (all) | tg t/s (all) | tg t/s per sequence | weights read per step |"
          + (" bandwidth floor t/s | of the floor |" if floor else ""), file=stream)
    print("|---|---|---|---|---|---|" + ("---|---|" if floor else ""), file=stream)
    for r in out["seqs"]:
        line = (f"| {r['n_seq']} | {r['depth']} | {r['pp_mean']:.1f} | {r['tg_mean']:.1f} ± {r['tg_std']:.1f} | "
                f"{r['tg_mean'] / r['n_seq']:.1f} | {r['step_weight_bytes'] / 2**20:.1f} MiB |")
        if floor:
            line += f" {r['floor_tokens_per_s']:.1f} | {r['floor_fraction']:.0%} |"
        print(line, file=stream)


def print_report(out: dict, stream=sys.stdout) -> None:
    print(f"model: {out['model']}  threads: {out['threads']}  cache: {out['cache_type']}", file=stream)
    load = out["load"]
    rss = "" if load["rss_bytes"] is None else f", RSS after load {load['rss_bytes'] / 2**20:.1f} MiB"
    print(f"load: {load['seconds']:.2f} s{rss} (weights mapped; bench prefetches: every page read at load, "
          f"and the CPU copies made)", file=stream)
    print("| test | depth | t/s | seconds |", file=stream)
    print("|---|---|---|---|", file=stream)
    for r in out["results"]:
        secs = f"{r['seconds']:.2f}" if r.get("seconds") is not None else ""
        print(f"| {r['test']} | {r['depth']} | {r['mean']:.2f} ± {r['std']:.2f} | {secs} |", file=stream)
    c = out["cache_bytes_per_token"]
    print(f"cache bytes per context token: measured {c['measured']:.1f}, theoretical {c['theoretical']:.1f}",
          file=stream)
    w = out["decode_weight_bytes"]
    print(f"weights read per decode token: {w['total'] / 2**20:.2f} MiB (" + ", ".join(
        f"{k} {v / 2**20:.2f}" for k, v in w.items() if k != "total") + ")", file=stream)
    if "bandwidth_floor_tokens_per_s" in out:
        print(f"memory bandwidth {out['bandwidth_gbs']:.1f} GB/s -> floor {out['bandwidth_floor_tokens_per_s']:.1f} "
              f"t/s; tg reaches {out.get('bandwidth_fraction', 0):.0%} of it", file=stream)
    if "compute_fraction" in out:
        macs = out["prefill_macs_per_token"]
        print(f"weight matrices per prompt token: {macs / 1e6:.1f} M multiply-accumulates; compute roof "
              f"{out['compute_roof_gmacs']:.0f} GMAC/s -> " + ", ".join(
                  f"{test} reaches {frac:.1%}" for test, frac in out["compute_fraction"].items()), file=stream)
    print(f"graph: {out['graph_nodes']} nodes, {out['graph_nodes_per_layer']:.0f} per layer, "
          f"{out['graph_splits']} backend splits, {out['graph_copies']} copies; compute buffer "
          + ", ".join(f"d{d}: {b / 2**20:.1f} MiB" for d, b in out["compute_bytes_by_depth"].items()), file=stream)


def main_args(args) -> int:
    depths = [int(x) for x in str(args.depth).split(",") if x != ""]
    if args.cache_type not in CACHE_TYPES:
        raise SystemExit(f"unknown cache type {args.cache_type}")
    try:
        prompts = [int(x) for x in str(args.n_prompt).split(",") if x != ""]
    except ValueError:
        raise SystemExit(f"-p needs token counts, e.g. 512 or 4096,16384, got {args.n_prompt!r}") from None
    if not prompts or min(prompts) < 0:
        raise SystemExit(f"-p needs non-negative token counts, got {args.n_prompt!r}")
    if args.seqs:
        if len(prompts) > 1:
            raise SystemExit("--seqs takes one -p value (the prompt length per sequence)")
        seqs = [int(x) for x in str(args.seqs).split(",") if x != ""]
        if not seqs or min(seqs) < 1:
            raise SystemExit(f"--seqs needs positive sequence counts, got {args.seqs!r}")
        out = run_seqs_bench(args.model, seqs, prompts[0], args.n_gen, args.threads, depths, args.repetitions,
                             args.cache_type, args.ubatch, args.bandwidth, not args.no_flash_attn,
                             **backend_kwargs(args))
        report = print_seqs_report
    else:
        out = run_bench(args.model, prompts, args.n_gen, args.threads, depths, args.repetitions,
                        args.cache_type, args.ubatch, args.bandwidth, not args.no_flash_attn,
                        compute_roof_gmacs=args.compute_roof, **backend_kwargs(args))
        report = print_report
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        report(out)
    return 0
