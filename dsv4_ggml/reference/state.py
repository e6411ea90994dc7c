"""Per-layer decode-time state (spec §4.1): raw-KV window ring, compressor states, compressed caches."""

from __future__ import annotations

import numpy as np

from .compressor import CompressorState


class WindowRing:
    """Sliding-window raw KV: ``W`` rows, position ``t`` in slot ``t mod W``."""

    def __init__(self, window: int, width: int):
        self.window = window
        self.rows = np.zeros((window, width))
        self.n_past = 0

    def history(self):
        """The ``≤ W−1`` rows before the next token (all a new query can see), in position order.

        Returns ``(rows [n, width], first_pos)``.
        """
        n = min(self.n_past, self.window - 1)
        positions = np.arange(self.n_past - n, self.n_past)
        return self.rows[positions % self.window], self.n_past - n

    def write(self, kv: np.ndarray) -> None:
        """Append the next ``T`` tokens' kv (only the last ``W`` can still be needed)."""
        positions = np.arange(self.n_past, self.n_past + len(kv))
        tail = slice(max(0, len(kv) - self.window), len(kv))
        self.rows[positions[tail] % self.window] = kv[tail]
        self.n_past += len(kv)


class RowCache:
    """Append-only cache of compressed entries; row ``j`` = block ``j``."""

    def __init__(self, width: int):
        self._rows = np.zeros((16, width))
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def rows(self) -> np.ndarray:
        return self._rows[:self._n]

    def append(self, rows: np.ndarray) -> None:
        need = self._n + len(rows)
        if need > len(self._rows):
            grown = np.zeros((max(need, 2 * len(self._rows)), self._rows.shape[1]))
            grown[:self._n] = self._rows[:self._n]
            self._rows = grown
        self._rows[self._n:need] = rows
        self._n = need


class LayerState:
    """Everything one layer keeps between eval() calls (§4.1)."""

    def __init__(self, hp: dict, ratio: int):
        self.ratio = ratio
        self.window = WindowRing(hp["n_swa"], hp["head_dim"])
        if ratio:
            self.compressor = CompressorState(ratio, hp["head_dim"])
            self.compressed = RowCache(hp["head_dim"])
        if ratio == 4:
            self.indexer_compressor = CompressorState(ratio, hp["indexer_head_dim"])
            self.indexer_keys = RowCache(hp["indexer_head_dim"])
