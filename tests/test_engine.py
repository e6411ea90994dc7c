"""The ggml engine (Model.eval) against the float64 NumPy reference and llama.cpp's golden logits.

Tolerance (F32 weights): max|Δ| / max|ref| < 1e-4 at every position, identical greedy tokens.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import dsv4_ggml
from dsv4_ggml import errors
from dsv4_ggml.reference import Reference
from dsv4_ggml.tiny import write_tiny_model

# DSV4_TEST_BACKEND=cuda runs these tests on the GPU (a CUDA build; benchmarks/gpu_check.sh)
from conftest import TEST_BACKEND as BACKEND

TOL = 1e-4


def engine(path, **kw):
    """The engine with F32 caches: the 1e-4 comparisons need them (F16, the default, rounds the
    cached keys; tests/test_quant.py bounds that)."""
    return dsv4_ggml.Model(path, cache_type=kw.pop("cache_type", "f32"), backend=BACKEND, **kw)

# Together: compress ratios 0/4/128, hash and score routing, indexer top-k far below the number
# of compressed blocks (175 at 700 tokens), windows that are not a multiple of the ratios.
# `prompt` seeds the 700 prompt tokens. Selections whose k-th and (k+1)-th scores are closer than
# float32 noise flip between implementations (spec §3.6, §8), so each prompt was picked for
# margins of at least MIN_MARGIN over the prompt and its 64-token greedy continuation (the test
# checks that precondition with the reference).
CONFIGS = {
    "default-seed0": dict(seed=0, prompt=108),
    "mixed-seed1": dict(seed=1, prompt=107, n_layer=4, compress_ratios=[4, 128, 0, 4], n_hash_layers=1,
                        indexer_top_k=5, n_swa=20, n_expert=6, n_expert_used=3),
    "nohash-seed2": dict(seed=2, prompt=102, n_layer=3, compress_ratios=[128, 0, 4], n_hash_layers=0,
                         n_head=8, head_dim=128, o_groups=4, o_lora_rank=16, swiglu_limit=2.0),
}
MIN_MARGIN = 2e-5


def rel_err(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position: max |a − ref| / max |ref|."""
    return np.abs(a - ref).max(axis=-1) / np.abs(ref).max(axis=-1)


def prompt(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 512, n)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    opts = dict(CONFIGS[request.param])
    seed, prompt_seed = opts.pop("seed"), opts.pop("prompt")
    path = tmp_path_factory.mktemp("engine") / f"{request.param}.gguf"
    write_tiny_model(path, seed=seed, **opts)
    toks = prompt(700, prompt_seed)
    ref = Reference(path, record_margins=True)
    ref_logits = ref.eval(toks)
    greedy = []   # the reference's own greedy continuation, 64 steps
    step_logits = []
    nxt = int(ref_logits[-1].argmax())
    for _ in range(64):
        greedy.append(nxt)
        lg = ref.eval([nxt])[0]
        step_logits.append(lg)
        nxt = int(lg.argmax())
    margins = ref.min_margins()
    assert min(margins.values()) >= MIN_MARGIN, f"test data has a near-tie selection: {margins}"
    return request.param, path, toks, ref_logits, greedy, np.array(step_logits)


@pytest.mark.parametrize("n_ubatch,flash_attn", [(512, True), (37, True), (512, False)])
def test_prompt_then_greedy_decode_matches_reference(case, n_ubatch, flash_attn):
    name, path, toks, ref_logits, greedy, ref_steps = case
    m = engine(path, n_ctx=1024, n_ubatch=n_ubatch, flash_attn=flash_attn)
    logits = m.eval(toks)
    err = rel_err(logits, ref_logits)
    print(f"{name} n_ubatch={n_ubatch} flash_attn={flash_attn}: prompt worst {err.max():.2e} "
          f"median {np.median(err):.2e}")
    assert err.max() < TOL, f"worst at position {err.argmax()}"
    assert (logits.argmax(1) == ref_logits.argmax(1)).all()

    tokens, steps = [], []
    nxt = int(logits[-1].argmax())
    for _ in range(64):
        tokens.append(nxt)
        lg = m.eval([nxt])[0]
        steps.append(lg)
        nxt = int(lg.argmax())
    err = rel_err(np.array(steps), ref_steps)
    print(f"{name}: 64 decode steps worst {err.max():.2e}")
    assert tokens == greedy
    assert err.max() < TOL
    assert m.n_past == 764


