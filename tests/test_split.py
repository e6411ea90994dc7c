"""Split GGUFs (llama.cpp's gguf-split format) load as one model.

A model split into parts (`PREFIX-00001-of-00003.gguf` …, written here by `dsv4_ggml.split`
with gguf-py's writer, as gguf-split and convert_hf_to_gguf.py write them) opens from any part's
name and gives byte-identical logits to the single file: the golden F32 file and a tiny Q8_0
model, split by tensor count and by size into 2, 3 and 5 parts, and with an empty first part.
Damaged part sets (a part missing, truncated, from another split, with a wrong split.no, a
tensor in two parts, a tensor count that lies) raise the typed error naming the part.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

import dsv4_ggml
from dsv4_ggml import errors
from dsv4_ggml.split import SPLIT_KEYS, parse_size, part_path, split_gguf

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import hostile  # noqa: E402
from gguf_edit import rewrite  # noqa: E402

N_TOKENS = 300     # of the golden prompt: crosses the ratio-4 and ratio-128 compressions
N_CTX = 512


# --- sources and their single-file logits --------------------------------------------------------

@pytest.fixture(scope="module")
def prompt(golden) -> list[int]:
    return json.loads((golden / "tokens-700.json").read_text())[:N_TOKENS]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A tiny Q8_0 model (tests/hostile.py's base: Q8_0 matrices, F32 vectors, an I32 table)."""
    p = tmp_path_factory.mktemp("small") / "small.gguf"
    p.write_bytes(hostile.base_bytes())
    return p


@pytest.fixture(scope="module")
def sources(golden, small, prompt) -> dict[str, tuple[Path, list[int]]]:
    n_vocab = hostile.SMALL["n_vocab"]
    return {"golden-f32": (golden / "ds4-tiny-f32.gguf", prompt),
            "tiny-q8_0": (small, [t % n_vocab for t in prompt[:200]])}


def open_model(path, **kw) -> dsv4_ggml.Model:
    return dsv4_ggml.Model(path, n_ctx=N_CTX, n_threads=2, **kw)


def eval_logits(path, tokens, **kw) -> np.ndarray:
    with open_model(path, **kw) as m:
        return m.eval(tokens, logits="all")


@pytest.fixture(scope="module")
def single_logits(sources) -> dict[str, np.ndarray]:
    return {name: eval_logits(path, toks) for name, (path, toks) in sources.items()}


def tensor_sizes(path) -> list[int]:
    return [int(t.n_bytes) for t in GGUFReader(os.fspath(path)).tensors]


def parts_by_size(sizes: list[int], limit: int) -> int:
    """The parts gguf-py's writer makes with split_max_size=limit (a new part when the next
    tensor would take the current one past the limit; at least one tensor per part)."""
    parts, used, n = 1, 0, 0
    for s in sizes:
        if n > 0 and used + s > limit:
            parts, used, n = parts + 1, 0, 0
        used, n = used + s, n + 1
    return parts


def size_limit_for(sizes: list[int], k: int) -> int:
    """The smallest byte limit that splits into at most k parts (the count falls as it grows)."""
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if parts_by_size(sizes, mid) <= k else (mid + 1, hi)
    return lo


