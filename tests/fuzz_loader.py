"""Atheris fuzzer for the GGUF loader: `dsv4_ggml.Model(path)` on mutated files.

    python tests/fuzz_loader.py -max_total_time=60 [CORPUS_DIR ...] [libFuzzer flags]

Every input is written to a file and opened with `dsv4_ggml.Model` (n_ctx 64, one thread); when
it opens, a few tokens are evaluated. Raising a `Dsv4Error` is the expected outcome for a bad
file; any other exception, a crash, an abort in ggml, a hang (-timeout, 10 s by default) or an
RSS beyond -rss_limit_mb (4096 by default) is a finding; allocations beyond DSV4_FUZZ_DATA_MB
(RLIMIT_DATA, 3072 by default; 0: none, e.g. under ASan) fail inside the library instead, as an
OutOfMemoryError. libFuzzer writes the input to
`crash-*` / `timeout-*` / `oom-*` (-artifact_prefix); turn each into a regression case in
tests/hostile.py (REGRESSIONS).

Seeds: a tiny valid model (1 layer of ratio 4 with the indexer and hash routing, 300 tokens), the
same with the split keys of a one-part split GGUF, and a 2-layer one (ratio 0 + 128) with an MTP
block, written into a temporary seed directory that is
appended to the corpus directories (a temporary corpus directory is used when none is given).

Mutations: half libFuzzer's byte-level mutations, half structure-aware ones (tests/hostile.py's
GGUF parser/serializer: a key's value or type, a tensor's shape, type, name or offset, dropped or
duplicated entries, counts), so that most inputs get past the header checks into hparams,
tensor binding and session creation.

Coverage: atheris instruments the Python side only. For coverage of the native library, build it
with clang and `-fsanitize=fuzzer-no-link` and point DSV4_LIBRARY at it (see the report in
tests/test_hostile.py's docstring); the harness imports atheris before loading the library, so
its counters register with libFuzzer.

Files with a sliding window above 2^20 tokens load but are not evaluated: their state is
legal yet gigabytes large, and each step would take seconds, which stalls fuzzing.
"""
from __future__ import annotations

import os
import random
import struct
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

with atheris.instrument_imports(include=["dsv4_ggml"]):
    import dsv4_ggml
    from dsv4_ggml import errors

import hostile  # noqa: E402

SEED_CONFIGS = {
    "tiny-csa-1layer.gguf": dict(n_layer=1, compress_ratios=[4], n_hash_layers=1, n_vocab=300, n_embd=32, n_head=2,
                                 head_dim=32, n_rot=16, q_lora_rank=16, o_groups=2, o_lora_rank=8, indexer_n_head=2,
                                 indexer_head_dim=32, indexer_top_k=2, n_expert=4, n_expert_used=2, expert_ff=32,
                                 n_swa=4, context_length=256, weight_type="q8_0"),
    "tiny-swa-hca-mtp.gguf": dict(n_layer=2, compress_ratios=[0, 128], n_hash_layers=1, n_mtp_layers=1, n_vocab=300,
                                  n_embd=32, n_head=2, head_dim=32, n_rot=16, q_lora_rank=16, o_groups=2,
                                  o_lora_rank=8, indexer_n_head=2, indexer_head_dim=32, indexer_top_k=2, n_expert=4,
                                  n_expert_used=2, expert_ff=32, n_swa=4, context_length=256),
}
N_CTX = 64
TOKENS = [0, 7, 3, 200, 9, 9]

