"""Several sequences in one model (`Model(n_seq=N)`): batched steps across sequences, rollback
(`truncate`) and fork (`copy_seq`), each proved against the same sequence run alone.

Tolerances (F32 weights and caches): batched vs alone 1e-5 relative at every position, identical
greedy tokens; a rolled-back or copied sequence vs a fresh run of its tokens 1e-6, logits and the
saved state (`save_state`, which depends only on the sequence) both.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

import dsv4_ggml
from dsv4_ggml import errors
from dsv4_ggml.tiny import write_tiny_model

from test_engine import CONFIGS, engine, prompt, rel_err

PROMPTS = (37, 150, 300, 700)      # every sequence crosses a different set of compression boundaries
CHUNKS = (37, 50, 64, 128)         # each one's prompt tokens per step
N_DECODE = 64


@pytest.fixture(scope="module", params=list(CONFIGS))
def config_model(request, tmp_path_factory):
    opts = dict(CONFIGS[request.param])
    seed = opts.pop("seed")
    opts.pop("prompt")
    path = tmp_path_factory.mktemp("seqs") / f"{request.param}.gguf"
    write_tiny_model(path, seed=seed, **opts)
    return request.param, path


def run_alone(path, toks, n_decode=N_DECODE, chunk=None, **kw):
    """Prompt logits (in chunks of `chunk` tokens, default one batch), greedy tokens and their
    logits of one sequence in a model of its own."""
    m = engine(path, n_ctx=1024, **kw)
    chunk = chunk or len(toks)
    logits = np.concatenate([m.eval(toks[i:i + chunk]) for i in range(0, len(toks), chunk)])
    greedy, steps = [], []
    nxt = int(logits[-1].argmax())
    for _ in range(n_decode):
        greedy.append(nxt)
        lg = m.eval([nxt])[0]
        steps.append(lg)
        nxt = int(lg.argmax())
    return logits, greedy, np.array(steps)


def run_batched(path, prompts, chunks=CHUNKS, n_decode=N_DECODE, **kw):
    """The same, every sequence in one model: each step carries every sequence's next prompt chunk
    or (once its prompt is in) its next greedy token, so prompt chunks and decode tokens mix."""
    n = len(prompts)
    m = engine(path, n_ctx=1024, n_seq=n, **kw)
    fed = [0] * n
    prompt_out = [[] for _ in range(n)]
    greedy = [[] for _ in range(n)]
    steps = [[] for _ in range(n)]
    nxt = [0] * n
    while any(len(s) < n_decode for s in steps):
        batch = {}
        for i, p in enumerate(prompts):
            if fed[i] < len(p):
                batch[i] = p[fed[i]:fed[i] + chunks[i]]
            elif len(steps[i]) < n_decode:
                batch[i] = [nxt[i]]
                greedy[i].append(nxt[i])
        for i, lg in m.eval_batch(batch, logits="all").items():
            if fed[i] < len(prompts[i]):
                prompt_out[i].append(lg)
                fed[i] += len(batch[i])
            else:
                steps[i].append(lg[0])
            nxt[i] = int(lg[-1].argmax())
    return m, [np.concatenate(p) for p in prompt_out], greedy, [np.array(s) for s in steps]


def check_batched_against_alone(name, path, n_ubatch=512):
    prompts = [prompt(n, 100 + n) for n in PROMPTS]
    m, prompt_logits, greedy, steps = run_batched(path, prompts, n_ubatch=n_ubatch)
    for i, p in enumerate(prompts):
        want_prompt, want_greedy, want_steps = run_alone(path, p)
        err_p = rel_err(prompt_logits[i], want_prompt)
        err_d = rel_err(steps[i], want_steps)
        print(f"{name} n_ubatch {n_ubatch} sequence {i} ({len(p)} tokens): prompt worst {err_p.max():.1e}, "
              f"{N_DECODE} decode steps worst {err_d.max():.1e}")
        assert err_p.max() < 1e-5, f"sequence {i}: position {err_p.argmax()}"
        assert greedy[i] == want_greedy, f"sequence {i}"
        assert err_d.max() < 1e-5
        assert m.seq_len(i) == len(p) + N_DECODE
    st = m.stats()
    assert st["n_seq"] == 4 and st["state_bytes"] == m.estimate_state_bytes(1024, n_seq=4)


def test_batched_sequences_equal_each_one_run_alone(config_model):
    """4 sequences, prompts of 37/150/300/700 tokens fed in mixed steps, then 64 greedy decode
    steps each, all batched: per sequence the logits of that sequence run alone."""
    check_batched_against_alone(*config_model)


def test_batched_sequences_split_over_micro_batches(tiny_model):
    """The same with n_ubatch 61: a step's tokens are split over micro-batches, sequences across
    them (one-token sequences first)."""
    check_batched_against_alone("default", tiny_model, n_ubatch=61)


def test_batched_decode_reuses_its_graphs(tiny_model):
    """Four sequences decoding together at different depths: a few cached graphs (a step with or
    without a completed block), not one per step."""
    m = engine(tiny_model, n_ctx=1024, n_seq=4)
    m.eval_batch({i: prompt(60 + 37 * i, 200 + i) for i in range(4)})
    before = m.stats()["n_graph_builds"]
    for step in range(100):
        m.eval_batch({i: [int(prompt(1, 300 + 4 * step + i)[0])] for i in range(4)})
    builds = m.stats()["n_graph_builds"] - before
    print(f"100 batched decode steps of 4 sequences: {builds} graph builds")
    assert builds <= 6


# --- rollback ---------------------------------------------------------------------------------------

def state_parts(blob: bytes) -> dict:
    """A saved state (one sequence; F32 caches): header, ring rows, cache rows, tokens."""
    magic, version, cache_type, fingerprint, n_past, ring_bytes, cache_bytes = struct.unpack("<8sIiQqQQ", blob[:48])
    assert magic == b"DSV4STAT" and version == 2 and cache_type == 0
    body = blob[48:48 + ring_bytes + cache_bytes]
    tokens = np.frombuffer(blob[48 + ring_bytes + cache_bytes:-8], np.int32)
    return {"n_past": n_past, "rings": np.frombuffer(body[:ring_bytes], np.float32),
            "caches": np.frombuffer(body[ring_bytes:], np.float32), "tokens": tokens, "fingerprint": fingerprint}


def state_err(a: bytes, b: bytes) -> float:
    """Max relative difference of two saved states' floats (their layouts and tokens must agree)."""
    pa, pb = state_parts(a), state_parts(b)
    assert pa["n_past"] == pb["n_past"] and np.array_equal(pa["tokens"], pb["tokens"])
    assert pa["fingerprint"] == pb["fingerprint"]
    err = 0.0
    for part in ("rings", "caches"):
        x, y = pa[part], pb[part]
        assert x.shape == y.shape and np.array_equal(np.isinf(x), np.isinf(y)), part
        fin = np.isfinite(y)
        if fin.any():
            err = max(err, float(np.abs(x[fin] - y[fin]).max() / max(np.abs(y[fin]).max(), 1e-30)))
    return err


