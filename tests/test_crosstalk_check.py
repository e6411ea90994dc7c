"""The cross-talk check of benchmarks/server_load.py (benchmarks/crosstalk.py): a request's own
answer passes, another prompt's answer fails, greedy and seeded sampling alike."""
import os
import sys

import pytest

import dsv4_ggml
from dsv4_ggml.sampling import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from crosstalk import batch_variance, explained, replay  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_model):
    m = dsv4_ggml.Model(tiny_model, n_ctx=256, n_seq=3)
    yield m
    m.close()


def _answer(model, prompt, **kw):
    model.reset()
    out = [c.token for c in model.generate(prompt, max_tokens=16, **kw) if c.token is not None]
    model.reset()
    return out


PROMPTS = ([5, 17, 33, 8, 91, 12, 40], [7, 7, 120, 3, 66, 150, 21, 9, 44], [200, 14, 2, 88, 61])


def test_own_answers_pass_foreign_ones_fail(model):
    greedy = SamplingParams(temperature=0.0)
    answers = [_answer(model, p, temperature=0.0) for p in PROMPTS]
    assert all(len(a) == 16 for a in answers)
    eps = batch_variance(model, list(zip(PROMPTS, answers)))
    assert eps < 1e-4, eps        # F32: batching changes the logits by rounding only
    for i, p in enumerate(PROMPTS):
        ok, gap = explained(replay(model, p, answers[i]), answers[i], greedy, eps)
        assert ok and gap == 0.0
        for j, other in enumerate(answers):
            if answers[j] != answers[i]:
                assert not explained(replay(model, p, other), other, greedy, eps)[0]
        # one token changed at the end: still caught
        changed = answers[i][:-1] + [(answers[i][-1] + 1) % model.n_vocab]
        assert not explained(replay(model, p, changed), changed, greedy, eps)[0]
        # ... unless the allowed variance covers the gap it needs
        ok, gap = explained(replay(model, p, changed), changed, greedy, 1e3)
        assert ok and gap > 0


def test_seeded_samples_replay_their_draws(model):
    p = PROMPTS[1]
    own = _answer(model, p, temperature=1.0, seed=7)
    logits = replay(model, p, own)
    assert explained(logits, own, SamplingParams(temperature=1.0, seed=7), 1e-6)[0]
    # the same answer under another seed's draws is not what that seed picks
    assert not explained(logits, own, SamplingParams(temperature=1.0, seed=8), 1e-6)[0]
    other = _answer(model, p, temperature=1.0, seed=8)
    assert other != own
    assert not explained(replay(model, p, other), other, SamplingParams(temperature=1.0, seed=7), 1e-6)[0]
