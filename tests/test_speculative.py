"""Speculative decoding is lossless: greedy streams equal plain greedy decoding token for token
(any acceptance, any K, across compression boundaries and the context end); sampled streams have
plain sampling's distribution (chi-square against the exact distribution computed from the
model) and a seed reproduces its stream."""
from __future__ import annotations

import math
import os
import statistics
from collections import Counter

import numpy as np
import pytest

from dsv4_ggml import Model
from dsv4_ggml.errors import InvalidArgumentError
from dsv4_ggml.sampling import Sampler, SamplingParams
from dsv4_ggml.speculative import AdaptiveK, Drafting, ModelDrafter, _accept_sampled

N_CTX = 400      # past the third ratio-128 boundary (384) to the context end
PROMPT = [17, 18, 19]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    from dsv4_ggml.tiny import write_tiny_model

    other = tmp_path_factory.mktemp("draft") / "tiny-seed1.gguf"
    write_tiny_model(other, seed=1)
    target = Model(str(tiny_model), n_ctx=N_CTX, n_threads=1)
    same = Model(str(tiny_model), n_ctx=N_CTX, n_threads=1)       # agrees always
    stranger = Model(str(other), n_ctx=N_CTX, n_threads=1)        # (almost) never agrees
    yield target, same, stranger
    for m in (target, same, stranger):
        m.close()


class FlakyDrafter(ModelDrafter):
    """The target's own greedy drafts, each replaced by a wrong token with probability 1/2: every
    mix of accepted and rejected drafts, rollbacks of every length."""

    def __init__(self, model, seed: int):
        super().__init__(model)
        self.rng = np.random.default_rng(seed)

    def propose(self, context, k, rng=None):
        drafts, dists = super().propose(context, k)
        drafts = [int((d + 1 + self.rng.integers(50)) % self.model.n_vocab) if self.rng.random() < 0.5 else d
                  for d in drafts]
        return drafts, [(np.array([d]), np.array([1.0])) for d in drafts]


def _greedy(target, draft=None, max_tokens=N_CTX) -> list[tuple[int, str, str | None]]:
    target.reset()
    return [(c.token, c.text, c.finish_reason) for c in target.generate(PROMPT, max_tokens=max_tokens, temperature=0,
                                                                         draft=draft)]


def test_greedy_streams_equal_plain_decoding(models):
    target, same, stranger = models
    plain = _greedy(target)
    assert plain[-1][2] == "length" and len(plain) == N_CTX - len(PROMPT), "expected a run to the context end"
    for k, name, drafter in ((1, "self", ModelDrafter(same)), (4, "self", ModelDrafter(same)),
                             (2, "stranger", ModelDrafter(stranger)),
                             (1, "flaky", FlakyDrafter(same, seed=1)), (3, "flaky", FlakyDrafter(same, seed=3))):
        if True:
            d = Drafting(drafter, n_draft=k, adaptive=False)
            assert _greedy(target, d) == plain, (name, k)
            if name == "self":
                assert d.stats["acceptance"] == 1.0 and d.stats["proposed"] > 100
            if name == "flaky":
                assert 0.2 < d.stats["acceptance"] < 0.8, d.stats
    adaptive = Drafting(ModelDrafter(stranger), n_draft=4)
    assert _greedy(target, adaptive) == plain
    # stop strings and max_tokens end a speculative stream where they end a plain one
    text = "".join(t for _, t, _ in plain[:60])
    stop = text[40:43]
    target.reset()
    want = [(c.token, c.text, c.finish_reason) for c in target.generate(PROMPT, max_tokens=50, temperature=0, stop=stop)]
    target.reset()
    got = [(c.token, c.text, c.finish_reason) for c in target.generate(
        PROMPT, max_tokens=50, temperature=0, stop=stop, draft=Drafting(FlakyDrafter(same, 9), 3, adaptive=False))]
    assert got == want


