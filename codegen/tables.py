"""The DSL's declarations as concrete tables, for the Python code that writes or plans GGUF files
(the tiny writer, the converter, tests): each GGUF key by hyperparameter name, and the tensor
table (names, shapes, whether required) of one configuration. One home for these facts: the
declarations in `codegen/v4.py`, which also generate the C++ loader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .dsl import LAYER, HParam, Kind
from .v4 import MODEL


def hparam(name: str) -> HParam:
    return MODEL.hparam_by_name(name)


def gguf_key(name: str) -> str:
    """The full GGUF key of hyperparameter `name` (e.g. "n_embd" -> "deepseek4.embedding_length")."""
    return hparam(name).key


def values_from_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameter values by name from GGUF metadata {full key: value} (string arrays give
    their length, optional keys their default or fallback), then the derived values."""
    env: dict[str, Any] = {}
    for h in MODEL.hparams:
        if h.key in meta:
            v = meta[h.key]
            env[h.name] = len(v) if h.kind is Kind.STR_ARRAY_LEN else v
        elif h.fallback is not None:
            env[h.name] = env[h.fallback]
        else:
            env[h.name] = h.default
    n_all = env["n_layer_all"]
    for h in MODEL.hparams:           # one value for every block, or one per block
        if h.per_layer and env.get(h.name) is not None:
            v = env[h.name]
            env[h.name] = list(v)[:n_all] if isinstance(v, (list, tuple)) else [v] * n_all
    for d in MODEL.derived:
        env[d.name] = d.expr.eval(env)
    return env


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]       # ggml ne order
    dtype: str                   # the DSL's DType value: f32, i32, float, weight
    required: bool


def tensor_table(env: Mapping[str, Any]) -> list[TensorRow]:
    """Every tensor a file of this configuration holds (required) or may hold (optional), in
    declaration order, per-layer tensors for each block that has them."""
    rows = []
    for t in MODEL.tensors:
        layers = range(env["n_layer_all"]) if t.layered else [None]
        for il in layers:
            e = dict(env, **{LAYER.name: il}) if il is not None else env
            if not t.when.eval(e):
                continue
            shape = tuple(int(s.eval(e)) for s in t.shape)
            rows.append(TensorRow(t.name.format(il=il) if il is not None else t.name, shape, t.dtype.value,
                                  t.required))
    return rows
