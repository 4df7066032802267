"""StreamingLLM: attention sinks plus the most recent tokens, the same in every layer."""

from __future__ import annotations

import copy

from ..ladder import CompactionPlan, window_plan
from .base import SlotPolicy


class StreamingPolicy(SlotPolicy):
    def __init__(self, sinks: int):
        if sinks < 0:
            raise ValueError(f"sinks={sinks} must be >= 0; e.g. sinks=4")
        self.sinks = sinks
        self._plans: dict[tuple[int, int], CompactionPlan] = {}

    def plan(self, n: int, target: int) -> CompactionPlan:
        key = (n, target)
        plan = self._plans.get(key)
        if plan is None:
            plan = window_plan(n, target, self.sinks)
            if n <= 2 * target + 64 and len(self._plans) < 4096:  # one-off prefill plans are not kept
                self._plans[key] = plan
        return plan

    def fork(self) -> "SlotPolicy":
        """A copy for another sequence; the memoised plans are pure, so both share them."""
        return copy.copy(self)