# (tokens evaluated, tokens kept): the tiny model has a 32-token window, ratios 4 and 128, top-8
# indexer selection from t = 35 on, and rings with 32 rows of slack (n_rollback)
BOUNDARIES = {
    "inside the window": (20, 12),
    "window ring wrap": (70, 60),                  # 64 ring rows: positions 64.. overwrote 0..
    "mid CSA block": (140, 130),
    "at a CSA boundary": (140, 132),
    "CSA block completed by the last kept token": (140, 131),
    "mid HCA block": (230, 200),
    "at an HCA boundary": (270, 256),
    "HCA block completed by a dropped token": (140, 127),
    "before entries the indexer had picked": (60, 36),   # blocks 9.. were picked, then dropped
    "by 32, the most without recomputing": (300, 268),
}


@pytest.mark.parametrize("kind", list(BOUNDARIES))
def test_truncate_then_continue_equals_a_fresh_run(tiny_model, kind):
    """Evaluate past the boundary (a prompt chunk, then single tokens), truncate back, continue with
    other tokens (a chunk, then decode steps): the logits and the saved state of a fresh run of the
    kept prefix plus the new tokens, with nothing recomputed."""
    past, keep = BOUNDARIES[kind]
    toks, new = prompt(past, 11), prompt(48, 12)
    m = engine(tiny_model, n_ctx=512)
    m.eval(toks[:keep])
    if past - 5 > keep:
        m.eval(toks[keep:past - 5])
    for t in toks[max(keep, past - 5):past]:
        m.eval([int(t)])
    before = m.stats()
    m.truncate(keep)
    after = m.stats()
    assert m.n_past == keep and m.tokens() == [int(t) for t in toks[:keep]]
    assert after["n_restores"] == 0 and after["n_ubatches"] == before["n_ubatches"]   # O(1): nothing recomputed
    got = np.concatenate([m.eval(new[:40])] + [m.eval([int(t)]) for t in new[40:]])

    fresh = engine(tiny_model, n_ctx=512)
    fresh.eval(toks[:keep])
    want = np.concatenate([fresh.eval(new[:40])] + [fresh.eval([int(t)]) for t in new[40:]])
    err, serr = rel_err(got, want).max(), state_err(m.save_state(), fresh.save_state())
    print(f"{kind}: {past} -> {keep}: logits {err:.1e}, state {serr:.1e}")
    assert err < 1e-6 and serr < 1e-6
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("checkpoints", [True, False], ids=["from a checkpoint", "from the start"])
def test_truncate_beyond_the_rings_restores_and_recomputes(tiny_model, checkpoints):
    """Further back than the rings reach: the nearest checkpoint (one every 64 tokens here) is
    restored and the gap recomputed; without checkpoints, the kept prefix from the start."""
    toks, new = prompt(400, 13), prompt(30, 14)
    kw = dict(checkpoint_interval=64, n_checkpoints=8) if checkpoints else dict(n_checkpoints=0)
    m = engine(tiny_model, n_ctx=512, n_ubatch=50, **kw)
    m.eval(toks)
    st = m.stats()
    assert (st["checkpoint_bytes"] > 0) == checkpoints
    m.truncate(230)
    st = m.stats()
    assert st["n_restores"] == 1
    # checkpoints at the ends of the 50-token micro-batches that reach 64, 128, ...: 200 and 250 ...
    assert st["n_reevaluated"] == (30 if checkpoints else 230)
    got = m.eval(new)
    fresh = engine(tiny_model, n_ctx=512, n_ubatch=50)
    fresh.eval(toks[:230])
    want = fresh.eval(new)
    err, serr = rel_err(got, want).max(), state_err(m.save_state(), fresh.save_state())
    print(f"400 -> 230 ({'checkpoint' if checkpoints else 'start'}): logits {err:.1e}, state {serr:.1e}")
    assert err < 1e-6 and serr < 1e-6


