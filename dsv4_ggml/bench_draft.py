"""`dsv4-ggml bench --draft ...`: what speculative decoding costs and gains on a model.

Random weights make real acceptance meaningless, so the parts are measured:
1. the cost of a verify step of K+1 positions against a 1-token step (decode is bandwidth-bound:
   the extra positions read the same weights);
2. end-to-end greedy decode with an ORACLE drafter: it drafts the plain greedy continuation of
   the target's context, computed by a second session outside the timing (drafting costs
   nothing: an upper bound), forced to a given acceptance rate by replacing each draft, with
   probability 1 - rate, by a wrong token (seeded); K fixed 1..4 and adaptive; the acceptance
   each run really had is printed (K-quant verify steps round differently from one-token steps,
   so even a 100% oracle is sometimes wrong), and every stream is compared with plain decoding;
3. with `--draft PATH`, a real draft model (with `--draft mtp`, the model's own MTP block): its
   acceptance, its cost per drafted token, speed; for MTP also plain decode without the MTP
   block (what keeping its state costs).
The projection for a drafter of known cost c (seconds per drafted token) and acceptance a:
tokens/s = (1 - a^(K+1)) / (1 - a) / (t_verify(K+1) + K c).
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from .model import Model
from .speculative import Drafting, ModelDrafter


class OracleDrafter:
    """Drafts the plain greedy continuation of the context it is given, each draft wrong with
    probability 1 - rate (seeded). The continuation comes from a second session of the same file
    decoding one token at a time (plain decoding's own steps); when the target's stream parts
    from it (K-quant weights round a K+1-row verify step differently from a one-row step) the
    oracle decodes the next `ahead` tokens again from the target's context. That work is the
    benchmark's, not the drafter's: its seconds are counted in `overhead_s`, which the caller
    takes off the wall time."""

    def __init__(self, ref: Model, rate: float, seed: int = 0, ahead: int = 16):
        self.ref, self.rate, self.ahead = ref, rate, ahead
        self.rng = np.random.default_rng(seed)
        self.known: list[int] = []     # a context and its plain greedy continuation
        self.overhead_s = 0.0

    def check_compatible(self, target) -> None:
        pass

    def _follow(self, context: list[int], k: int) -> list[int]:
        n = len(context)
        if self.known[:n] != context or len(self.known) < n + k:
            t0 = time.perf_counter()
            ref = self.ref
            ref.reset()
            x = ref.eval(context, logits="last")[-1]
            cont = []
            for _ in range(max(self.ahead, k)):
                if n + len(cont) >= ref.n_ctx - 1:
                    break
                cont.append(int(np.argmax(x)))
                x = ref.eval([cont[-1]], logits="last")[-1]
            self.known = list(context) + cont
            self.overhead_s += time.perf_counter() - t0
        return self.known[n:n + k]

    def propose(self, context, k, rng=None):
        true = self._follow(list(context), k)
        drafts = [t if self.rng.random() < self.rate else (t + 1) % self.ref.n_vocab for t in true]
        return drafts, [(np.array([d]), np.array([1.0])) for d in drafts]


def _decode(m: Model, prompt: list[int], n: int, draft=None) -> tuple[list[int], float]:
    m.reset()
    m.eval(prompt[:-1], logits="last")          # the prompt but its last token: timing starts at decode
    t0 = time.perf_counter()
    out = [c.token for c in m.generate(prompt, max_tokens=n, temperature=0, draft=draft)]
    return out, time.perf_counter() - t0


def _parts_at(got: list[int], plain: list[int]) -> int | None:
    """The first index where the two streams differ (None: equal)."""
    for i, (a, b) in enumerate(zip(got, plain)):
        if a != b:
            return i
    return None if len(got) == len(plain) else min(len(got), len(plain))


def verify_costs(m: Model, prompt: list[int], sizes=range(1, 6), reps: int = 5) -> dict[int, float]:
    """Median seconds of one step of n positions after the prompt."""
    m.reset()
    m.eval(prompt, logits="last")
    base = len(prompt)
    out = {}
    for n in sizes:
        times = []
        for r in range(reps + 1):
            t0 = time.perf_counter()
            m.eval(prompt[:n], logits="all")
            dt = time.perf_counter() - t0
            m.truncate(base)
            if r:
                times.append(dt)
        out[n] = statistics.median(times)
    return out


def run_draft_bench(path: str, draft_path: str | None = None, n_gen: int = 128, threads: int | None = None,
                    n_prompt: int = 64, rates=(1.0, 0.9, 0.7, 0.5, 0.0), ks=(1, 2, 3, 4), stream=sys.stdout) -> dict:
    mtp = draft_path == "mtp"
    m = Model(path, n_ctx=n_prompt + n_gen + 16, n_threads=threads, mtp=mtp)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(10, m.n_vocab, n_prompt)]
    costs = verify_costs(m, prompt)
    print(f"verify step cost (median, after {n_prompt} tokens): " +
          ", ".join(f"{n} pos {costs[n] * 1e3:.2f} ms ({costs[n] / costs[1]:.2f}x)" for n in costs), file=stream)
    plain, t_plain = _decode(m, prompt, n_gen)
    _, t_plain2 = _decode(m, prompt, n_gen)
    t_plain = min(t_plain, t_plain2)
    tg = len(plain) / t_plain
    print(f"plain greedy decode: {tg:.1f} tokens/s ({len(plain)} tokens)", file=stream)
    out = {"verify_s": costs, "plain_tg": tg, "oracle": {}}
    parted: dict = {}
    ref = Model(path, n_ctx=m.n_ctx, n_threads=threads)
    out["oracle_acceptance"] = {}
    for rate in rates:
        row, seen = {}, {}
        for k in list(ks) + ["adaptive"]:
            oracle = OracleDrafter(ref, rate, seed=1)
            d = Drafting(oracle, n_draft=4 if k == "adaptive" else k, adaptive=k == "adaptive")
            got, dt = _decode(m, prompt, n_gen, d)
            parted[(rate, k)] = _parts_at(got, plain)
            row[k] = len(got) / (dt - oracle.overhead_s)
            seen[k] = d.stats["acceptance"]
        out["oracle"][rate] = row
        out["oracle_acceptance"][rate] = seen
        print(f"oracle drafts, acceptance forced to {rate:.0%}: " +
              ", ".join(f"K={k} {v:.1f} t/s ({v / tg:.2f}x, {seen[k]:.0%} accepted)" for k, v in row.items()),
              file=stream)
    ref.close()
    differ = {key: at for key, at in parted.items() if at is not None}
    out["streams_part"] = differ
    if differ:     # F32/F16/Q8_0 weights never part; K-quants round differently in multi-row steps
        print(f"streams that part from plain decoding (first differing token): {differ} — the weights' "
              f"kernels round a K+1-row step differently from a one-row one", file=stream)
    else:
        print("every speculative stream equals plain decoding", file=stream)
    if mtp:
        base = Model(path, n_ctx=m.n_ctx, n_threads=threads)
        t_base = min(_decode(base, prompt, n_gen)[1] for _ in range(2))
        base.close()
        out["plain_tg_without_mtp"] = len(plain) / t_base
        print(f"plain greedy decode without the MTP block: {len(plain) / t_base:.1f} tokens/s "
              f"(keeping the MTP state costs {t_plain / t_base - 1:+.1%})", file=stream)
    if draft_path:
        dm = None if mtp else Model(draft_path, n_ctx=m.n_ctx, n_threads=threads)
        out["drafter"] = {}
        for k in list(ks) + ["adaptive"]:
            n, adaptive = (max(ks), True) if k == "adaptive" else (k, False)
            d = Drafting.of("mtp", n, adaptive) if mtp else Drafting(ModelDrafter(dm), n_draft=n, adaptive=adaptive)
            got, dt = _decode(m, prompt, n_gen, d)
            s = d.stats
            out["drafter"][k] = len(got) / dt
            print(f"{'MTP' if mtp else 'draft model'} K={k}: {len(got) / dt:.1f} t/s ({len(got) / dt / tg:.2f}x), "
                  f"acceptance {s['acceptance']:.0%}, draft {1e3 * (s['draft_s_per_token'] or 0):.2f} ms/token",
                  file=stream)
        if dm is not None:
            dm.close()
    m.close()
    return out
