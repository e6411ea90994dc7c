"""Token sampling: repetition penalty, top-k, top-p, min-p, temperature, seeded draws.

The chain follows llama.cpp's default order (penalties, top-k, top-p, min-p, temperature,
draw). `temperature <= 0` is greedy. A seeded sampler draws the same tokens from the same logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # 0: off
    top_p: float = 0.95        # 1.0: off
    min_p: float = 0.05        # 0.0: off
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InvalidArgumentError(f"min_p must be in [0, 1], got {self.min_p}")
        if not np.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise InvalidArgumentError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise InvalidArgumentError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.params
        x = np.array(logits, dtype=np.float64)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and len(history):
            recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
            v = x[recent]
            x[recent] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        return x

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        if self.params.temperature <= 0:
            return int(np.argmax(self._penalized(logits, history)))
        ids, probs = self.distribution(logits, history)
        return int(ids[self.rng.choice(len(ids), p=probs)])

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) that `sample` draws from (temperature > 0): the chain's
        survivors and their normalized probabilities. Greedy: the argmax with probability 1."""
        p = self.params
        x = self._penalized(logits, history)
        if p.temperature <= 0:
            return np.array([int(np.argmax(x))]), np.array([1.0])
        # candidates by descending logit (stable: ties keep the lower id first)
        order = np.argsort(-x, kind="stable")
        if p.top_k:
            order = order[:p.top_k]
        z = x[order]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            order, z, probs = order[:keep], z[:keep], probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            order, z = order[keep], z[keep]
        t = np.exp((z - z[0]) / p.temperature)
        return order, t / t.sum()
