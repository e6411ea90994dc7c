"""A corpus of malformed GGUF files for the loader, derived from a valid tiny model.

Every case is `(name, data, expected)`:

* `name`: `category/detail`, stable between runs (the corpus is deterministic);
* `data`: the file's bytes (or, for the few cases of several GiB, a `Sparse` file: its first
  bytes and its size; `write_file(data, path)` writes either);
* `expected`: the `dsv4_ggml.errors` class that opening the file with `dsv4_ggml.Model` must
  raise, `None` for "any Dsv4Error", or one of two sentinels for files that are not errors:
  `LOADS` (a valid variant: it must open and evaluate tokens) and `MAY_LOAD` (a mutant whose
  outcome is not specified: it may open, or raise any Dsv4Error, but must never crash, hang or
  exhaust memory).

`case_list()` returns the cases with their bytes built on demand (`Case.data`); `cases()` yields
the tuples. Building the whole list takes well under a second; a case's bytes take a few ms.

The files are built with a small GGUF parser/serializer of our own (not the `gguf` package's
writer, which refuses most of what we need: duplicate keys, wrong counts, bad offsets) over a
tiny model written by `dsv4_ggml.tiny.write_tiny_model` (3 layers: ratio 0 hashed, ratio 4,
ratio 128; Q8_0 matrices, F32 vectors, an I32 hash table), plus a variant with an MTP block.

Run `python tests/hostile.py [DIR]` to list the corpus (or write every file into DIR).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import re
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from dsv4_ggml import errors  # noqa: E402  (pure Python: does not load the native library)

# --- what a case expects ---------------------------------------------------------------------


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


LOADS = _Sentinel("LOADS")        # a valid variant: opens, and evaluates tokens
MAY_LOAD = _Sentinel("MAY_LOAD")  # unspecified outcome: opens or raises a Dsv4Error, never crashes

NotGGUF, Truncated, Corrupt = errors.NotGGUFError, errors.TruncatedFileError, errors.CorruptFileError
BadKey, MissingKey, WrongArch = errors.BadKeyError, errors.MissingKeyError, errors.WrongArchitectureError
MissingTensor, TensorShape = errors.MissingTensorError, errors.TensorShapeError
TensorType, Unexpected = errors.TensorTypeError, errors.UnexpectedTensorError
ModelFormat, OOM = errors.ModelFormatError, errors.OutOfMemoryError

# --- GGUF encoding -----------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
        U64: "<Q", I64: "<q", F64: "<d"}

# ggml types
T_F32, T_F16, T_Q4_0, T_Q8_0, T_Q8_1, T_Q4_K, T_Q8_K = 0, 1, 2, 8, 9, 12, 15
T_IQ2_XXS, T_IQ4_NL, T_I8, T_I16, T_I32, T_I64, T_F64, T_BF16 = 16, 20, 24, 25, 26, 27, 28, 30
T_TQ2_0, T_MXFP4, T_NVFP4, T_Q1_0 = 35, 39, 40, 41
REMOVED_TYPES = (4, 5, 31, 32, 33, 36, 37, 38)   # Q4_2, Q4_3, Q4_0_4_4 ... IQ4_NL_8_8
GGML_TYPE_COUNT = 43
# quantized types ggml can store but not compute with (no dequantization, no dot product): they
# exist only as the activations' side of a dot product
UNUSABLE_TYPES = (T_Q8_1, T_Q8_K)


@functools.lru_cache(maxsize=None)
def _type_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES
    return {int(k): (int(v[0]), int(v[1])) for k, v in GGML_QUANT_SIZES.items()}


def type_nbytes(ggml_type: int, ne: tuple[int, ...]) -> int:
    blck, size = _type_sizes()[ggml_type]
    return ne[0] // blck * size * math.prod(ne[1:])


def enc_str(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_scalar(vtype: int, value) -> bytes:
    if vtype == STR:
        return enc_str(value)
    return struct.pack(_FMT[vtype], value)


def enc_array(sub: int, values) -> bytes:
    body = struct.pack("<IQ", sub, len(values))
    return body + b"".join(enc_scalar(sub, v) for v in values)


@dataclass
class KV:
    key: bytes
    vtype: int
    body: bytes        # the encoded value (after the type field)


@dataclass
class Tensor:
    name: bytes
    ne: tuple[int, ...]
    ggml_type: int
    data: bytes


@dataclass
class Gguf:
    kvs: list[KV]
    tensors: list[Tensor]
    version: int = 3
    alignment: int = 32          # the layout's alignment (general.alignment is a key like any other)

    def copy(self) -> "Gguf":
        return Gguf([dataclasses.replace(k) for k in self.kvs], [dataclasses.replace(t) for t in self.tensors],
                    self.version, self.alignment)

    # keys
    def kv_index(self, key: str) -> int:
        k = key.encode()
        for i, kv in enumerate(self.kvs):
            if kv.key == k:
                return i
        raise KeyError(key)

    def value(self, key: str):
        kv = self.kvs[self.kv_index(key)]
        return decode_value(kv.vtype, kv.body)

    def set(self, key: str, vtype: int, value, sub: int | None = None) -> "Gguf":
        body = enc_array(sub, value) if vtype == ARR else enc_scalar(vtype, value)
        return self.set_raw(key, vtype, body)

    def set_raw(self, key: str, vtype: int, body: bytes) -> "Gguf":
        try:
            self.kvs[self.kv_index(key)] = KV(key.encode(), vtype, body)
        except KeyError:
            self.kvs.append(KV(key.encode(), vtype, body))
        return self

    def drop(self, key: str) -> "Gguf":
        del self.kvs[self.kv_index(key)]
        return self

    # tensors
    def t_index(self, name: str) -> int:
        n = name.encode()
        for i, t in enumerate(self.tensors):
            if t.name == n:
                return i
        raise KeyError(name)

    def tensor(self, name: str) -> Tensor:
        return self.tensors[self.t_index(name)]

    def retype(self, name: str, ggml_type: int, ne: tuple[int, ...] | None = None) -> "Gguf":
        """Gives a tensor another type (and shape): zero data of the new size."""
        t = self.tensor(name)
        t.ggml_type = ggml_type
        t.ne = tuple(ne or t.ne)
        blck = _type_sizes()[ggml_type][0]
        t.data = bytes(type_nbytes(ggml_type, t.ne)) if t.ne[0] % blck == 0 else bytes(64)
        return self


def decode_value(vtype: int, body: bytes):
    v, _ = _read_value(body, 0, vtype)
    return v


def _read_value(buf: bytes, pos: int, vtype: int):
    if vtype == STR:
        n = struct.unpack_from("<Q", buf, pos)[0]
        return buf[pos + 8:pos + 8 + n], pos + 8 + n
    if vtype == ARR:
        sub, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        out = []
        for _ in range(n):
            v, pos = _read_value(buf, pos, sub)
            out.append(v)
        return out, pos
    fmt = _FMT[vtype]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


def parse(buf: bytes) -> Gguf:
    """Parses a well-formed GGUF (the base models only; no validation)."""
    assert buf[:4] == b"GGUF"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24
    kvs = []
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8:pos + 8 + n]
        vtype = struct.unpack_from("<I", buf, pos + 8 + n)[0]
        start = pos + 12 + n
        _, pos = _read_value(buf, start, vtype)
        kvs.append(KV(key, vtype, buf[start:pos]))
    g = Gguf(kvs, [], version)
    for kv in kvs:
        if kv.key == b"general.alignment":
            g.alignment = decode_value(kv.vtype, kv.body)
    infos = []
    for _ in range(n_tensors):
        n = struct.unpack_from("<Q", buf, pos)[0]
        name = buf[pos + 8:pos + 8 + n]
        pos += 8 + n
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        ne = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(ne), ggml_type, off))
    data_start = -(-pos // g.alignment) * g.alignment
    for name, ne, ggml_type, off in infos:
        nb = type_nbytes(ggml_type, ne)
        g.tensors.append(Tensor(name, ne, ggml_type, buf[data_start + off:data_start + off + nb]))
    return g


@dataclass
class Layout:
    """Where things are in a serialized file: `marks` are (offset, label) of every field start
    in file order; `at` maps a field ("kv[3].type", "ti[5].offset", ...) to its offset."""

    marks: list[tuple[int, str]] = field(default_factory=list)
    at: dict[str, int] = field(default_factory=dict)
    data_start: int = 0
    tensors_end: int = 0    # end of the last tensor's data (a cut at or after it leaves a valid file)
    size: int = 0

    def mark(self, off: int, label: str) -> None:
        self.marks.append((off, label))
        self.at[label] = off


def serialize(g: Gguf, *, n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF",
              offsets: dict[int, int] | None = None, lead: int = 0, detail_arrays: int = 4) -> tuple[bytes, Layout]:
    """Writes `g` (tensor data in order, each at the next multiple of g.alignment after `lead`
    bytes, the file padded to it). `offsets` overrides the recorded data offset of tensor i (the
    data stays in place). Array elements get marks for the first and last `detail_arrays` only."""
    lay = Layout()
    out = bytearray()

    def put(label: str, b: bytes) -> None:
        lay.mark(len(out), label)
        out.extend(b)

    put("magic", magic)
    put("version", struct.pack("<I", g.version))
    put("n_tensors", struct.pack("<Q", len(g.tensors) if n_tensors is None else n_tensors))
    put("n_kv", struct.pack("<Q", len(g.kvs) if n_kv is None else n_kv))
    for i, kv in enumerate(g.kvs):
        p = f"kv[{i}]"
        put(f"{p}.keylen", struct.pack("<Q", len(kv.key)))
        put(f"{p}.key", kv.key)
        put(f"{p}.type", struct.pack("<I", kv.vtype))
        start = len(out)
        lay.mark(start, f"{p}.body")
        if kv.vtype == ARR and len(kv.body) >= 12:
            sub, n = struct.unpack_from("<IQ", kv.body, 0)
            lay.mark(start + 4, f"{p}.arrlen")
            if sub in _FMT:
                es = struct.calcsize(_FMT[sub])
                for j in list(range(min(n, detail_arrays))) + list(range(max(detail_arrays, n - detail_arrays), n)):
                    lay.mark(start + 12 + j * es, f"{p}.elem[{j}]")
            elif sub == STR:
                pos, j = 12, 0
                while pos < len(kv.body) and j < n:
                    if j < detail_arrays or j >= n - detail_arrays:
                        lay.mark(start + pos, f"{p}.elem[{j}]")
                        lay.mark(start + pos + 8, f"{p}.elem[{j}].chars")
                    pos += 8 + struct.unpack_from("<Q", kv.body, pos)[0]
                    j += 1
        elif kv.vtype == STR:
            lay.mark(start + 8, f"{p}.chars")
        out.extend(kv.body)
    al = g.alignment
    rel = []
    pos = lead
    for t in g.tensors:
        pos = -(-pos // al) * al
        rel.append(pos)
        pos += len(t.data)
    for i, t in enumerate(g.tensors):
        p = f"ti[{i}]"
        put(f"{p}.namelen", struct.pack("<Q", len(t.name)))
        put(f"{p}.name", t.name)
        put(f"{p}.ndims", struct.pack("<I", len(t.ne)))
        for d, n in enumerate(t.ne):
            put(f"{p}.ne{d}", struct.pack("<Q", n & 0xFFFFFFFFFFFFFFFF))
        put(f"{p}.type", struct.pack("<I", t.ggml_type))
        off = (offsets or {}).get(i, rel[i])
        put(f"{p}.offset", struct.pack("<Q", off & 0xFFFFFFFFFFFFFFFF))
    lay.mark(len(out), "padding")
    data_start = -(-len(out) // al) * al
    out.extend(bytes(data_start - len(out)))
    lay.data_start = data_start
    lay.mark(data_start, "data")
    for i, t in enumerate(g.tensors):
        lay.mark(data_start + rel[i], f"data[{i}]")
        out.extend(bytes(data_start + rel[i] - len(out)))
        out.extend(t.data)
    lay.tensors_end = len(out)
    out.extend(bytes(-len(out) % al))
    lay.size = len(out)
    return bytes(out), lay


# --- the base models -------------------------------------------------------------------------

# Small enough that a case costs a millisecond, complete enough that every tensor kind appears:
# layer 0 ratio 0 + hash routing, layer 1 ratio 4 (indexer), layer 2 ratio 128; Q8_0 matrices.
SMALL = dict(n_layer=3, compress_ratios=[0, 4, 128], n_hash_layers=1, n_vocab=300, n_embd=64, n_head=2,
             head_dim=64, n_rot=32, q_lora_rank=32, o_groups=2, o_lora_rank=16, indexer_n_head=4,
             indexer_head_dim=64, indexer_top_k=2, n_expert=4, n_expert_used=2, expert_ff=32, n_swa=8,
             context_length=1024, weight_type="q8_0")
N_CTX = 256   # the n_ctx the runner opens every file with (within SMALL's context_length)


@functools.lru_cache(maxsize=None)
def base_bytes(mtp: bool = False) -> bytes:
    from dsv4_ggml.tiny import write_tiny_model
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "base.gguf"
        write_tiny_model(p, seed=0, n_mtp_layers=1 if mtp else 0, **SMALL)
        return p.read_bytes()


@functools.lru_cache(maxsize=None)
def _base(mtp: bool = False) -> Gguf:
    return parse(base_bytes(mtp))


def base(mtp: bool = False) -> Gguf:
    """A fresh (mutable) copy of the parsed base model."""
    return _base(mtp).copy()


@functools.lru_cache(maxsize=None)
def base_layout(mtp: bool = False) -> tuple[bytes, Layout]:
    data, lay = serialize(_base(mtp))
    assert data == base_bytes(mtp), "the serializer must reproduce the base file byte for byte"
    return data, lay


def patched(data: bytes, *patches: tuple[int, bytes]) -> bytes:
    b = bytearray(data)
    for off, new in patches:
        b[off:off + len(new)] = new
    return bytes(b)


def _dtype_rules() -> dict[str, tuple[str, bool]]:
    """GGUF tensor name pattern -> (dtype rule, required), from the model's DSL."""
    from codegen.v4 import MODEL
    out = {}
    for t in list(MODEL.global_tensors) + list(MODEL.layer_tensors):
        out[t.name] = (t.dtype.name, t.required)
    return out


