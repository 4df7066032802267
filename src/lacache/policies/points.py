"""When a bounded cache compacts: the one rule every backend replays (no torch).

The property it gives (docs/method.md, "Same tokens, same answer"): for a rule that amortises its
compactions (``chunk``), what every layer holds after token *n* of a stream is a function of tokens
1..*n* alone, however the stream was split into forward passes. Compaction happens only at fixed
*compaction points*, the absolute stream positions that are multiples of the **period**
``P = chunk + 1``, and no pass that keeps the property crosses one: within a period the cache only
grows, and a causal forward over appended tokens is the same whether they come in one pass or in
several. At a point the cache compacts to ``target = budget - chunk`` when it holds more than that,
so it never holds more than ``target + P = budget + 1`` slots while a pass runs and never more
than ``budget`` between passes: the same row a one-token decode step needs, whatever the prefill
chunk.

Callers split passes at the points (``pass_limit``, ``split``; before the cache first fills, no point
compacts, so the first pass may run to the first point past ``target``): vLLM's scheduler clips each
request's chunk, ``stream_generate``, the chat loop and the chunked evaluations split theirs. A
pass that crosses points anyway (``model.generate(prompt)``'s one-pass prefill: the whole prompt
attended at once) compacts once at its end, down to what token-by-token feeding would hold there
(``target + end % P``), so decoding after it meets the same points.

A rule that sets its own points (``amortises = False``: the authors' schedule, which compacts
almost every token once full) has no period, and neither has a rule run with ``chunk=0`` (the
default of the score rules TOVA, H2O and key-norm: a point after every token would make every
pass one token long, a prefill token by token): they compact after any pass that leaves more than
their capacity, so they are exact only against a stream fed *in the same passes*.

The vLLM scheduler, its workers (``vllm.slots.RequestSlots``), the transformers cache
(``cache.bounded``) and the static decode planner (``cache.decode_schedule``) all ask this module;
``tests/test_points.py`` checks that they agree on any pass structure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CompactionPoints", "points_for"]


@dataclass(frozen=True)
class CompactionPoints:
    """Where a stream's compactions happen, and how far each one compacts."""

    #: slots a compaction at a point leaves (at most): ``budget - chunk``
    target: int
    #: distance between compaction points (``chunk + 1``); None: the rule compacts whenever a pass
    #: leaves more than its capacity (the authors' schedule)
    period: int | None

    def after(self, seen: int, held: int, q: int, capacity: int) -> int | None:
        """The slot count a pass of ``q`` tokens compacts to once it ran, or None when it does not compact.

        ``seen``: tokens of the stream before the pass; ``held``: slots held before it; ``capacity``:
        the rule's capacity now (read only when there is no period).
        """
        if q <= 0:
            return None
        slots = held + q
        period = self.period
        if period is None:
            return self.target if slots > capacity else None
        end = seen + q
        if end // period == seen // period:  # no point reached: the cache only grew
            return None
        room = self.target + end % period  # what token-by-token feeding holds at most here
        return room if slots > room else None

    def pass_limit(self, seen: int) -> int | None:
        """The most tokens a pass starting after ``seen`` tokens may take without crossing a point where the cache
        compacts (None: any).

        Until the cache first holds more than ``target`` it compacts at no point (it holds every token it has seen),
        so the first pass may run to the first point past ``target``; from there every point may compact, and a
        pass ends at the next one. A function of ``seen`` alone, so the scheduler and every transformers loop cut
        the same passes without asking the cache."""
        period = self.period
        if period is None:
            return None
        first = (self.target // period + 1) * period  # the first point where a cache can hold more than target
        if seen < first:
            return first - seen
        return period - seen % period

    def split(self, seen: int, tokens: int, most: int | None = None) -> list[int]:
        """``tokens`` new tokens as passes of at most ``most`` tokens (None: no limit) that end at every point
        they reach, starting after ``seen`` tokens."""
        if most is not None and most < 1:
            raise ValueError(f"most={most!r} must be at least 1 token per pass, e.g. most=512")
        passes: list[int] = []
        while tokens > 0:
            q = tokens
            limit = self.pass_limit(seen)
            if limit is not None:
                q = min(q, limit)
            if most is not None:
                q = min(q, most)
            passes.append(q)
            seen += q
            tokens -= q
        return passes

    def peak(self, capacity: int, step: int) -> int:
        """The most slots one pass attends over when passes of up to ``step`` tokens keep to the points
        (vLLM's scheduler makes them): ``target + period`` with a period, else ``capacity + step``."""
        if self.period is None:
            return capacity + step
        return self.target + self.period  # the slots at a point, however the period was split

    def describe(self) -> dict:
        return {"period": self.period}


def points_for(policy, budget: int, chunk: int) -> CompactionPoints:
    """The compaction points of ``policy`` at ``budget`` with ``chunk`` slots freed per compaction: a period of
    ``chunk + 1`` tokens for a rule that amortises with ``chunk >= 1``; none for a rule that sets its own points
    or runs with ``chunk=0`` (it compacts whenever a pass leaves it over capacity, as before points existed)."""
    target = int(budget) - int(chunk)
    if not policy.amortises or int(chunk) < 1:
        return CompactionPoints(target, None)
    return CompactionPoints(target, int(chunk) + 1)
