"""The high-level model API."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import _native
from .errors import InvalidArgumentError

BACKENDS = {"cpu": 0, "cuda": 1}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the GGUF file (ggml order: shape[0] is the fastest axis)."""

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _struct_to_dict(ffi, hp) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n_layer_all = int(hp.n_layer_all)
    for name, field in ffi.typeof("dsv4_hparams").fields:
        value = getattr(hp, name)
        if field.type.kind == "array":
            out[name] = [value[i] for i in range(n_layer_all)]
        else:
            out[name] = value
    return out


class Model:
    """A DeepSeek-V4 GGUF model, opened and validated by the native engine.

    >>> m = Model("model.gguf", n_ctx=4096)          # doctest: +SKIP
    >>> m.hparams["n_layer"], m.n_vocab               # doctest: +SKIP

    Raises a `dsv4_ggml.Dsv4Error` subclass naming the problem when the file is not a
    usable DeepSeek-V4 GGUF (see `dsv4_ggml.errors`).
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
                 backend: str = "cpu"):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise InvalidArgumentError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                      or n_threads < 1):
            raise InvalidArgumentError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if backend not in BACKENDS:
            raise InvalidArgumentError(
                f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.path = os.fspath(path)
        self.backend = backend
        self.n_threads = n_threads or (os.cpu_count() or 1)

        ffi, lib = _native.load()
        self._ffi, self._lib = ffi, lib
        params = ffi.new("dsv4_model_params *", lib.dsv4_model_default_params())
        params.backend = BACKENDS[backend]
        params.n_threads = self.n_threads
        out = ffi.new("dsv4_model **")
        _native.check(lib.dsv4_model_open(os.fsencode(self.path), params, out))
        self._model = ffi.gc(out[0], lib.dsv4_model_free)

        hp = ffi.new("dsv4_hparams *")
        _native.check(lib.dsv4_model_get_hparams(self._model, hp))
        self.hparams: dict[str, Any] = _struct_to_dict(ffi, hp[0])
        if n_ctx > self.hparams["n_ctx_train"]:
            self.close()
            raise InvalidArgumentError(
                f"n_ctx {n_ctx} exceeds the model's context length {self.hparams['n_ctx_train']} "
                "(deepseek4.context_length)")
        self.n_ctx = n_ctx

    # --- properties --------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return int(self.hparams["n_vocab"])

    @property
    def tensors(self) -> list[TensorInfo]:
        """The file's tensors in file order."""
        self._require_open()
        ffi, lib = self._ffi, self._lib
        n = ffi.new("int64_t *")
        _native.check(lib.dsv4_model_n_tensors(self._model, n))
        info = ffi.new("dsv4_tensor_info *")
        out = []
        for i in range(n[0]):
            _native.check(lib.dsv4_model_tensor_info(self._model, i, info))
            out.append(TensorInfo(
                name=ffi.string(info.name).decode(),
                type=ffi.string(info.type_name).decode(),
                shape=tuple(int(info.ne[d]) for d in range(info.n_dims)),
                offset=int(info.offset),
                nbytes=int(info.nbytes),
            ))
        return out

    # --- lifetime ------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._model is None:
            raise InvalidArgumentError("the model is closed")

    def close(self) -> None:
        """Releases the native model now (otherwise it is released when garbage-collected)."""
        model, self._model = getattr(self, "_model", None), None
        if model is not None:
            self._ffi.release(model)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._model is None else f"n_ctx={self.n_ctx}"
        return (f"<dsv4_ggml.Model {os.path.basename(self.path)!r} backend={self.backend} {state} "
                f"layers={self.hparams['n_layer']} vocab={self.n_vocab}>")