def test_drafting_errors(models):
    target, same, _ = models
    with pytest.raises(InvalidArgumentError):
        Drafting(ModelDrafter(same), n_draft=0)
    with pytest.raises(InvalidArgumentError):
        target.generate(PROMPT, draft="model.gguf")


def test_chat_with_a_draft_model(models):
    target, same, _ = models
    msgs = [{"role": "user", "content": "Hello there"}]
    target.reset()
    plain = target.create_chat_completion(msgs, max_tokens=40, temperature=0)
    target.reset()
    fast = target.create_chat_completion(msgs, max_tokens=40, temperature=0, draft=same, n_draft=3)
    assert fast["choices"] == plain["choices"]


def _chi2_p(observed: Counter, expected: dict, n: int) -> float:
    """p-value of Pearson's chi-square goodness of fit (cells with expected count < 5 pooled),
    by the Wilson–Hilferty normal approximation of the chi-square distribution."""
    cells, pooled_o, pooled_e = [], 0, 0.0
    for key, p in expected.items():
        e = p * n
        if e < 5:
            pooled_o, pooled_e = pooled_o + observed.get(key, 0), pooled_e + e
        else:
            cells.append((observed.get(key, 0), e))
    if pooled_e > 0:
        cells.append((pooled_o, pooled_e))
    unexpected = sum(v for k, v in observed.items() if k not in expected)
    assert unexpected == 0, f"{unexpected} draws outside the support"
    x2 = sum((o - e) ** 2 / e for o, e in cells)
    k = len(cells) - 1
    z = ((x2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 1 - statistics.NormalDist().cdf(z)


def test_speculative_sampling_rule_keeps_the_target_distribution():
    rng = np.random.default_rng(0)
    p = (np.array([3, 5, 7, 9]), np.array([0.1, 0.2, 0.3, 0.4]))
    for q in ((np.array([5, 7, 11]), np.array([0.6, 0.3, 0.1])), (np.array([9]), np.array([1.0]))):
        n = 40_000
        q_rng = np.random.default_rng(1)
        counts = Counter(_accept_sampled(rng, p, q, int(q[0][q_rng.choice(len(q[0]), p=q[1])])) for _ in range(n))
        assert _chi2_p(counts, dict(zip(p[0].tolist(), p[1].tolist())), n) > 0.01


DRAWS = int(os.environ.get("DSV4_SPEC_DRAWS", "4000"))


def test_speculative_sampling_matches_plain_sampling(models):
    """(tok1, tok2) jointly and tok3: the exact distribution plain sampling draws from (the
    sampling chain applied to the model's logits, enumerated) vs DRAWS speculative draws whose
    drafter samples from another model (q != p), so accepts, rejections and residual draws all
    happen. Set DSV4_SPEC_DRAWS=20000 for the issue's full run."""
    target, same, _ = models
    chain = dict(temperature=1.5, top_k=6, top_p=1.0, min_p=0.0)
    sampler = Sampler(SamplingParams(**chain))

    eos = target.tokenizer.eos_id

    def dist(prefix):
        if prefix and prefix[-1] == eos:                # the stream has ended
            return {None: 1.0}
        target.reset()
        ids, probs = sampler.distribution(target.eval(PROMPT + prefix, logits="last")[0], PROMPT + prefix)
        return dict(zip(ids.tolist(), probs.tolist()))

    joint, third = {}, Counter()
    for a, pa in dist([]).items():
        for b, pb in dist([a]).items():
            joint[(a, b)] = pa * pb
            for c, pc in dist([a, b] if b is not None else [a]).items() if b is not None else [(None, 1.0)]:
                third[c] += pa * pb * pc
    draft_chain = SamplingParams(temperature=0.7, top_k=10, top_p=1.0, min_p=0.0, seed=5)   # q overlaps p
    drafting = Drafting(ModelDrafter(same, draft_chain), n_draft=2, adaptive=False)
    seen_pairs, seen_third = Counter(), Counter()
    streams = {}
    proposed = accepted = 0
    target.reset()
    for seed in range(DRAWS):   # 4 tokens: the 2nd and 3rd go through the drafts' accept/reject
        toks = [c.token for c in target.generate(PROMPT, max_tokens=4, seed=seed, draft=drafting, **chain)][:3]
        proposed, accepted = proposed + drafting.stats["proposed"], accepted + drafting.stats["accepted"]
        toks += [None] * (3 - len(toks))           # ended by the end-of-sentence token
        seen_pairs[tuple(toks[:2])] += 1
        seen_third[toks[2]] += 1
        if seed < 5:
            streams[seed] = toks
    assert 0.05 < accepted / proposed < 0.95, (accepted, proposed)
    assert _chi2_p(seen_pairs, joint, DRAWS) > 0.01
    assert _chi2_p(seen_third, dict(third), DRAWS) > 0.01
    for seed, toks in streams.items():          # a seed reproduces its stream
        target.reset()
        again = [c.token for c in target.generate(PROMPT, max_tokens=4, seed=seed, draft=Drafting(
            ModelDrafter(same, draft_chain), 2, adaptive=False), **chain)]
        again = again[:3]
        assert again + [None] * (3 - len(again)) == toks


def test_adaptive_k_stops_drafting_when_drafts_fail():
    k = AdaptiveK(4)
    assert k.choose() == 1                      # nothing measured yet: one draft first
    for _ in range(20):
        k.record(4, 0, verify_s=0.012, draft_s=0.02)
        k.record(0, 0, verify_s=0.010, draft_s=0.0)
    picks = [k.choose() for _ in range(32)]
    assert picks.count(0) >= 30 and 1 in picks  # plain decoding, probing now and then
    good = AdaptiveK(4)
    for _ in range(20):
        good.record(4, 4, verify_s=0.011, draft_s=0.004)
        good.record(0, 0, verify_s=0.010, draft_s=0.0)
    assert good.choose() == 4


def test_adaptive_k_probes_less_often_while_probes_fail():
    k = AdaptiveK(4, probe_every=16, probe_max=128)
    k.record(1, 0, verify_s=0.021, draft_s=0.002)
    k.record(0, 0, verify_s=0.010, draft_s=0.0)
    gaps, since = [], 0
    for _ in range(600):
        n = k.choose()
        since += 1
        if n:
            gaps.append(since)
            since = 0
            k.record(n, 0, verify_s=0.021, draft_s=0.002)       # the probe fails
        else:
            k.record(0, 0, verify_s=0.010, draft_s=0.0)
    assert gaps[:4] == [16, 32, 64, 128] and set(gaps[4:]) == {128}
    # a probe that gets a draft accepted brings the probing back to every 16 plain steps
    k.accept = 0.0
    while not k.choose():
        k.record(0, 0, verify_s=0.010, draft_s=0.0)
    k.record(1, 1, verify_s=0.021, draft_s=0.002)
    assert k.probe_interval == 16


def test_bench_draft_checks_every_stream(tiny_model):
    import io

    from dsv4_ggml.bench_draft import run_draft_bench

    out = io.StringIO()
    res = run_draft_bench(str(tiny_model), str(tiny_model), n_gen=24, threads=1, n_prompt=16, rates=(1.0, 0.0),
                          ks=(1, 2), stream=out)
    assert set(res["oracle"]) == {1.0, 0.0} and set(res["oracle"][1.0]) == {1, 2, "adaptive"}
    # the oracle follows the target's context: on F32 weights its forced rates are the real ones
    assert res["oracle_acceptance"][1.0][1] == res["oracle_acceptance"][1.0][2] == 1.0
    assert res["oracle_acceptance"][0.0][2] == 0.0
    assert "draft model K=2" in out.getvalue() and "acceptance 100%" in out.getvalue()
    assert res["streams_part"] == {}            # F32 weights: every stream equals plain decoding