def test_truncate_to_just_before_a_prompt_end_costs_nothing(tiny_model):
    """A checkpoint is kept at the end of every prompt: a thinking-mode chat's next turn goes back
    to just before where its last prompt ended, after hundreds of generated tokens."""
    toks = prompt(120, 15)
    m = engine(tiny_model, n_ctx=1024, n_ubatch=64)
    m.eval(toks)
    for t in prompt(300, 16):        # "generation"
        m.eval([int(t)])
    m.truncate(119)
    st = m.stats()
    assert st["n_restores"] == 1 and st["n_reevaluated"] == 0
    fresh = engine(tiny_model, n_ctx=1024, n_ubatch=64)
    fresh.eval(toks[:119])
    new = prompt(20, 17)
    assert rel_err(m.eval(new), fresh.eval(new)).max() < 1e-6
    assert state_err(m.save_state(), fresh.save_state()) < 1e-6


def test_rollback_within_n_rollback_is_free_and_beyond_is_not(tiny_model):
    """Rolling back by up to n_rollback tokens from the furthest point recomputes nothing, at any
    position mod 4 and 128; further back restores (no checkpoints here: from the start)."""
    m = engine(tiny_model, n_ctx=1024, n_rollback=32, n_checkpoints=0)
    toks = prompt(700, 18)
    m.eval(toks[:300])
    for d in (1, 3, 4, 17, 31, 32):
        if m.n_past < 300:
            m.eval(toks[m.n_past:300])
        m.truncate(300 - d)
        assert m.stats()["n_restores"] == 0, d
    m.eval(toks[m.n_past:300])
    m.truncate(300 - 40)
    assert m.stats()["n_restores"] == 1
    small = engine(tiny_model, n_ctx=1024, n_rollback=0, n_checkpoints=0)
    small.eval(toks[:300])
    small.truncate(299)                 # a window ring of n_swa rows still holds what 299 needs
    assert small.stats()["n_restores"] == 0
    small.truncate(297)
    assert small.stats()["n_restores"] == 1


