"""Is a server answer its own prompt's answer? The cross-talk check of `server_load.py` for files
whose logits depend on how a step is batched.

On F32, F16 and Q8_0 weights a request gives the same tokens alone and under load. On K-quant
weights it may not: a sequence's logits move by up to a small `eps` with the batch it runs in
(other rows change the rounding of the batched kernels, and quantizing the activations to Q8_K
turns a 1-ulp change into a step), and a greedy or sampled choice near a tie flips. That is not
cross-talk (no slot read another's state), but an exact comparison cannot tell them apart.

This module can:
- `batch_variance` measures eps on the file: the logits of sequences evaluated alone vs the same
  sequences together in one session's batched steps.
- `explained` replays an answer alone, teacher-forced (its prompt, then its own tokens one by one,
  as the server runs a request), and checks each token is a choice the sampler could make from
  logits within eps of these: greedy, its logit at most 2 eps below the best; sampled, the seeded
  draw picks it from the alone logits moved by at most eps toward it.

An answer that read another request's state fails this (the negative control of
`server_load.py` checks foreign answers against each prompt and reports how many would pass).
"""
from __future__ import annotations

import numpy as np

from dsv4_ggml.sampling import Sampler, SamplingParams


def replay(model, prompt: list[int], tokens: list[int], seq: int = 0) -> list[np.ndarray]:
    """Logits (float64) before each of `tokens`, computed alone in slot `seq`: the prompt in one
    evaluation, then the tokens one at a time (the server's order)."""
    model.reset(seq)
    out = [np.asarray(model.eval(prompt, seq=seq, logits="last")[-1], dtype=np.float64)]
    for t in tokens[:-1]:
        out.append(np.asarray(model.eval([int(t)], seq=seq, logits="last")[-1], dtype=np.float64))
    model.reset(seq)
    return out


def batch_variance(model, cases: list[tuple[list[int], list[int]]]) -> float:
    """max |Δ logit| between each case (prompt, tokens) replayed alone and the same cases run
    together, `model.n_seq` at a time: their prompts in one batched step, then one token each per
    step (a decode group, as the server's steps)."""
    alone = [replay(model, p, t) for p, t in cases]
    worst = 0.0
    for g0 in range(0, len(cases), model.n_seq):
        group = list(range(g0, min(g0 + model.n_seq, len(cases))))
        model.reset()
        first = model.eval_batch({k - g0: cases[k][0] for k in group})
        for k in group:
            worst = max(worst, float(np.abs(first[k - g0][-1] - alone[k][0]).max()))
        for i in range(1, max(len(cases[k][1]) for k in group)):
            live = [k for k in group if i < len(cases[k][1])]
            step = model.eval_batch({k - g0: [int(cases[k][1][i - 1])] for k in live})
            for k in live:
                worst = max(worst, float(np.abs(step[k - g0][-1] - alone[k][i]).max()))
    model.reset()
    return worst


def _pick(sampler: Sampler, logits: np.ndarray, u: float) -> int:
    """The token a draw `u` picks (numpy's Generator.choice with p: the first cdf entry above u)."""
    ids, probs = sampler.distribution(logits)
    cdf = np.cumsum(probs)
    return int(ids[min(int(np.searchsorted(cdf / cdf[-1], u, side="right")), len(ids) - 1)])


def explained(logits: list[np.ndarray], tokens: list[int], params: SamplingParams, eps: float) -> tuple[bool, float]:
    """(whether every token is a choice the sampler could make from logits within eps of `logits`,
    the largest logit gap a greedy choice needed). Sampled (seeded) answers replay the seed's draws:
    numpy's Generator.choice with p draws one uniform per token."""
    sampler = Sampler(params)
    rng = np.random.default_rng(params.seed)
    gap = 0.0
    for x, y in zip(logits, tokens):
        if params.temperature <= 0:
            gap = max(gap, float(x.max() - x[y]))
            continue
        u = float(rng.random())
        if _pick(sampler, x, u) == y:
            continue
        # move every logit by eps toward picking y: y up; the tokens ranked before it down when
        # the draw fell before y's share (so y's share starts earlier), up when it fell after it
        ids, probs = sampler.distribution(x)
        where = np.flatnonzero(ids == y)
        start = float(np.cumsum(probs)[where[0] - 1]) if len(where) and where[0] > 0 else (0.0 if len(where) else 1.0)
        before = x > x[y]
        toward = np.where(before, -1.0, 1.0) if u < start else np.where(before, 1.0, -1.0)
        toward[y] = 1.0
        if _pick(sampler, x + eps * toward, u) != y:
            return False, gap
    return gap <= 2 * eps, gap