def dtype_rule(name: str) -> tuple[str, bool]:
    rules = _dtype_rules_cached()
    if name in rules:
        return rules[name]
    m = re.match(r"blk\.(\d+)\.(.*)", name)
    if m:
        return rules["blk.{il}." + m.group(2)]
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _dtype_rules_cached():
    return _dtype_rules()


def type_allowed(rule: str, ggml_type: int) -> bool:
    floats = (T_F32, T_F16, T_BF16)
    if rule == "F32":
        return ggml_type == T_F32
    if rule == "I32":
        return ggml_type == T_I32
    if rule == "FLOAT":
        return ggml_type in floats
    quantized = ggml_type in _type_sizes() and _type_sizes()[ggml_type][0] > 1
    return ggml_type in floats or (quantized and ggml_type not in UNUSABLE_TYPES)


# --- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sparse:
    """A file of `size` bytes that starts with `head` and is zeros after it, written sparse (the
    zeros take no disk): for tensors of several GiB that only their shapes matter for."""

    head: bytes
    size: int


def write_file(data: "bytes | Sparse", path: str | os.PathLike) -> None:
    """Writes a case's data (bytes, or a Sparse file) to `path`."""
    with open(path, "wb") as f:
        if isinstance(data, Sparse):
            f.write(data.head)
            f.truncate(data.size)
        else:
            f.write(data)


@dataclass
class Case:
    name: str
    make: Callable[[], bytes] = field(repr=False)
    expected: object     # a Dsv4Error subclass, None (any Dsv4Error), LOADS or MAY_LOAD

    @property
    def data(self) -> "bytes | Sparse":
        return self.make()

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]


def _ser(fn: Callable[[], Gguf], **kw) -> Callable[[], bytes]:
    return lambda: serialize(fn(), **kw)[0]


def _edit(mtp: bool = False, **kw) -> Callable[[Callable[[Gguf], object]], Callable[[], bytes]]:
    """Decorator-ish helper: `_edit()(lambda g: g.set(...))` -> a bytes factory."""
    def wrap(edit: Callable[[Gguf], object]) -> Callable[[], bytes]:
        def make() -> bytes:
            g = base(mtp)
            edit(g)
            return serialize(g, **kw)[0]
        return make
    return wrap


class _Builder:
    def __init__(self) -> None:
        self.cases: list[Case] = []
        self.names: set[str] = set()

    def add(self, name: str, make: Callable[[], bytes], expected) -> None:
        assert name not in self.names, f"duplicate case name {name}"
        self.names.add(name)
        self.cases.append(Case(name, make, expected))

    def edit(self, name: str, expected, edit: Callable[[Gguf], object], mtp: bool = False, **kw) -> None:
        self.add(name, _edit(mtp, **kw)(edit), expected)


K = "deepseek4."


