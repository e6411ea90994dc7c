"""A small, real byte-level BPE vocabulary for the tiny models (llama.cpp "gpt2" tokenizer).

Layout: ids 0/1 are BOS/EOS, then the 256 byte tokens (GPT-2's byte-to-unicode alphabet, in byte
order), then the tokens of the merges learned from a short embedded English text, then DeepSeek-V4's
chat special tokens (CONTROL), then `<｜padN｜>` fillers (UNUSED, as in the golden files) up to the requested size.
The trainer splits the text with the deepseek-v3 pre-tokenizer the GGUF names, counts byte pairs
inside the pieces, and merges the most frequent pair (ties broken by the pair's text) while it
occurs at least twice: deterministic, so every call returns the same vocabulary (cached per size).
DeepSeek's DSML tool-call markup (`<｜DSML｜invoke ...>`) is left to plain text: whether the real
vocabulary has special tokens for it is not established, so the tiny one does not pretend to.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
CHAT_SPECIALS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜tool▁calls▁begin｜>",
                 "<｜tool▁calls▁end｜>")

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5   # gguf token types

CORPUS = """\
DeepSeek-V4 is a mixture of experts language model. Every token is routed to a few experts,
and a shared expert sees every token. The attention keeps a sliding window of recent tokens and
compresses older ones into blocks: four tokens per block in the sparse layers, where a lightning
indexer picks the blocks that matter, and one hundred and twenty-eight tokens per block in the
heavily compressed layers, which attend to every block.

An inference engine reads the weights from a file, builds a graph of operations for each batch
of tokens, and runs it on the processor or on the graphics card. The engine keeps a cache of the
keys it has seen, so that each new token only computes what is new. Tests compare the engine
with a reference written in NumPy, token by token, and the logits must agree to the last digit
that float arithmetic allows.

The hidden state of every token is carried in four streams, the hyper-connections. Before each
block the streams are mixed into one input, and after the block the output is written back into
all four of them. The mixing weights come from a small projection of the streams themselves, made
doubly stochastic by a few rounds of normalisation of the rows and the columns.

When the user sends a message, the engine renders the chat template, turns the text into tokens,
evaluates the prompt in one batch, and then samples one token at a time until the end of the
sentence. Each sampled token is fed back to the model, and the answer is streamed to the user.

Hello world! The quick brown fox jumps over the lazy dog. Numbers like 42, 128 and 4096 appear
in the configuration; so do names such as ggml, GGUF, CUDA and Python. Ünïcödé text, 中文, and
emoji 🙂 are split into bytes when no merge covers them.
"""

# The pre-tokenizer of the GGUF's `tokenizer.ggml.pre = "deepseek-v3"` (llama.cpp applies the three
# splits in turn, each piece isolated): merges are learned inside the pieces it produces, so every
# merge can fire. Kept equal to `dsv4_ggml.tokenizer.DEEPSEEK_V3_SPLITS` (a test checks it).
PRE_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


def pre_tokenize(text: str) -> list[str]:
    """The text pieces the deepseek-v3 pre-tokenizer cuts `text` into."""
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS])
    return [piece for piece, _ in pre.pre_tokenize_str(text)]


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def train_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges, most frequent pair first; ties broken by the pair's text."""
    b2u = bytes_to_unicode()
    words: dict[tuple[str, ...], int] = {}
    for piece in pre_tokenize(text):
        w = tuple(b2u[b] for b in piece.encode("utf-8"))
        words[w] = words.get(w, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]        # "a b" strings, GGUF style
    bos_id: int = 0
    eos_id: int = 1


@functools.lru_cache(maxsize=8)
def build_vocab(n_vocab: int = 512) -> Vocab:
    """The tiny vocabulary with exactly `n_vocab` tokens (at least 2 + 256 + the chat specials)."""
    fixed = 2 + 256 + len(CHAT_SPECIALS)
    if n_vocab < fixed:
        raise ValueError(f"n_vocab must be at least {fixed} (BOS/EOS, 256 bytes, chat tokens), got {n_vocab}")
    b2u = bytes_to_unicode()
    tokens = [BOS, EOS] + [b2u[b] for b in range(256)]
    types = [TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_NORMAL] * 256
    room = n_vocab - fixed
    merges = train_merges(CORPUS, min(room, max(0, room - room // 8)))  # leave a few pad slots
    seen = set(tokens)
    kept = []
    for a, b in merges:
        t = a + b
        if t in seen:
            continue
        seen.add(t)
        tokens.append(t)
        types.append(TOKEN_NORMAL)
        kept.append(f"{a} {b}")
    tokens += list(CHAT_SPECIALS)
    types += [TOKEN_CONTROL] * len(CHAT_SPECIALS)
    while len(tokens) < n_vocab:
        tokens.append(f"<｜pad{len(tokens)}｜>")
        types.append(TOKEN_UNUSED)
    return Vocab(tuple(tokens), tuple(types), tuple(kept))
