"""Key-norm (Devoto et al., 2024): keep the slots whose keys have the smallest L2 norm.

Attention-free like LaCache: it needs no queries, only one norm per new key.
"""

from __future__ import annotations

from .. import checks
from .._lazy import torch
from ..registry import Method, register
from .base import KEY_NORM, LayerView, key_norms
from .scores import ScorePolicy, score_rule

__all__ = ["KNormPolicy", "knorm_policy"]


class KNormPolicy(ScorePolicy):
    """Key-norm: keep the slots whose keys have the smallest L2 norm (head-averaged); no attention needed."""

    observes_every_step = True
    keyed_state = True
    key_statistic = KEY_NORM

    def observe(self, view: LayerView) -> None:
        new = self.key_state(view.keys()[:, :, -view.query_length:])
        old = self.state[view.layer_idx]
        self.state[view.layer_idx] = new if old is None else torch.cat([old, new], dim=1)

    def key_state(self, keys: torch.Tensor) -> torch.Tensor:
        """Head-averaged L2 norms ``[B, q]`` (a position rotation leaves a key's norm unchanged), at the
        precision every backend compares them (``key_norms``)."""
        return key_norms(keys)

    def score(self, view: LayerView) -> torch.Tensor:
        # vLLM's workers hand in every slot's norm at compaction time instead of observing each pass
        return self.state_score(view.norms() if view.carries_stats else self.state[view.layer_idx])

    def state_score(self, state: torch.Tensor) -> torch.Tensor:
        return -state  # the smallest norms are kept


def knorm_policy(num_layers: int, budget: int, sinks: int = 4, window: int | None = None) -> KNormPolicy:
    """Key-norm for ``budget`` slots: ``sinks``, a recent ``window`` (default an eighth of the budget) and
    the smallest-norm keys in the rest."""
    if window is None and checks.is_integer(budget):
        window = max(1, budget // 8)
    return score_rule(KNormPolicy, num_layers, budget, sinks, window)


# chunked (``chunk=None``: budget // 16 freed per compaction, at compaction points) like the ladder, in every
# backend: vLLM cannot afford a compaction per token per request, and one default keeps both backends' answers
# equal (before issue 31 key-norm evicted to exactly the budget every token; ``chunk=0`` still does)
register(Method("knorm", knorm_policy, "key-norm: the smallest key norms + sinks + a recent window", sees="keys",
                suites=frozenset({"ppl", "passkey"})))
