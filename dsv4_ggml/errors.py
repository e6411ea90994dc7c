"""Exceptions raised by dsv4_ggml. Every failure of the native library maps to one class."""
from __future__ import annotations


class Dsv4Error(Exception):
    """Base class of every error this package raises on purpose."""

    status = None  # the native dsv4_status code, when the error came from the library


class InvalidArgumentError(Dsv4Error, ValueError):
    """A caller error: bad token ids, bad options, out-of-range values."""


class FileError(Dsv4Error, OSError):
    """The file cannot be opened, read or mapped."""


class GGUFError(Dsv4Error):
    """The file is not a valid GGUF file."""


class NotGGUFError(GGUFError):
    """The file is not a GGUF file at all (bad magic, too short)."""


class TruncatedFileError(GGUFError):
    """The file ends before the data it declares (an interrupted download?)."""


class CorruptFileError(GGUFError):
    """A malformed GGUF structure: version, counts, offsets, types, duplicates."""


class ModelFormatError(Dsv4Error):
    """A valid GGUF that is not a usable DeepSeek-V4 model."""


class WrongArchitectureError(ModelFormatError):
    """general.architecture is not 'deepseek4'."""


class MissingKeyError(ModelFormatError, KeyError):
    """A required metadata key is absent."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BadKeyError(ModelFormatError):
    """A metadata key has the wrong type or an unsupported value."""


class MissingTensorError(ModelFormatError):
    """A tensor the hyperparameters require is absent."""


class TensorShapeError(ModelFormatError):
    """A tensor's shape differs from what the hyperparameters imply."""


class TensorTypeError(ModelFormatError):
    """A tensor's ggml type is not allowed for its role."""


class UnexpectedTensorError(ModelFormatError):
    """The file holds a tensor the model does not use."""


class ContextOverflowError(Dsv4Error):
    """The request does not fit in the session's context (n_ctx)."""


class BackendError(Dsv4Error):
    """The requested backend is unavailable or failed."""


class OutOfMemoryError(Dsv4Error, MemoryError):
    """An allocation failed."""


class NumericsError(Dsv4Error, FloatingPointError):
    """A NaN or Inf appeared in the computation."""


class InternalError(Dsv4Error):
    """A bug in dsv4-ggml."""


class CancelledError(Dsv4Error):
    """A progress callback asked to stop loading."""


class StateError(Dsv4Error, ValueError):
    """A saved session state is corrupt or belongs to another model or session geometry."""


# dsv4_status code -> exception class (codes from native/include/dsv4.h)
BY_STATUS = {
    1: InvalidArgumentError,
    2: FileError,
    3: NotGGUFError,
    4: TruncatedFileError,
    5: CorruptFileError,
    6: WrongArchitectureError,
    7: MissingKeyError,
    8: BadKeyError,
    9: MissingTensorError,
    10: TensorShapeError,
    11: TensorTypeError,
    12: UnexpectedTensorError,
    13: ContextOverflowError,
    14: BackendError,
    15: OutOfMemoryError,
    16: NumericsError,
    17: InternalError,
    18: CancelledError,
    19: StateError,
}


def from_status(status: int, message: str) -> Dsv4Error:
    cls = BY_STATUS.get(status, InternalError)
    err = cls(message)
    err.status = status
    return err