# --- fork -------------------------------------------------------------------------------------------

def test_copy_seq_then_continue_both_equals_their_fresh_runs(tiny_model):
    """A shared prefix evaluated once, copied, then each copy continued with other tokens (batched
    together): each equals a fresh run of its own tokens. The copy keeps the original's rollback
    slack (it is rolled back by 20 tokens first, recomputing nothing)."""
    shared, a, b = prompt(333, 19), prompt(50, 20), prompt(45, 21)
    m = engine(tiny_model, n_ctx=1024, n_seq=3)
    m.eval(shared, seq=1)
    m.copy_seq(1, 2)
    assert m.tokens(2) == m.tokens(1) and m.seq_len(2) == 333
    m.truncate(313, seq=2)
    assert m.stats()["n_restores"] == 0
    out = m.eval_batch({1: a, 2: b}, logits="all")
    for seq, prefix, toks in ((1, shared, a), (2, shared[:313], b)):
        fresh = engine(tiny_model, n_ctx=1024)
        fresh.eval(prefix)
        want = fresh.eval(toks)
        err, serr = rel_err(out[seq], want).max(), state_err(m.save_state(seq=seq), fresh.save_state())
        print(f"sequence {seq}: {len(prefix)} + {len(toks)} tokens: logits {err:.1e}, state {serr:.1e}")
        assert err < 1e-6 and serr < 1e-6
    assert m.seq_len(0) == 0            # the untouched slot


# --- random operations ------------------------------------------------------------------------------

