"""What content-aware rules share (TOVA, H2O, key-norm): keep each layer's top-scoring slots.

Each layer, and each sequence of a batch, keeps its own top-scoring slots, plus ``sinks`` leading
slots and a recent ``window`` that are never evicted. Kept slots stay in their original order, so
the position shift sees them as a contiguous history like any other bounded cache. A rule is a
subclass that says how a slot scores (``tova.py``, ``h2o.py``, ``knorm.py``).
"""

from __future__ import annotations

from .. import checks
from .._lazy import torch
from .base import LayerView, RetentionPolicy, rank_slots, rows_of
from .plan import RowPlan

__all__ = ["ScorePolicy", "keep_top", "score_rule"]


def keep_top(score: torch.Tensor, target: int, sinks: int, window: int) -> torch.Tensor:
    """Indices ``[B, target]`` (ascending) of the top-``score`` slots, always keeping sinks and the window;
    equal scores keep the older slot (``rank_slots``)."""
    n = score.shape[-1]
    forced = score.clone()
    forced[:, : min(sinks, n)] = float("inf")
    if window:
        forced[:, max(0, n - window) :] = float("inf")
    return rank_slots(forced, target).sort(dim=-1).values


class ScorePolicy(RetentionPolicy):
    """Base for per-layer, per-sequence score-based eviction: keep the ``target`` best-scoring slots.

    Subclasses give ``score(view)`` (higher is kept). Rules whose scores accumulate over the stream
    keep one score per slot in ``state[layer]`` and set ``observes_every_step``; the kept columns of
    that state follow every compaction.

    A rule whose state entry for a slot is fixed by that slot's own stored key when it is written
    (key-norm) sets ``keyed_state`` and gives ``key_state``/``state_score``: a compiled decode step
    can then hold the state in a tensor and choose the survivors itself (``cache.static_scores``).
    Rules that read attention (TOVA, H2O) cannot: the cache never sees a compiled step's queries.
    """

    #: a slot's state entry depends on its own stored key alone (``key_state``)
    keyed_state: bool = False

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

    def count_after(self, n: int, target: int) -> int:
        """Slots a compaction of ``n`` down to ``target`` leaves: exactly ``target`` (the top slots)."""
        return min(n, target)

    def score(self, view: LayerView) -> torch.Tensor:
        """``[B, n]`` scores of the layer's slots (higher is kept); default: the accumulated state."""
        return self.state_score(self.state[view.layer_idx])

    def key_state(self, keys: torch.Tensor) -> torch.Tensor:
        """``keyed_state`` rules: the state entries ``[B, q]`` of new slots from their stored keys ``[B, H, q, D]``."""
        raise NotImplementedError(f"{type(self).__name__} does not score slots from their keys alone")

    def state_score(self, state: torch.Tensor) -> torch.Tensor:
        """Scores (higher is kept) from state entries; the identity unless a rule keeps something else."""
        return state

    def retain(self, view: LayerView, target: int) -> RowPlan:
        idx = keep_top(self.score(view), target, self.sinks, self.window)
        layer = view.layer_idx
        if self.state[layer] is not None:
            self.state[layer] = self.state[layer].gather(1, idx)
        return RowPlan(idx)

    def select_rows(self, rows: list[int]) -> None:
        self.state = [rows_of(state, rows) for state in self.state]

    def reset(self) -> None:
        self.state = [None] * self.num_layers

    def describe(self) -> dict:
        return {"policy": type(self).__name__.replace("Policy", "").lower(), "sinks": self.sinks, "window": self.window}


def score_rule(cls: type[ScorePolicy], num_layers: int, budget: int, sinks, window) -> ScorePolicy:
    """A score rule of class ``cls``, its settings checked against ``budget`` (one ``ValueError`` that
    names the setting and a value that works)."""
    budget = checks.integer("budget", budget, minimum=1, example=512)
    sinks = checks.integer("sinks", sinks, example=4)
    if not checks.is_integer(window) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer (the newest token is always kept), e.g. window=16")
    if sinks + window > budget:
        raise ValueError(f"budget={budget} is smaller than sinks={sinks} + window={window}: use budget >= "
                         f"{sinks + window} or a smaller window")
    return cls(num_layers, int(sinks), int(window))
