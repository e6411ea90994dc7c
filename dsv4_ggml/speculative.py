"""Speculative decoding: a drafter proposes K tokens, the target model checks them in ONE batched
step of K+1 positions, the longest agreeing prefix is kept and the rest rolled back (`truncate`).

Lossless by construction:
- greedy (temperature 0): each position's token is chosen exactly as plain decoding chooses it
  (the same `TokenGenerator`, the same repeat-penalty history); a draft is kept only where it
  equals that token, so the stream is plain greedy decoding's, token for token;
- sampling: speculative sampling (Leviathan et al. / Chen et al.): a draft d with drafter
  probability q(d) is accepted with probability min(1, p(d)/q(d)), where p is the target's
  distribution after the sampling chain (penalty, top-k, top-p, min-p, temperature); on a
  rejection the token is drawn from the normalized residual max(0, p - q). The result is
  distributed exactly as plain sampling from p. All draws (the drafter's too) come from the
  generation's seeded generator, so a seed reproduces its stream.

K adapts (`AdaptiveK`): from the measured cost of a verify step of each size, the drafter's cost
per token and the recent acceptance rate, it picks the K with the most tokens per second
(expected accepted tokens (1 - a^(K+1)) / (1 - a) over the step's time); K = 0 is plain
decoding, probed again now and then, so a drafter that never agrees costs little.

Drafters: `MtpDrafter` (the model's own MTP block, `draft="mtp"`) and `ModelDrafter` (any
smaller DeepSeek-V4 GGUF with the same vocabulary, e.g. a DSpark-style draft, or a tiny model).
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from .errors import InvalidArgumentError
from .generation import GenerationChunk, TokenGenerator, check_prompt_fits
from .sampling import Sampler, SamplingParams

MAX_DRAFT = 8


class ModelDrafter:
    """Drafts with another model (its sequence `seq`), greedily or by sampling with `params`."""

    def __init__(self, model, params: SamplingParams | None = None, seed: int | None = None, seq: int = 0):
        self.model = model
        self.params = params
        self.seq = seq
        self.sampler = Sampler(params if params is not None else SamplingParams(temperature=0.0, seed=seed))

    def check_compatible(self, target) -> None:
        if int(self.model.n_vocab) != int(target.n_vocab):
            raise InvalidArgumentError(f"the draft model's vocabulary ({self.model.n_vocab} tokens) differs from the "
                                       f"target's ({target.n_vocab}): a drafter must share the tokenizer")

    def propose(self, context: Sequence[int], k: int, rng: np.random.Generator | None = None
                ) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        """K tokens following `context`, and the distribution each was drawn from (ids, probs);
        draws use `rng` (the generation's seeded generator) when given."""
        m = self.model
        rng = rng if rng is not None else self.sampler.rng
        k = min(k, m.n_ctx - 1 - len(context))
        if k <= 0:
            return [], []
        logits = m._feed(list(context), seq=self.seq)
        drafts, dists = [], []
        for i in range(k):
            ids, probs = self.sampler.distribution(logits, m._seqs[self.seq])
            t = int(ids[rng.choice(len(ids), p=probs)]) if len(ids) > 1 else int(ids[0])
            drafts.append(t)
            dists.append((ids, probs))
            if i + 1 < k:
                logits = m.eval([t], seq=self.seq, logits="last")[0]
        return drafts, dists


class MtpDrafter:
    """Drafts with the target's own MTP block (spec §3.10; the target opened with mtp=True): the
    first draft row pairs the trunk's state at the last evaluated position with the token just
    sampled, each further row the MTP block's own output with the previous draft (llama.cpp's
    draft-mtp). Greedy, or by sampling with `params`."""

    def __init__(self, params: SamplingParams | None = None, seq: int = 0):
        self.sampler = Sampler(params if params is not None else SamplingParams(temperature=0.0))
        self.model = None
        self.seq = seq                  # the target's sequence it drafts for

    def check_compatible(self, target) -> None:
        if not getattr(target, "mtp", False):
            raise InvalidArgumentError("MTP drafting needs the model opened with mtp=True (and a file with an MTP block)")
        self.model = target

    def propose(self, context: Sequence[int], k: int, rng: np.random.Generator | None = None
                ) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
        m = self.model
        held = m._seqs[self.seq]
        if len(context) != len(held) + 1 or list(context[:-1]) != held:
            raise InvalidArgumentError("MTP drafting goes on from the tokens the target holds and the one sampled after them")
        rng = rng if rng is not None else self.sampler.rng
        k = min(k, m.n_ctx - 1 - len(context), 31)
        drafts, dists, t = [], [], int(context[-1])
        for i in range(max(k, 0)):
            logits = m.mtp_draft(t, offset=i, seq=self.seq)
            recent = self.sampler.params.repeat_last_n
            ids, probs = self.sampler.distribution(logits, (list(context[-recent:]) if recent else []) + drafts)
            t = int(ids[rng.choice(len(ids), p=probs)]) if len(ids) > 1 else int(ids[0])
            drafts.append(t)
            dists.append((ids, probs))
        return drafts, dists


class AdaptiveK:
    """Chooses the number of drafts per step from measured costs and the acceptance rate."""

    def __init__(self, k_max: int, adaptive: bool = True, probe_every: int = 16, probe_max: int = 256):
        self.k_max, self.adaptive, self.probe_every, self.probe_max = k_max, adaptive, probe_every, probe_max
        # plain steps between two probes: doubles after each probe that gets nothing accepted
        self.probe_interval = probe_every
        self._probing = False
        self.verify_s: dict[int, float] = {}      # step size -> seconds (moving average)
        self.draft_s: float | None = None         # seconds per drafted token
        self.accept = 0.5                         # moving acceptance rate per draft
        self.steps_plain = 0
        self.proposed = self.accepted = 0

    def _cost(self, n: int) -> float:
        """Seconds of a verify step of n positions: measured, else extrapolated from the measured
        sizes (one size known: each more position +30%, between bandwidth- and compute-bound)."""
        known = self.verify_s
        if n in known:
            return known[n]
        if not known:
            return 1.0
        sizes = sorted(known)
        if len(sizes) == 1:
            return known[sizes[0]] * (1 + 0.3 * (n - sizes[0]))
        a, b = (sizes[-2], sizes[-1]) if n > sizes[-1] else (sizes[0], sizes[1])
        slope = max((known[b] - known[a]) / (b - a), 0.0)
        return max(known[b] + slope * (n - b), min(known.values()))

    def choose(self) -> int:
        if not self.adaptive:
            return self.k_max
        if self.draft_s is None:
            return 1                              # measure a draft and a 2-position step first
        a = min(self.accept, 0.999)
        best_k, best = 0, 1.0 / self._cost(1)
        for k in range(1, self.k_max + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (self._cost(k + 1) + k * self.draft_s)
            if rate > best:
                best_k, best = k, rate
        if best_k == 0:
            self.steps_plain += 1
            if self.steps_plain % self.probe_interval == 0:
                self._probing = True
                return 1                          # look again: the text may have become predictable
        return best_k

    def record(self, k: int, accepted: int, verify_s: float, draft_s: float) -> None:
        if self._probing:
            self._probing = False
            self.steps_plain = 0
            self.probe_interval = self.probe_every if accepted else min(2 * self.probe_interval, self.probe_max)
        self.proposed += k
        self.accepted += accepted
        old = self.verify_s.get(k + 1)
        self.verify_s[k + 1] = verify_s if old is None else 0.8 * old + 0.2 * verify_s
        if k:
            per = draft_s / k
            self.draft_s = per if self.draft_s is None else 0.8 * self.draft_s + 0.2 * per
            rate = accepted / k
            self.accept = 0.7 * self.accept + 0.3 * rate

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _accept_sampled(rng: np.random.Generator, p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray],
                    d: int) -> int | None:
    """Speculative sampling for one draft `d`: d itself (accepted), or a token drawn from the
    residual max(0, p - q) (rejected)."""
    p_ids, p_probs = p
    q_ids, q_probs = q
    pd = float(p_probs[p_ids == d].sum())
    qd = float(q_probs[q_ids == d].sum())
    if qd > 0 and rng.random() < min(1.0, pd / qd):
        return d
    ids = np.union1d(p_ids, q_ids)
    pp = np.zeros(len(ids))
    qq = np.zeros(len(ids))
    pp[np.searchsorted(ids, p_ids)] = p_probs
    qq[np.searchsorted(ids, q_ids)] = q_probs
    r = np.maximum(pp - qq, 0.0)
    if r.sum() <= 0:            # p == q: cannot happen after a rejection, but never divide by zero
        r = pp
    return int(ids[rng.choice(len(ids), p=r / r.sum())])


def verify(gen: TokenGenerator, rows, drafts: list[int], dists: list, held: Sequence[int], n_base: int
           ) -> Iterator[tuple[GenerationChunk, bool]]:
    """The accept step after a verify step that evaluated [t, drafts...] at positions n_base.. (rows:
    their logits; held: the tokens the sequence holds, drafts included): each chunk to hand on,
    and whether its draft was accepted (the last chunk's is not). Greedy, a draft is accepted
    when it equals the sampler's choice; sampling, with min(1, p/q), else the residual is
    sampled; after the accepted drafts comes the model's own next token."""
    p = gen.sampler.params
    for i in range(len(drafts) + 1):
        n_past = n_base + 1 + i
        history = held[max(0, n_past - p.repeat_last_n):n_past]   # all the sampler reads
        if p.temperature <= 0 or i == len(drafts):
            choice = gen.sampler.sample(rows[i], history)
        else:
            choice = _accept_sampled(gen.sampler.rng, gen.sampler.distribution(rows[i], history), dists[i], drafts[i])
        chunk = gen.accept(choice, n_past)
        accepted = i < len(drafts) and choice == drafts[i] and not chunk.finish_reason
        yield chunk, accepted
        if not accepted:
            return


def speculative_stream(model, tokens: Sequence[int], max_tokens: int, params: SamplingParams, stop,
                       drafter, n_draft: int = 2, adaptive: bool = True, stats: dict | None = None
                       ) -> Iterator[GenerationChunk]:
    """`stream_tokens` with speculative decoding on sequence 0 of `model` (same chunks)."""
    if not 1 <= n_draft <= MAX_DRAFT:
        raise InvalidArgumentError(f"n_draft must be in 1..{MAX_DRAFT}, got {n_draft}")
    drafter.check_compatible(model)
    gen = TokenGenerator(model.tokenizer, model.n_ctx, max_tokens, params, stop)
    check_prompt_fits(len(tokens), model.n_ctx)
    policy = AdaptiveK(n_draft, adaptive)
    rng = gen.sampler.rng
    held = model._tokens
    chunk = gen.next(model._feed(list(tokens)), held, len(held))
    yield chunk
    while not chunk.finish_reason:
        t = chunk.token
        n_base = len(held)
        room = min(model.n_ctx - 2 - n_base, gen.max_tokens - gen.n_generated - 1)
        k = max(0, min(policy.choose(), room))
        t0 = time.perf_counter()
        drafts, dists = drafter.propose(held + [t], k, rng) if k else ([], [])
        t1 = time.perf_counter()
        rows = model.eval([t] + drafts, logits="all")
        t2 = time.perf_counter()
        accepted = 0
        for chunk, ok in verify(gen, rows, drafts, dists, held, n_base):
            yield chunk
            accepted += ok
        model.truncate(n_base + 1 + accepted)     # keep t and the accepted drafts
        policy.record(len(drafts), accepted, t2 - t1, t1 - t0)
    if stats is not None:
        stats.update(proposed=policy.proposed, accepted=policy.accepted, acceptance=policy.acceptance,
                     verify_s={k: round(v, 6) for k, v in sorted(policy.verify_s.items())},
                     draft_s_per_token=policy.draft_s)


class Drafting:
    """What `Model.generate(..., draft=...)` takes: a drafter, the most drafts per step, whether
    K adapts, and the statistics of the last generation (`stats`: proposed, accepted,
    acceptance, verify seconds per step size, draft seconds per token)."""

    def __init__(self, drafter, n_draft: int = 2, adaptive: bool = True):
        if isinstance(n_draft, bool) or not isinstance(n_draft, int) or not 1 <= n_draft <= MAX_DRAFT:
            raise InvalidArgumentError(f"n_draft must be an integer in 1..{MAX_DRAFT}, got {n_draft!r}")
        self.drafter, self.n_draft, self.adaptive = drafter, n_draft, adaptive
        self.stats: dict = {}

    @classmethod
    def of(cls, draft, n_draft: int = 2, adaptive: bool = True) -> "Drafting | None":
        """`draft` as a Drafting: None, a Drafting, "mtp" (the model's own MTP block) or a draft `Model`."""
        if draft is None or isinstance(draft, Drafting):
            return draft
        if draft == "mtp":
            return cls(MtpDrafter(), n_draft, adaptive)
        if all(hasattr(draft, a) for a in ("_feed", "eval", "n_vocab", "n_ctx")):   # a Model (no import: no cycle)
            return cls(ModelDrafter(draft), n_draft, adaptive)
        raise InvalidArgumentError(f"draft must be a dsv4_ggml.Model (the draft model) or a Drafting, "
                                   f"got {type(draft).__name__}")

    def stream(self, model, tokens, max_tokens, params, stop) -> Iterator[GenerationChunk]:
        self.stats = {}
        return speculative_stream(model, tokens, max_tokens, params, stop, self.drafter, self.n_draft,
                                  self.adaptive, self.stats)