def test_one_batch_prefill_equals_token_by_token(tiny_model):
    toks = prompt(300, 7)
    m = engine(tiny_model, n_ctx=512)
    batch = m.eval(toks)
    m.reset()
    single = np.concatenate([m.eval([t]) for t in toks])
    err = rel_err(single, batch)
    print(f"prefill vs decode: worst {err.max():.2e}")
    assert err.max() < 1e-5


def test_decode_crosses_every_compression_boundary(tiny_model):
    """Token-by-token decode from position 0 through t = 3, 7, 31/32, 35, 127/128, 255/256."""
    toks = prompt(260, 8)
    ref = Reference(tiny_model).eval(toks)
    m = engine(tiny_model, n_ctx=512)
    out = np.concatenate([m.eval([t]) for t in toks])
    err = rel_err(out, ref)
    for t in (3, 7, 31, 32, 35, 127, 128, 255, 256):
        assert err[t] < TOL, f"position {t}: {err[t]:.2e}"
    assert err.max() < TOL


def test_golden_f32_matches_llamacpp(golden):
    toks = json.loads((golden / "tokens-700.json").read_text())
    want = np.load(golden / "ds4-tiny-f32.llamacpp-logits.npy")
    m = engine(golden / "ds4-tiny-f32.gguf", n_ctx=1024)
    for mode in ("batch", "decode", "chunks37"):
        m.reset()
        if mode == "batch":
            got = m.eval(toks)
        elif mode == "decode":
            got = np.concatenate([m.eval([t]) for t in toks])
        else:
            got = np.concatenate([m.eval(toks[i:i + 37]) for i in range(0, len(toks), 37)])
        err = rel_err(got, want)
        print(f"golden f32 {mode}: worst {err.max():.2e} median {np.median(err):.2e}")
        assert err.max() < TOL
        assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("repack", ["none", "auto"])
def test_golden_q8_0_against_llamacpp_within_measured_bound(golden_q8_0, repack):
    """Q8_0 weights: both engines quantize activations inside the matmuls; selection flips make
    the tiny model chaotic, and so does the rounding of activations to Q8_0: a difference in the
    seventh digit can move an activation to the next Q8_0 step. Until the first compressed entry
    (position 4) our arithmetic is llama.cpp's; from there our fused decode attention (ops.h:
    attend_decode) sums in another order than ggml's flash attention. (Before that op, our decode
    matched llama.cpp's logits exactly until the first selection flip, at position 19.)
    Measured: positions 0-3 within 1.5e-7; median 1.8e-2 / 2.0e-2, worst 0.34 / 0.42, argmax
    94.6% / 93.9% (in place / AMX; the F32 golden stays within 1.1e-6)."""
    golden = golden_q8_0
    toks = json.loads((golden / "tokens-700.json").read_text())
    want = np.load(golden / "ds4-tiny-q8_0.llamacpp-logits.npy")
    m = engine(golden / "ds4-tiny-q8_0.gguf", n_ctx=1024, repack=repack)
    got = np.concatenate([m.eval([t]) for t in toks])
    err = rel_err(got, want)
    agree = (got.argmax(1) == want.argmax(1)).mean()
    print(f"golden q8_0 repack={repack}: worst {err.max():.2e} median {np.median(err):.2e} argmax {agree:.1%}")
    if BACKEND == "cpu":   # ggml-cuda rounds activations to Q8_1 blocks, llama.cpp's CPU run to Q8_0
        assert err[:4].max() < 1e-6
    assert np.median(err) < 0.04 and agree > 0.9


@pytest.mark.parametrize("n_ubatch", [1, 7, 32])
def test_last_only_logits_equal_the_last_row(tiny_model, n_ubatch):
    """Micro-batches whose logits nobody reads build no output head; their ring overwrites must
    still come after every ring read (regression: a NONE graph wrote a ring before reading it)."""
    toks = prompt(100, 9)
    m = engine(tiny_model, n_ctx=256, n_ubatch=n_ubatch)
    full = m.eval(toks)
    m.reset()
    last = m.eval(toks, logits="last")
    assert last.shape == (1, m.n_vocab)
    np.testing.assert_allclose(last[0], full[-1], rtol=0, atol=1e-5 * np.abs(full[-1]).max())


