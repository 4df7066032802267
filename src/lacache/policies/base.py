"""The contract between a bounded cache and the rule that decides which slots survive."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..ladder import CompactionPlan


class SlotPolicy(ABC):
    """Decides, when the cache is over budget, which slots each layer keeps.

    Policies that only look at slot indices (ladder, window) are pure and memoise their plans, so
    a long stream reuses a handful of index tensors instead of building new ones per token.
    """

    #: slots at the front that are never evicted
    sinks: int = 0

    @abstractmethod
    def plan(self, n: int, target: int) -> CompactionPlan:
        """Plan the compaction of ``n`` slots down to at most ``target`` (and advance any state)."""

    def min_target(self) -> int:
        """The smallest ``target`` this policy can compact to."""
        return self.sinks + 1

    def reset(self) -> None:
        """Forget per-stream state (a new sequence starts)."""

    def fork(self) -> "SlotPolicy":
        """An independent copy carrying this stream's state (beam search repeating a sequence)."""
        import copy

        return copy.deepcopy(self)

    def describe(self) -> dict:
        return {"policy": type(self).__name__, "sinks": self.sinks}
