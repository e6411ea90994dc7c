"""The checkpoint's tokenizer (tokenizer.json, byte-level BPE; tokenizer_config.json and the chat
template files when present) as the GGUF token list, token types and merges."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import BadKeyError, FileError
from .config import _load_json

# gguf TokenType values (llama.cpp)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or (tok.startswith("<｜") and tok.endswith("｜>"))


def read_tokenizer(hf_dir: str | os.PathLike, n_vocab: int) -> dict[str, Any]:
    """tokenizer.json (HF byte-level BPE) -> GGUF token list (id order, `[PAD{i}]` for unassigned ids),
    token types (added special or special-looking: CONTROL; other added: USER_DEFINED; missing: UNUSED;
    else NORMAL), merges ("a b"), the text->id map, and the chat template when there is one."""
    d = Path(hf_dir)
    path = d / "tokenizer.json"
    if not path.is_file():
        raise FileError(f"'{d}' has no tokenizer.json (the GGUF vocabulary comes from it)")
    tj = _load_json(path)
    model = tj.get("model") or {}
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise BadKeyError(f"'{path}' is not a byte-level BPE tokenizer (model.type {model.get('type')!r})")
    id_to_tok: dict[int, str] = {}
    for tok, i in model["vocab"].items():
        id_to_tok[int(i)] = tok
    added = {}
    for a in tj.get("added_tokens") or []:
        added[int(a["id"])] = a
        id_to_tok[int(a["id"])] = a["content"]
    if id_to_tok and max(id_to_tok) >= n_vocab:
        raise BadKeyError(f"tokenizer.json has token id {max(id_to_tok)}, beyond the config's vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(tok)
        if i in added:
            types.append(TOKEN_CONTROL if added[i].get("special") or _looks_special(tok) else TOKEN_USER_DEFINED)
        else:
            types.append(TOKEN_NORMAL)
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise BadKeyError(f"'{path}': malformed merge {m!r}")

    template = None
    tc_path = d / "tokenizer_config.json"
    tc = _load_json(tc_path) if tc_path.is_file() else {}
    ct = tc.get("chat_template")
    if isinstance(ct, list):   # [{name, template}, ...]
        named = {t.get("name"): t.get("template") for t in ct if isinstance(t, dict)}
        ct = named.get("default") or next(iter(named.values()), None)
    if isinstance(ct, str) and ct:
        template = ct
    elif (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif (d / "chat_template.json").is_file():
        ct = _load_json(d / "chat_template.json").get("chat_template")
        template = ct if isinstance(ct, str) and ct else None

    def special_id(key):
        v = tc.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return {t: i for i, t in enumerate(tokens)}.get(v) if isinstance(v, str) else None

    return dict(tokens=tokens, types=types, merges=merges, chat_template=template,
                bos_id=special_id("bos_token"), eos_id=special_id("eos_token"))
