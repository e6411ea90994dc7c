"""dsv4-ggml: a Python-first inference engine for DeepSeek-V4 on ggml.

    from dsv4_ggml import Model
    model = Model("model.gguf", n_ctx=4096)

The native library is loaded on first use, so pure-Python parts (the NumPy reference,
the tiny-model writer, the code generator) work without it.
"""
from __future__ import annotations

from .errors import (
    BackendError, BadKeyError, CancelledError, ContextOverflowError, CorruptFileError, Dsv4Error, FileError,
    GGUFError, InternalError, InvalidArgumentError, MissingKeyError, MissingTensorError,
    ModelFormatError, NotGGUFError, NumericsError, OutOfMemoryError, StateError, TensorShapeError,
    TensorTypeError, TruncatedFileError, UnexpectedTensorError, WrongArchitectureError,
)

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Model", "TensorInfo"):
        from . import model
        return getattr(model, name)
    if name == "Reference":
        from .reference import Reference
        return Reference
    raise AttributeError(f"module 'dsv4_ggml' has no attribute {name!r}")


__all__ = [
    "Model", "TensorInfo", "Reference", "Dsv4Error", "InvalidArgumentError", "FileError",
    "GGUFError", "NotGGUFError", "TruncatedFileError", "CorruptFileError", "ModelFormatError",
    "WrongArchitectureError", "MissingKeyError", "BadKeyError", "MissingTensorError",
    "TensorShapeError", "TensorTypeError", "UnexpectedTensorError", "ContextOverflowError",
    "BackendError", "OutOfMemoryError", "NumericsError", "InternalError", "CancelledError", "StateError",
]
