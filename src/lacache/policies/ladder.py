"""LaCache: ladder-shaped retention with iterative compaction (docs/method.md §1, "Compaction plan")."""

from __future__ import annotations

from .base import IndexPolicy
from .ladder_geometry import LadderGeometry, ladder_compaction
from .plan import CompactionPlan

__all__ = ["LadderPolicy", "ladder_plan"]

# Memoised plans per policy: a steady stream visits a few dozen, each an int64 [layers, slots] index
# (30 layers x 512 slots: 123 KB). Past the byte cap (e.g. 80 layers x 4,096 slots, 2.6 MB a plan)
# plans are rebuilt instead, a few ms once per compaction (every `chunk` tokens).
_MEMO_LIMIT = 4096
_MEMO_BYTES = 32 * 2**20


def ladder_plan(
    geometry: LadderGeometry, n: int, cursor: int, target: int, sinks: int, window: int
) -> CompactionPlan:
    """The plan that compacts ``n`` slots to at most ``target`` by laddering rungs from ``cursor``."""
    return CompactionPlan(*ladder_compaction(geometry, n, cursor, target, sinks, window))


class LadderPolicy(IndexPolicy):
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
        self._memo_bytes = 0

    def min_target(self) -> int:
        return self.sinks + self.window + self.geometry.rung - 1

    def plan(self, n: int, target: int) -> CompactionPlan:
        key = (n, self.cursor, target)
        plan = self._plans.get(key)
        if plan is None:
            plan = ladder_plan(self.geometry, n, self.cursor, target, self.sinks, self.window)
            if n <= 2 * target + 64 and self._keep(key, plan):  # one-off prefill plans are not kept
                if (n, target) not in self._cycles:
                    self._cycles.add((n, target))
                    self._plan_cycle(n, plan.cursor, target)
        self.cursor = plan.cursor
        return plan

    def _plan_cycle(self, n: int, cursor: int, target: int) -> None:
        """Memoise the plans of every cursor a stream of ``n -> target`` compactions visits from ``cursor``."""
        while (n, cursor, target) not in self._plans:
            plan = ladder_plan(self.geometry, n, cursor, target, self.sinks, self.window)
            if not self._keep((n, cursor, target), plan):
                return
            cursor = plan.cursor

    def _keep(self, key: tuple[int, int, int], plan: CompactionPlan) -> bool:
        size = plan.index.nbytes
        if len(self._plans) >= _MEMO_LIMIT or self._memo_bytes + size > _MEMO_BYTES:
            return False
        self._plans[key] = plan
        self._memo_bytes += size
        return True

    def decode_state(self) -> int:
        return self.cursor

    def reset(self) -> None:
        super().reset()
        self.cursor = self.sinks

    def describe(self) -> dict:
        g = self.geometry
        return {
            "policy": "ladder",
            "schedule": "capped",
            "sinks": self.sinks,
            "window": self.window,
            "span": g.span,
            "overlap": g.overlap,
            "layout": g.layout,
            "rung": g.rung,
            "keep": g.keep,
            "group": g.group,
        }
