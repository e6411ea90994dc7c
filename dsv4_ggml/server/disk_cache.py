"""`--cache-dir`: slot states kept on disk by prefix, so that a prompt cache survives restarts.

When a request has evaluated its prompt but the last token, its slot's state (`Model.save_state`:
the tokens it holds and the state they made) is written to `DIR/<sha256 of the token
ids>.dsv4cache` by a background thread: a loaded state cannot be rolled back, so a state that
stops short of the generation is the one a repeated or extended prompt can go on from. When
a new request's prompt shares a longer prefix with a saved state than with any idle slot, that
state is loaded into the slot (then truncated to the shared prefix, as for a slot's own cache).
At start the directory is scanned; the total size is bounded (`max_bytes`, least recently used
files go first; a hit refreshes a file's time). A file that is not ours, truncated, corrupted or
saved by another model or cache type is skipped with a log line and never loaded twice: the
engine checks the state's own magic, model fingerprint and checksum.

File layout: `DSV4PCACHE1\\n`, a 4-byte little-endian header length, a JSON header
(`{"n_tokens", "model", "tokens"}`), then the blob `save_state` returned.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

log = logging.getLogger("uvicorn.error")

MAGIC = b"DSV4PCACHE1\n"
SUFFIX = ".dsv4cache"
MIN_TOKENS = 16           # shorter prompts are cheap to recompute: not worth a file


def model_identity(model) -> str:
    """What a saved state must match: the model file (name and size) and the cache type."""
    path = getattr(model, "path", "")
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    return f"{os.path.basename(path)}:{size}:{getattr(model, 'cache_type', '')}:{getattr(model, 'n_ctx', '')}"


def _key(tokens: Sequence[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:40]


class DiskCache:
    def __init__(self, directory: str | os.PathLike, max_bytes: int, model_id: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.model_id = model_id
        self.entries: dict[Path, list[int]] = {}     # file -> the tokens its state holds
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv4-cache-writer")
        self.hits = self.saved = self.skipped = 0
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            tokens = self._read_header(path)
            if tokens is not None:
                self.entries[path] = tokens
        log.info("prompt cache %s: %d saved states", self.dir, len(self.entries))

    def _read_header(self, path: Path) -> list[int] | None:
        try:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    raise ValueError("not a dsv4-ggml prompt cache file")
                (n,) = struct.unpack("<I", f.read(4))
                header = json.loads(f.read(n))
            tokens = header["tokens"]
            if not isinstance(tokens, list) or len(tokens) != header["n_tokens"]:
                raise ValueError("inconsistent header")
            if header.get("model") != self.model_id:
                raise ValueError(f"saved by another model ({header.get('model')!r})")
            return [int(t) for t in tokens]
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            self.skipped += 1
            log.warning("prompt cache: ignoring %s: %s", path.name, e)
            return None

    def best(self, tokens: Sequence[int]) -> tuple[Path | None, int]:
        """The saved state sharing the longest prefix with `tokens`, and that length."""
        from .scheduler import common_prefix

        with self._lock:
            entries = list(self.entries.items())
        best, n = None, 0
        for path, held in entries:
            k = common_prefix(held, tokens)
            if k > n:
                best, n = path, k
        return best, n

    def load(self, path: Path) -> bytes | None:
        """The state blob of `path` (None, and the file forgotten, when it cannot be read)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            (n,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
            os.utime(path)                   # least recently used goes first
            self.hits += 1
            return data[len(MAGIC) + 4 + n:]
        except (OSError, struct.error) as e:
            self.forget(path, str(e))
            return None

    def forget(self, path: Path, why: str) -> None:
        log.warning("prompt cache: ignoring %s: %s", path.name, why)
        self.skipped += 1
        self._drop(path)

    def _drop(self, path: Path) -> None:
        """Forgets a saved state and deletes its file."""
        with self._lock:
            self.entries.pop(path, None)
        try:
            path.unlink()
        except OSError:
            pass

    def wants(self, tokens: Sequence[int]) -> bool:
        """Whether a state holding `tokens` is worth saving (long enough, not saved yet)."""
        if len(tokens) < MIN_TOKENS:
            return False
        path = self.dir / (_key(tokens) + SUFFIX)
        with self._lock:
            known = path in self.entries
        if known:
            try:
                os.utime(path)
            except OSError:
                pass
        return not known

    def save(self, tokens: Sequence[int], blob: bytes) -> None:
        """Writes the state in the background (a file per distinct token list)."""
        if len(tokens) < MIN_TOKENS:
            return
        tokens = list(tokens)
        path = self.dir / (_key(tokens) + SUFFIX)
        with self._lock:
            if path in self.entries:
                os.utime(path)
                return
        self._writer.submit(self._write, path, tokens, blob)

    def _write(self, path: Path, tokens: list[int], blob: bytes) -> None:
        header = json.dumps({"n_tokens": len(tokens), "model": self.model_id, "tokens": tokens}).encode()
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header + blob)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("prompt cache: could not write %s: %s", path.name, e)
            return
        with self._lock:
            self.entries[path] = tokens
        self.saved += 1
        self._evict()

    def _evict(self) -> None:
        files = []
        for path in list(self.entries):
            try:
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
            except OSError:
                with self._lock:
                    self.entries.pop(path, None)
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            self._drop(path)
            total -= size

    def close(self) -> None:
        self._writer.shutdown(wait=True)
