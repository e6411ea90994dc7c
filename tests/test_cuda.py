"""CUDA: where the weights live changes where the model runs, not what it computes.

Every placement of a tiny F32 model (all on the GPU; routed experts on the host; only some trunk
layers on the GPU; none) gives the logits of the CPU engine within 1e-5 relative at every
position of a 700-token prompt and 32 greedy decode steps, with identical greedy tokens; several
sequences batched on the GPU give what each gives alone there. The whole engine suite also runs on
the GPU with DSV4_TEST_BACKEND=cuda (benchmarks/gpu_check.sh). Skipped where this build has no
CUDA backend or the machine no device (CI).
"""
from __future__ import annotations

import numpy as np
import pytest

import dsv4_ggml
from dsv4_ggml import _native
from dsv4_ggml.model import BACKENDS
from dsv4_ggml.tiny import write_tiny_model

from test_engine import CONFIGS, prompt, rel_err


def _cuda_available() -> bool:
    _, lib = _native.load()
    return bool(lib.dsv4_backend_available(BACKENDS["cuda"]))


pytestmark = pytest.mark.skipif(not _cuda_available(), reason="no CUDA backend in this build or no device")

N_DECODE = 32
PLACEMENTS = {
    "gpu": dict(backend="cuda"),
    "experts-on-host": dict(backend="cuda", experts_on_host=True),
    "first-layer-on-gpu": dict(backend="cuda", n_gpu_layers=1),
    "no-layer-on-gpu": dict(backend="cuda", n_gpu_layers=0),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def config_run(request, tmp_path_factory):
    """A tiny config, its prompt and the CPU engine's prompt logits, greedy tokens and their logits."""
    opts = dict(CONFIGS[request.param])
    seed, prompt_seed = opts.pop("seed"), opts.pop("prompt")
    path = tmp_path_factory.mktemp("cuda") / f"{request.param}.gguf"
    write_tiny_model(path, seed=seed, **opts)
    toks = prompt(700, prompt_seed)
    return request.param, path, toks, run(path, toks, backend="cpu")


def run(path, toks, **kw):
    m = dsv4_ggml.Model(path, n_ctx=1024, cache_type="f32", **kw)
    logits = m.eval(toks)
    greedy, steps = [], []
    nxt = int(logits[-1].argmax())
    for _ in range(N_DECODE):
        greedy.append(nxt)
        lg = m.eval([nxt])[0]
        steps.append(lg)
        nxt = int(lg.argmax())
    return logits, greedy, np.array(steps)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_placement_gives_the_cpu_logits(config_run, placement):
    name, path, toks, (want_prompt, want_greedy, want_steps) = config_run
    logits, greedy, steps = run(path, toks, **PLACEMENTS[placement])
    err_p, err_d = rel_err(logits, want_prompt), rel_err(steps, want_steps)
    print(f"{name} {placement}: prompt worst {err_p.max():.1e}, decode worst {err_d.max():.1e}")
    assert err_p.max() < 1e-5, f"position {err_p.argmax()}"
    assert greedy == want_greedy
    assert err_d.max() < 1e-5


def test_batched_sequences_on_the_gpu_equal_each_alone(tiny_model):
    """Three sequences on the GPU, prompts fed in mixed steps beside each other's decode tokens,
    then rolled back and continued: each equals that sequence run alone on the GPU."""
    prompts = [prompt(n, 500 + n) for n in (45, 160, 300)]
    m = dsv4_ggml.Model(tiny_model, n_ctx=1024, cache_type="f32", backend="cuda", n_seq=3)
    got = {i: [] for i in range(3)}
    fed = [0, 0, 0]
    nxt = [0, 0, 0]
    for _ in range(40):
        batch = {}
        for i, p in enumerate(prompts):
            batch[i] = p[fed[i]:fed[i] + 64] if fed[i] < len(p) else [nxt[i]]
        for i, lg in m.eval_batch(batch, logits="all").items():
            got[i].append(lg)
            fed[i] += len(batch[i]) if fed[i] < len(prompts[i]) else 0
            nxt[i] = int(lg[-1].argmax())
    for i in range(3):
        toks = m.tokens(i)
        alone = dsv4_ggml.Model(tiny_model, n_ctx=1024, cache_type="f32", backend="cuda")
        want = alone.eval(toks)
        err = rel_err(np.concatenate(got[i])[:len(toks)], want)
        print(f"sequence {i} ({len(toks)} tokens) batched vs alone on cuda: worst {err.max():.1e}")
        assert err.max() < 1e-5
        # roll back by 20 and continue: equals the alone run of the kept tokens plus the new ones
        m.truncate(len(toks) - 20, seq=i)
        tail = [int(t) for t in prompt(8, 900 + i)]
        cont = m.eval(tail, seq=i)
        fresh = dsv4_ggml.Model(tiny_model, n_ctx=1024, cache_type="f32", backend="cuda")
        want = fresh.eval(list(toks[:-20]) + tail)[-8:]
        err = rel_err(cont, want)
        print(f"sequence {i} rolled back by 20 and continued: worst {err.max():.1e}")
        assert err.max() < 1e-5
