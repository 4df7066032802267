"""LaCache: ladder-shaped retention with iterative compaction (SPEC §2.1-2.2)."""

from __future__ import annotations

from ..ladder import CompactionPlan, LadderGeometry, ladder_plan
from .base import SlotPolicy


class LadderPolicy(SlotPolicy):
    """Keeps a cursor across calls; plans depend only on (slots, cursor, target) and are memoised.

    In a steady stream the cache cycles through a bounded set of (slots, cursor) states, so after
    one pass every compaction is a dictionary hit returning ready-made device index tensors.
    """

    def __init__(self, geometry: LadderGeometry, sinks: int, window: int):
        self.geometry = geometry
        self.sinks = sinks
        self.window = window
        self.cursor = sinks
        self._plans: dict[tuple[int, int, int], CompactionPlan] = {}

    def min_target(self) -> int:
        return self.sinks + self.window + self.geometry.rung - 1

    def plan(self, n: int, target: int) -> CompactionPlan:
        key = (n, self.cursor, target)
        plan = self._plans.get(key)
        if plan is None:
            plan = ladder_plan(self.geometry, n, self.cursor, target, self.sinks, self.window)
            if n <= 2 * target + 64 and len(self._plans) < 4096:  # one-off prefill plans are not kept
                self._plans[key] = plan
        self.cursor = plan.cursor
        return plan

    def reset(self) -> None:
        self.cursor = self.sinks

    def describe(self) -> dict:
        g = self.geometry
        return {
            "policy": "ladder",
            "sinks": self.sinks,
            "window": self.window,
            "span": g.span,
            "overlap": g.overlap,
            "layout": g.layout,
            "rung": g.rung,
            "keep": g.keep,
        }
