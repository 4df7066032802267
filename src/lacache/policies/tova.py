"""TOVA (Oren et al., 2024): keep the slots the newest query attends to most, per layer."""

from __future__ import annotations

from .._lazy import torch
from ..registry import Method, register
from .base import LayerView
from .scores import ScorePolicy, score_rule

__all__ = ["TOVAPolicy", "tova_policy"]


class TOVAPolicy(ScorePolicy):
    """TOVA: keep the slots the newest query attends to most (head-averaged), per layer."""

    needs_attention = True

    def score(self, view: LayerView) -> torch.Tensor:
        return view.attention()[:, -1, :]


def tova_policy(num_layers: int, budget: int, sinks: int = 0, window: int = 1) -> TOVAPolicy:
    """TOVA for ``budget`` slots: ``sinks`` leading and ``window`` newest slots are never evicted."""
    return score_rule(TOVAPolicy, num_layers, budget, sinks, window)


register(Method("tova", tova_policy, "TOVA: the slots the newest query attends to most", sees="attention",
                chunked=False))
