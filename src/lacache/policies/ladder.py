"""LaCache: ladder-shaped retention with iterative compaction (SPEC §2.1-2.2)."""

from __future__ import annotations

import copy

from ..ladder import CompactionPlan, LadderGeometry, ladder_plan
from .base import SlotPolicy

_MEMO_LIMIT = 4096  # plans kept per policy; a steady stream visits a few dozen


class LadderPolicy(SlotPolicy):
    """Keeps a cursor across calls; plans depend only on (slots, cursor, target) and are memoised.

    In a steady stream the cache cycles through a bounded set of (slots, cursor) states. The first
    time a (slots, target) pair is seen, the whole cycle of cursors it leads to is planned at once,
    so every later compaction of the stream is a dictionary hit and nothing is built (or allocated)
    for plans after the first compaction.
    """

    def __init__(self, geometry: LadderGeometry, sinks: int, window: int):
        self.geometry = geometry
        self.sinks = sinks
        self.window = window
        self.cursor = sinks
        self._plans: dict[tuple[int, int, int], CompactionPlan] = {}
        self._cycles: set[tuple[int, int]] = set()

    def min_target(self) -> int:
        return self.sinks + self.window + self.geometry.rung - 1

    def plan(self, n: int, target: int) -> CompactionPlan:
        key = (n, self.cursor, target)
        plan = self._plans.get(key)
        if plan is None:
            plan = ladder_plan(self.geometry, n, self.cursor, target, self.sinks, self.window)
            if n <= 2 * target + 64 and len(self._plans) < _MEMO_LIMIT:  # one-off prefill plans are not kept
                self._plans[key] = plan
                if (n, target) not in self._cycles:
                    self._cycles.add((n, target))
                    self._plan_cycle(n, plan.cursor, target)
        self.cursor = plan.cursor
        return plan

    def _plan_cycle(self, n: int, cursor: int, target: int) -> None:
        """Memoise the plans of every cursor a stream of ``n -> target`` compactions visits from ``cursor``."""
        while (n, cursor, target) not in self._plans and len(self._plans) < _MEMO_LIMIT:
            plan = ladder_plan(self.geometry, n, cursor, target, self.sinks, self.window)
            self._plans[(n, cursor, target)] = plan
            cursor = plan.cursor

    def reset(self) -> None:
        self.cursor = self.sinks

    def fork(self) -> "SlotPolicy":
        """A copy with this stream's cursor; the memoised plans are pure, so both share them."""
        return copy.copy(self)

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
