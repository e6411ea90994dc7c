"""The high-level model API."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from .errors import InvalidArgumentError, OutOfMemoryError
from .memory import available_memory_bytes
from .sampling import SamplingParams

BACKENDS = {"cpu": 0, "cuda": 1}
CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}   # ggml type ids
REPACK = {"none": 0, "auto": 1, "interleaved": 2, "amx": 3}     # dsv4_repack; True = auto, False = none

_log = logging.getLogger("dsv4_ggml")


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
    offset: int                 # byte offset in its file (`file`)
    nbytes: int
    placement: str = "mapped"   # "mapped" (read in place from the file) or the buffer it was copied into
    file: int = 0               # index into `Model.files` of the file holding it (a split model's part)


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


AUTO_N_SEQ = 4      # the sequences n_seq="auto" asks for
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")   # a part of a split GGUF (gguf-split's names)


def _model_name(path: str) -> str:
    """The file's name without .gguf, and without the part number of a split model."""
    return _SPLIT_SUFFIX.sub("", os.path.splitext(os.path.basename(path))[0])


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
    shows where each weight lives). All copies together stay within `copy_limit` bytes (None:
    half the physical memory): the non-expert weights first, then the routed experts; the
    weights beyond it are read in place, and `load_note` (also logged as a warning) says so.

    `mtp=True` also runs the file's MTP block (spec §3.10) over every token, with its own window
    per sequence: `eval(..., mtp=True)` returns its logits beside the trunk's (one more layer per
    token; a model without the block raises).

    `n_seq` sequence slots (each with its own state, for `eval_batch`, `truncate`, `copy_seq`);
    `"auto"`: 4 when their state takes at most half of the memory available after loading,
    else 1 (the server's default).
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
                 backend: str = "cpu", n_ubatch: int = 512, cache_type: str = "f16",
                 flash_attn: bool = True, prefetch: bool = False, progress=None,
                 n_gpu_layers: int | None = None, experts_on_host: bool = False, repack: bool | str = True,
                 n_seq: int | str = 1, n_rollback: int = 32, checkpoint_interval: int = 1024, n_checkpoints: int = 8,
                 mtp: bool = False, copy_limit: int | None = None):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise InvalidArgumentError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        auto_seq = n_seq == "auto"
        if auto_seq:
            n_seq = AUTO_N_SEQ
        for name, value in (("n_seq", n_seq), ("n_rollback", n_rollback),
                            ("checkpoint_interval", checkpoint_interval), ("n_checkpoints", n_checkpoints)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
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
        if copy_limit is not None:
            if isinstance(copy_limit, bool) or not isinstance(copy_limit, int) or not 1 <= copy_limit < 2**64:
                raise InvalidArgumentError(f"copy_limit must be a positive number of bytes or None, got {copy_limit!r}")
            params.copy_limit = copy_limit
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

        note = ffi.new("const char **")
        _native.check(lib.dsv4_model_load_note(self._model, note))
        self.load_note: str = ffi.string(note[0]).decode()
        if self.load_note:
            _log.warning("%s: %s", self.path, self.load_note)

        hp = ffi.new("dsv4_hparams *")
        _native.check(lib.dsv4_model_get_hparams(self._model, hp))
        self.hparams: dict[str, Any] = _struct_to_dict(ffi, hp[0])

        sp = ffi.new("dsv4_session_params *", lib.dsv4_session_default_params())
        sp.n_ctx = n_ctx
        sp.n_ubatch = n_ubatch
        sp.n_threads = self.n_threads
        sp.cache_type = CACHE_TYPES[cache_type]
        sp.flash_attn = bool(flash_attn)
        sp.n_seq, sp.n_rollback = n_seq, n_rollback
        sp.checkpoint_interval, sp.n_checkpoints = checkpoint_interval, n_checkpoints
        sp.mtp = bool(mtp)
        self.mtp = bool(mtp)
        sess = ffi.new("dsv4_session **")
        try:
            if auto_seq:
                n_seq = sp.n_seq = self._auto_n_seq(sp)
            try:
                _native.check(lib.dsv4_session_create(self._model, sp, sess))
            except OutOfMemoryError:
                if not auto_seq or n_seq == 1:
                    raise
                n_seq = sp.n_seq = 1
                _native.check(lib.dsv4_session_create(self._model, sp, sess))
        except BaseException:
            self.close()
            raise
        self._session = ffi.gc(sess[0], lib.dsv4_session_free)
        self._params = sp
        self.n_ctx = n_ctx
        self.n_ubatch = n_ubatch
        self.n_seq = n_seq
        self.name = _model_name(self.path)
        self._seqs: list[list[int]] = [[] for _ in range(n_seq)]    # the tokens each sequence holds
        self._last: list[np.ndarray | None] = [None] * n_seq        # each one's last logits, when known
        self._tokenizer = None
        self._chat_template = None

    def _auto_n_seq(self, sp) -> int:
        """n_seq="auto": AUTO_N_SEQ sequences when their state takes at most half the memory
        available now (after the weights), else 1 (and 1 if the allocation then fails)."""
        out, slot = self._ffi.new("uint64_t *"), self._ffi.new("uint64_t *")
        _native.check(self._lib.dsv4_model_state_bytes(self._model, sp, out, slot))
        available = available_memory_bytes()
        return AUTO_N_SEQ if available is None or int(out[0]) <= available // 2 else 1

    # --- inference ------------------------------------------------------------------------------
    def _seq(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.n_seq:
            raise InvalidArgumentError(f"sequence {seq!r} does not exist (this model holds n_seq={self.n_seq}: "
                                       f"0 … {self.n_seq - 1})")
        return int(seq)

    def _token_array(self, tokens) -> np.ndarray:
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
        return np.ascontiguousarray(arr, dtype=np.int32)

    def eval(self, tokens, logits: str = "all", *, seq: int = 0, mtp: bool = False):
        """Appends `tokens` to sequence `seq` (default 0) and returns their logits, float32
        `[len(tokens), n_vocab]` (`logits="all"`), or only the last row `[1, n_vocab]`
        (`logits="last"`). Raises (and leaves the state unchanged) on bad token ids and when
        the tokens do not fit in n_ctx. `mtp=True` (a model opened with mtp): a pair (trunk
        logits, MTP logits), the MTP row of token t predicting token t + 1 from the trunk's
        state at t − 1 and token t (§3.10)."""
        return self.eval_batch({seq: tokens}, logits=logits, mtp=mtp)[self._seq(seq)]

    def eval_batch(self, batch: dict, logits: str | dict = "last", mtp: bool = False) -> dict:
        """Appends tokens to several sequences at once, `{seq: tokens, ...}`, and returns
        `{seq: logits}` (each `[len(tokens), n_vocab]` with `logits="all"`, `[1, n_vocab]` with
        "last"; or a dict `{seq: "all" | "last"}`, "last" for the sequences it leaves out). The
        sequences run together: each micro-batch reads the weights once for all of
        them (prompt chunks and single decode tokens mixed), each sequence attends to its own
        state, and each gets the logits it would get alone (up to the rounding of kernels that
        differ with the batch shape; bit for bit the same whatever the other sequences hold).
        Validates everything first: on an error no sequence changes. `mtp=True`:
        `{seq: (logits, mtp_logits)}` (see `eval`)."""
        self._require_open()
        if not isinstance(batch, dict) or not batch:
            raise InvalidArgumentError("eval_batch needs a non-empty dict {seq: tokens}")
        modes = logits if isinstance(logits, dict) else {seq: logits for seq in batch}
        for mode in modes.values():
            if mode not in ("all", "last"):
                raise InvalidArgumentError(f"logits must be 'all' or 'last' (or a dict of them by sequence), "
                                           f"got {mode!r}")
        if mtp and not self.mtp:
            raise InvalidArgumentError("MTP logits need a model opened with mtp=True")
        ffi, lib = self._ffi, self._lib
        entries = ffi.new("dsv4_seq_batch[]", len(batch))
        keep, out, fed = [], {}, {}
        for i, (seq, tokens) in enumerate(batch.items()):
            seq = self._seq(seq)
            toks = fed[seq] = self._token_array(tokens)
            rows = len(toks) if modes.get(seq, "last") == "all" else 1
            res = np.empty((rows, self.n_vocab), dtype=np.float32)
            if mtp:
                res_mtp = np.empty((rows, self.n_vocab), dtype=np.float32)
                entries[i].mtp_logits = ffi.cast("float *", res_mtp.ctypes.data)
                keep.append(res_mtp)
            entries[i].seq = seq
            entries[i].tokens = ffi.cast("const int32_t *", toks.ctypes.data)
            entries[i].n_tokens = len(toks)
            entries[i].logits = ffi.cast("float *", res.ctypes.data)
            entries[i].out_rows = rows
            keep.append(toks)
            out[seq] = (res, res_mtp) if mtp else res
        _native.check(lib.dsv4_session_eval_batch(self._session, entries, len(batch)))
        for seq, res in out.items():
            self._seqs[seq].extend(int(t) for t in fed[seq])
            self._last[seq] = (res[0] if mtp else res)[-1]
        return out

    def mtp_draft(self, token: int, offset: int = 0, seq: int = 0) -> np.ndarray:
        """One MTP draft row (a model opened with mtp=True; spec §3.10): the MTP block alone for
        `token` placed `offset` positions after the tokens sequence `seq` holds, from the trunk's
        state at the position before (offset 0: `token` is the one sampled after them) or the
        previous draft row's output (offset k: after drafting offset k − 1); returns the logits
        `[n_vocab]` of the token after it. The sequence does not change: its next eval overwrites
        the draft rows."""
        self._require_open()
        seq = self._seq(seq)
        if not self.mtp:
            raise InvalidArgumentError("mtp_draft needs a model opened with mtp=True")
        for name, v in (("token", token), ("offset", offset)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgumentError(f"{name} must be an integer, got {v!r}")
        out = np.empty(self.n_vocab, dtype=np.float32)
        _native.check(self._lib.dsv4_session_mtp_draft(self._session, seq, int(token), int(offset),
                                                       self._ffi.cast("float *", out.ctypes.data)))
        return out

    def truncate(self, n: int, seq: int = 0) -> None:
        """Keeps the first `n` tokens of sequence `seq` and forgets the rest: the next eval goes on
        from position n exactly as if the forgotten tokens had never been seen. Costs nothing when
        n is within `n_rollback` (default 32) tokens of the furthest the sequence has been since it
        was last reset or loaded; further back it restores the nearest checkpoint (one every
        `checkpoint_interval` tokens, the last `n_checkpoints` kept) and recomputes the tokens
        between it and n (from the start without one)."""
        self._require_open()
        seq = self._seq(seq)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise InvalidArgumentError(f"truncate needs a token count, got {n!r}")
        _native.check(self._lib.dsv4_session_truncate(self._session, seq, int(n)))
        if n < len(self._seqs[seq]):
            del self._seqs[seq][int(n):]
            self._last[seq] = None

    def copy_seq(self, src: int, dst: int) -> None:
        """Makes sequence `dst` a copy of sequence `src` (a shared prefix evaluated once, then
        continued in several slots)."""
        self._require_open()
        src, dst = self._seq(src), self._seq(dst)
        _native.check(self._lib.dsv4_session_copy_seq(self._session, src, dst))
        self._seqs[dst] = list(self._seqs[src])
        self._last[dst] = self._last[src]

    def tokens(self, seq: int = 0) -> list[int]:
        """The tokens sequence `seq` holds."""
        return list(self._seqs[self._seq(seq)])

    @property
    def _tokens(self) -> list[int]:
        return self._seqs[0]

    def save_state(self, seq: int = 0) -> bytes:
        """Sequence `seq`'s state (the ring rows it needs, the entries of its completed blocks, its
        tokens) as a checksummed blob, for `load_state` into any sequence of a model of the same
        file and cache type whose n_ctx holds it. The blob depends only on the sequence, not on how
        it was computed (alone or batched, rolled back, copied)."""
        self._require_open()
        seq = self._seq(seq)
        ffi, lib = self._ffi, self._lib
        n = ffi.new("size_t *")
        _native.check(lib.dsv4_session_state_size(self._session, seq, n))
        buf = bytearray(n[0])
        written = ffi.new("size_t *")
        _native.check(lib.dsv4_session_save_state(self._session, seq, ffi.from_buffer(buf), len(buf), written))
        return bytes(buf[:written[0]])

    def load_state(self, blob: bytes, seq: int = 0) -> None:
        """Restores a state saved by `save_state` into sequence `seq`. A corrupt or foreign blob
        raises StateError and leaves the session unchanged."""
        self._require_open()
        seq = self._seq(seq)
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError("load_state needs the bytes returned by save_state")
        ffi, lib = self._ffi, self._lib
        data = bytes(blob)
        _native.check(lib.dsv4_session_load_state(self._session, seq, ffi.from_buffer(data), len(data)))
        n = ffi.new("int64_t *")
        _native.check(lib.dsv4_session_tokens(self._session, seq, ffi.NULL, 0, n))
        toks = np.empty(n[0], dtype=np.int32)
        if n[0]:
            _native.check(lib.dsv4_session_tokens(self._session, seq, ffi.cast("int32_t *", toks.ctypes.data), n[0], n))
        self._seqs[seq] = [int(t) for t in toks]
        self._last[seq] = None

    def reset(self, seq: int | None = None) -> None:
        """Forgets every token of sequence `seq` (None: of every sequence)."""
        self._require_open()
        seqs = range(self.n_seq) if seq is None else [self._seq(seq)]
        _native.check(self._lib.dsv4_session_reset(self._session, -1 if seq is None else seqs[0]))
        for s in seqs:
            self._seqs[s] = []
            self._last[s] = None

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

    def metadata_array_length(self, key: str) -> int | None:
        """The number of entries of an array metadata value of the GGUF, or None when absent
        (or not an array)."""
        self._require_open()
        n = self._ffi.new("int64_t *")
        _native.check(self._lib.dsv4_model_meta_array_length(self._model, key.encode(), n))
        return None if n[0] < 0 else int(n[0])

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when add_bos (default: the GGUF's add_bos_token).
        Special tokens written in the text (`<｜User｜>`, ...) become their ids."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_bos)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # --- generation -------------------------------------------------------------------------------
    def _feed(self, tokens: list[int], seq: int = 0) -> np.ndarray:
        """Makes sequence `seq` hold `tokens`, evaluating only what follows the longest common prefix
        of the tokens it holds and these (a chat's next turn, or a thinking-mode turn whose earlier
        reasoning was dropped: the sequence is rolled back to where they part), and returns the
        last token's logits."""
        seq = self._seq(seq)
        held = self._seqs[seq]
        common = 0
        for a, b in zip(held, tokens):
            if a != b:
                break
            common += 1
        if common == len(tokens):
            if common == len(held) and self._last[seq] is not None:
                return self._last[seq]
            common -= 1          # the prompt is held whole: recompute its last token for the logits
        if common < len(held):
            self.truncate(common, seq=seq)
        return self.eval(tokens[common:], logits="last", seq=seq)[0]

    def _tokens_for_text(self, text: str, seq: int = 0) -> list[int]:
        """Tokens of a rendered prompt. When it extends the text sequence `seq` holds, the held
        tokens, then the new text's (so a chat's next turn evaluates only the new turn, whatever
        the tokenizer would make of the whole text); otherwise the text's own tokens (`_feed` then
        keeps the common prefix)."""
        held_tokens = self._seqs[self._seq(seq)]
        if held_tokens:
            held = self.tokenizer.decode(held_tokens)
            if len(text) > len(held) and text.startswith(held):
                return held_tokens + self.tokenize(text[len(held):], add_bos=False)
        return self.tokenize(text, add_bos=False)

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None, stop=None, draft=None, n_draft: int = 2,
                 adaptive_draft: bool = True):
        """Streams `GenerationChunk(token, text, finish_reason)` for a prompt (text or token
        ids). Stops at EOS, a stop string (not included in the text), max_tokens or n_ctx.

        `draft`: speculative decoding with a draft `Model` (same vocabulary; up to `n_draft`
        drafts checked per step, K adapting to the measured acceptance unless
        `adaptive_draft=False`) or a `speculative.Drafting` (whose `stats` tell the acceptance).
        The stream is the same as without: greedy token for token, sampling in distribution."""
        from .generation import stream_tokens
        from .speculative import Drafting
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
        return stream_tokens(self, tokens, max_tokens, params, _stops(stop), Drafting.of(draft, n_draft, adaptive_draft))

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
                               reasoning_effort: str | None = None, draft=None, n_draft: int = 2):
        """OpenAI-style chat completion over the chat template. The session keeps the
        conversation: a follow-up turn evaluates only the tokens after what it already holds.
        `draft`, `n_draft`: speculative decoding, as in `generate`."""
        from .generation import chat_completion
        from .speculative import Drafting
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, 64, seed)
        extra = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
        return chat_completion(self, messages, stream, max_tokens, params, _stops(stop), thinking, tools, extra,
                               Drafting.of(draft, n_draft))

    @property
    def n_past(self) -> int:
        """Tokens in sequence 0 so far."""
        return self.seq_len(0)

    def seq_len(self, seq: int = 0) -> int:
        """Tokens in sequence `seq` so far."""
        self._require_open()
        n = self._ffi.new("int64_t *")
        _native.check(self._lib.dsv4_session_n_past(self._session, self._seq(seq), n))
        return int(n[0])

    def stats(self) -> dict[str, int]:
        """Session counters: n_past (sequence 0), n_ubatches, n_graph_builds, n_graph_nodes,
        state_bytes (every slot), slot_state_bytes (one slot), n_seq, checkpoint_bytes, n_restores
        and n_reevaluated (truncations that went back further than the rings reach, and the tokens
        they recomputed), compute_bytes, n_graph_splits and n_graph_copies (of the current graph:
        what it needs of the compute buffer, the backend splits the scheduler made, the tensors it
        copies between backends) and compute_bytes_all (the session's one compute buffer, shared
        by every cached graph)."""
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

    def estimate_state_bytes(self, n_ctx: int, cache_type: str | None = None, n_seq: int = 1,
                             per_slot: bool = False) -> int:
        """Persistent state a session of n_ctx tokens and n_seq sequences needs (nothing is
        allocated); `per_slot=True`: what each sequence slot takes."""
        self._require_open()
        ct = CACHE_TYPES.get(cache_type or self.cache_type)
        if ct is None:
            raise InvalidArgumentError(f"cache_type must be one of {sorted(CACHE_TYPES)}")
        sp = self._ffi.new("dsv4_session_params *", self._params[0])
        sp.n_ctx, sp.cache_type, sp.n_seq = int(n_ctx), ct, int(n_seq)
        out, slot = self._ffi.new("uint64_t *"), self._ffi.new("uint64_t *")
        _native.check(self._lib.dsv4_model_state_bytes(self._model, sp, out, slot))
        return int(slot[0] if per_slot else out[0])

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
                file=int(info.file),
            ))
        return out

    @property
    def files(self) -> list[str]:
        """The files the model was read from: [path], or every part of a split GGUF
        (llama.cpp's gguf-split: PREFIX-00001-of-00003.gguf …) in part order, whichever part
        `path` named."""
        self._require_open()
        ffi, lib = self._ffi, self._lib
        n = ffi.new("int32_t *")
        _native.check(lib.dsv4_model_n_files(self._model, n))
        out = ffi.new("const char **")
        paths = []
        for i in range(n[0]):
            _native.check(lib.dsv4_model_file_path(self._model, i, out))
            paths.append(os.fsdecode(ffi.string(out[0])))
        return paths

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
