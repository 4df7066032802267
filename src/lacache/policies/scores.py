"""Content-aware eviction: TOVA, H2O (attention scores) and key-norm (attention-free).

Each layer, and each sequence of a batch, keeps its own top-scoring slots, plus ``sinks`` leading
slots and a recent ``window`` that are never evicted. Kept slots stay in their original order, so
the position shift sees them as a contiguous history like any other bounded cache.
"""

from __future__ import annotations

import torch

from .base import LayerView, RetentionPolicy
from .plan import RowPlan

__all__ = ["ScorePolicy", "TOVAPolicy", "H2OPolicy", "KNormPolicy", "keep_top"]


def keep_top(score: torch.Tensor, target: int, sinks: int, window: int) -> torch.Tensor:
    """Indices ``[B, target]`` (ascending) of the top-``score`` slots, always keeping sinks and the window."""
    n = score.shape[-1]
    forced = score.clone()
    forced[:, : min(sinks, n)] = float("inf")
    if window:
        forced[:, max(0, n - window) :] = float("inf")
    return forced.topk(target, dim=-1).indices.sort(dim=-1).values


class ScorePolicy(RetentionPolicy):
    """Base for per-layer, per-sequence score-based eviction: keep the ``target`` best-scoring slots.

    Subclasses give ``score(view)`` (higher is kept). Rules whose scores accumulate over the stream
    keep one score per slot in ``state[layer]`` and set ``observes_every_step``; the kept columns of
    that state follow every compaction.
    """

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

    def score(self, view: LayerView) -> torch.Tensor:
        """``[B, n]`` scores of the layer's slots (higher is kept); default: the accumulated state."""
        return self.state[view.layer_idx]

    def retain(self, view: LayerView, target: int) -> RowPlan:
        idx = keep_top(self.score(view), target, self.sinks, self.window)
        layer = view.layer_idx
        if self.state[layer] is not None:
            self.state[layer] = self.state[layer].gather(1, idx)
        return RowPlan(idx)

    def reset(self) -> None:
        self.state = [None] * self.num_layers

    def describe(self) -> dict:
        return {"policy": type(self).__name__.replace("Policy", "").lower(), "sinks": self.sinks, "window": self.window}


class TOVAPolicy(ScorePolicy):
    """TOVA: keep the slots the newest query attends to most (head-averaged), per layer."""

    needs_attention = True

    def score(self, view: LayerView) -> torch.Tensor:
        return view.attention()[:, -1, :]


class H2OPolicy(ScorePolicy):
    """H2O: heavy hitters by attention accumulated over every query so far, plus a recent window."""

    needs_attention = True
    observes_every_step = True

    def observe(self, view: LayerView) -> None:
        acc = self.state[view.layer_idx]
        total = view.attention().sum(dim=1)  # [B, n]
        if acc is not None:
            total[:, : acc.shape[1]] += acc
        self.state[view.layer_idx] = total


class KNormPolicy(ScorePolicy):
    """Key-norm: keep the slots whose keys have the smallest L2 norm (head-averaged); no attention needed."""

    observes_every_step = True

    def observe(self, view: LayerView) -> None:
        q = view.query_length
        new = view.keys()[:, :, -q:].float().norm(dim=-1).mean(dim=1)  # [B, q]
        old = self.state[view.layer_idx]
        self.state[view.layer_idx] = new if old is None else torch.cat([old, new], dim=1)

    def score(self, view: LayerView) -> torch.Tensor:
        return -self.state[view.layer_idx]