def _valid(b: _Builder) -> None:
    """Valid variants: each must open and evaluate (proves the corpus' edits are surgical)."""
    b.add("valid/base", lambda: base_bytes(False), LOADS)
    b.add("valid/base-with-mtp-block", lambda: base_bytes(True), LOADS)
    b.edit("valid/version-2", LOADS, lambda g: setattr(g, "version", 2))
    for al in (8, 16, 64, 4096):
        def edit(g, al=al):
            g.alignment = al
            g.set("general.alignment", U32, al)
        b.edit(f"valid/alignment-{al}", LOADS, edit)

    # integer keys in any integer type whose value fits, float keys as f64
    b.edit("valid/u32-key-as-u64", LOADS, lambda g: g.set(K + "block_count", U64, 3))
    b.edit("valid/u32-key-as-i64", LOADS, lambda g: g.set(K + "expert_count", I64, 4))
    b.edit("valid/u32-key-as-u8", LOADS, lambda g: g.set(K + "attention.sliding_window", U8, 8))
    b.edit("valid/u32-key-as-i16", LOADS, lambda g: g.set(K + "attention.head_count", I16, 2))
    b.edit("valid/f32-key-as-f64", LOADS, lambda g: g.set(K + "rope.freq_base", F64, 10000.0))
    b.edit("valid/compress-ratios-u32", LOADS, lambda g: g.set(K + "attention.compress_ratios", ARR, [0, 4, 128, 0], U32))
    b.edit("valid/compress-ratios-i64", LOADS, lambda g: g.set(K + "attention.compress_ratios", ARR, [0, 4, 128], I64))
    b.edit("valid/compress-ratios-u8-exact", LOADS, lambda g: g.set(K + "attention.compress_ratios", ARR, [0, 4, 128], U8))
    b.edit("valid/swiglu-scalar", LOADS, lambda g: g.set(K + "swiglu_clamp_exp", F32, 1.0))
    b.edit("valid/swiglu-f64-array", LOADS, lambda g: g.set(K + "swiglu_clamp_exp", ARR, [1.0] * 3, F64))
    b.edit("valid/expert-ff-per-layer", LOADS, lambda g: g.set(K + "expert_feed_forward_length", ARR, [32] * 3, U32))
    b.edit("valid/no-shexp-clamp", LOADS, lambda g: g.drop(K + "swiglu_clamp_shexp"))
    b.edit("valid/no-add-bos", LOADS, lambda g: g.drop("tokenizer.ggml.add_bos_token"))
    b.edit("valid/unknown-keys", LOADS, lambda g: (g.set("zz.unknown", ARR, [1, 2, 3], U64),
                                                 g.set("deepseek4.block_count\0", U32, 99),
                                                 g.set("\xff\xfe", STR, "\0\0")))
    # keys the loader ignores may have any type
    for key in ("embedding_length_out", "feed_forward_length", "rope.scaling.yarn_beta_fast"):
        b.edit(f"valid/ignored-key-{key}-as-string", LOADS, lambda g, key=key: g.set(K + key, STR, "nonsense"))
    b.edit("valid/token-type-wrong-length", LOADS,
           lambda g: g.set("tokenizer.ggml.token_type", ARR, [1, 2], I32))
    b.edit("valid/token-type-as-f32", LOADS, lambda g: g.set("tokenizer.ggml.token_type", ARR, [1.0] * 300, F32))
    b.edit("valid/empty-merges", LOADS, lambda g: g.set("tokenizer.ggml.merges", ARR, [], STR))
    b.edit("valid/optional-vision-bias", LOADS,
           lambda g: g.tensors.append(Tensor(b"blk.1.exp_probs_b_vl.bias", (4,), T_F32, bytes(16))))
    b.edit("valid/trailing-unit-dim", LOADS,
           lambda g: setattr(g.tensor("blk.0.attn_q_a.weight"), "ne", (64, 32, 1)))
    b.edit("valid/tensors-in-reverse-order", LOADS, lambda g: g.tensors.reverse())

    def shared_data(g):   # two tensors with the same shape and type may share their bytes
        g.tensors.append(Tensor(b"blk.1.exp_probs_b_vl.bias", (4,), T_F32, bytes(16)))
    b.edit("valid/vision-bias-shares-data", LOADS, shared_data)
    for t in (T_F16, T_BF16):
        b.edit(f"valid/hc-fn-as-{t}", LOADS, lambda g, t=t: g.retype("blk.0.hc_attn_fn.weight", t))
    for t in (T_F32, T_F16, T_BF16, T_Q4_0, T_IQ4_NL, T_MXFP4, T_NVFP4):
        b.edit(f"valid/weight-as-type-{t}", LOADS, lambda g, t=t: g.retype("blk.1.attn_kv.weight", t))
    b.edit("valid/embedding-as-q4_0", LOADS, lambda g: g.retype("token_embd.weight", T_Q4_0))


