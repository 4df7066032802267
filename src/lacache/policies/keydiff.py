"""KeyDiff (Park et al., 2025): keep the slots whose keys point furthest from the layer's mean key direction.

Attention-free like key-norm, but relative: a key that looks like most of the cache (the filler of a
long document) is what attention can most afford to lose, and a key unlike the rest (a name, a
number, a change of subject) is what a later question may need. Each head's *anchor* is the mean of
the layer's unit keys; a slot's score is its negative cosine to the anchor, averaged over the heads.

Keys are compared as attention reads them, each at its slot's position (``KeyStatistic.positioned``:
vLLM's paged keys sit exactly there; a shift common to every position leaves every cosine unchanged,
so any frame a cache stores them in gives the same scores).

**Each slot is scored once**, at the first compaction that holds it, against the mean direction of
the keys held then, and keeps that score (the paper re-scores every held key at every eviction). Why:
two backends compute keys with different kernels, so a value can round to a different 8-bit number in
each; a score re-read at every compaction draws that chance again each time, one read once draws it
once, as a key norm does. Measured on the bundled model (a 50-input streaming session, budget 64,
the statistic perturbed by 1e-6): re-scored, 3 runs of 3 left the unperturbed tokens by the 10th
input; scored once, 2 of 3 never did. The mean direction is still read from every held key at each
compaction (``per_slot=False``); only the new slots' values are used.
"""

from __future__ import annotations

from .. import checks
from .._lazy import torch
from ..registry import Method, register
from .base import KeyStatistic, LayerView
from .plan import RowPlan
from .scores import ScorePolicy, keep_top, score_rule

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
    """KeyDiff: keep the keys least similar to the layer's mean key direction (plus sinks and a recent window).

    ``state[layer]`` holds the held slots' scores, in slot order, as they were first given."""

    key_statistic = KEY_DIVERGENCE

    def score(self, view: LayerView) -> torch.Tensor:
        """The held slots' scores as they were first read; the slots new since the last compaction scored
        against the mean direction now."""
        values = view.stats(KEY_DIVERGENCE)
        held = self.state[view.layer_idx]
        return values if held is None else torch.cat([held, values[:, held.shape[1]:]], dim=1)

    def retain(self, view: LayerView, target: int) -> RowPlan:
        """Keep the top slots; the survivors keep the scores they were ranked by."""
        scores = self.score(view)
        idx = keep_top(scores, target, self.sinks, self.window)
        self.state[view.layer_idx] = scores.gather(1, idx)
        return RowPlan(idx)


def keydiff_policy(num_layers: int, budget: int, sinks: int = 4, window: int | None = None) -> KeyDiffPolicy:
    """KeyDiff for ``budget`` slots: ``sinks``, a recent ``window`` (default an eighth of the budget) and the
    keys furthest from the mean direction in the rest."""
    if window is None and checks.is_integer(budget):
        window = max(1, budget // 8)
    return score_rule(KeyDiffPolicy, num_layers, budget, sinks, window)


# chunked like key-norm (budget // 16 freed per compaction): each compaction reads the layer's keys again
# vLLM's serving default in float32 (docs/serving.md, "Which rule to serve"); lacache-capped in half precision
register(Method("keydiff", keydiff_policy, "KeyDiff: keys furthest from the mean key direction + sinks + a "
                "recent window; vLLM's default in float32", sees="keys", suites=frozenset({"passkey", "ruler"}),
                serving_default=True))
