"""Long-running use: threads, saved states, long sequences, NaN detection, leaks."""
from __future__ import annotations

import gc
import resource
import threading
import time

import numpy as np
import pytest

import dsv4_ggml
from dsv4_ggml import errors
from dsv4_ggml.tiny import write_tiny_model
from gguf_edit import read_model, write_model


def prompt(n, seed):
    return np.random.default_rng(seed).integers(2, 512, n)


def test_sessions_in_threads_give_the_same_logits_as_alone(tiny_model):
    prompts = [prompt(120, s) for s in range(4)]
    alone = [dsv4_ggml.Model(tiny_model, n_ctx=256, n_threads=1, cache_type="f32").eval(p) for p in prompts]
    models = [dsv4_ggml.Model(tiny_model, n_ctx=256, n_threads=1, cache_type="f32") for _ in prompts]
    results: list = [None] * len(prompts)

    def work(i):
        out = []
        for _ in range(3):   # steps x threads, repeated: interleaving must not matter
            models[i].reset()
            out.append(models[i].eval(prompts[i]))
        results[i] = out
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in enumerate(results):
        for r in runs:
            np.testing.assert_array_equal(r, alone[i])
    print(f"{len(prompts)} threads x 3 runs x {len(prompts[0])} tokens: identical to running alone")


def test_the_gil_is_released_during_compute(tiny_model):
    m = dsv4_ggml.Model(tiny_model, n_ctx=2048, n_threads=1)
    toks = prompt(1500, 3)
    done = threading.Event()
    ticks = 0

    def run():
        m.eval(toks)
        done.set()
    t = threading.Thread(target=run)
    start = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0)
    t.join()
    elapsed = time.perf_counter() - start
    print(f"main thread ran {ticks} loop iterations during a {elapsed:.2f} s eval")
    assert ticks > 1000


def test_save_and_load_state_round_trip_exactly(tiny_model):
    toks = prompt(200, 4)
    a = dsv4_ggml.Model(tiny_model, n_ctx=512)
    a.eval(toks[:150])
    blob = a.save_state()
    expected = a.eval(toks[150:])
    b = dsv4_ggml.Model(tiny_model, n_ctx=512)
    b.eval(prompt(30, 9))                    # some other sequence, replaced by the load
    b.load_state(blob)
    assert b.n_past == 150 and b._tokens == [int(t) for t in toks[:150]]
    np.testing.assert_array_equal(b.eval(toks[150:]), expected)
    assert b.save_state() != blob            # it moved on
    a.reset()
    a.load_state(blob)                       # and back again on the first one
    np.testing.assert_array_equal(a.eval(toks[150:]), expected)


def test_a_corrupt_or_foreign_state_is_rejected_and_changes_nothing(tiny_model, tmp_path):
    m = dsv4_ggml.Model(tiny_model, n_ctx=256)
    m.eval(prompt(50, 5))
    blob = m.save_state()
    m.eval(prompt(7, 6))
    before = m.save_state()
    cases = {
        "flipped bit": blob[:500] + bytes([blob[500] ^ 1]) + blob[501:],
        "truncated": blob[:-10],
        "empty": b"",
        "not a state": b"x" * 100,
        "appended": blob + b"\0",
    }
    for name, bad in cases.items():
        with pytest.raises(errors.StateError):
            m.load_state(bad)
        assert m.save_state() == before, name
    other = tmp_path / "other.gguf"
    write_tiny_model(other, seed=1)
    with pytest.raises(errors.StateError, match="another model"):
        dsv4_ggml.Model(other, n_ctx=256).load_state(blob)
    with pytest.raises(errors.StateError, match="n_ctx"):        # 50 tokens do not fit
        dsv4_ggml.Model(tiny_model, n_ctx=48).load_state(blob)
    # the blob holds one sequence, whatever the session it came from: another n_ctx, slot count
    # and rollback slack take it, into any slot
    other_session = dsv4_ggml.Model(tiny_model, n_ctx=512, n_seq=2, n_rollback=0)
    other_session.load_state(blob, seq=1)
    assert other_session.save_state(seq=1) == blob and other_session.seq_len(0) == 0
    with pytest.raises(errors.StateError, match="cache type"):
        dsv4_ggml.Model(tiny_model, n_ctx=256, cache_type="q8_0").load_state(blob)


def test_long_run_keeps_memory_at_the_theoretical_size(tiny_model):
    """20k tokens (512-token prefills, then single-token decode steps at 4k and at 20k): logits
    stay finite, the state stays at its n_ctx-sized allocation, and a decode step's scratch grows
    only by a few floats per visible compressed block (no n_ctx × n_ctx or n_ctx × heads
    materialisation)."""
    n = 20480
    m = dsv4_ggml.Model(tiny_model, n_ctx=n, n_ubatch=512)
    state = m.state_bytes
    assert state == m.estimate_state_bytes(n)
    toks = prompt(n, 7)
    decode_scratch = {}
    for i in range(0, n - 64, 512):
        chunk = toks[i:min(i + 512, n - 64)]
        assert np.isfinite(m.eval(chunk, logits="last")).all()
        if m.n_past >= 4096 and 4096 not in decode_scratch:
            assert np.isfinite(m.eval([int(toks[i])], logits="last")).all()
            decode_scratch[4096] = (m.n_past, m.stats()["compute_bytes"])
    for t in toks[m.n_past:]:
        assert np.isfinite(m.eval([int(t)], logits="last")).all()
    decode_scratch[n] = (m.n_past, m.stats()["compute_bytes"])
    st = m.stats()
    (p0, b0), (p1, b1) = decode_scratch[4096], decode_scratch[n]
    per_block = (b1 - b0) / ((p1 - p0) / 4)
    print(f"{n} tokens: state {state} bytes (= theoretical); decode scratch {b0} bytes at {p0} tokens, "
          f"{b1} at {p1}: {per_block:.0f} bytes per additional compressed block")
    assert st["state_bytes"] == state and st["n_past"] == n
    # a few floats per visible block (scores, masks, the F32 view of the HCA entries); an indexer
    # materialising per-head scores would alone need 16 heads x 4 bytes x 2 CSA layers = 128
    assert per_block < 96


def test_nan_in_the_weights_is_reported_not_propagated(tiny_model, tmp_path):
    kv, tensors = read_model(tiny_model)
    poisoned = []
    for name, data, qtype in tensors:
        if name == "blk.2.attn_kv.weight":
            data = data.copy()
            data[0, 0] = np.nan
        poisoned.append((name, data, qtype))
    path = tmp_path / "nan.gguf"
    write_model(path, kv, poisoned)
    m = dsv4_ggml.Model(path, n_ctx=64)
    with pytest.raises(errors.NumericsError, match="non-finite"):
        m.eval(prompt(10, 8))
    with pytest.raises(errors.NumericsError):
        m.eval(prompt(4, 8), logits="last")


def test_load_eval_free_loop_does_not_leak(tiny_model):
    """1000 × (open, eval 8 tokens, free). RSS may grow by allocator noise, not per iteration."""
    toks = prompt(8, 10)

    def cycle():
        m = dsv4_ggml.Model(tiny_model, n_ctx=64)
        m.eval(toks)
        m.close()

    for _ in range(50):
        cycle()
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(1000):
        cycle()
    gc.collect()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grow_kib = rss1 - rss0
    print(f"1000 load/eval/free cycles in {time.perf_counter() - t0:.1f} s: max RSS {rss0} -> {rss1} KiB "
          f"(+{grow_kib} KiB)")
    assert grow_kib < 16 * 1024   # one leaked session state alone would be ~250 KiB per cycle
