"""The LaCache authors' schedule as a policy: the ladder compacted when and where their code does it.

The arithmetic (and where it departs from their code) is in ``lacache.policies.authors_schedule``; this
policy carries its state between forward passes and tells the cache its capacity, which grows by
``floor(R / 2)`` at the first overflow (their "budget compensation").
"""

from __future__ import annotations

from .authors_schedule import ReferenceState, reference_compaction, reference_min_budget
from .base import IndexPolicy
from .ladder_geometry import LadderGeometry
from .plan import CompactionPlan

__all__ = ["ReferenceLadderPolicy"]

_MEMO_LIMIT = 2048


class ReferenceLadderPolicy(IndexPolicy):
    """``schedule="reference"``: compacts above its own capacity, ignoring the cache's target."""

    amortises = False

    def __init__(self, geometry: LadderGeometry, sinks: int, budget: int):
        self.geometry = geometry
        self.sinks = sinks
        self.budget = budget
        self.state = ReferenceState.start(budget, sinks)
        # decode revisits a few (slots, state) pairs; plans are pure functions of them
        self._plans: dict[tuple[int, ReferenceState], tuple[CompactionPlan, ReferenceState]] = {}

    def capacity(self, budget: int) -> int:
        return self.state.capacity

    def most_slots(self, budget: int) -> int:
        g = self.geometry
        return budget + (g.rung - g.keep) // 2

    def min_target(self) -> int:
        return reference_min_budget(self.geometry, self.sinks)

    def recent_window(self) -> int:
        """The authors' recent window: as many slots as the model has layers."""
        return self.geometry.num_layers

    def plan(self, n: int, target: int) -> CompactionPlan:
        key = (n, self.state)
        hit = self._plans.get(key)
        if hit is None:
            index, state, starts = reference_compaction(self.geometry, n, self.state, self.sinks)
            hit = (CompactionPlan(index, state.cursor, starts), state)
            if n <= 2 * self.state.capacity + 64 and len(self._plans) < _MEMO_LIMIT:
                self._plans[key] = hit
        plan, self.state = hit
        return plan

    def decode_state(self):
        return self.state

    def reset(self) -> None:
        super().reset()
        self.state = ReferenceState.start(self.budget, self.sinks)

    def describe(self) -> dict:
        g = self.geometry
        return {"policy": "ladder", "schedule": "reference", "sinks": self.sinks, "window": g.num_layers,
                "span": g.span, "overlap": g.overlap, "rung": g.rung, "keep": g.keep,
                "capacity": self.state.capacity}
