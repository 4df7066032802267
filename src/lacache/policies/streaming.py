"""StreamingLLM: attention sinks plus the most recent tokens, the same in every layer."""

from __future__ import annotations

import numpy as np

from .. import checks
from ..registry import Method, register
from .base import IndexPolicy
from .plan import CompactionPlan, identity_plan

__all__ = ["StreamingPolicy", "window_plan", "streaming_policy"]


def window_plan(n: int, target: int, sinks: int) -> CompactionPlan:
    """Keep the ``sinks`` first slots and the most recent ``target - sinks``."""
    if n <= target:
        return identity_plan(n, sinks)
    if target <= sinks:
        raise ValueError(f"target={target} must exceed sinks={sinks}")
    recent = target - sinks
    index = np.concatenate([np.arange(sinks), np.arange(n - recent, n)]).astype(np.int64)
    return CompactionPlan(index[None, :], sinks)


class StreamingPolicy(IndexPolicy):
    def __init__(self, sinks: int):
        if sinks < 0:
            raise ValueError(f"sinks={sinks} must be >= 0; e.g. sinks=4")
        self.sinks = sinks
        self._plans: dict[tuple[int, int], CompactionPlan] = {}

    def recent_window(self) -> int:
        """Every slot after the sinks is the recent window: StreamingLLM keeps nothing else."""
        return 1 << 62

    def plan(self, n: int, target: int) -> CompactionPlan:
        key = (n, target)
        plan = self._plans.get(key)
        if plan is None:
            plan = window_plan(n, target, self.sinks)
            if n <= 2 * target + 64 and len(self._plans) < 4096:  # one-off prefill plans are not kept
                self._plans[key] = plan
        return plan


def streaming_policy(num_layers: int, budget: int, sinks: int = 4) -> StreamingPolicy:
    """StreamingLLM's rule (the same in every layer), validated against ``budget``."""
    budget = checks.integer("budget", budget, minimum=1, example=512)
    sinks = checks.integer("sinks", sinks, example=4)
    if budget <= sinks:
        raise ValueError(f"budget={budget} must exceed sinks={sinks}: e.g. budget={sinks + 64}")
    return StreamingPolicy(sinks)


register(Method("streaming", streaming_policy, "StreamingLLM: sinks + the most recent tokens", baseline=True))
