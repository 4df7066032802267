"""A method written the way a user adds one: this one file, a policy plus one ``register(...)``.

"Keep every k-th old token": sinks and a recent window stay; each compaction keeps every ``k``-th
slot of the older middle (oldest dropped first if that is still too many), so older history gets
sparser with every pass, as with the ladder, but the same in every layer. It reads slot counts
only, so the vLLM plugin serves it too. The tests import this module (``tests/test_new_method.py``,
``tests/serving/test_vllm_new_method.py``) and find it everywhere a built-in method is.
"""

from __future__ import annotations

import numpy as np

from lacache import checks
from lacache.policies import CompactionPlan, IndexPolicy, identity_plan
from lacache.registry import Method, register


class EveryKthPolicy(IndexPolicy):
    """Sinks, every ``k``-th slot of the middle, and the newest ``window`` slots."""

    def __init__(self, sinks: int, window: int, k: int):
        self.sinks, self.window, self.k = sinks, window, k

    def min_target(self) -> int:
        return self.sinks + self.window + 1

    def plan(self, n: int, target: int) -> CompactionPlan:
        if n <= target:
            return identity_plan(n, self.sinks)
        middle = np.arange(self.sinks, n - self.window)
        thinned = middle[(middle - self.sinks) % self.k == self.k - 1]  # the newest of each run of k
        room = target - self.sinks - self.window
        thinned = thinned[max(0, len(thinned) - room):] if room > 0 else thinned[:0]
        index = np.concatenate([np.arange(self.sinks), thinned, np.arange(n - self.window, n)])
        return CompactionPlan(index.astype(np.int64)[None, :], self.sinks)


def every_kth_policy(num_layers: int, budget: int, sinks: int = 4, window: int | None = None,
                     k: int = 2) -> EveryKthPolicy:
    """Every ``k``-th old token for ``budget`` slots: ``sinks`` and a recent ``window`` (default budget/4) stay."""
    budget = checks.integer("budget", budget, minimum=1, example=512)
    sinks = checks.integer("sinks", sinks, example=4)
    k = checks.integer("k", k, minimum=2, example=2)
    window = max(1, budget // 4) if window is None else checks.integer("window", window, minimum=1, example=16)
    if sinks + window + 1 > budget:
        raise ValueError(f"budget={budget} is too small for sinks={sinks} + window={window} + one old slot: "
                         f"use budget >= {sinks + window + 1}")
    return EveryKthPolicy(sinks, window, k)


register(Method("every-kth", every_kth_policy, "keep every k-th old token (sinks + recent window stay)",
                suites=frozenset({"ppl"})))
