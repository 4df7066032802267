"""Content-aware eviction: TOVA, H2O (attention scores) and key-norm (attention-free).

Each layer, and each sequence of a batch, keeps its own top-scoring slots, plus ``sinks`` leading
slots and a recent ``window`` that are never evicted. Kept slots stay in their original order, so
the position shift sees them as a contiguous history like any other bounded cache.
"""

from __future__ import annotations

import torch

from ..ladder import CompactionPlan
from .base import SlotPolicy

__all__ = ["ScorePolicy", "TOVAPolicy", "H2OPolicy", "KNormPolicy", "keep_top", "attention_probs"]


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-averaged attention of the new queries over all visible slots: ``[B, q, n]``.

    ``query`` is ``[B, Hq, q, D]`` (post-RoPE), ``keys`` ``[B, Hkv, n, D]`` as attention sees them;
    the last ``q`` slots are the new tokens, attended causally.
    """
    b, hq, q, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    groups = hq // hkv
    qg = query.float().reshape(b, hkv, groups * q, d)
    scores = (qg @ keys.float().transpose(-1, -2)) * scaling  # [B, Hkv, groups*q, n]
    scores = scores.view(b, hkv, groups, q, n)
    if q > 1:
        causal = torch.ones(q, n, dtype=torch.bool, device=keys.device).tril(n - q)
        scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def keep_top(score: torch.Tensor, target: int, sinks: int, window: int) -> torch.Tensor:
    """Indices ``[B, target]`` (ascending) of the top-``score`` slots, always keeping sinks and the window."""
    n = score.shape[-1]
    forced = score.clone()
    forced[:, : min(sinks, n)] = float("inf")
    if window:
        forced[:, max(0, n - window) :] = float("inf")
    return forced.topk(target, dim=-1).indices.sort(dim=-1).values


class ScorePolicy(SlotPolicy):
    """Base for per-layer, per-sequence score-based eviction. Keeps one score row per slot."""

    #: whether the cache must observe queries (attention scores)
    needs_queries = False
    #: whether scores must be observed at every step, not only when evicting
    accumulates = False

    def __init__(self, num_layers: int, sinks: int, window: int):
        if sinks < 0:
            raise ValueError(f"sinks={sinks} must be >= 0; e.g. sinks=4")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1 (the newest token is always kept); e.g. window=16")
        self.num_layers = num_layers
        self.sinks = sinks
        self.window = window
        self.state: list[torch.Tensor | None] = [None] * num_layers

    def min_target(self) -> int:
        return self.sinks + self.window

    def plan(self, n: int, target: int) -> CompactionPlan:  # pragma: no cover - not an index-only policy
        raise TypeError(f"{type(self).__name__} chooses slots from scores; the cache calls select()")

    def observe(self, layer_idx: int, keys: torch.Tensor, probs: torch.Tensor | None, q: int) -> None:
        """Record scores for this step's slots (``keys`` are the layer's stored keys, new ones last)."""

    def score(self, layer_idx: int) -> torch.Tensor:
        return self.state[layer_idx]

    def select(self, layer_idx: int, target: int) -> torch.Tensor:
        idx = keep_top(self.score(layer_idx), target, self.sinks, self.window)
        if self.state[layer_idx] is not None:
            self.state[layer_idx] = self.state[layer_idx].gather(1, idx)
        return idx

    def reset(self) -> None:
        self.state = [None] * self.num_layers

    def describe(self) -> dict:
        return {"policy": type(self).__name__.replace("Policy", "").lower(), "sinks": self.sinks, "window": self.window}


class TOVAPolicy(ScorePolicy):
    """TOVA: keep the slots the newest query attends to most (head-averaged), per layer."""

    needs_queries = True

    def observe(self, layer_idx, keys, probs, q):
        if probs is not None:
            self.state[layer_idx] = probs[:, -1, :]


class H2OPolicy(ScorePolicy):
    """H2O: heavy hitters by attention accumulated over every query so far, plus a recent window."""

    needs_queries = True
    accumulates = True

    def observe(self, layer_idx, keys, probs, q):
        acc = self.state[layer_idx]
        total = probs.sum(dim=1)  # [B, n]
        if acc is not None:
            total[:, : acc.shape[1]] += acc
        self.state[layer_idx] = total


class KNormPolicy(ScorePolicy):
    """Key-norm: keep the slots whose keys have the smallest L2 norm (head-averaged); no attention needed."""

    accumulates = True

    def observe(self, layer_idx, keys, probs, q):
        new = keys[:, :, -q:].float().norm(dim=-1).mean(dim=1)  # [B, q]
        old = self.state[layer_idx]
        self.state[layer_idx] = new if old is None else torch.cat([old, new], dim=1)

    def score(self, layer_idx):
        return -self.state[layer_idx]