def test_random_eval_truncate_copy_sequences_match_fresh_runs(tiny_model):
    """A property test (hypothesis): hundreds of random evals (batched, chunks and single tokens),
    truncations (near and far) and copies on 2 sequences; after each eval, each sequence's new
    logits equal those of its tokens run fresh, and at the end so do the saved states."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

    import functools

    # one engine under test and one oracle for every example (a failing example's traceback keeps
    # its objects alive while hypothesis shrinks it)
    model = engine(tiny_model, n_ctx=512, n_seq=2, n_ubatch=96, checkpoint_interval=48, n_checkpoints=3)
    oracle = engine(tiny_model, n_ctx=512, n_ubatch=512)

    def near_tie(tokens) -> bool:
        """Whether a top-k selection (indexer, router) of `tokens` has its k-th and (k+1)-th
        scores closer than float32 noise: there, batch shape alone may flip it (spec §8), and a
        difference says nothing about the state operations."""
        from dsv4_ggml.reference import Reference

        ref = Reference(tiny_model, record_margins=True)
        ref.eval(list(tokens))
        return min(ref.min_margins().values()) < 2e-5

    @functools.lru_cache(maxsize=16)
    def fresh_logits(tokens: tuple) -> np.ndarray:
        """The logits of every position of `tokens`, computed fresh (one sequence, one batch)."""
        oracle.reset()
        return oracle.eval(list(tokens))

    class Sequences(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.m = model
            self.m.reset()
            self.held = [[], []]
            self.ops = 0

        @rule(data=st.data(), n0=st.integers(0, 60), n1=st.integers(0, 60), seed=st.integers(0, 10**6))
        def eval(self, data, n0, n1, seed):
            rng = np.random.default_rng(seed)
            batch = {i: [int(t) for t in rng.integers(2, 512, n)] for i, n in enumerate((n0, n1))
                     if n > 0 and len(self.held[i]) + n <= 450}
            if not batch:
                return
            out = self.m.eval_batch(batch, logits="all")
            for i, toks in batch.items():
                self.held[i] += toks
                want = fresh_logits(tuple(self.held[i]))[-len(toks):]
                if rel_err(out[i], want).max() >= 1e-5:
                    hypothesis.assume(not near_tie(self.held[i]))   # random tokens: a near-tie is no finding
                assert rel_err(out[i], want).max() < 1e-5
            self.ops += 1

        @rule(seq=st.integers(0, 1), back=st.one_of(st.integers(0, 40), st.integers(0, 450)))
        def truncate(self, seq, back):
            n = max(0, len(self.held[seq]) - back)
            self.m.truncate(n, seq=seq)
            self.held[seq] = self.held[seq][:n]
            self.ops += 1

        @precondition(lambda self: self.held[0] or self.held[1])
        @rule(src=st.integers(0, 1))
        def copy(self, src):
            self.m.copy_seq(src, 1 - src)
            self.held[1 - src] = list(self.held[src])
            self.ops += 1

        @invariant()
        def tokens_agree(self):
            for i in range(2):
                assert self.m.tokens(i) == self.held[i]

        def teardown(self):
            for i in range(2):
                if self.held[i]:
                    oracle.reset()
                    oracle.eval(self.held[i])
                    err = state_err(self.m.save_state(seq=i), oracle.save_state())
                    assert err < 1e-5 or near_tie(self.held[i]), err
            Sequences.total_ops += self.ops

    Sequences.total_ops = 0
    settings = hypothesis.settings(max_examples=6, stateful_step_count=60, deadline=None,
                                   suppress_health_check=list(hypothesis.HealthCheck), derandomize=True)
    hypothesis.stateful.run_state_machine_as_test(Sequences, settings=settings)
    print(f"{Sequences.total_ops} random operations")
    assert Sequences.total_ops >= 200


# --- quantized weights, cache types -----------------------------------------------------------------

# Batched vs alone with quantized weights or caches, on test_quant.py's "smooth" tiny model (every
# block and every expert selected): the logits of a quantized model depend on the shapes of its
# matrix products (a decode token alone takes ggml's vector kernels, in a batch its matrix ones;
# a prompt chunked otherwise too), and where a selection can flip, a seventh-digit difference
# then diverges chaotically (spec §8; the default tiny Q8_0 model: 0.33 relative between one
# 300-token batch and 128-token chunks of one sequence alone). Prompts are chunked alike both ways.
# Bounds: README's engine-vs-reference bound of each type.
QUANT_CASES = {  # (weight type, cache type): bound
    ("q8_0", "f16"): 2.3e-2,
    ("q4_k", "f16"): 3.0e-2,
    ("f32", "f16"): 3.4e-4,
    ("f32", "bf16"): 2.2e-3,
    ("f32", "q8_0"): 8.5e-3,
}


@pytest.mark.parametrize("weights,cache", list(QUANT_CASES))
def test_batched_equals_alone_with_quantized_weights_and_caches(tmp_path_factory, weights, cache):
    from test_quant import SMOOTH
    path = tmp_path_factory.mktemp("q") / f"tiny-smooth-{weights}.gguf"
    write_tiny_model(path, seed=0, weight_type=weights, **SMOOTH)
    prompts = [prompt(150, 31), prompt(300, 32)]
    _, prompt_logits, greedy, steps = run_batched(path, prompts, chunks=(50, 128), n_decode=16, cache_type=cache)
    worst = 0.0
    for i, p in enumerate(prompts):
        want_prompt, want_greedy, want_steps = run_alone(path, p, n_decode=16, chunk=(50, 128)[i], cache_type=cache)
        # each run decodes its own greedy tokens: compare the steps both took the same way
        same = 0
        while same < 16 and greedy[i][same] == want_greedy[same]:
            same += 1
        worst = max(worst, rel_err(prompt_logits[i], want_prompt).max())
        if same:
            worst = max(worst, rel_err(steps[i][:same], want_steps[:same]).max())
    print(f"weights {weights}, cache {cache}: batched vs alone worst {worst:.1e} (bound {QUANT_CASES[(weights, cache)]})")
    assert worst < QUANT_CASES[(weights, cache)]


# K-quant routed experts over 16 experts, 8 per token: a batch's rows per expert straddle the
# 8 rows at which ggml's tiled K-quant kernel takes over from its row-by-row one
CONTENT_CASES = {
    "f32": dict(),
    "q8_0": dict(weight_type="q8_0"),
    "q4_k-16-experts": dict(weight_type="q4_k", indexer_top_k=512, n_expert=16, n_expert_used=8, expert_ff=256),
}


@pytest.mark.parametrize("case", list(CONTENT_CASES))
def test_logits_do_not_depend_on_what_other_sequences_hold(tmp_path_factory, case):
    """No cross-talk, bit for bit: a sequence's logits in batched steps are the same whatever
    tokens the sequences batched with it hold (same lengths, so the same steps). This holds on
    K-quant weights too: ggml's tiled K-quant kernel rounds differently from its row-by-row one,
    and our patch 0007 makes the choice per batch, not per expert (where it followed the other
    sequences' routing)."""
    path = tmp_path_factory.mktemp("content") / f"tiny-{case}.gguf"
    write_tiny_model(path, seed=0, **CONTENT_CASES[case])
    mine = prompt(60, 50)

    def run(m, others):
        m.reset()
        out = [m.eval_batch({0: mine[:40], **{k + 1: o[:40] for k, o in enumerate(others)}}, logits="all")[0]]
        for i in range(40, 60):       # decode steps; every third one with 5-token chunks beside
            step = {0: [mine[i]], **{k + 1: (o[i:i + 5] if i % 3 == 0 else [o[i]]) for k, o in enumerate(others)}}
            out.append(m.eval_batch(step)[0])
        return out

    for repack in ("none", "auto"):
        m = dsv4_ggml.Model(path, n_ctx=256, n_seq=4, repack=repack)
        first = run(m, [prompt(70, 60 + k) for k in range(3)])
        for variant in (1, 2):
            other = run(m, [prompt(70, 60 + 10 * variant + k) for k in range(3)])
            assert all(np.array_equal(a, b) for a, b in zip(first, other)), (repack, variant)
        m.close()


# --- errors -----------------------------------------------------------------------------------------

def test_bad_sequence_operations_raise_and_change_nothing(tiny_model):
    m = engine(tiny_model, n_ctx=128, n_seq=2)
    m.eval(prompt(20, 40), seq=1)
    blob = m.save_state(seq=1)
    bad = [
        (errors.InvalidArgumentError, "does not exist", lambda: m.eval([3], seq=2)),
        (errors.InvalidArgumentError, "does not exist", lambda: m.eval([3], seq=-1)),
        (errors.InvalidArgumentError, "does not exist", lambda: m.eval_batch({0: [3], 5: [4]})),
        (errors.InvalidArgumentError, "does not exist", lambda: m.truncate(3, seq=7)),
        (errors.InvalidArgumentError, "holds 20", lambda: m.truncate(21, seq=1)),
        (errors.InvalidArgumentError, "holds 20", lambda: m.truncate(-1, seq=1)),
        (errors.InvalidArgumentError, "both sequence 1", lambda: m.copy_seq(1, 1)),
        (errors.InvalidArgumentError, "does not exist", lambda: m.copy_seq(1, 2)),
        (errors.InvalidArgumentError, "does not exist", lambda: m.save_state(seq=2)),
        (errors.InvalidArgumentError, "does not exist", lambda: m.load_state(blob, seq=3)),
        (errors.InvalidArgumentError, "vocabulary", lambda: m.eval_batch({0: [3], 1: [600]})),
        (errors.ContextOverflowError, "sequence 1", lambda: m.eval_batch({0: [3], 1: prompt(109, 41)})),
        (errors.InvalidArgumentError, "empty", lambda: m.eval_batch({0: [3], 1: []})),
        (errors.InvalidArgumentError, "non-empty", lambda: m.eval_batch({})),
        (errors.InvalidArgumentError, "token count", lambda: m.truncate(2.5, seq=1)),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
        assert m.seq_len(0) == 0 and m.seq_len(1) == 20 and m.save_state(seq=1) == blob
    for n_seq in (0, -3, 257, 10**9, 2.0, True):
        with pytest.raises(errors.InvalidArgumentError, match="n_seq"):
            dsv4_ggml.Model(tiny_model, n_ctx=64, n_seq=n_seq)
    for kw in (dict(n_rollback=-1), dict(n_rollback=10**6), dict(checkpoint_interval=-5), dict(n_checkpoints=-1)):
        with pytest.raises(errors.InvalidArgumentError, match=list(kw)[0]):
            dsv4_ggml.Model(tiny_model, n_ctx=64, **kw)
