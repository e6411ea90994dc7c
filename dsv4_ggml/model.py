"""The high-level model API."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from .errors import InvalidArgumentError
from .sampling import SamplingParams

BACKENDS = {"cpu": 0, "cuda": 1}
CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}   # ggml type ids
REPACK = {"none": 0, "auto": 1, "interleaved": 2, "amx": 3}     # dsv4_repack; True = auto, False = none


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise InvalidArgumentError("stop must be a string or a list of strings")
    return list(stop)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the GGUF file (ggml order: shape[0] is the fastest axis)."""

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    placement: str = "mapped"   # "mapped" (read in place from the file) or the buffer it was copied into


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

    `backend="cuda"` (a build with `-DDSV4_CUDA=ON`) puts the weights of the first
    `n_gpu_layers` trunk layers (None: all, with the output head) in device memory and runs
    their ops there; `experts_on_host=True` keeps the routed experts in host memory, where
    the CPU runs them (a model larger than the card). The token embedding stays on the host.
    On the CPU, `repack=True` ("auto") copies the quantized matrices into ggml's AMX layout
    where the CPU has AMX and the matrix fits it (routed experts included), else the
    non-expert ones into ggml's interleaved layout where one exists for their type, and the
    other non-expert weights as they are (all but the token embedding, while they fit in a
    quarter of physical memory; every copy on
    transparent huge pages where the kernel allows: faster prefill and decode, but the copies
    live in process memory); "amx" and "interleaved" use only
    that layout, False ("none") reads every weight from the mapped file in place (`tensors`
    shows where each weight lives).
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
                 backend: str = "cpu", n_ubatch: int = 512, cache_type: str = "f16",
                 flash_attn: bool = True, prefetch: bool = False, progress=None,
                 n_gpu_layers: int | None = None, experts_on_host: bool = False, repack: bool | str = True):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise InvalidArgumentError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                      or n_threads < 1):
            raise InvalidArgumentError(f"n_threads must be a positive integer or None, got {n_threads!r}")
        if isinstance(n_ubatch, bool) or not isinstance(n_ubatch, int) or n_ubatch < 1:
            raise InvalidArgumentError(f"n_ubatch must be a positive integer, got {n_ubatch!r}")
        if cache_type not in CACHE_TYPES:
            raise InvalidArgumentError(f"cache_type must be one of {sorted(CACHE_TYPES)}, got {cache_type!r}")
        self.cache_type = cache_type
        if backend not in BACKENDS:
            raise InvalidArgumentError(
                f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        if n_gpu_layers is not None and (isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int)
                                         or n_gpu_layers < 0):
            raise InvalidArgumentError(f"n_gpu_layers must be a non-negative integer or None, got {n_gpu_layers!r}")
        self.path = os.fspath(path)
        self.backend = backend
        self.n_threads = n_threads or (os.cpu_count() or 1)

        ffi, lib = _native.load()
        self._ffi, self._lib = ffi, lib
        params = ffi.new("dsv4_model_params *", lib.dsv4_model_default_params())
        params.backend = BACKENDS[backend]
        params.n_threads = self.n_threads
        params.prefetch = bool(prefetch)
        params.n_gpu_layers = -1 if n_gpu_layers is None else n_gpu_layers
        params.experts_on_host = bool(experts_on_host)
        if isinstance(repack, bool):
            repack = "auto" if repack else "none"
        if repack not in REPACK:
            raise InvalidArgumentError(f"repack must be True, False or one of {sorted(REPACK)}, got {repack!r}")
        params.repack = REPACK[repack]
        callback = None
        if progress is not None:
            if not callable(progress):
                raise InvalidArgumentError("progress must be a callable taking the fraction loaded")

            @ffi.callback("bool(float, void *)")
            def callback(fraction, _):
                try:
                    return progress(float(fraction)) is not False
                except Exception:   # an error in the callback cancels the load
                    return False
            params.progress = callback
        out = ffi.new("dsv4_model **")
        _native.check(lib.dsv4_model_open(os.fsencode(self.path), params, out))
        self._model = ffi.gc(out[0], lib.dsv4_model_free)

        hp = ffi.new("dsv4_hparams *")
        _native.check(lib.dsv4_model_get_hparams(self._model, hp))
        self.hparams: dict[str, Any] = _struct_to_dict(ffi, hp[0])

        sp = ffi.new("dsv4_session_params *", lib.dsv4_session_default_params())
        sp.n_ctx = n_ctx
        sp.n_ubatch = n_ubatch
        sp.n_threads = self.n_threads
        sp.cache_type = CACHE_TYPES[cache_type]
        sp.flash_attn = bool(flash_attn)
        sess = ffi.new("dsv4_session **")
        try:
            _native.check(lib.dsv4_session_create(self._model, sp, sess))
        except BaseException:
            self.close()
            raise
        self._session = ffi.gc(sess[0], lib.dsv4_session_free)
        self.n_ctx = n_ctx
        self.n_ubatch = n_ubatch
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        self._tokens: list[int] = []          # the sequence the session holds
        self._last_logits: np.ndarray | None = None
        self._tokenizer = None
        self._chat_template = None

    # --- inference ------------------------------------------------------------------------------
    def eval(self, tokens, logits: str = "all") -> np.ndarray:
        """Appends `tokens` to the sequence and returns their logits, float32
        `[len(tokens), n_vocab]` (`logits="all"`), or only the last row `[1, n_vocab]`
        (`logits="last"`). Raises (and leaves the state unchanged) on bad token ids and when
        the tokens do not fit in n_ctx."""
        self._require_open()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise InvalidArgumentError(f"tokens must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise InvalidArgumentError("tokens is empty: eval() needs at least one token")
        if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            raise InvalidArgumentError(f"tokens must be integers, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= self.n_vocab:
            bad = arr[(arr < 0) | (arr >= self.n_vocab)][0]
            raise InvalidArgumentError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        if logits not in ("all", "last"):
            raise InvalidArgumentError(f"logits must be 'all' or 'last', got {logits!r}")
        toks = np.ascontiguousarray(arr, dtype=np.int32)
        rows = len(toks) if logits == "all" else 1
        out = np.empty((rows, self.n_vocab), dtype=np.float32)
        ffi, lib = self._ffi, self._lib
        _native.check(lib.dsv4_session_eval(
            self._session, ffi.cast("const int32_t *", toks.ctypes.data), len(toks),
            ffi.cast("float *", out.ctypes.data), rows))
        self._tokens.extend(int(t) for t in toks)
        self._last_logits = out[-1]
        return out

    def save_state(self) -> bytes:
        """The session's whole state (caches, rings, tokens) as a checksummed blob, for
        `load_state` on a session of the same model, n_ctx and cache type."""
        self._require_open()
        ffi, lib = self._ffi, self._lib
        n = ffi.new("size_t *")
        _native.check(lib.dsv4_session_state_size(self._session, n))
        buf = bytearray(n[0])
        written = ffi.new("size_t *")
        _native.check(lib.dsv4_session_save_state(self._session, ffi.from_buffer(buf), len(buf), written))
        return bytes(buf[:written[0]])

    def load_state(self, blob: bytes) -> None:
        """Restores a state saved by `save_state`. A corrupt or foreign blob raises StateError and
        leaves the session unchanged."""
        self._require_open()
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError("load_state needs the bytes returned by save_state")
        ffi, lib = self._ffi, self._lib
        data = bytes(blob)
        _native.check(lib.dsv4_session_load_state(self._session, ffi.from_buffer(data), len(data)))
        n = ffi.new("int64_t *")
        _native.check(lib.dsv4_session_tokens(self._session, ffi.NULL, 0, n))
        toks = np.empty(n[0], dtype=np.int32)
        if n[0]:
            _native.check(lib.dsv4_session_tokens(self._session, ffi.cast("int32_t *", toks.ctypes.data), n[0], n))
        self._tokens = [int(t) for t in toks]
        self._last_logits = None

    def reset(self) -> None:
        """Forgets every token (empty windows and caches)."""
        self._require_open()
        _native.check(self._lib.dsv4_session_reset(self._session))
        self._tokens = []
        self._last_logits = None

    # --- text ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The model's tokenizer (`dsv4_ggml.tokenizer.Dsv4Tokenizer`), built from the GGUF."""
        if self._tokenizer is None:
            from .tokenizer import Dsv4Tokenizer
            self._require_open()
            self._tokenizer = Dsv4Tokenizer.from_model(self)
        return self._tokenizer

    @property
    def chat_template(self):
        """The GGUF's `tokenizer.chat_template`, else the built-in DeepSeek-V4 template."""
        if self._chat_template is None:
            from .chat import ChatTemplate
            self._chat_template = ChatTemplate(self.metadata_string("tokenizer.chat_template"))
        return self._chat_template

    def metadata_string(self, key: str) -> str | None:
        """A string metadata value of the GGUF, or None when absent."""
        self._require_open()
        ffi = self._ffi
        text, n = ffi.new("const char **"), ffi.new("size_t *")
        _native.check(self._lib.dsv4_model_meta_string(self._model, key.encode(), text, n))
        return None if text[0] == ffi.NULL else ffi.unpack(text[0], n[0]).decode("utf-8", "replace")

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when add_bos (default: the GGUF's add_bos_token).
        Special tokens written in the text (`<｜User｜>`, ...) become their ids."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_bos)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # --- generation -------------------------------------------------------------------------------
    def _feed(self, tokens: list[int]) -> np.ndarray:
        """Makes the session hold `tokens`, evaluating only what follows the longest reusable
        prefix (the whole current sequence, when it is a prefix), and returns the last logits."""
        n = len(self._tokens)
        if n and len(tokens) > n and tokens[:n] == self._tokens:
            return self.eval(tokens[n:], logits="last")[0]
        if tokens == self._tokens and self._last_logits is not None:
            return self._last_logits
        self.reset()
        return self.eval(tokens, logits="last")[0]

    def _tokens_for_text(self, text: str) -> list[int]:
        """Tokens of a rendered prompt that extends the current sequence's text: the sequence's
        own tokens, then the new text's (so a chat's next turn evaluates only the new turn)."""
        if self._tokens:
            held = self.tokenizer.decode(self._tokens)
            if len(text) > len(held) and text.startswith(held):
                return self._tokens + self.tokenize(text[len(held):], add_bos=False)
        return self.tokenize(text, add_bos=False)

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None, stop=None):
        """Streams `GenerationChunk(token, text, finish_reason)` for a prompt (text or token
        ids). Stops at EOS, a stop string (not included in the text), max_tokens or n_ctx."""
        from .generation import stream_tokens
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        return stream_tokens(self, tokens, max_tokens, params, _stops(stop))

    def create_completion(self, prompt, max_tokens: int = 16, temperature: float = 0.8, top_k: int = 40,
                          top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                          seed: int | None = None, stop=None, stream: bool = False, echo: bool = False):
        """OpenAI-style text completion (a dict, or an iterator of chunks when stream=True)."""
        from .generation import completion
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        return completion(self, prompt, stream, max_tokens, params, _stops(stop), echo)

    def create_chat_completion(self, messages, max_tokens: int = 256, temperature: float = 0.8,
                               top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                               repeat_penalty: float = 1.0, seed: int | None = None, stop=None,
                               stream: bool = False, thinking: bool = False, tools=None,
                               reasoning_effort: str | None = None):
        """OpenAI-style chat completion over the chat template. The session keeps the
        conversation: a follow-up turn evaluates only the tokens after what it already holds."""
        from .generation import chat_completion
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        extra = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
        return chat_completion(self, messages, stream, max_tokens, params, _stops(stop), thinking, tools, extra)

    @property
    def n_past(self) -> int:
        """Tokens in the sequence so far."""
        self._require_open()
        n = self._ffi.new("int64_t *")
        _native.check(self._lib.dsv4_session_n_past(self._session, n))
        return int(n[0])

    def stats(self) -> dict[str, int]:
        """Session counters: n_past, n_ubatches, n_graph_builds, n_graph_nodes, state_bytes,
        compute_bytes."""
        self._require_open()
        st = self._ffi.new("dsv4_session_stats *")
        _native.check(self._lib.dsv4_session_get_stats(self._session, st))
        return {name: int(getattr(st, name)) for name, _ in self._ffi.typeof("dsv4_session_stats").fields}

    @property
    def state_bytes(self) -> int:
        """Bytes of the session's persistent state (sized from n_ctx and the compress ratios)."""
        return self.stats()["state_bytes"]

    # --- properties --------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return int(self.hparams["n_vocab"])

    def estimate_state_bytes(self, n_ctx: int, cache_type: str | None = None) -> int:
        """Persistent state a session of n_ctx tokens needs (nothing is allocated)."""
        self._require_open()
        ct = CACHE_TYPES.get(cache_type or self.cache_type)
        if ct is None:
            raise InvalidArgumentError(f"cache_type must be one of {sorted(CACHE_TYPES)}")
        out = self._ffi.new("uint64_t *")
        _native.check(self._lib.dsv4_model_state_bytes(self._model, int(n_ctx), ct, out))
        return int(out[0])

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
                placement=ffi.string(info.placement).decode(),
            ))
        return out

    # --- lifetime ------------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._model is None:
            raise InvalidArgumentError("the model is closed")

    def close(self) -> None:
        """Releases the native session and model now (otherwise when garbage-collected)."""
        session, self._session = getattr(self, "_session", None), None
        if session is not None:
            self._ffi.release(session)
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