_tmp = Path(tempfile.mkdtemp(prefix="dsv4-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
_input = _tmp / "input.gguf"


def write_seeds(directory: Path) -> list[Path]:
    from dsv4_ggml.tiny import write_tiny_model
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, cfg in SEED_CONFIGS.items():
        p = directory / name
        if not p.exists():
            write_tiny_model(p, seed=1, **cfg)
        out.append(p)
    # the first seed as a one-part split GGUF (llama.cpp's split.* keys): mutations reach those checks
    p = directory / "tiny-csa-1layer-split-keys.gguf"
    if not p.exists():
        g = hostile.parse(out[0].read_bytes())
        g.set("split.no", hostile.U16, 0).set("split.count", hostile.U16, 1)
        g.set("split.tensors.count", hostile.I32, len(g.tensors))
        p.write_bytes(hostile.serialize(g)[0])
    out.append(p)
    return out


def evaluable(hp: dict) -> bool:
    """False for windows so large that evaluating would stall fuzzing (legal, only slow)."""
    return hp["n_swa"] <= 1 << 20


def TestOneInput(data: bytes) -> None:
    _input.write_bytes(data)
    try:
        m = dsv4_ggml.Model(_input, n_ctx=N_CTX, n_threads=1, n_ubatch=N_CTX)
    except errors.Dsv4Error as e:
        if not str(e).strip():
            raise AssertionError(f"{type(e).__name__} with an empty message") from e
        return
    try:
        if evaluable(m.hparams):
            n = m.n_vocab
            m.eval([t % n for t in TOKENS], logits="last")
            m.eval([1 % n], logits="all")
    except errors.Dsv4Error:
        pass
    finally:
        m.close()


# --- structure-aware mutations ----------------------------------------------------------------

_INTERESTING = (0, 1, 2, 3, 4, 7, 8, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 513, 1023, 1024, 4096, 65535,
                65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
_NUM_TYPES = (hostile.U8, hostile.I8, hostile.U16, hostile.I16, hostile.U32, hostile.I32, hostile.U64, hostile.I64)


def _rand_value(rng: random.Random, vtype: int):
    if vtype in (hostile.F32, hostile.F64):
        return rng.choice((0.0, -1.0, 1e-6, 1.0, 4.0, 16.0, 1e30, float("nan"), float("inf"), -float("inf"), 3e38))
    if vtype == hostile.BOOL:
        return rng.choice((0, 1, 2, 255))
    if vtype == hostile.STR:
        return rng.choice(("", "yarn", "gpt2", "deepseek4", "deepseek-v3", "x" * 70, "\0\xff"))
    bits = struct.calcsize(hostile._FMT[vtype]) * 8
    signed = vtype in (hostile.I8, hostile.I16, hostile.I32, hostile.I64)
    v = rng.choice(_INTERESTING) & ((1 << bits) - 1)
    if signed and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


def _mutate_structure(g: "hostile.Gguf", rng: random.Random) -> dict:
    kw: dict = {}
    op = rng.randrange(12)
    if op <= 3 and g.kvs:   # a key's value (same or another type)
        kv = rng.choice(g.kvs)
        key = kv.key.decode("utf-8", "replace")
        if kv.vtype == hostile.ARR and rng.random() < 0.6:
            sub, n = struct.unpack_from("<IQ", kv.body, 0)
            if sub == hostile.STR:
                vals = hostile.decode_value(kv.vtype, kv.body)
                k = rng.choice((0, 1, n // 2, max(0, n - 1), n + 1))
                g.set_raw(key, hostile.ARR, hostile.enc_array(hostile.STR, vals[:k]))
            else:
                vals = list(hostile.decode_value(kv.vtype, kv.body))
                sub2 = rng.choice(_NUM_TYPES + (hostile.F32, sub, sub))
                if rng.random() < 0.5 and vals:
                    vals[rng.randrange(len(vals))] = _rand_value(rng, sub2)
                else:
                    vals = vals[:rng.randrange(len(vals) + 2)] + [_rand_value(rng, sub2)] * rng.randrange(2)
                vals = [_rand_value(rng, sub2) if not _fits(sub2, v) else v for v in vals]
                g.set_raw(key, hostile.ARR, hostile.enc_array(sub2, vals))
        else:
            vtype = kv.vtype if rng.random() < 0.7 and kv.vtype != hostile.ARR else rng.choice(
                _NUM_TYPES + (hostile.F32, hostile.F64, hostile.BOOL, hostile.STR))
            g.set_raw(key, vtype, hostile.enc_scalar(vtype, _rand_value(rng, vtype)))
    elif op == 4 and g.kvs:   # drop or duplicate a key
        i = rng.randrange(len(g.kvs))
        if rng.random() < 0.5:
            del g.kvs[i]
        else:
            g.kvs.insert(rng.randrange(len(g.kvs) + 1), g.kvs[i])
    elif op in (5, 6) and g.tensors:   # a tensor's shape
        t = rng.choice(g.tensors)
        ne = list(t.ne)
        d = rng.randrange(len(ne) + 1)
        if d == len(ne) and len(ne) < 4:
            ne.append(rng.choice((1, 2)))
        elif ne:
            ne[rng.randrange(len(ne))] = rng.choice(_INTERESTING[:22])
        t.ne = tuple(ne)
        if rng.random() < 0.5:
            _resize(t)
    elif op == 7 and g.tensors:   # a tensor's type
        t = rng.choice(g.tensors)
        t.ggml_type = rng.choice(tuple(hostile._type_sizes()) + hostile.REMOVED_TYPES + (43, 99))
        if rng.random() < 0.7:
            _resize(t)
    elif op == 8 and g.tensors:   # drop, duplicate or rename a tensor
        i = rng.randrange(len(g.tensors))
        r = rng.random()
        if r < 0.4:
            del g.tensors[i]
        elif r < 0.7:
            g.tensors.append(hostile.Tensor(g.tensors[i].name, g.tensors[i].ne, g.tensors[i].ggml_type, g.tensors[i].data))
        else:
            other = rng.choice(g.tensors).name
            g.tensors[i].name = rng.choice((other, other + b"x", other.replace(b"blk.0", b"blk.1"), b"", b"a" * 64))
    elif op == 9 and g.tensors:   # a tensor's data offset
        i = rng.randrange(len(g.tensors))
        kw["offsets"] = {i: rng.choice(_INTERESTING) & ~31 | rng.choice((0, 0, 0, 1, 4, 16))}
    elif op == 10:   # the alignment
        al = rng.choice((0, 1, 2, 3, 8, 16, 64, 4096, 2**31))
        g.set("general.alignment", rng.choice((hostile.U32, hostile.U32, hostile.U64, hostile.I32)), al)
        if al and al & (al - 1) == 0 and al <= 4096:
            g.alignment = al
    else:   # the counts
        kw[rng.choice(("n_kv", "n_tensors"))] = max(0, rng.choice((-1, 1, 2)) + (len(g.kvs) if rng.random() < 0.5 else len(g.tensors)))
    return kw


def _fits(vtype: int, v) -> bool:
    if vtype in (hostile.F32, hostile.F64):
        return isinstance(v, float)
    if not isinstance(v, int) or isinstance(v, bool):
        return False
    bits = struct.calcsize(hostile._FMT[vtype]) * 8
    if vtype in (hostile.I8, hostile.I16, hostile.I32, hostile.I64):
        return -(1 << (bits - 1)) <= v < 1 << (bits - 1)
    return 0 <= v < 1 << bits


def _resize(t: "hostile.Tensor") -> None:
    sizes = hostile._type_sizes()
    if t.ggml_type in sizes and t.ne and t.ne[0] % sizes[t.ggml_type][0] == 0:
        n = hostile.type_nbytes(t.ggml_type, t.ne)
        if n <= 1 << 22:
            t.data = bytes(n)


def CustomMutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return atheris.Mutate(data, max_size)
    try:
        g = hostile.parse(data)
    except Exception:   # not parseable (a mutant): byte-level only
        return atheris.Mutate(data, max_size)
    kw = {}
    try:
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            kw.update(_mutate_structure(g, rng))
        out = hostile.serialize(g, **kw)[0]
    except Exception:   # the mutator's own limits (a value its type cannot hold, a float alignment, a 2^31
        # padding): not a finding about the loader, so mutate the bytes instead
        return atheris.Mutate(data, max_size)
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


def main(argv: list[str]) -> None:
    args = list(argv)
    dirs = [a for a in args[1:] if not a.startswith("-")]
    seeds = write_seeds(_tmp / "seeds")
    if not dirs:
        args.append(str(_tmp / "corpus"))
        dirs.append(str(_tmp / "corpus"))
    for d in dirs:       # libFuzzer writes new inputs into the first directory: it must exist
        os.makedirs(d, exist_ok=True)
    args.append(str(_tmp / "seeds"))
    biggest = max(p.stat().st_size for p in seeds)
    defaults = {"-max_len": str(biggest * 2), "-timeout": "10", "-rss_limit_mb": "4096"}
    for flag, value in defaults.items():
        if not any(a.startswith(flag + "=") for a in args):
            args.insert(1, f"{flag}={value}")
    # allocations beyond DSV4_FUZZ_DATA_MB fail inside the library (an OutOfMemoryError, which is
    # fine) before libFuzzer's RSS limit would call them a finding
    import resource
    lim = int(os.environ.get("DSV4_FUZZ_DATA_MB", "3072")) * 2**20
    if lim > 0:
        resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
    from dsv4_ggml import _native
    _native.load()   # after `import atheris`: an instrumented library registers its counters with libFuzzer
    atheris.Setup(args, TestOneInput, custom_mutator=CustomMutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
