"""Static decode steps for a rule that scores each slot by its own key (key-norm).

An index-only rule's compactions are listed before the steps run (``cache.decode_schedule``); a
score rule's cannot be, since which slots survive depends on the keys. Two facts still let a
compiled step carry it without a host read or a data-dependent shape:

* *when* it compacts depends on slot counts and the stream position alone (``policies.points``: a
  step that reaches a compaction point holding more than ``budget - chunk`` slots compacts to that),
  so the step's counters find it as they find an index rule's;
* a slot's state entry (key-norm: the head-averaged norm of its stored key) is fixed when the slot
  is written, so the state is one ``[B, C]`` tensor per layer, moved with the keys; the survivors
  are a top-k of fixed size ``budget - chunk`` over it (sinks and the recent window forced in,
  free slots forced out), the host rule's own choice, made per sequence.

The slots' token indices ride along in a ``[B, C]`` tensor, so a host read (``sync``) restores
the token index and the rule's state from tensors instead of replaying a plan. Rules that score by
attention (TOVA, H2O) would need the step's queries, which reach the attention function but never
the cache's ``update``: they have no static mode.
"""

from __future__ import annotations

import torch

from ..policies.base import LayerView, rank_slots
from .decode_schedule import DecodeSchedule, count_schedule
from .static import StaticDecode, _static
from .storage import TokenIndex

__all__ = ["ScoredStaticDecode"]


class ScoredStaticDecode(StaticDecode):
    """``StaticDecode`` for a ``keyed_state`` score rule: the step chooses each sequence's survivors."""

    def __init__(self, cache):
        super().__init__(cache)
        #: per layer ``[B, C]``: the rule's state entry of each slot, and its token index
        self.state: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []

    @property
    def _target(self) -> int:
        return self.cache.budget - self.cache.chunk

    def _continue_at(self, n: int, k0: torch.Tensor) -> int | None:
        # the schedule is one event repeating for ever: any state continues it
        return 0 if self.schedule is not None and self._fits(k0, self.slots) else None

    def _plan(self, n: int) -> DecodeSchedule:
        cache = self.cache
        return count_schedule(cache.points, n, cache._seen, cache.policy.capacity(cache.budget), len(cache.layers))

    def _load_slots(self, n: int) -> None:
        cache = self.cache
        k0 = self.keys[0]
        rows, device = k0.shape[0], k0.device
        if not self.state or self.state[0].shape != (rows, self.slots) or self.state[0].device != device:
            self.state = [_static(torch.zeros((rows, self.slots), device=device)) for _ in cache.layers]
            self.tokens = [_static(torch.zeros((rows, self.slots), dtype=torch.long, device=device))
                           for _ in cache.layers]
        for layer, state, tokens in zip(cache.layers, self.state, self.tokens):
            state[:, :n] = cache.policy.state[layer.layer_idx].to(device)
            tokens[:, :n] = layer.token_index.to(device)

    def _keep(self, layer_idx: int, row: torch.Tensor, due: torch.Tensor) -> torch.Tensor:
        """``[B, C]``: each sequence's top-scoring slots when a compaction is due (``keep_top``'s choice),
        else every slot."""
        policy = self.cache.policy
        slot = self.every[: self.slots]
        held = self.held
        score = policy.state_score(self.state[layer_idx])
        forced = torch.where((slot < policy.sinks) | (slot >= held - policy.window), float("inf"), score)
        forced = torch.where(slot < held, forced, float("-inf"))  # free slots never survive
        top = rank_slots(forced, self._target)  # equal scores: the older slot, as keep_top
        keep = torch.zeros_like(forced, dtype=torch.bool).scatter(1, top, True)
        return keep | ~due

    def _write_slots(self, layer_idx: int, source: torch.Tensor, at: torch.Tensor, stored_key: torch.Tensor) -> None:
        state, tokens = self.state[layer_idx], self.tokens[layer_idx]
        rows = state.shape[0]
        state.copy_(state.gather(1, source))
        tokens.copy_(tokens.gather(1, source))
        state.index_copy_(1, at, self.cache.policy.key_state(stored_key).to(state.dtype))
        tokens.index_copy_(1, at, self.seen.view(1, 1).expand(rows, 1))

    def sync(self) -> None:
        """Hand the tensor steps' result to the host path: token index and rule state read from their
        tensors, counters, and the compaction the last step decided (the host rule plans it)."""
        if not self.dirty:
            return
        self.dirty = False
        cache = self.cache
        policy = cache.policy
        held, seen, applied = int(self.held), int(self.seen), int(self.applied)
        _, seen_before, applied_before = self._host
        for layer, state, tokens in zip(cache.layers, self.state, self.tokens):
            layer._tokens = TokenIndex.of(tokens[:, :held].cpu(), seen)
            policy.state[layer.layer_idx] = state[:, :held].clone()
        self.compactions += applied - applied_before
        self._hand_back(held, seen, seen_before)
        # decided by the last step (at a compaction point), applied by the next
        if cache.points.after(seen - 1, held - 1, 1, policy.capacity(cache.budget)) is not None:
            for layer in cache.layers:
                view = LayerView(layer.layer_idx, held, 1, cache._forwards, layer._k[:, :, :held])
                layer.schedule(policy.retain(view, self._target))
            self.compactions += 1
        self.arm()
