"""Every compaction a run of one-token decode steps will make, planned before the steps run.

A compiled decode step cannot ask the host which slots to drop: reading a tensor value or building a
plan in Python inside the traced step breaks the graph. For an index-only rule (the ladder on either
schedule, StreamingLLM) it does not need to: which slots survive depends only on slot counts and the
rule's own state, so from the state after a prefill the whole future of one-token steps is fixed. It
is also periodic: the state after a compaction (slots held, the rule's cursor) takes finitely many
values, so the sequence of compactions enters a cycle. This module finds that sequence, a transient
prefix then a cycle, with no torch: property tests check it against the rule driven step by step.

``StaticDecode`` (``cache.static``) turns it into tensors the compiled step indexes with its
compaction counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..policies.base import IndexPolicy
from ..policies.plan import CompactionPlan
from ..policies.points import CompactionPoints

__all__ = ["Compaction", "DecodeSchedule", "plan_decode", "count_schedule", "MAX_EVENTS"]

#: compactions a schedule may list before its cycle closes (the authors' schedule compacts at every
#: step and cycles within about ``budget`` compactions; the capped ladder within a few dozen)
MAX_EVENTS = 1 << 15


@dataclass(frozen=True)
class Compaction:
    """One compaction of a run of decode steps."""

    #: slots held, the new token included, when the rule decides it (the step's own attention sees them all)
    trigger: int
    #: slots held after it
    kept: int
    #: per layer, the slots it drops, ascending: ``[layers, trigger - kept]`` (``[layers, 0]`` when the step
    #: chooses them itself: ``count_schedule``)
    drops: np.ndarray
    #: the rule's plan (host rows for the token index); None when the step chooses
    plan: CompactionPlan | None = None


@dataclass(frozen=True)
class DecodeSchedule:
    """The compactions of one-token steps from a given state: ``events[:cycle_start]`` happen once,
    then ``events[cycle_start:]`` repeat for ever."""

    start_slots: int
    events: tuple[Compaction, ...]
    cycle_start: int
    #: (slots held, the rule's state) -> index of the compaction that comes next from there: a cache
    #: found in one of these states continues this schedule at that index (no new plan)
    states: dict

    @property
    def cycle_length(self) -> int:
        return len(self.events) - self.cycle_start

    def position(self, k: int) -> int:
        """Index into ``events`` of the ``k``-th compaction (0-based) of the run."""
        if k < self.cycle_start:
            return k
        return self.cycle_start + (k - self.cycle_start) % self.cycle_length

    def event(self, k: int) -> Compaction:
        return self.events[self.position(k)]

    @property
    def most_slots(self) -> int:
        """The most slots a layer holds at once during the run (a step's new token included)."""
        return max([self.start_slots + 1] + [e.trigger for e in self.events])

    @property
    def most_drops(self) -> int:
        return max(e.drops.shape[1] for e in self.events)


def _state(policy: IndexPolicy):
    state = policy.decode_state()
    try:
        hash(state)
    except TypeError:
        raise TypeError(f"{type(policy).__name__}.decode_state() must be hashable; got {state!r}") from None
    return state


def plan_decode(policy: IndexPolicy, points: CompactionPoints, slots: int, seen: int, budget: int, num_layers: int,
                max_events: int = MAX_EVENTS) -> DecodeSchedule:
    """The compactions of one-token decode steps for a cache holding ``slots`` slots after ``seen`` tokens, whose
    rule is ``policy``.

    ``policy`` is not advanced (a fork is driven). A step compacts where ``points`` says (``policies.points``:
    the one rule ``BoundedCache`` and vLLM replay for every forward pass), to what it says.
    """
    rule = policy.fork()
    n = int(slots)
    seen = int(seen)
    period = points.period or 1
    states: dict = {}
    events: list[Compaction] = []
    while True:
        key = (n, seen % period, _state(rule))
        if key in states:  # the future from here is the one already listed from there
            return DecodeSchedule(int(slots), tuple(events), states[key], states)
        states[key] = len(events)
        target = points.after(seen, n, 1, rule.capacity(budget))
        n += 1
        seen += 1
        if target is None:
            continue
        if len(events) >= max_events:
            raise ValueError(
                f"the decode compactions of {type(policy).__name__} (budget={budget}) did not repeat within "
                f"{max_events} compactions, so a static cache cannot plan them; use static=False"
            )
        plan = rule.plan(n, target)
        everything = np.arange(n, dtype=np.int64)
        drops = np.stack([np.setdiff1d(everything, plan.rows_for(layer), assume_unique=True)
                          for layer in range(num_layers)])
        events.append(Compaction(n, plan.kept, drops, plan))
        n = plan.kept


def count_schedule(points: CompactionPoints, slots: int, seen: int, capacity: int, num_layers: int) -> DecodeSchedule:
    """When one-token steps compact, for a rule that chooses the survivors itself (by score) and always keeps
    exactly the target.

    Timing depends on slot counts and the stream position alone (``points``); which slots go is left to the
    step (``cache.static_scores``), so the events carry no drops: a transient first compaction, then one that
    repeats every period.
    """
    if not 0 < points.target <= capacity:
        raise ValueError(f"target={points.target} must be between 1 and capacity={capacity}")
    none = np.empty((num_layers, 0), dtype=np.int64)
    n, seen = int(slots), int(seen)
    events: list[Compaction] = []
    while len(events) < 2:
        target = points.after(seen, n, 1, capacity)
        n += 1
        seen += 1
        if target is not None:
            events.append(Compaction(n, target, none))
            n = target
    first, steady = events
    if first.trigger == steady.trigger:
        return DecodeSchedule(int(slots), (steady,), 0, {})
    return DecodeSchedule(int(slots), (first, steady), 1, {})