def split_into(src: Path, prefix: Path, how: str, k: int) -> list[Path]:
    sizes = tensor_sizes(src)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if how == "tensors":
        paths = split_gguf(src, prefix, max_tensors=-(-len(sizes) // k))
    elif how == "bytes":
        paths = split_gguf(src, prefix, max_bytes=size_limit_for(sizes, k))
    else:   # "empty-first": the metadata alone in part 1 (gguf-py's small_first_shard)
        paths = split_gguf(src, prefix, max_tensors=-(-len(sizes) // (k - 1)), small_first_part=True)
    assert len(paths) == k, paths
    return paths


SPLITS = [("tensors", 2), ("tensors", 3), ("tensors", 5), ("bytes", 2), ("bytes", 3), ("bytes", 5),
          ("empty-first", 3)]


# --- split sets load as the single file ----------------------------------------------------------

@pytest.mark.parametrize("source", ["golden-f32", "tiny-q8_0"])
@pytest.mark.parametrize("how,k", SPLITS)
def test_split_gives_identical_logits(sources, single_logits, tmp_path, source, how, k):
    src, toks = sources[source]
    paths = split_into(src, tmp_path / "m", how, k)
    assert [p.name for p in paths] == [f"m-{i:05d}-of-{k:05d}.gguf" for i in range(1, k + 1)]
    held = [[t.name for t in GGUFReader(os.fspath(p)).tensors] for p in paths]
    if how == "empty-first":
        assert held[0] == []
    assert all(held[1:])
    with open_model(src) as single:
        want = [(t.name, t.type, t.shape, t.nbytes) for t in single.tensors]
    for opened in (paths[0], paths[-1]):        # any part's name opens the whole model
        with open_model(opened) as m:
            assert m.files == [os.fspath(p) for p in paths]
            assert m.name == "m"
            assert [(t.name, t.type, t.shape, t.nbytes) for t in m.tensors] == want
            assert [t.file for t in m.tensors] == [i for i, names in enumerate(held) for _ in names]
            got = m.eval(toks, logits="all")
        assert np.array_equal(got, single_logits[source]), f"opened by {opened.name}"


def test_split_read_in_place_and_saved_states_move_between_single_and_split(sources, single_logits, tmp_path):
    src, toks = sources["golden-f32"]
    paths = split_into(src, tmp_path / "g", "bytes", 3)
    # every weight read from its part's mapping (none copied): still the same logits
    with open_model(paths[1], repack=False) as m:
        assert {t.placement for t in m.tensors} == {"mapped"}
        assert np.array_equal(m.eval(toks, logits="all"), single_logits["golden-f32"])
        blob = m.save_state()
    # the same model: a state saved from the split set loads into the single file and back
    with open_model(src) as single:
        single.load_state(blob)
        assert single.tokens() == toks
        back = single.save_state()
    with open_model(paths[0]) as m:
        m.load_state(back)


def test_single_file_with_split_keys_of_one_part_loads(sources, single_logits, tmp_path):
    src, toks = sources["tiny-q8_0"]
    n = len(tensor_sizes(src))
    one = rewrite(src, tmp_path / "one.gguf", set_keys={
        "split.no": (0, GGUFValueType.UINT16), "split.count": (1, GGUFValueType.UINT16),
        "split.tensors.count": (n, GGUFValueType.INT32)})
    with open_model(one) as m:
        assert m.files == [os.fspath(one)]
        assert np.array_equal(m.eval(toks, logits="all"), single_logits["tiny-q8_0"])
    # also under a part's name: "-00001-of-00001"
    named = tmp_path / "one-00001-of-00001.gguf"
    shutil.copy(one, named)
    with open_model(named) as m:
        assert m.files == [os.fspath(named)] and m.name == "one"


def test_inspect_lists_the_parts(sources, tmp_path):
    src, _ = sources["tiny-q8_0"]
    paths = split_into(src, tmp_path / "s", "tensors", 3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "dsv4_ggml.cli", "inspect", str(paths[2]), "--tensors"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "a split GGUF of 3 parts" in r.stdout
    for i, p in enumerate(paths):
        assert f"part {i + 1}/3  {p}" in r.stdout
    assert "token_embd.weight" in r.stdout and "part 3" in r.stdout


def test_parse_size_and_part_names():
    assert parse_size("50G") == 50 * 10**9
    assert parse_size("500M") == 500 * 10**6
    assert parse_size("64k") == 64_000
    assert parse_size("123") == 123
    for bad in ("", "G", "1.5G", "-3", "0", "10X"):
        with pytest.raises(errors.InvalidArgumentError):
            parse_size(bad)
    assert part_path("/d/model.gguf", 2, 3) == Path("/d/model-00002-of-00003.gguf")


def test_split_gguf_copies_every_key_and_tensor(sources, tmp_path):
    src, _ = sources["tiny-q8_0"]
    paths = split_into(src, tmp_path / "c", "bytes", 3)
    r = GGUFReader(os.fspath(src))
    first = GGUFReader(os.fspath(paths[0]))
    keys = [k for k in first.fields if not k.startswith("GGUF.")]
    assert keys == [k for k in r.fields if not k.startswith("GGUF.")] + list(SPLIT_KEYS)
    data = {t.name: bytes(t.data.tobytes()) for t in r.tensors}
    n = 0
    for i, p in enumerate(paths):
        part = GGUFReader(os.fspath(p))
        assert [part.fields[k].contents() for k in SPLIT_KEYS] == [i, 3, len(data)]
        if i > 0:
            assert [k for k in part.fields if not k.startswith("GGUF.")] == list(SPLIT_KEYS)
        for t in part.tensors:
            assert bytes(t.data.tobytes()) == data[t.name]
            n += 1
    assert n == len(data)


def test_convert_cli_takes_split_options():
    from dsv4_ggml.cli import build_parser
    argv = ["convert", "ck", "out.gguf", "--split-max-size", "50G", "--split-max-tensors", "7"]
    args = build_parser(argv).parse_args(argv)
    assert args.split_max_size == 50 * 10**9 and args.split_max_tensors == 7
    with pytest.raises(SystemExit):
        build_parser(["convert"]).parse_args(["convert", "ck", "out.gguf", "--split-max-size", "lots"])


# --- damaged part sets -> typed errors naming the part ------------------------------------------

@pytest.fixture
def parts(sources, tmp_path) -> list[Path]:
    """The tiny Q8_0 model in 3 parts (by tensor count), in a fresh directory."""
    return split_into(sources["tiny-q8_0"][0], tmp_path / "set" / "m", "tensors", 3)


def patch_key(path: Path, key: str, value: int) -> None:
    """Overwrites the integer value of metadata key `key` in place (same type, same size)."""
    data = bytearray(path.read_bytes())
    k = struct.pack("<Q", len(key)) + key.encode()
    at = data.index(k) + len(k)
    vtype = GGUFValueType(struct.unpack_from("<I", data, at)[0])
    fmt = {GGUFValueType.UINT16: "<H", GGUFValueType.INT32: "<i", GGUFValueType.UINT32: "<I"}[vtype]
    struct.pack_into(fmt, data, at + 4, value)
    path.write_bytes(bytes(data))


def raises(path, cls, *needles: str) -> str:
    with pytest.raises(cls) as e:
        open_model(path)
    msg = str(e.value)
    print(f"{type(e.value).__name__}: {msg}")
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_part(parts):
    parts[1].unlink()
    for opened in (parts[0], parts[2]):
        raises(opened, errors.FileError, "split GGUF part 2 of 3", f"cannot open '{parts[1]}'", "No such file")


def test_truncated_part(parts):
    whole = parts[2].read_bytes()
    parts[2].write_bytes(whole[:len(whole) // 2])        # cut in its data
    raises(parts[0], errors.TruncatedFileError, f"split GGUF part 3 of 3 '{parts[2]}'", "truncated GGUF")
    parts[2].write_bytes(whole)
    parts[1].write_bytes(parts[1].read_bytes()[:100])    # cut in its header
    raises(parts[2], errors.TruncatedFileError, f"split GGUF part 2 of 3 '{parts[1]}'", "truncated GGUF")


def test_part_of_another_model_swapped_in(parts, sources, tmp_path):
    other = split_into(sources["golden-f32"][0], tmp_path / "other" / "g", "tensors", 3)
    shutil.copy(other[1], parts[1])
    raises(parts[0], errors.CorruptFileError, f"split GGUF part 2 of 3 '{parts[1]}'", "another split model")


def test_part_of_another_split_of_the_same_model_swapped_in(parts, sources, tmp_path):
    other = split_into(sources["tiny-q8_0"][0], tmp_path / "other" / "m", "bytes", 3)
    shutil.copy(other[1], parts[1])
    msg = raises(parts[0], errors.CorruptFileError)
    # the parts overlap (a tensor in two parts) or leave tensors out (the count disagrees)
    assert f"'{parts[1]}'" in msg or ("split.tensors.count" in msg and f"'{parts[0]}'" in msg), msg


def test_part_with_a_wrong_split_no(parts):
    patch_key(parts[2], "split.no", 1)
    raises(parts[0], errors.CorruptFileError, f"split GGUF part 3 of 3 '{parts[2]}' says it is part 2 of 3")


def test_duplicated_part(parts):
    shutil.copy(parts[1], parts[2])
    raises(parts[1], errors.CorruptFileError, f"split GGUF part 3 of 3 '{parts[2]}' says it is part 2 of 3")


def test_part_count_that_lies(parts, tmp_path):
    # the files renamed as 2 parts, while their keys say 3
    two = [tmp_path / "two-00001-of-00002.gguf", tmp_path / "two-00002-of-00002.gguf"]
    for src, dst in zip(parts, two):
        shutil.copy(src, dst)
    raises(two[0], errors.CorruptFileError, f"split GGUF part 1 of 2 '{two[0]}' says it is part 1 of 3")
    # split.count lies in every part: the set looks like 2 parts, but split.tensors.count says more
    for p in parts[:2]:
        patch_key(p, "split.count", 2)
    for src, dst in zip(parts, two):
        shutil.copy(src, dst)
    raises(two[1], errors.CorruptFileError, f"split GGUF '{two[0]}': split.tensors.count says the model has")


def test_tensor_in_two_parts(parts, tmp_path):
    first = GGUFReader(os.fspath(parts[0])).tensors
    name = next(t.name for t in first if t.tensor_type == 0)   # an F32 tensor of part 1
    data = np.array(next(t.data for t in first if t.name == name))
    edited = rewrite(parts[1], tmp_path / "edited.gguf", add_tensors={name: data})
    os.replace(edited, parts[1])
    raises(parts[0], errors.CorruptFileError, f"split GGUF part 2 of 3 '{parts[1]}' holds tensor '{name}'",
           f"which part 1 '{parts[0]}' holds too")


def test_tensor_count_that_lies(parts):
    n = sum(len(GGUFReader(os.fspath(p)).tensors) for p in parts)
    for p in parts:
        patch_key(p, "split.tensors.count", n + 1)
    raises(parts[1], errors.CorruptFileError, f"split GGUF '{parts[0]}': split.tensors.count says the model has "
           f"{n + 1} tensors, but its 3 parts hold {n}")


def test_renamed_part(parts, tmp_path):
    renamed = tmp_path / "model.gguf"
    shutil.copy(parts[0], renamed)
    raises(renamed, errors.CorruptFileError, f"'{renamed}' is part 1 of a model split into 3 files",
           "-00001-of-00003.gguf")


def test_part_that_is_not_a_part(parts, sources):
    shutil.copy(sources["tiny-q8_0"][0], parts[2])     # the whole single file, under part 3's name
    raises(parts[0], errors.CorruptFileError, f"split GGUF part 3 of 3 '{parts[2]}' has no split.no")
