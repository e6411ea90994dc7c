"""The MTP block in the engine (spec §3.10) against the float64 reference: its logits at every
position of a 700-token prompt and of a greedy continuation, however the tokens arrive (micro-batch
sizes, several sequences in one batch, rolled back and recomputed, copied, saved and loaded)."""
from __future__ import annotations

import numpy as np
import pytest

import dsv4_ggml
from dsv4_ggml.errors import InvalidArgumentError
from dsv4_ggml.reference import Reference
from dsv4_ggml.reference.mtp import mtp_logits
from dsv4_ggml.tiny import write_tiny_model

from conftest import TEST_BACKEND as BACKEND

TOL = 1e-4


def rel_err(a, ref):
    return np.abs(a - ref).max(axis=-1) / np.abs(ref).max(axis=-1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp") / "tiny-mtp.gguf"
    write_tiny_model(path, seed=0, n_mtp_layers=1)
    toks = np.random.default_rng(108).integers(2, 512, 700)   # test_engine's margin-checked prompt
    ref = Reference(path)
    logits, xfin = ref.eval(toks, return_xfin=True)
    return path, toks, logits, mtp_logits(path, toks, xfin)


def engine(path, **kw):
    return dsv4_ggml.Model(path, cache_type="f32", backend=BACKEND, mtp=True, **kw)


@pytest.mark.parametrize("n_ubatch", [512, 37])
def test_mtp_logits_match_the_reference(case, n_ubatch):
    path, toks, ref, ref_mtp = case
    m = engine(path, n_ctx=1024, n_ubatch=n_ubatch)
    logits, mtp = m.eval(toks, mtp=True)
    assert rel_err(logits, ref).max() < TOL
    err = rel_err(mtp, ref_mtp)
    assert err.max() < TOL, f"worst MTP position {err.argmax()}: {err.max():.2e}"


def test_mtp_rows_however_they_arrive(case):
    """Prompt chunks and one-token steps, two sequences per batch, a rollback past the window's
    slack (recomputed from a checkpoint), a copy and a saved state: every MTP row equals the
    reference's for its position."""
    path, toks, ref, ref_mtp = case
    m = engine(path, n_ctx=1024, n_seq=3, n_rollback=8, checkpoint_interval=128)
    got = {0: [], 1: []}
    lg = m.eval_batch({0: toks[:300], 1: toks[:250]}, logits="all", mtp=True)
    for s in (0, 1):
        got[s].append(lg[s][1])
    for i in range(40):                                   # decode steps, both sequences together
        out = m.eval_batch({0: [toks[300 + i]], 1: [toks[250 + i]]}, logits="all", mtp=True)
        for s in (0, 1):
            got[s].append(out[s][1])
    seq0 = np.concatenate(got[0])
    assert rel_err(seq0, ref_mtp[:340]).max() < TOL
    assert rel_err(np.concatenate(got[1]), ref_mtp[:290]).max() < TOL
    m.truncate(200, seq=0)                                # far beyond the slack: a checkpoint and recompute
    _, again = m.eval(toks[200:340], mtp=True, seq=0)
    assert rel_err(again, ref_mtp[200:340]).max() < TOL
    m.copy_seq(0, 2)
    blob = m.save_state(seq=1)
    m.reset(seq=1)
    m.load_state(blob, seq=1)
    out = m.eval_batch({2: toks[340:360], 1: toks[290:300]}, logits="all", mtp=True)
    assert rel_err(out[2][1], ref_mtp[340:360]).max() < TOL
    assert rel_err(out[1][1], ref_mtp[290:300]).max() < TOL


def test_mtp_needs_a_block_and_a_session(case, tiny_model):
    path = case[0]
    with pytest.raises(InvalidArgumentError, match="no MTP block"):
        dsv4_ggml.Model(tiny_model, n_ctx=64, mtp=True)
    plain = dsv4_ggml.Model(path, n_ctx=64)
    with pytest.raises(InvalidArgumentError, match="mtp=True"):
        plain.eval([1, 2, 3], mtp=True)
    # a plain session of the same file still gives the trunk's logits
    m = engine(path, n_ctx=64)
    a = m.eval([5, 6, 7], mtp=True)[0]
    b = dsv4_ggml.Model(path, n_ctx=64, cache_type="f32").eval([5, 6, 7])
    assert np.array_equal(a, b)


def test_mtp_draft_rows_match_the_reference(case):
    """Chained draft rows: the first from the trunk's state at the last position and the sampled
    token, each next from the MTP block's own output and the previous draft (§3.10, llama.cpp's
    draft-mtp), against the reference's explicit rows; the sequence itself is unchanged and goes
    on exactly (the verify step overwrites the draft rows)."""
    from dsv4_ggml.reference.mtp import MtpState, load_mtp

    path, toks, ref, ref_mtp = case
    q = 300
    m = engine(path, n_ctx=1024)
    m.eval(toks[:q])
    chain = [int(toks[q]), 17, 99, 5]          # the sampled token, then arbitrary drafts
    got = [m.mtp_draft(t, offset=i) for i, t in enumerate(chain)]
    st = MtpState(load_mtp(path))
    _, xfin = Reference(path).eval(toks[:q], return_xfin=True)
    st.eval(toks[:q], xfin)
    h = xfin[q - 1][None]
    for i, t in enumerate(chain):
        want, h = st.eval_rows([t], h, return_state=True)
        assert rel_err(got[i][None], want).max() < TOL, i
    assert rel_err(got[0][None], ref_mtp[q:q + 1]).max() < TOL   # the first row is the real row q
    # the sequence goes on as if no draft had been made
    _, after = m.eval(toks[q:q + 40], mtp=True)
    assert rel_err(after, ref_mtp[q:q + 40]).max() < TOL
    with pytest.raises(InvalidArgumentError):
        m.mtp_draft(5, offset=40)              # past the rollback slack


def test_greedy_with_mtp_drafts_equals_plain_decoding(case):
    from dsv4_ggml.speculative import Drafting

    path, toks, _, _ = case
    m = engine(path, n_ctx=512)
    prompt = [int(t) for t in toks[:40]]
    plain = [c.token for c in m.generate(prompt, max_tokens=120, temperature=0)]
    for k in (1, 3):
        m.reset()
        d = Drafting.of("mtp", k, adaptive=False)
        assert [c.token for c in m.generate(prompt, max_tokens=120, temperature=0, draft=d)] == plain
        assert d.stats["proposed"] > 0
    with pytest.raises(InvalidArgumentError, match="mtp=True"):
        dsv4_ggml.Model(path, n_ctx=64).generate([1, 2], max_tokens=2, draft="mtp").__next__()


N_GEN = 500
# per config, the seed of a 12-token prompt whose plain greedy stream runs to the context end
# (no EOS before it)
PROMPT_SEEDS = {"default-seed0": 0, "mixed-seed1": 11, "nohash-seed2": 2}


@pytest.fixture(scope="module")
def draft_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp-draft") / "tiny-seed1.gguf"
    write_tiny_model(path, seed=1)
    return path


@pytest.mark.parametrize("config", list(PROMPT_SEEDS))
def test_every_config_greedy_500_tokens_with_drafts_equals_plain(config, tmp_path_factory, draft_model_path):
    """Each tiny config with an MTP block: 500 greedy tokens past every compression boundary to the
    context end, plain vs MTP drafts (K = 1..4, fixed) vs a draft model (another tiny model, and
    the target's own file as its draft: all accepted) vs adaptive K: the same tokens."""
    from test_engine import CONFIGS

    from dsv4_ggml.speculative import Drafting

    cfg = dict(CONFIGS[config])
    seed = cfg.pop("seed")
    cfg.pop("prompt")
    path = tmp_path_factory.mktemp("mtp-cfg") / f"tiny-{config}-mtp.gguf"
    write_tiny_model(path, seed=seed, n_mtp_layers=1, **cfg)
    prompt = [int(t) for t in np.random.default_rng(PROMPT_SEEDS[config]).integers(2, 512, 12)]
    m = engine(path, n_ctx=len(prompt) + N_GEN)

    def stream(draft=None):
        m.reset()
        return [(c.token, c.finish_reason) for c in m.generate(prompt, max_tokens=N_GEN + 10, temperature=0,
                                                                draft=draft)]

    plain = stream()
    assert len(plain) == N_GEN and plain[-1][1] == "length"   # ends at the context end
    for k in (1, 2, 3, 4):
        d = Drafting.of("mtp", k, adaptive=False)
        assert stream(d) == plain, ("mtp", k)
        assert d.stats["proposed"] >= N_GEN // (k + 1) - 1
    other = dsv4_ggml.Model(draft_model_path, n_ctx=len(prompt) + N_GEN)
    own = dsv4_ggml.Model(path, n_ctx=len(prompt) + N_GEN)
    for name, drafter, k in (("draft model", other, 3), ("own file", own, 4), ("mtp adaptive", "mtp", 4)):
        d = Drafting.of(drafter, k, adaptive=name == "mtp adaptive")
        assert stream(d) == plain, name
        if name == "own file":
            assert d.stats["acceptance"] == 1.0
    other.close()
    own.close()
    m.close()
