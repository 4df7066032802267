"""One request's slot accounting, the same on vLLM's scheduler and on its workers.

Both sides replay every forward pass of a request through the same retention rule: after a pass
of ``q`` tokens the request holds ``n + q`` slots, and when the pass reached one of the stream's
compaction points (``policies.points``: the one rule every backend asks) with more slots than the
point allows, the rule's plan compacts it to ``plan.kept``. The scheduler needs only the counts (to free the blocks a
compaction empties and size the next allocation); the worker also applies the plan to the paged
keys and values. Because the rule is deterministic, the two never need to talk.

A rule that reads keys (key-norm, KeyDiff, the salient and group ladders) chooses *which* slots
survive from a statistic of the keys (``RetentionPolicy.key_statistic``), but *how many* from counts
alone (``RetentionPolicy.count_after``): the scheduler replays the counts, and the worker hands each
layer's statistic in (``advance(q, stats=...)``) and gets one row of survivors per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..policies.base import IndexPolicy, LayerView, RetentionPolicy
from ..policies.plan import CompactionPlan
from ..policies.points import CompactionPoints

__all__ = ["RequestSlots", "KeptRequest", "kept_blocks", "longest_kept_prefix"]


def kept_blocks(held_slots: int, row_blocks: int, decode_slots: int, block_size: int) -> int:
    """Blocks a request's row keeps after a pass: those of its held slots, and never fewer than its
    decode row (``decode_slots``: the held slots plus the token being computed) while the row has them.

    Keeping the decode row means a decoding request never needs a new block, so vLLM never preempts
    one to find it. The scheduler and the workers both call this with their own (equal) row lengths,
    so they drop the same blocks."""
    def blocks(slots: int) -> int:
        return -(-slots // block_size)

    return min(row_blocks, max(blocks(held_slots), blocks(decode_slots)))


class RequestSlots:
    """Slots one request holds per layer, and which original tokens they are."""

    def __init__(self, policy: RetentionPolicy, budget: int, points: CompactionPoints, num_layers: int,
                 track_tokens: bool = False):
        self.policy = policy
        self.budget = budget
        self.points = points
        self.num_layers = num_layers
        self.slots = 0  # physical slots held (every layer the same)
        self.seen = 0  # logical tokens processed
        self.passes = 0
        #: the rule chooses slots from a key statistic (``RetentionPolicy.count_after`` gives their number)
        self.reads_keys = not isinstance(policy, IndexPolicy)
        #: the worker's statistic of the held slots, per model layer, for a statistic a slot keeps
        #: (``KeyStatistic.per_slot``: key norms); follows the request on reuse
        self.held_stats: dict = {}
        # original token index of every slot, [1 or layers, slots] (the worker keeps it for inspection)
        self.tokens: np.ndarray | None = np.zeros((1, 0), dtype=np.int64) if track_tokens else None

    @property
    def evicted(self) -> int:
        """Logical tokens minus physical slots: how far physical addresses lag logical positions."""
        return self.seen - self.slots

    def advance(self, q: int, stats=None, layers=None):
        """A forward pass of ``q`` tokens ran; returns the compaction plan it triggers, or None.

        A key-reading rule needs ``stats(layer, n)`` (``[1, n]``, the layer's every slot, ``LayerView.stats``)
        and the model ``layers`` it is asked for (the worker's): it then returns one row of survivors per layer
        (other layers keep their first ``kept`` slots in the plan, never applied). Without them (the
        scheduler) only the count advances and the plan is None."""
        if q <= 0:
            return None
        if self.tokens is not None:
            new = np.arange(self.seen, self.seen + q, dtype=np.int64)
            self.tokens = np.concatenate([self.tokens, np.broadcast_to(new, (self.tokens.shape[0], q))], axis=1)
        target = self.points.after(self.seen, self.slots, q, self.policy.capacity(self.budget))
        self.slots += q
        self.seen += q
        self.passes += 1
        if target is None:
            return None
        if self.reads_keys:
            return self._choose(q, target, stats, layers)
        plan = self.policy.retain(LayerView(0, self.slots, q, self.passes), target)
        if self.tokens is not None:
            rows = plan.index
            if rows.shape[0] > 1 and self.tokens.shape[0] == 1:
                self.tokens = np.broadcast_to(self.tokens, (rows.shape[0], self.tokens.shape[1]))
            self.tokens = np.take_along_axis(self.tokens, np.broadcast_to(rows, (self.tokens.shape[0], rows.shape[1])),
                                             axis=1) if rows.shape[0] > 1 else self.tokens[:, rows[0]]
        self.slots = plan.kept
        return plan

    def _choose(self, q: int, target: int, stats, layers) -> CompactionPlan | None:
        if stats is None:  # the scheduler: how many survive, not which
            self.slots = self.policy.count_after(self.slots, target)
            if self.tokens is not None:
                raise RuntimeError("token tracking needs the keys' statistic (the worker's replay)")
            return None
        n = self.slots
        rows = np.tile(np.arange(n, dtype=np.int64), (self.num_layers, 1))
        kept = None
        for layer in layers:
            chosen = self.policy.retain(LayerView(layer, n, q, self.passes, stats=stats(layer, n)), target).index
            if chosen.shape[0] != 1:
                raise RuntimeError("lacache: a served request is one sequence; the rule planned several rows")
            row = chosen[0].cpu().numpy()
            if kept is None:
                kept = row.shape[0]
            elif row.shape[0] != kept:
                raise RuntimeError(f"lacache: layers kept {kept} and {row.shape[0]} slots; a served rule must keep the "
                                   "same number in every layer")
            rows[layer, :kept] = row
        kept = self.policy.count_after(n, target) if kept is None else kept
        plan = CompactionPlan(np.ascontiguousarray(rows[:, :kept]), 0)
        if self.tokens is not None:
            tokens = np.broadcast_to(self.tokens, (self.num_layers, n)) if self.tokens.shape[0] == 1 else self.tokens
            self.tokens = np.take_along_axis(tokens, plan.index, axis=1)
        self.slots = kept
        return plan

    def token_positions(self, layer: int) -> list[int]:
        """Original indices of the tokens ``layer`` holds, in slot order (the worker's view)."""
        if self.tokens is None:
            raise RuntimeError("token tracking is off for this request")
        return self.tokens[layer if self.tokens.shape[0] > 1 else 0].tolist()


@dataclass
class KeptRequest:
    """A finished request's compacted cache, kept for a request that continues its exact token stream."""

    tokens: list[int]  # the tokens its cache has seen: prompt + every output token but the last
    blocks: list  # its block row, held (not in the pool's free list) until adopted or evicted
    slots: RequestSlots  # its retention state: a continuation must go on with the same rule state
    #: what else the keys and values depend on, besides the tokens (e.g. the LoRA adapter, the cache salt
    #: that keeps users apart): only a request with the same context may continue it
    context: tuple = ()


def longest_kept_prefix(kept: Sequence[KeptRequest], prompt: Sequence[int], context: tuple = ()) -> KeptRequest | None:
    """The kept request of the same ``context`` whose whole token stream is the longest prefix of ``prompt``,
    leaving at least one token to compute (the pass that gives the first logits); None when there is none.

    Reuse is keyed on the *whole* stream: a compacted cache depends on every token it has seen and on
    the passes they came in, so a prompt that differs anywhere before the end gets a full prefill."""
    best = None
    for entry in kept:
        n = len(entry.tokens)
        if (n < len(prompt) and entry.context == context and (best is None or n > len(best.tokens))
                and list(prompt[:n]) == entry.tokens):
            best = entry
    return best