def test_eval_past_n_ctx_raises_and_leaves_the_state(tiny_model):
    toks = prompt(40, 10)
    m = engine(tiny_model, n_ctx=48)
    m.eval(toks[:30])
    m.eval(toks[30:])              # 40 of 48 used
    with pytest.raises(errors.ContextOverflowError, match="n_ctx 48"):
        m.eval(toks[:20])
    assert m.n_past == 40
    after = m.eval(toks[:8])       # still usable, and the failed call changed nothing
    m2 = engine(tiny_model, n_ctx=48)
    m2.eval(toks[:30])
    m2.eval(toks[30:])
    np.testing.assert_array_equal(after, m2.eval(toks[:8]))


@pytest.mark.parametrize("bad", [[], [-1], [512], [3, 600, 4], [[1, 2]], [1.5]])
def test_bad_tokens_raise_and_leave_the_state(tiny_model, bad):
    m = engine(tiny_model, n_ctx=64)
    m.eval([5, 6, 7])
    with pytest.raises(errors.InvalidArgumentError):
        m.eval(bad)
    assert m.n_past == 3


def test_state_memory_is_sized_from_n_ctx_the_ratios_and_the_slots(tiny_model):
    """Per layer and sequence slot: a window ring of n_swa + R rows (R = n_rollback: what a
    sequence can be rolled back by without recomputing); ratio 4: compressor rings of 8 + R rows
    (values and logits) + n_ctx/4 (+1) entries of 256 and of 128 floats; ratio 128: a ring of
    128 + R rows + n_ctx/128 (+1) entries. Each compressor ring tensor has one more row (value 0,
    logit -inf, read for positions before 0). No n_ctx × full KV."""
    def expected(n_ctx: int, n_seq: int = 1, R: int = 32) -> int:
        D, W, Di = 256, 32, 128
        total = 0
        for r in (0, 4, 128, 0, 4, 128):
            total += n_seq * D * (W + R)
            if r == 4:
                total += 2 * (n_seq * (8 + R) + 1) * 2 * D + n_seq * (n_ctx // 4 + 1) * D
                total += 2 * (n_seq * (8 + R) + 1) * 2 * Di + n_seq * (n_ctx // 4 + 1) * Di
            if r == 128:
                total += 2 * (n_seq * (128 + R) + 1) * D + n_seq * (n_ctx // 128 + 1) * D
        return 4 * total

    for n_ctx, n_seq, R in ((512, 1, 32), (4096, 1, 32), (512, 3, 32), (512, 1, 0), (1024, 4, 100)):
        m = engine(tiny_model, n_ctx=n_ctx, n_seq=n_seq, n_rollback=R)
        assert abs(m.state_bytes - expected(n_ctx, n_seq, R)) <= 6 * 512, (m.state_bytes, expected(n_ctx, n_seq, R))
        assert m.state_bytes == m.estimate_state_bytes(n_ctx, n_seq=n_seq)
        per_slot = m.stats()["slot_state_bytes"]
        assert abs(per_slot - (expected(n_ctx, 2, R) - expected(n_ctx, 1, R))) <= 6 * 512
    growth = (engine(tiny_model, n_ctx=4096).state_bytes
              - engine(tiny_model, n_ctx=512).state_bytes) / (4096 - 512)
    # 2 CSA layers × (256 + 128) / 4 + 2 HCA layers × 256 / 128 floats per token = 196 floats
    assert abs(growth - 4 * 196) < 4


def test_decode_reuses_the_graph_between_steps(tiny_model):
    """Decode steps reuse a few cached graphs: one without a completed block, one completing a
    CSA block (every 4th token), one completing an HCA block too (every 128th); new ones only
    when a visible-cache width changes (every 64 blocks), never per token."""
    m = engine(tiny_model, n_ctx=1024)
    m.eval(prompt(100, 11))
    before = m.stats()
    for t in prompt(200, 12):
        m.eval([int(t)])
    after = m.stats()
    builds = after["n_graph_builds"] - before["n_graph_builds"]
    print(f"200 decode steps: {builds} graph builds, {after['n_graph_nodes']} nodes, "
          f"compute buffer {after['compute_bytes']} bytes")
    assert after["n_ubatches"] - before["n_ubatches"] == 200
    assert builds <= 6   # steps 100..299: 3 kinds, the CSA width changes once (t = 256)
