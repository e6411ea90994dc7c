"""DeepSeek-V3/V4 tokenizer built from GGUF metadata with the `tokenizers` library.

llama.cpp's "gpt2" byte-level BPE with the `deepseek-v3` / `joyai-llm` pre-tokenizer (spec §5):
three regex splits applied in turn (digit runs of 1–3, runs of CJK/kana, then the V3
punctuation/letter/newline/whitespace split), each piece isolated, then the GPT-2 byte-to-unicode
mapping. Control and user-defined tokens (BOS/EOS, `<｜User｜>`, `<think>`, ...) are special:
they match as whole strings in the text, never split by BPE.
"""
from __future__ import annotations

import functools
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM (the same for JOYAI_LLM)
DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
SUPPORTED_PRE = ("deepseek-v3", "joyai-llm")
# gguf / llama.cpp token types
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class Dsv4Tokenizer:
    """Text <-> token ids for one vocabulary."""

    def __init__(self, tokens: Sequence[str], merges: Iterable[str], token_types: Sequence[int],
                 bos_id: int, eos_id: int, add_bos: bool = True):
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed merge {m!r}")
            pairs.append((a, b))
        self._tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        self._tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in DEEPSEEK_V3_SPLITS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._tok.decoder = decoders.ByteLevel()
        # control and unused (filler) tokens are specials; user-defined ones are added tokens
        # matched in any text, which decode to their text like normal tokens (llama.cpp's rules)
        special = [t for t, ty in zip(tokens, token_types) if ty in (TOKEN_CONTROL, TOKEN_UNUSED)]
        user = [t for t, ty in zip(tokens, token_types) if ty == TOKEN_USER_DEFINED]
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self._tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        self.tokens = list(tokens)
        self.special_ids = frozenset(vocab[t] for t in special)
        self._text_ids = self.special_ids | frozenset(vocab[t] for t in user)   # pieces that are text, not bytes
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.n_vocab = len(tokens)

    @classmethod
    def from_model(cls, model) -> "Dsv4Tokenizer":
        """Reads the vocabulary through the native library of an open `Model`."""
        ffi, lib = model._ffi, model._lib
        from . import _native

        text, n, ty = ffi.new("const char **"), ffi.new("size_t *"), ffi.new("int32_t *")
        tokens, types = [], []
        for i in range(model.n_vocab):
            _native.check(lib.dsv4_model_token(model._model, i, text, n, ty))
            tokens.append(ffi.unpack(text[0], n[0]).decode("utf-8", "replace"))
            types.append(int(ty[0]))
        merges = []
        for i in range(model.hparams["n_merges"]):
            _native.check(lib.dsv4_model_merge(model._model, i, text, n))
            merges.append(ffi.unpack(text[0], n[0]).decode("utf-8", "replace"))
        hp = model.hparams
        return cls(tokens, merges, types, hp["bos_token_id"], hp["eos_token_id"], bool(hp["add_bos"]))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (added tokens: their UTF-8 text)."""
        if token_id in self._text_ids:
            return self.tokens[token_id].encode("utf-8")
        return _unicode_to_bytes(self.tokens[token_id])


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    from .tiny_vocab import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


def _unicode_to_bytes(piece: str) -> bytes:
    inv = _unicode_to_byte()
    return bytes(inv[c] for c in piece if c in inv)


class StreamDecoder:
    """Turns a stream of token ids into text without ever emitting a broken UTF-8 character:
    the bytes of a character split across tokens are held back until it is complete."""

    def __init__(self, tokenizer: Dsv4Tokenizer):
        self._tok = tokenizer
        self._pending = b""

    def push(self, token_id: int) -> str:
        data = self._pending + self._tok.token_bytes(token_id)
        for held in range(0, min(3, len(data)) + 1):
            head, tail = data[:len(data) - held], data[len(data) - held:]
            if held and not _is_utf8_prefix(tail):
                continue
            try:
                text = head.decode("utf-8")
            except UnicodeDecodeError:
                continue
            self._pending = tail
            return text
        self._pending = b""                      # invalid bytes inside: replace them
        return data.decode("utf-8", errors="replace")

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


def _is_utf8_prefix(b: bytes) -> bool:
    """True when `b` is the incomplete start of one UTF-8 character."""
    first = b[0]
    need = 2 if first >> 5 == 0b110 else 3 if first >> 4 == 0b1110 else 4 if first >> 3 == 0b11110 else 0
    return need > len(b) and all(x >> 6 == 0b10 for x in b[1:])
