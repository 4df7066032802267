"""KeyDiff (Park et al., 2025): keep the slots whose keys point furthest from the layer's mean key direction.

Attention-free like key-norm, but relative: a key that looks like most of the cache (the filler of a
long document) is what attention can most afford to lose, and a key unlike the rest (a name, a
number, a change of subject) is what a later question may need. Each head's *anchor* is the mean of
the layer's unit keys; a slot's score is its negative cosine to the anchor, averaged over the heads.

Keys are compared as attention reads them, each at its slot's position (``KeyStatistic.positioned``:
vLLM's paged keys sit exactly there; a shift common to every position leaves every cosine unchanged,
so any frame a cache stores them in gives the same scores). Scores depend on every held key, so each
compaction reads the layer's keys again (``per_slot=False``) instead of keeping a value per slot. On
the bundled model, pass key through a 64-token chunked prefill at half the prompt (docs/serving.md),
this finds 20 of 20 keys in the suite's repeated filler and 11 of 20 in running text, where key-norm
finds 19 and 2 and the full cache 20 and 16.
"""

from __future__ import annotations

from .. import checks
from .._lazy import torch
from ..registry import Method, register
from .base import KeyStatistic, LayerView
from .scores import ScorePolicy, score_rule

__all__ = ["KeyDiffPolicy", "keydiff_policy", "KEY_DIVERGENCE", "anchor_divergence"]


def anchor_divergence(keys: torch.Tensor) -> torch.Tensor:
    """``[B, n]``: each slot's negative cosine to its head's mean unit key, averaged over heads, for keys
    ``[B, H, n, D]`` (unrounded: a backend that splits heads over processes averages these first)."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    anchor = torch.nn.functional.normalize(unit.mean(dim=2, keepdim=True), dim=-1)
    return -(unit * anchor).sum(dim=-1).mean(dim=1)


#: KeyDiff's score: how far each key points from the layer's mean direction
KEY_DIVERGENCE = KeyStatistic("key divergence from the mean direction", anchor_divergence, per_slot=False,
                              positioned=True)


class KeyDiffPolicy(ScorePolicy):
    """KeyDiff: keep the keys least similar to the layer's mean key direction (plus sinks and a recent window)."""

    key_statistic = KEY_DIVERGENCE

    def score(self, view: LayerView) -> torch.Tensor:
        return view.stats(KEY_DIVERGENCE)


def keydiff_policy(num_layers: int, budget: int, sinks: int = 4, window: int | None = None) -> KeyDiffPolicy:
    """KeyDiff for ``budget`` slots: ``sinks``, a recent ``window`` (default an eighth of the budget) and the
    keys furthest from the mean direction in the rest."""
    if window is None and checks.is_integer(budget):
        window = max(1, budget // 8)
    return score_rule(KeyDiffPolicy, num_layers, budget, sinks, window)


# chunked like key-norm (budget // 16 freed per compaction): each compaction reads the layer's keys again
register(Method("keydiff", keydiff_policy, "KeyDiff: keys furthest from the mean key direction + sinks + a "
                "recent window", sees="keys", suites=frozenset({"passkey", "ruler"})))