def _magic_version_counts(b: _Builder) -> None:
    data = lambda: base_bytes(False)  # noqa: E731
    for magic in (b"FUGG", b"gguf", b"GGML", b"GGJT", b"GGLA", b"\0\0\0\0", b"\x7fELF", b"PK\x03\x04", b"GGU\0"):
        b.add(f"magic/{magic.hex()}", lambda m=magic: patched(data(), (0, m)), NotGGUF)
    for n in (0, 1, 2, 3):
        b.add(f"magic/only-{n}-bytes", lambda n=n: data()[:n], NotGGUF)
    b.add("magic/text-file", lambda: b"# not a model\n" * 100, NotGGUF)
    for v in (0, 1, 4, 5, 0xFFFF, 0x10000, 0x03000000, 0x7FFFFFFF, 0xFFFFFFFF):
        b.add(f"version/{v:#x}", lambda v=v: patched(data(), (4, struct.pack("<I", v))), Corrupt)

    _, lay = base_layout()
    n_kv = len(_base().kvs)
    n_t = len(_base().tensors)
    huge = (2**32, 2**40, 2**48, 2**61, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
    for v in huge:   # 2^32 entries need ~2^37 bytes: "truncated" or "corrupt" are both fair
        exp = Corrupt if v >= 2**40 else errors.GGUFError
        b.add(f"counts/n_kv-{v:#x}", lambda v=v: patched(data(), (16, struct.pack("<Q", v))), exp)
        b.add(f"counts/n_tensors-{v:#x}", lambda v=v: patched(data(), (8, struct.pack("<Q", v))), exp)
    for v in (0, 1, n_kv - 1, n_kv + 1, n_kv + 1000, 10**6, 2**31):
        b.add(f"counts/n_kv-{v}", lambda v=v: patched(data(), (16, struct.pack("<Q", v))), None)
    b.add("counts/n_tensors-0", lambda: patched(data(), (8, struct.pack("<Q", 0))), MissingTensor)
    b.add("counts/n_tensors-minus-1", lambda: patched(data(), (8, struct.pack("<Q", n_t - 1))), MissingTensor)
    for v in (n_t + 1, n_t + 1000, 10**6, 2**31):
        b.add(f"counts/n_tensors-{v}", lambda v=v: patched(data(), (8, struct.pack("<Q", v))), None)
    # counts written consistently but the lists do not match them
    b.edit("counts/one-more-kv-declared", None, lambda g: None, n_kv=n_kv + 1)
    b.edit("counts/one-more-tensor-declared", None, lambda g: None, n_tensors=n_t + 1)


def _truncations(b: _Builder) -> None:
    """Cuts at every field boundary (and one byte on either side), and at evenly spaced offsets
    inside every section. A cut before the end of the last tensor's data is always an error."""
    data, lay = base_layout()
    cuts: dict[int, str] = {}
    for off, label in lay.marks:
        for d in (-1, 0, 1):
            c = off + d
            if 0 <= c < lay.tensors_end:
                cuts.setdefault(c, f"{label}{d:+d}" if d else label)
    # evenly spaced inside each section
    sections = [("header", 0, lay.at["kv[0].keylen"]), ("kv", lay.at["kv[0].keylen"], lay.at["ti[0].namelen"]),
                ("tensor-info", lay.at["ti[0].namelen"], lay.at["padding"]), ("padding", lay.at["padding"], lay.data_start),
                ("data", lay.data_start, lay.tensors_end)]
    for sec, lo, hi in sections:
        n = 64 if sec in ("kv", "data", "tensor-info") else 8
        for k in range(n):
            c = lo + (hi - lo) * k // n
            cuts.setdefault(c, f"{sec}@{k}/{n}")
    for c in sorted(cuts):
        b.add(f"trunc/{c}-{cuts[c]}", lambda c=c: data[:c], NotGGUF if c < 4 else Truncated)
    # a cut in the padding after the last tensor leaves a valid file
    if lay.size > lay.tensors_end:
        b.add("valid/cut-in-final-padding", lambda: data[:lay.tensors_end], LOADS)


def _kv_structure(b: _Builder) -> None:
    data, lay = base_layout()
    g0 = _base()
    targets = {0: "first", g0.kv_index(K + "block_count"): "block_count",
               g0.kv_index("tokenizer.ggml.tokens"): "tokens", g0.kv_index(K + "attention.compress_ratios"): "ratios",
               len(g0.kvs) - 1: "last"}
    for i, what in targets.items():
        p = f"kv[{i}]"
        keylen_at, type_at, body_at = lay.at[f"{p}.keylen"], lay.at[f"{p}.type"], lay.at[f"{p}.body"]
        for v, exp in ((0, Corrupt), (2**63, Corrupt), (2**64 - 1, Corrupt), (2**40 + 1, Corrupt),
                       (lay.size - keylen_at - 8 + 1, Truncated), (lay.size, Truncated)):
            b.add(f"kv/{what}-keylen-{v:#x}", lambda a=keylen_at, v=v: patched(data, (a, struct.pack("<Q", v))), exp)
        for v in (13, 14, 255, 0x80000000, 0xFFFFFFFF):
            b.add(f"kv/{what}-type-{v:#x}", lambda a=type_at, v=v: patched(data, (a, struct.pack("<I", v))), Corrupt)
        # another valid type: the value bytes are read differently (any error, or a load)
        for v in range(13):
            if v == g0.kvs[i].vtype:
                continue
            b.add(f"kv/{what}-retyped-{v}", lambda a=type_at, v=v: patched(data, (a, struct.pack("<I", v))), MAY_LOAD)
        kv = g0.kvs[i]
        if kv.vtype == ARR:
            arrlen_at = lay.at[f"{p}.arrlen"]
            for v in (13, 0xFFFFFFFF):
                b.add(f"kv/{what}-elemtype-{v:#x}", lambda a=body_at, v=v: patched(data, (a, struct.pack("<I", v))), Corrupt)
            b.add(f"kv/{what}-nested-array", lambda a=body_at: patched(data, (a, struct.pack("<I", ARR))), Corrupt)
            for v in (2**40, 2**61, 2**62, 2**63, 2**64 - 1):
                b.add(f"kv/{what}-arrlen-{v:#x}", lambda a=arrlen_at, v=v: patched(data, (a, struct.pack("<Q", v))), Corrupt)
            n = struct.unpack_from("<Q", data, arrlen_at)[0]
            for v in (n + 1, n - 1, 0, 10**7):
                b.add(f"kv/{what}-arrlen-{v}", lambda a=arrlen_at, v=v: patched(data, (a, struct.pack("<Q", v))), None)
        if kv.vtype == STR:
            for v in (2**63, 2**64 - 1, 2**41):
                b.add(f"kv/{what}-strlen-{v:#x}", lambda a=body_at, v=v: patched(data, (a, struct.pack("<Q", v))), Corrupt)
    # a string inside the tokens array with an absurd length
    tok = g0.kv_index("tokenizer.ggml.tokens")
    for j in (0, 299):
        at = lay.at[f"kv[{tok}].elem[{j}]"]
        for v in (2**63, 2**64 - 1, lay.size):
            exp = Corrupt if v > 2**40 else Truncated
            b.add(f"kv/token-{j}-strlen-{v:#x}", lambda a=at, v=v: patched(data, (a, struct.pack("<Q", v))), exp)

    # duplicates
    for key in ("general.architecture", K + "block_count", "tokenizer.ggml.tokens", K + "attention.compress_ratios"):
        def dup(g, key=key):
            kv = g.kvs[g.kv_index(key)]
            g.kvs.append(dataclasses.replace(kv))
        b.edit(f"kv/duplicate-{key}", Corrupt, dup)

        def dup_other(g, key=key):   # same key, another value and type
            g.kvs.insert(0, KV(key.encode(), U32, struct.pack("<I", 1)))
        b.edit(f"kv/duplicate-retyped-{key}", Corrupt, dup_other)
    b.edit("kv/empty-key-appended", Corrupt, lambda g: g.kvs.append(KV(b"", U32, struct.pack("<I", 1))))
    b.edit("kv/binary-key-unknown-type", Corrupt, lambda g: g.kvs.append(KV(b"\0\xff" * 2000, 77, b"")))
    b.edit("kv/binary-key-nested-array", Corrupt,
           lambda g: g.kvs.append(KV(b"\n\0\x1b[2J" * 500, ARR, struct.pack("<IQ", ARR, 0))))
    b.edit("kv/bool-byte-2", BadKey, lambda g: g.set_raw(K + "expert_weights_norm", BOOL, b"\x02"))
    b.edit("kv/bool-byte-ff-optional", BadKey, lambda g: g.set_raw("tokenizer.ggml.add_bos_token", BOOL, b"\xff"))


def _alignment_offsets(b: _Builder) -> None:
    for vt, v in ((U8, 32), (U16, 32), (I32, 32), (U64, 32), (I64, 32), (F32, 32.0), (STR, "32"), (BOOL, 1)):
        b.edit(f"align/type-{vt}", Corrupt, lambda g, vt=vt, v=v: g.set("general.alignment", vt, v))
    b.edit("align/type-array", Corrupt, lambda g: g.set("general.alignment", ARR, [32], U32))
    for v in (0, 3, 24, 33, 48, 96, 2**31 + 1, 0xFFFFFFFF):
        b.edit(f"align/value-{v:#x}", Corrupt, lambda g, v=v: g.set("general.alignment", U32, v))
    # powers of two below the 8 the GGUF specification requires, with a layout that follows them
    for v in (1, 2, 4):
        def small(g, v=v):
            g.alignment = v
            g.set("general.alignment", U32, v)
        b.edit(f"align/below-8-{v}", Corrupt, small)

    # alignment 1 with every tensor at an address that is 1 mod 4 (the I32 hash table included):
    # f32/i32 data would be read misaligned (undefined behaviour, seen by UBSan)
    def odd() -> bytes:
        g = base()
        g.alignment = 1
        g.set("general.alignment", U32, 1)
        _, lay = serialize(g)
        return serialize(g, lead=(1 - lay.data_start) % 4)[0]
    b.add("align/below-8-odd-offsets", odd, Corrupt)
    for v in (2**31, 2**20, 64):   # a power of two the offsets are not multiples of
        b.edit(f"align/offsets-not-multiple-of-{v:#x}", Corrupt, lambda g, v=v: g.set("general.alignment", U32, v))

    data, lay = base_layout()
    g0 = _base()
    n_t = len(g0.tensors)
    picks = {0: "first", g0.t_index("blk.0.ffn_gate_tid2eid.weight"): "tid2eid", n_t - 1: "last",
             g0.t_index("blk.1.ffn_gate_exps.weight"): "exps"}
    for i, what in picks.items():
        at = lay.at[f"ti[{i}].offset"]
        cur = struct.unpack_from("<Q", data, at)[0]
        for d in (1, 4, 16, 31):
            b.add(f"offset/{what}-misaligned-plus-{d}", lambda a=at, v=cur + d: patched(data, (a, struct.pack("<Q", v))), Corrupt)
        rel_end = lay.size - lay.data_start
        for v, exp in ((rel_end, Truncated), (rel_end - 32, Truncated), (2**40, Corrupt), (2**63, Corrupt),
                       (2**64 - 32, Corrupt), (2**64 - 2**20, Corrupt)):
            b.add(f"offset/{what}-at-{v:#x}", lambda a=at, v=v: patched(data, (a, struct.pack("<Q", v))), exp)
        # another tensor's data: same bytes, any outcome (shapes/types are still checked)
        b.add(f"offset/{what}-aliases-offset-0", lambda a=at: patched(data, (a, struct.pack("<Q", 0))), MAY_LOAD)


def _tensor_infos(b: _Builder) -> None:
    data, lay = base_layout()
    g0 = _base()
    n_t = len(g0.tensors)
    picks = {0: "first", g0.t_index("output_norm.weight"): "1d", g0.t_index("blk.1.ffn_down_exps.weight"): "3d",
             g0.t_index("blk.0.ffn_gate_tid2eid.weight"): "tid2eid", n_t - 1: "last"}
    for i, what in picks.items():
        t = g0.tensors[i]
        p = f"ti[{i}]"
        nl, nd, ty = lay.at[f"{p}.namelen"], lay.at[f"{p}.ndims"], lay.at[f"{p}.type"]
        for v, exp in ((0, Corrupt), (64, Corrupt), (2**63, Corrupt), (2**64 - 1, Corrupt), (2**41, Corrupt)):
            b.add(f"tinfo/{what}-namelen-{v:#x}", lambda a=nl, v=v: patched(data, (a, struct.pack("<Q", v))), exp)
        for v in (0, 5, 8, 0x80000000, 0xFFFFFFFF):
            b.add(f"tinfo/{what}-ndims-{v:#x}", lambda a=nd, v=v: patched(data, (a, struct.pack("<I", v))), Corrupt)
        for d in range(len(t.ne)):
            ne_at = lay.at[f"{p}.ne{d}"]
            for v in (2**63, 2**64 - 1, 2**63 + 5):   # negative as int64
                b.add(f"tinfo/{what}-ne{d}-{v:#x}", lambda a=ne_at, v=v: patched(data, (a, struct.pack("<Q", v))), Corrupt)
            b.add(f"tinfo/{what}-ne{d}-zero", lambda a=ne_at: patched(data, (a, struct.pack("<Q", 0))), TensorShape)
        if len(t.ne) >= 2:
            a0 = lay.at[f"{p}.ne0"]
            b.add(f"tinfo/{what}-ne-product-overflows",
                  lambda a=a0: patched(data, (a, struct.pack("<QQ", 2**32, 2**32 + 1))), Corrupt)
            b.add(f"tinfo/{what}-ne-product-2^62",
                  lambda a=a0: patched(data, (a, struct.pack("<QQ", 2**31, 2**31))), Corrupt)
            b.add(f"tinfo/{what}-bytes-overflow",   # elements fit in int64, bytes (x4 or x34/32) do not
                  lambda a=a0: patched(data, (a, struct.pack("<QQ", 2**32, 2**30 + 1))), Corrupt)
        for v in REMOVED_TYPES + (GGML_TYPE_COUNT, 44, 99, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF):
            b.add(f"tinfo/{what}-type-{v:#x}", lambda a=ty, v=v: patched(data, (a, struct.pack("<I", v))), Corrupt)
    # names
    long = b"blk.0." + b"x" * 80
    b.edit("tinfo/name-64-bytes", Corrupt, lambda g: setattr(g.tensors[3], "name", b"n" * 64))
    b.edit("tinfo/name-1000-bytes", Corrupt, lambda g: setattr(g.tensors[3], "name", long * 12))
    b.edit("tinfo/name-63-bytes-unknown", Unexpected, lambda g: g.tensors.append(Tensor(b"m" * 63, (1,), T_F32, bytes(4))))
    b.edit("tinfo/name-with-nul", MissingTensor, lambda g: setattr(g.tensors[0], "name", g.tensors[0].name + b"\0x"))
    b.edit("tinfo/name-binary", MissingTensor, lambda g: setattr(g.tensors[0], "name", b"\xff\xfe\x1b[31m"))
    b.edit("tinfo/name-empty", Corrupt, lambda g: setattr(g.tensors[2], "name", b""))

    def dup_rename(g):   # a tensor renamed to the name of another
        g.tensors[4].name = g.tensors[1].name
    b.edit("tinfo/duplicate-name-renamed", Corrupt, dup_rename)
    b.edit("tinfo/duplicate-name-appended", Corrupt, lambda g: g.tensors.append(dataclasses.replace(g.tensors[-1])))
    b.edit("tinfo/duplicate-name-same-data", Corrupt,
           lambda g: g.tensors.insert(0, dataclasses.replace(g.tensor("blk.0.ffn_gate_tid2eid.weight"))))


def _tensor_sets(b: _Builder) -> None:
    g0 = _base()
    for t in g0.tensors:
        name = t.name.decode()
        b.edit(f"missing/{name}", MissingTensor, lambda g, i=g0.t_index(name): g.tensors.pop(i))
    gm = _base(True)
    for t in gm.tensors:
        name = t.name.decode()
        if name.startswith("blk.3."):
            required = dtype_rule(name)[1]
            b.edit(f"missing-mtp/{name}", MissingTensor if required else LOADS,
                   lambda g, i=gm.t_index(name): g.tensors.pop(i), mtp=True)

    def extra(name: str, ne, ggml_type=T_F32):
        return lambda g: g.tensors.append(Tensor(name.encode(), ne, ggml_type, bytes(type_nbytes(ggml_type, ne))))
    for name, ne in (("mystery.weight", (4,)), ("blk.3.attn_norm.weight", (64,)), ("blk.512.attn_norm.weight", (64,)),
                     ("blk.-1.attn_norm.weight", (64,)), ("blk.0.exp_probs_b.bias", (4,)),
                     ("blk.0.attn_compressor_kv.weight", (64, 64)), ("blk.2.indexer.proj.weight", (64, 4)),
                     ("blk.0.indexer_compressor_norm.weight", (64,)), ("blk.1.ffn_gate_tid2eid.weight", (2, 300)),
                     ("blk.2.nextn.eh_proj.weight", (128, 64)), ("blk.2.nextn.enorm.weight", (64,)),
                     ("output_hc_fn.weight.", (256, 4)), ("Token_embd.weight", (64, 300))):
        b.edit(f"extra/{name}", Unexpected, extra(name, ne, T_I32 if "tid2eid" in name else T_F32))
    b.edit("extra/optional-with-wrong-shape", TensorShape, extra("blk.1.exp_probs_b_vl.bias", (5,)))
    b.edit("extra/optional-with-wrong-type", TensorType, extra("blk.1.exp_probs_b_vl.bias", (4,), T_F16))
    b.edit("extra/mtp-block-extra-tensor", Unexpected, extra("blk.4.attn_norm.weight", (64,)), mtp=True)
    # a bundled DSpark/DFlash draft head (llama.cpp's names) loads whatever its shapes and types;
    # names near them are still unexpected
    for name, ne, ggml_type in (("markov_w1.weight", (16, 300), T_F32), ("markov_w2.scale", (1,), T_F32),
                                ("conf_proj.bias", (7, 3), T_I32), ("fc.weight", (128, 64), T_F16),
                                ("blk.7.attn_conv_base.weight", (4,), T_F32), ("d2t", (300,), T_I32)):
        b.edit(f"valid/draft-head-{name}", LOADS, extra(name, ne, ggml_type))
    for name in ("markov_w1", "markov_w1.weight.", "blk.x.ffn_conv_proj.weight", "blk.7.attn_conv_base.bias",
                 "selector_hidden.bias", "d2t.weight"):
        b.edit(f"extra/near-draft-head-{name}", Unexpected, extra(name, (4,)))

    # shapes
    for name in ("token_embd.weight", "blk.0.attn_q_b.weight", "blk.1.attn_output_a.weight", "blk.2.ffn_up_exps.weight",
                 "blk.1.indexer_compressor_ape.weight", "output_hc_fn.weight"):
        ne = g0.tensor(name).ne

        def swap(g, name=name, ne=ne):
            g.retype(name, g.tensor(name).ggml_type, (ne[1], ne[0]) + ne[2:])
        blck = _type_sizes()[g0.tensor(name).ggml_type][0]
        b.edit(f"shape/{name}-transposed", Corrupt if ne[1] % blck else TensorShape, swap)

        def grow(g, name=name, ne=ne):
            g.retype(name, g.tensor(name).ggml_type, (ne[0], ne[1] + 1) + ne[2:])
        b.edit(f"shape/{name}-one-row-more", TensorShape, grow)

        def flat(g, name=name, ne=ne):
            t = g.tensor(name)
            t.ne = (ne[0], math.prod(ne[1:]))  # same bytes, fewer dims
        if len(ne) > 2:
            b.edit(f"shape/{name}-flattened", TensorShape, flat)

        def extra_dim(g, name=name, ne=ne):
            g.tensor(name).ne = ne + (1,) * (4 - len(ne) - 1) + (2,)
            g.retype(name, g.tensor(name).ggml_type)
        b.edit(f"shape/{name}-extra-dim-2", TensorShape, extra_dim)
    b.edit("shape/1d-as-2d", TensorShape, lambda g: setattr(g.tensor("output_norm.weight"), "ne", (32, 2)))
    b.edit("shape/scale-empty", TensorShape, lambda g: g.retype("output_hc_scale.weight", T_F32, (0,)))
    b.edit("shape/q8_0-columns-not-multiple-of-32", Corrupt,
           lambda g: setattr(g.tensor("blk.0.attn_kv.weight"), "ne", (48, 64)))


def _dtypes(b: _Builder) -> None:
    g0 = _base()
    kinds = (T_F32, T_F16, T_BF16, T_Q8_0, T_Q4_0, T_Q4_K, T_I8, T_I16, T_I32, T_I64, T_F64, T_Q8_1, T_Q8_K, T_TQ2_0,
             T_Q1_0)
    for t in g0.tensors:
        name = t.name.decode()
        rule = dtype_rule(name)[0]
        for k in kinds:
            if k == t.ggml_type:
                continue
            blck = _type_sizes()[k][0]
            if t.ne[0] % blck:
                exp = Corrupt
            elif type_allowed(rule, k):
                exp = LOADS
            else:
                exp = TensorType
            # keep the corpus small: every type on a few tensors, the rest on all
            if exp is LOADS and not re.match(r"(token_embd|output|blk\.1\.attn_kv|blk\.2\.ffn_down_exps|blk\.1\.indexer\.proj|"
                                             r"blk\.0\.hc_ffn_fn|blk\.2\.attn_compressor_ape)\.", name):
                continue
            b.edit(f"dtype/{name}-as-{k}", exp, lambda g, name=name, k=k: g.retype(name, k))


def _keys(b: _Builder) -> None:
    g0 = _base()
    # every key the loader reads, by kind
    u32 = ["block_count", "context_length", "embedding_length", "attention.head_count", "attention.head_count_kv",
           "attention.key_length", "attention.value_length", "rope.dimension_count",
           "rope.scaling.original_context_length", "attention.q_lora_rank", "attention.sliding_window",
           "attention.output_group_count", "attention.output_lora_rank", "attention.indexer.head_count",
           "attention.indexer.key_length", "attention.indexer.top_k", "expert_count", "expert_used_count",
           "expert_shared_count", "expert_gating_func", "hyper_connection.count",
           "hyper_connection.sinkhorn_iterations", "hash_layer_count"]
    u32 = [K + k for k in u32] + ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
    f32 = [K + k for k in ("rope.freq_base", "rope.scaling.factor", "attention.layer_norm_rms_epsilon",
                           "attention.compress_rope_freq_base", "expert_weights_scale", "hyper_connection.epsilon")]
    strs = [K + "rope.scaling.type", "tokenizer.ggml.model", "tokenizer.ggml.pre", "general.architecture"]
    optional = {"tokenizer.ggml.add_bos_token", K + "swiglu_clamp_shexp", K + "nextn_predict_layers"}
    for kv in g0.kvs:
        key = kv.key.decode()
        if key in optional:
            b.edit(f"dropkey/{key}", LOADS, lambda g, key=key: g.drop(key))
        elif key in u32 + f32 + strs or key in (K + "attention.compress_ratios", K + "swiglu_clamp_exp",
                                                 K + "expert_feed_forward_length", K + "expert_weights_norm",
                                                 "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            b.edit(f"dropkey/{key}", MissingKey, lambda g, key=key: g.drop(key))
    for key in u32:
        v = g0.value(key)
        for name, vt, val in (("string", STR, str(v)), ("f32", F32, float(v)), ("f64", F64, float(v)),
                              ("bool", BOOL, 1), ("array", ARR, [v])):
            b.edit(f"keytype/{key}-as-{name}", BadKey,
                   lambda g, key=key, vt=vt, val=val: g.set(key, vt, val, U32 if vt == ARR else None))
        b.edit(f"keytype/{key}-negative", BadKey, lambda g, key=key: g.set(key, I32, -1))
        b.edit(f"keytype/{key}-i64-min", BadKey, lambda g, key=key: g.set(key, I64, -2**63))
        b.edit(f"keytype/{key}-u64-2^32", BadKey, lambda g, key=key, v=v: g.set(key, U64, 2**32 + v))
        b.edit(f"keytype/{key}-as-u64", LOADS, lambda g, key=key, v=v: g.set(key, U64, v))
    for key in f32:
        v = g0.value(key)
        for name, vt, val in (("u32", U32, int(v)), ("string", STR, str(v)), ("bool", BOOL, 1),
                              ("array", ARR, [v])):
            b.edit(f"keytype/{key}-as-{name}", BadKey,
                   lambda g, key=key, vt=vt, val=val: g.set(key, vt, val, F32 if vt == ARR else None))
        for name, val in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):
            b.edit(f"keytype/{key}-{name}", BadKey, lambda g, key=key, val=val: g.set(key, F32, val))
        b.edit(f"keytype/{key}-f64-1e300", BadKey, lambda g, key=key: g.set(key, F64, 1e300))
        b.edit(f"keytype/{key}-f64-nan", BadKey, lambda g, key=key: g.set(key, F64, math.nan))
    for key in strs:
        for name, vt, val in (("u32", U32, 1), ("array", ARR, [g0.value(key)])):
            b.edit(f"keytype/{key}-as-{name}", BadKey,
                   lambda g, key=key, vt=vt, val=val: g.set(key, vt, val, STR if vt == ARR else None))
    b.edit("keytype/architecture-empty", WrongArch, lambda g: g.set("general.architecture", STR, ""))
    b.edit("keytype/architecture-deepseek2", WrongArch, lambda g: g.set("general.architecture", STR, "deepseek2"))
    b.edit("keytype/architecture-with-nul", WrongArch, lambda g: g.set("general.architecture", STR, "deepseek4\0"))
    b.edit("keytype/architecture-4k-binary", WrongArch, lambda g: g.set("general.architecture", STR, b"\xff\x00\x1b" * 1400))
    for key in (K + "expert_weights_norm", "tokenizer.ggml.add_bos_token"):
        for name, vt, val in (("u8", U8, 1), ("u32", U32, 1), ("string", STR, "true"), ("array", ARR, [True])):
            b.edit(f"keytype/{key}-as-{name}", BadKey,
                   lambda g, key=key, vt=vt, val=val: g.set(key, vt, val, BOOL if vt == ARR else None))
    ratios = K + "attention.compress_ratios"
    for name, vt, val, sub in (("scalar", U32, 0, None), ("f32-array", ARR, [0.0, 4.0, 128.0, 0.0], F32),
                               ("string-array", ARR, ["0", "4", "128", "0"], STR), ("bool-array", ARR, [0, 1, 1, 0], BOOL),
                               ("f64-array", ARR, [0.0, 4.0, 128.0], F64)):
        b.edit(f"keytype/{ratios}-as-{name}", BadKey, lambda g, vt=vt, val=val, sub=sub: g.set(ratios, vt, val, sub))
    for key in (K + "swiglu_clamp_exp", K + "swiglu_clamp_shexp"):
        for name, vt, val, sub in (("u32", U32, 1, None), ("string", STR, "1.0", None), ("u32-array", ARR, [1] * 3, U32),
                                   ("string-array", ARR, ["1"] * 3, STR), ("bool-array", ARR, [1] * 3, BOOL),
                                   ("short-array", ARR, [1.0] * 2, F32), ("long-array", ARR, [1.0] * 4, F32),
                                   ("empty-array", ARR, [], F32), ("nan-entry", ARR, [1.0, math.nan, 1.0], F32),
                                   ("inf-scalar", F32, math.inf, None)):
            b.edit(f"keytype/{key}-as-{name}", BadKey, lambda g, key=key, vt=vt, val=val, sub=sub: g.set(key, vt, val, sub))
    ff = K + "expert_feed_forward_length"
    for name, vt, val, sub in (("string", STR, "32", None), ("f32", F32, 32.0, None), ("f32-array", ARR, [32.0] * 3, F32),
                               ("short-array", ARR, [32] * 2, U32), ("long-array", ARR, [32] * 4, U32),
                               ("negative-entry", ARR, [32, -1, 32], I32), ("zero-entry", ARR, [32, 0, 32], U32),
                               ("zero", U32, 0, None), ("huge-entry", ARR, [32, 2**40, 32], U64)):
        b.edit(f"keytype/{ff}-as-{name}", BadKey, lambda g, vt=vt, val=val, sub=sub: g.set(ff, vt, val, sub))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        for name, vt, val, sub in (("string", STR, "a b", None), ("u32-array", ARR, [1, 2, 3], U32), ("u32", U32, 3, None)):
            b.edit(f"keytype/{key}-as-{name}", BadKey, lambda g, key=key, vt=vt, val=val, sub=sub: g.set(key, vt, val, sub))
    b.edit("keytype/tokens-empty", BadKey, lambda g: g.set("tokenizer.ggml.tokens", ARR, [], STR))
    b.edit("keytype/tokens-one-fewer", TensorShape,
           lambda g: g.set("tokenizer.ggml.tokens", ARR, g.value("tokenizer.ggml.tokens")[:-1], STR))


def kset(key, vt, val, sub=None):
    """An edit setting metadata key `key` (`deepseek4.` implied, unless tokenizer./general.)."""
    return lambda g: g.set(key if key.startswith(("tokenizer.", "general.")) else K + key, vt, val, sub)


def _hparams(b: _Builder) -> None:
    """Values of the right type that contradict each other or the tensors."""
    R = "attention.compress_ratios"
    cases = [
        ("block_count-0", kset("block_count", U32, 0), BadKey),
        ("block_count-513", kset("block_count", U32, 513), BadKey),
        ("block_count-max", kset("block_count", U32, 0xFFFFFFFF), BadKey),
        ("block_count-4-arrays-short", kset("block_count", U32, 4), BadKey),
        ("ratios-shorter-than-layers", kset(R, ARR, [0, 4], I32), BadKey),
        ("ratios-empty", kset(R, ARR, [], I32), BadKey),
        ("ratios-huge-i64", kset(R, ARR, [0, 2**40, 128], I64), BadKey),
        ("ratios-u32-max", kset(R, ARR, [0, 0xFFFFFFFF, 128], U32), BadKey),
        ("ratios-i64-min", kset(R, ARR, [0, -2**63, 128], I64), BadKey),
        ("ratios-4-and-128-swapped", kset(R, ARR, [0, 128, 4, 0], I32), ModelFormat),
        ("ratios-0-on-a-csa-layer", kset(R, ARR, [0, 0, 128, 0], I32), Unexpected),
        ("ratios-4-on-a-swa-layer", kset(R, ARR, [4, 4, 128, 0], I32), MissingTensor),
        ("head_count_kv-0", kset("attention.head_count_kv", U32, 0), BadKey),
        ("head_count_kv-2", kset("attention.head_count_kv", U32, 2), BadKey),
        ("head_count-0", kset("attention.head_count", U32, 0), BadKey),
        ("head_count-3-not-divisible-by-groups", kset("attention.head_count", U32, 3), BadKey),
        ("head_count-4", kset("attention.head_count", U32, 4), TensorShape),
        ("output_group_count-0", kset("attention.output_group_count", U32, 0), BadKey),
        ("output_group_count-3", kset("attention.output_group_count", U32, 3), BadKey),
        ("output_group_count-1", kset("attention.output_group_count", U32, 1), TensorShape),
        ("output_lora_rank-0", kset("attention.output_lora_rank", U32, 0), BadKey),
        ("value_length-differs", kset("attention.value_length", U32, 32), BadKey),
        ("q_lora_rank-0", kset("attention.q_lora_rank", U32, 0), BadKey),
        ("q_lora_rank-64", kset("attention.q_lora_rank", U32, 64), TensorShape),
        ("sliding_window-0", kset("attention.sliding_window", U32, 0), BadKey),
        ("rope-dims-0", kset("rope.dimension_count", U32, 0), BadKey),
        ("rope-dims-1", kset("rope.dimension_count", U32, 1), BadKey),
        ("rope-dims-odd", kset("rope.dimension_count", U32, 33), BadKey),
        ("rope-dims-above-head-dim", kset("rope.dimension_count", U32, 66), BadKey),
        ("rope-dims-above-indexer-dim", kset("attention.indexer.key_length", U32, 16), BadKey),
        ("indexer-head-count-0", kset("attention.indexer.head_count", U32, 0), BadKey),
        ("indexer-key-length-0", kset("attention.indexer.key_length", U32, 0), BadKey),
        ("indexer-head-count-8", kset("attention.indexer.head_count", U32, 8), TensorShape),
        ("top_k-0", kset("attention.indexer.top_k", U32, 0), BadKey),
        ("expert_count-0", kset("expert_count", U32, 0), BadKey),
        ("expert_used-0", kset("expert_used_count", U32, 0), BadKey),
        ("expert_used-above-count", kset("expert_used_count", U32, 5), BadKey),
        ("expert_used-max", kset("expert_used_count", U32, 0xFFFFFFFF), BadKey),
        ("expert_used-3-contradicts-tid2eid", kset("expert_used_count", U32, 3), TensorShape),
        ("expert_count-8", kset("expert_count", U32, 8), TensorShape),
        ("expert_shared-0", kset("expert_shared_count", U32, 0), BadKey),
        ("expert_shared-2", kset("expert_shared_count", U32, 2), BadKey),
        ("expert_ff-64", kset("expert_feed_forward_length", U32, 64), TensorShape),
        ("gating-softmax", kset("expert_gating_func", U32, 1), BadKey),
        ("gating-sigmoid", kset("expert_gating_func", U32, 2), BadKey),
        ("weights_norm-false", kset("expert_weights_norm", BOOL, 0), BadKey),
        ("hc-count-0", kset("hyper_connection.count", U32, 0), BadKey),
        ("hc-count-3", kset("hyper_connection.count", U32, 3), BadKey),
        ("hc-count-max", kset("hyper_connection.count", U32, 0xFFFFFFFF), BadKey),
        ("sinkhorn-0", kset("hyper_connection.sinkhorn_iterations", U32, 0), BadKey),
        ("hash-layers-above-trunk", kset("hash_layer_count", U32, 4), BadKey),
        ("hash-layers-0", kset("hash_layer_count", U32, 0), ModelFormat),
        ("hash-layers-2", kset("hash_layer_count", U32, 2), ModelFormat),
        ("bos-out-of-vocab", kset("tokenizer.ggml.bos_token_id", U32, 300), BadKey),
        ("eos-out-of-vocab", kset("tokenizer.ggml.eos_token_id", U32, 0xFFFFFFFF), BadKey),
        ("context_length-0", kset("context_length", U32, 0), BadKey),
        ("context_length-below-n_ctx", kset("context_length", U32, N_CTX - 1), errors.InvalidArgumentError),
        ("rope-orig-ctx-0", kset("rope.scaling.original_context_length", U32, 0), BadKey),
        ("rope-scaling-none", kset("rope.scaling.type", STR, "none"), BadKey),
        ("rope-scaling-YaRN", kset("rope.scaling.type", STR, "YaRN"), BadKey),
        ("rope-scaling-empty", kset("rope.scaling.type", STR, ""), BadKey),
        ("tokenizer-llama", kset("tokenizer.ggml.model", STR, "llama"), BadKey),
        ("pre-tokenizer-empty", kset("tokenizer.ggml.pre", STR, ""), BadKey),
        ("embedding-0", kset("embedding_length", U32, 0), BadKey),
        ("embedding-2^30-hc-dim-wraps", kset("embedding_length", U32, 2**30), TensorShape),
        ("embedding-2^30+16-hc-dim-wraps-to-64", kset("embedding_length", U32, 2**30 + 16), TensorShape),
        ("key_length-odd", lambda g: (g.set(K + "attention.key_length", U32, 63), g.set(K + "attention.value_length", U32, 63)), BadKey),
        ("key_length-max", lambda g: (g.set(K + "attention.key_length", U32, 0xFFFFFFFE),
                                      g.set(K + "attention.value_length", U32, 0xFFFFFFFE)), TensorShape),
        ("nextn-1-on-trunk-file", kset("nextn_predict_layers", U32, 1), BadKey),
        ("nextn-2", kset("nextn_predict_layers", U32, 2), BadKey),
        ("nextn-equals-block-count", kset("nextn_predict_layers", U32, 3), BadKey),
        ("nextn-max", kset("nextn_predict_layers", U32, 0xFFFFFFFF), BadKey),
        ("block_count-2-with-arrays", lambda g: (g.set(K + "block_count", U32, 2),
                                                 g.set(K + "swiglu_clamp_exp", F32, 1.0),
                                                 g.set(K + "swiglu_clamp_shexp", F32, 1.0)), Unexpected),
        ("block_count-4-with-arrays", lambda g: (g.set(K + "block_count", U32, 4),
                                                 g.set(K + "swiglu_clamp_exp", F32, 1.0),
                                                 g.set(K + "swiglu_clamp_shexp", F32, 1.0)), MissingTensor),
    ]
    for v in (1, 2, 3, 5, 8, 16, 32, 64, 127, 129, 256, -4, -128, -1, 2**31 - 1, -2**31):
        cases.append((f"ratio-{v}", kset(R, ARR, [0, v, 128, 0], I32), BadKey))
    for name, edit, exp in cases:
        b.edit(f"hparams/{name}", exp, edit)
    # the MTP block
    b.edit("hparams/mtp-ratio-4", BadKey, lambda g: g.set(K + R, ARR, [0, 4, 128, 4], I32), mtp=True)
    b.edit("hparams/mtp-ratio-128", BadKey, lambda g: g.set(K + R, ARR, [0, 4, 128, 128], I32), mtp=True)
    b.edit("hparams/mtp-ratios-too-short", BadKey, lambda g: g.set(K + R, ARR, [0, 4, 128], I32), mtp=True)
    b.edit("hparams/mtp-without-nextn-key", Unexpected, lambda g: g.drop(K + "nextn_predict_layers"), mtp=True)
    b.edit("hparams/mtp-hash-layers-4", BadKey, lambda g: g.set(K + "hash_layer_count", U32, 4), mtp=True)

    def mtp_only(g):
        g.tensors = [t for t in g.tensors if not re.match(rb"blk\.[012]\.", t.name)]
    b.edit("hparams/mtp-only-file", MissingTensor, mtp_only, mtp=True)

    # hash routing table entries out of range (hparams.n_expert = 4)
    for pos, v in ((0, -1), (0, 4), (599, 4), (1, 2**31 - 1), (300, -2**31), (598, 1000)):
        def bad_id(g, pos=pos, v=v):
            t = g.tensor("blk.0.ffn_gate_tid2eid.weight")
            d = bytearray(t.data)
            d[pos * 4:pos * 4 + 4] = struct.pack("<i", v)
            t.data = bytes(d)
        b.edit(f"hparams/tid2eid-entry-{pos}-is-{v}", Corrupt, bad_id)


def _numeric_hparams(b: _Builder) -> None:
    """Values that once crashed or hung at the first eval (a negative norm epsilon aborts
    ggml_rms_norm; a Sinkhorn count of 2^31 or more turned negative in int32 and aborted
    ggml_dsv4_hc_comb; 2^31-1 iterations hang): the generated hparams reader rejects them."""
    b.edit("hparams/norm-eps-negative", BadKey, kset("attention.layer_norm_rms_epsilon", F32, -1.0))
    b.edit("hparams/norm-eps-zero", BadKey, kset("attention.layer_norm_rms_epsilon", F32, 0.0))
    b.edit("hparams/norm-eps-nan", BadKey, kset("attention.layer_norm_rms_epsilon", F32, float("nan")))
    b.edit("hparams/sinkhorn-2^31", BadKey, kset("hyper_connection.sinkhorn_iterations", U32, 2**31))
    b.edit("hparams/sinkhorn-max", BadKey, kset("hyper_connection.sinkhorn_iterations", U32, 0xFFFFFFFF))
    b.edit("hparams/sinkhorn-2^31-1", BadKey, kset("hyper_connection.sinkhorn_iterations", U32, 2**31 - 1))
    b.edit("hparams/sinkhorn-1001", BadKey, kset("hyper_connection.sinkhorn_iterations", U32, 1001))


def _huge(b: _Builder) -> None:
    """Sparse files of several GiB whose hparams make sizes overflow 64 bits: one layer, n_embd 1
    and every tensor at data offset 0, so the biggest tensor ({1, head_dim} F32) sets the file size."""
    from codegen.v4 import MODEL

    def model(head_dim: int, n_swa: int) -> Sparse:
        g = base()
        for key, vt, val in (("block_count", U32, 1), ("hash_layer_count", U32, 0), ("embedding_length", U32, 1),
                             ("attention.head_count", U32, 1), ("attention.key_length", U32, head_dim),
                             ("attention.value_length", U32, head_dim), ("rope.dimension_count", U32, 2),
                             ("attention.q_lora_rank", U32, 1), ("attention.output_group_count", U32, 1),
                             ("attention.output_lora_rank", U32, 1), ("attention.sliding_window", U32, n_swa),
                             ("expert_count", U32, 1), ("expert_used_count", U32, 1),
                             ("expert_feed_forward_length", U32, 1), ("swiglu_clamp_exp", F32, 1.0),
                             ("swiglu_clamp_shexp", F32, 1.0)):
            g.set(K + key, vt, val)
        g.set(K + "attention.compress_ratios", ARR, [0, 0], I32)
        env = dict(n_layer_all=1, n_layer=1, n_nextn=0, n_embd=1, n_vocab=300, n_head=1, head_dim=head_dim,
                   q_lora_rank=1, o_groups=1, o_lora_rank=1, indexer_n_head=16, indexer_head_dim=64, n_expert=1,
                   n_expert_used=1, n_expert_shared=1, hc_mult=4, hc_dim=4, hc_mix=24, n_hash_layers=0,
                   compress_ratios=[0], expert_ff=[1])
        g.tensors = [Tensor(n.encode(), ne, T_F32, b"") for n, (ne, _, req) in MODEL.expected_tensors(env).items() if req]
        head, lay = serialize(g)
        biggest = max(type_nbytes(t.ggml_type, t.ne) for t in g.tensors)
        return Sparse(head, lay.data_start + biggest + (-biggest % 32))

    # head_dim x n_swa x 4 bytes = 2^64 + 65536: the window would be sized 64 KiB for rows of 4 GiB
    b.add("huge/window-bytes-wrap-to-64k", lambda: model(1073758208, 4294901761), OOM)
    b.add("huge/window-bytes-exactly-2^64", lambda: model(2**31, 2**31), OOM)
    b.add("huge/head-dim-2^30-loads", lambda: model(2**30, 8), MAY_LOAD)


def _robustness(b: _Builder) -> None:
    """Values no check covers yet: the file may load, but opening it (and evaluating a few tokens)
    must neither crash, hang nor exhaust memory."""
    for name, edit in [
        ("top_k-max", kset("attention.indexer.top_k", U32, 0xFFFFFFFF)),
        ("top_k-1000", kset("attention.indexer.top_k", U32, 1000)),
        ("sliding_window-1", kset("attention.sliding_window", U32, 1)),
        ("sliding_window-2^20", kset("attention.sliding_window", U32, 2**20)),
        ("sliding_window-max", kset("attention.sliding_window", U32, 0xFFFFFFFF)),
        ("context_length-max", kset("context_length", U32, 0xFFFFFFFF)),
        ("rope-orig-ctx-max", kset("rope.scaling.original_context_length", U32, 0xFFFFFFFF)),
        ("sinkhorn-1", kset("hyper_connection.sinkhorn_iterations", U32, 1)),
        ("hc-eps-0", kset("hyper_connection.epsilon", F32, 0.0)),
        ("rope-factor-0", kset("rope.scaling.factor", F32, 0.0)),
        ("rope-freq-base-0", kset("rope.freq_base", F32, 0.0)),
        ("rope-freq-base-negative", kset("rope.freq_base", F32, -10000.0)),
        ("compress-rope-base-1", kset("attention.compress_rope_freq_base", F32, 1.0)),
        ("expert-scale-max", kset("expert_weights_scale", F32, 3.0e38)),
        ("swiglu-limit-0", kset("swiglu_clamp_exp", F32, 0.0)),
        ("swiglu-limit-negative", kset("swiglu_clamp_exp", F32, -1.0)),
        ("bos-eos-same", kset("tokenizer.ggml.eos_token_id", U32, 0)),
        ("hc-eps-negative", kset("hyper_connection.epsilon", F32, -1.0)),
        ("hc-eps-huge", kset("hyper_connection.epsilon", F32, 3.0e38)),
        ("norm-eps-huge", kset("attention.layer_norm_rms_epsilon", F32, 3.0e38)),
        ("rope-dims-equal-head-dim", kset("rope.dimension_count", U32, 64)),
        ("rope-dims-2", kset("rope.dimension_count", U32, 2)),
        ("top_k-1", kset("attention.indexer.top_k", U32, 1)),
        ("expert-scale-0", kset("expert_weights_scale", F32, 0.0)),
        ("expert-scale-negative", kset("expert_weights_scale", F32, -1.5)),
        ("rope-factor-negative", kset("rope.scaling.factor", F32, -16.0)),
        ("rope-factor-tiny", kset("rope.scaling.factor", F32, 1e-38)),
        ("sliding_window-above-context", kset("attention.sliding_window", U32, 4096)),
    ]:
        b.edit(f"robust/{name}", MAY_LOAD, edit)

    def all_experts(g):   # top-k = every expert (the hash table lists all 4 per token)
        g.set(K + "expert_used_count", U32, 4)
        t = g.tensor("blk.0.ffn_gate_tid2eid.weight")
        t.ne = (4, 300)
        t.data = struct.pack("<4i", 3, 1, 0, 2) * 300
    b.edit("robust/experts-used-equals-count", MAY_LOAD, all_experts)

    def one_expert(g):
        g.set(K + "expert_count", U32, 1)
        g.set(K + "expert_used_count", U32, 1)
        for t in g.tensors:
            n = t.name.decode()
            if n.endswith(("ffn_gate_inp.weight", "exp_probs_b.bias")) or "_exps." in n:
                g.retype(n, t.ggml_type, t.ne[:-1] + (1,))
            elif n.endswith("tid2eid.weight"):
                t.ne, t.data = (1, 300), bytes(1200)
    b.edit("robust/one-expert", MAY_LOAD, one_expert)

    def nan_weights(g):
        t = g.tensor("output_norm.weight")
        t.data = struct.pack("<f", math.nan) * (len(t.data) // 4)
    b.edit("robust/nan-norm-weights", MAY_LOAD, nan_weights)

    def inf_q8(g):   # Q8_0 block scales of +inf (f16 0x7c00)
        t = g.tensor("blk.0.attn_q_a.weight")
        d = bytearray(t.data)
        for o in range(0, len(d), 34):
            d[o:o + 2] = b"\x00\x7c"
        t.data = bytes(d)
    b.edit("robust/inf-q8_0-scales", MAY_LOAD, inf_q8)


def _mutants(b: _Builder, n: int) -> None:
    """Seeded random damage to the header (bit flips, interesting values at field starts,
    inserted and deleted bytes): any outcome but a crash, a hang or unbounded memory."""
    data, lay = base_layout()
    header_end = lay.data_start
    fields = [off for off, _ in lay.marks if off < header_end]
    interesting64 = (0, 1, 0x7F, 0x80, 0xFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, lay.size)
    for i in range(n):
        def make(i=i) -> bytes:
            rng = random.Random(1000 + i)
            d = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                if op < 0.35:
                    o = rng.randrange(4, header_end)
                    d[o] ^= 1 << rng.randrange(8)
                elif op < 0.7:
                    o = rng.choice(fields)
                    width = rng.choice((1, 4, 8))
                    v = rng.choice(interesting64) & ((1 << (8 * width)) - 1)
                    d[o:o + width] = v.to_bytes(width, "little")
                elif op < 0.85:
                    o = rng.randrange(4, header_end)
                    d[o:o] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8))))
                else:
                    o = rng.randrange(4, header_end)
                    del d[o:o + rng.choice((1, 4, 8))]
            return bytes(d)
        b.add(f"mutant/{i}", make, MAY_LOAD)


