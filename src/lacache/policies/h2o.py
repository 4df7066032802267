"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

from .. import checks
from ..registry import Method, register
from .base import LayerView
from .scores import ScorePolicy, score_rule

__all__ = ["H2OPolicy", "h2o_policy"]


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


def h2o_policy(num_layers: int, budget: int, window: int | None = None, sinks: int = 0) -> H2OPolicy:
    """H2O for ``budget`` slots: a recent ``window`` (default half the budget) and heavy hitters in the rest."""
    if window is None and checks.is_integer(budget):
        window = max(1, budget // 2)
    return score_rule(H2OPolicy, num_layers, budget, sinks, window)


register(Method("h2o", h2o_policy, "H2O: heavy hitters by accumulated attention + a recent window",
                sees="attention", chunked=False))