# Findings of tests/fuzz_loader.py, kept as regression cases: (name, hex bytes or a factory, expected)
REGRESSIONS: list[tuple[str, Callable[[], bytes], object]] = []


def _split_keys(b: _Builder) -> None:
    """llama.cpp's split keys (gguf-split) on one file. A case is written as case<i>.gguf, not a
    part's name (PREFIX-00001-of-00003.gguf): a file that says it is one part of several cannot
    reach the others. Whole part sets (a part missing, truncated, foreign, duplicated) are in
    tests/test_split.py."""
    n = len(_base().tensors)

    def keys(g, no=0, count=1, total=n, vtype=U16):   # as gguf-py writes them: u16, u16, i32
        g.set("split.no", vtype, no)
        g.set("split.count", vtype, count)
        g.set("split.tensors.count", I32, total)
    b.edit("valid/split-keys-one-part", LOADS, keys)
    b.edit("valid/split-keys-one-part-as-u32", LOADS, lambda g: keys(g, vtype=U32))
    b.edit("split/one-part-tensor-count-lies", Corrupt, lambda g: keys(g, total=n + 1))
    b.edit("split/part-2-of-1", Corrupt, lambda g: keys(g, no=1))
    b.edit("split/count-zero", Corrupt, lambda g: keys(g, count=0))
    b.edit("split/part-of-3-without-a-part-name", Corrupt, lambda g: keys(g, count=3))
    b.edit("split/part-2-of-3-without-a-part-name", Corrupt, lambda g: keys(g, no=1, count=3))
    b.edit("split/no-without-count", Corrupt, lambda g: g.set("split.no", U16, 0))
    b.edit("split/count-as-string", BadKey, lambda g: (keys(g), g.set("split.count", STR, "1")))
    b.edit("split/count-negative", BadKey, lambda g: (keys(g), g.set("split.count", I32, -1)))


def _regressions(b: _Builder) -> None:
    for name, make, exp in REGRESSIONS:
        b.add(f"regression/{name}", make, exp)


@functools.lru_cache(maxsize=None)
def _corpus(n_mutants: int) -> tuple[Case, ...]:
    b = _Builder()
    _valid(b)
    _magic_version_counts(b)
    _truncations(b)
    _kv_structure(b)
    _alignment_offsets(b)
    _tensor_infos(b)
    _tensor_sets(b)
    _dtypes(b)
    _keys(b)
    _hparams(b)
    _robustness(b)
    _numeric_hparams(b)
    _huge(b)
    _split_keys(b)
    _regressions(b)
    _mutants(b, n_mutants)
    return tuple(b.cases)


def default_mutants() -> int:
    return int(os.environ.get("DSV4_HOSTILE_MUTANTS", "300"))


def case_list(n_mutants: int | None = None) -> list[Case]:
    """Every case, bytes built on demand (deterministic: the same names, bytes and order)."""
    return list(_corpus(default_mutants() if n_mutants is None else n_mutants))


def cases(n_mutants: int | None = None) -> Iterator[tuple[str, "bytes | Sparse", object]]:
    """Yields (name, data, expected) for every case: data is bytes, or a Sparse file (write it
    with write_file)."""
    for c in case_list(n_mutants):
        yield c.name, c.data, c.expected


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    counts: dict[str, int] = {}
    for c in case_list():
        counts[c.category] = counts.get(c.category, 0) + 1
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", c.name)
            write_file(c.data, out / f"{safe}.gguf")
    for k, v in counts.items():
        print(f"{k:12s} {v}")
    print(f"{'total':12s} {sum(counts.values())}")
