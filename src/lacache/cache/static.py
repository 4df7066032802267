"""One-token decode steps with fixed shapes and tensor counters, so ``torch.compile`` captures a step whole.

A bounded cache's size never changes, which makes it the natural case for compiled decode and CUDA
graphs; the host-side path (``cache.storage``) cannot be captured, because it decides compactions on
the host (Python integers that change every step, plans built with numpy) and holds slots in buffers
that grow. A static cache (``static=True``) runs its one-token steps here instead:

* every layer holds a fixed buffer of ``C`` slots (the most the run ever holds, the new token
  included), allocated once and never moved, so CUDA graphs can replay over it;
* the slot count, the compaction counter, the tokens seen and the position frame are 0-d/1-d
  tensors updated in place: nothing in a step reads a tensor value on the host;
* compactions are planned before the steps run (``cache.decode_schedule``: for an index-only rule
  they depend on slot counts alone and repeat in a cycle) and stored as a table of dropped slots;
  the step indexes it with its counter. Each step gathers its layer through a slot map that is the
  identity on steps that do not compact, so there is no data-dependent branch and no
  data-dependent shape; keys are re-positioned in the same pass (stored rotation) or on read
  (rotate-on-read, half precision), as on the host path;
* attention sees all ``C`` slots; the mask's query offset is the new token's slot (a tensor), so
  the causal mask hides the free slots after it.

Multi-token passes (prefill, a chat turn, chunked prefill) stay on the host path and run eagerly:
before one, ``sync`` replays on the host what the tensor steps did (token index, the rule's state,
a compaction still pending); after it, the cache's decoder hook re-arms the tensors (``arm``).
A rule that scores each slot by its own key (key-norm) has a static mode too (``cache.static_scores``):
its compactions come at times fixed by slot counts, and the step chooses the survivors with a
top-k of fixed size. Rules that read attention (TOVA, H2O) or keep a pool (the salient ladder) have
none: see ``static_refusal``.
"""

from __future__ import annotations

import numpy as np
import torch

from .decode_schedule import DecodeSchedule, plan_decode

__all__ = ["StaticDecode", "static_refusal"]


def static_refusal(policy) -> str | None:
    """Why ``policy`` cannot run static decode steps, or None if it can."""
    from ..policies.base import IndexPolicy
    from ..policies.scores import ScorePolicy

    if isinstance(policy, ScorePolicy) and policy.keyed_state and not policy.needs_attention:
        return None
    if not isinstance(policy, IndexPolicy) or policy.needs_attention or policy.observes_every_step:
        why = ("reads the step's attention, which a compiled step never shows the cache" if policy.needs_attention
               else "has no static decode path")
        return (f"{type(policy).__name__} {why}; static=True serves index-only methods (lacache, lacache-capped, "
                "lacache-reference, streaming) and key-norm (knorm)")
    return None


def _move(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Slots of ``t`` ``[B, H, C, D]`` taken from ``source``: ``[C]`` for the batch, or ``[B, C]`` per sequence."""
    if source.dim() == 1:
        return t.index_select(2, source)
    b, h, c, d = t.shape
    return t.gather(2, source[:, None, :, None].expand(b, h, c, d))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _static(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as living at a fixed address (CUDA graphs replay over it without copying it in)."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


class StaticDecode:
    """The tensor state of a static cache's decode steps; owned by one ``BoundedCache``."""

    def __init__(self, cache):
        self.cache = cache
        self.slots = 0  # C: slots per layer buffer
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.schedule: DecodeSchedule | None = None
        #: host view at the last arm/sync: slots held, tokens seen, compactions applied
        self._host = (0, 0, 0)
        #: a tensor step ran since the host view was taken (write-only inside a step: no guard reads it)
        self.dirty = False
        self.armed = False
        #: compactions the tensor steps made, counted on the host at each sync
        self.compactions = 0

    # ----------------------------------------------------------------- arming (eager, after a host pass)
    def arm(self) -> None:
        """Take over from the host path: every layer settled, its slots in the fixed buffers, the
        counters at the host's state. A state the current schedule already lists continues it (no
        new plan, no new table: a compiled step keeps every shape and address)."""
        cache = self.cache
        layers = cache.layers
        for layer in layers:
            layer.settle()
        first = layers[0]
        if first._k is None:  # nothing seen yet: arm after the first host pass
            self.armed = False
            return
        n = first._n
        k0, v0 = first._k, first._v
        at = self._continue_at(n, k0)
        if at is None:
            schedule = self._plan(n)
            at = 0
            self._allocate(schedule, k0, v0)
            self._load_table(schedule, k0.device)
            self.schedule = schedule
        for layer, k, v in zip(layers, self.keys, self.values):
            if layer._k is not k:
                k[:, :, :n] = layer._k[:, :, :n]
                v[:, :, :n] = layer._v[:, :, :n]
            layer._k, layer._v = k, v
        device = k0.device
        self._load_slots(n)
        self._set("held", torch.tensor(n, device=device))
        self._set("applied", torch.tensor(at, device=device))
        self._set("seen", torch.tensor(cache._seen, device=device))
        frame = first.shift.frame
        self._set("frame", torch.tensor(frame if frame else [0], dtype=torch.long, device=device))
        self._host = (n, cache._seen, at)
        self.dirty = False
        self.armed = True

    def _continue_at(self, n: int, k0: torch.Tensor) -> int | None:
        """Index of the next compaction in the current schedule for a cache holding ``n`` slots in the
        rule's current state, or None when a new schedule is needed."""
        if self.schedule is None or not self._fits(k0, self.slots):
            return None
        cache = self.cache
        return self.schedule.states.get((n, cache._seen % (cache.points.period or 1), cache.policy.decode_state()))

    def _plan(self, n: int) -> DecodeSchedule:
        """The compactions of one-token steps from ``n`` held slots (index-only rules: every one planned)."""
        cache = self.cache
        return plan_decode(cache.policy, cache.points, n, cache._seen, cache.budget, len(cache.layers))

    def _load_slots(self, n: int) -> None:
        """Per-slot tensors besides keys and values (none here: an index-only rule's table says it all)."""

    def _fits(self, k0: torch.Tensor, slots: int) -> bool:
        """Whether the fixed buffers hold ``slots`` slots of keys shaped, typed and placed like ``k0``."""
        if not self.keys:
            return False
        held = self.keys[0]
        return (tuple(held.shape) == (k0.shape[0], k0.shape[1], slots, k0.shape[-1]) and held.dtype == k0.dtype
                and held.device == k0.device)

    def _allocate(self, schedule: DecodeSchedule, k0: torch.Tensor, v0: torch.Tensor) -> None:
        """Fixed buffers of ``schedule.most_slots`` slots per layer (kept when the shape is unchanged)."""
        slots = schedule.most_slots
        if self._fits(k0, slots):
            return
        b, h, _, dk = k0.shape
        self.keys = [_static(k0.new_zeros((b, h, slots, dk))) for _ in self.cache.layers]
        self.values = [_static(v0.new_zeros((b, v0.shape[1], slots, v0.shape[-1]))) for _ in self.cache.layers]
        self.slots = slots
        #: slot indices 0..C (C: the out-of-range slot that drops nothing), built once for every step
        self.every = _static(torch.arange(slots + 1, device=k0.device))

    def _set(self, name: str, value: torch.Tensor) -> None:
        """Write ``value`` into the tensor ``name`` in place when shapes allow (its address stays fixed)."""
        old = getattr(self, name, None)
        if isinstance(old, torch.Tensor) and old.shape == value.shape and old.device == value.device:
            old.copy_(value)
        else:
            setattr(self, name, _static(value.clone()))

    def _load_table(self, schedule: DecodeSchedule, device) -> None:
        """The schedule as tensors, padded to powers of two so a re-arm rarely changes a shape."""
        events = schedule.events
        rows, drops = _pow2(len(events)), _pow2(schedule.most_drops)
        layers = len(self.cache.layers)
        table = torch.full((rows, layers, drops), self.slots, dtype=torch.long)  # slot C: drops nothing
        trigger = torch.full((rows,), 1 << 62, dtype=torch.long)
        kept = torch.zeros((rows,), dtype=torch.long)
        for i, event in enumerate(events):
            table[i, :, : event.drops.shape[1]] = torch.from_numpy(event.drops)
            trigger[i], kept[i] = event.trigger, event.kept
        self._set("drops", table.to(device))
        self._set("trigger", trigger.to(device))
        self._set("kept", kept.to(device))
        self._set("cycle", torch.tensor([schedule.cycle_start, schedule.cycle_length], device=device))

    # ----------------------------------------------------------------- the traced step
    def _event(self) -> torch.Tensor:
        """Table row of the next compaction (tensor arithmetic: transient prefix, then the cycle)."""
        start, length = self.cycle[0], self.cycle[1]
        k = self.applied
        return torch.where(k < start, k, start + torch.remainder(k - start, length))

    def new_slot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row of the next compaction, whether it is due before this step, the new token's slot)."""
        row = self._event().view(1)  # indexing by a 0-d tensor would read it on the host: select instead
        due = (self.held >= self.trigger.index_select(0, row))[0]
        return row, due, torch.where(due, self.kept.index_select(0, row)[0], self.held)

    def update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
               positions: torch.Tensor | None, rotation: str, rotator) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply a due compaction to this layer, append the new token, return all ``C`` slots for attention."""
        slots = self.slots
        row, due, slot = self.new_slot()
        keep = self._keep(layer_idx, row, due)
        dest = torch.where(keep, torch.cumsum(keep, -1) - 1, slots)
        every = self.every
        if keep.dim() == 1:  # one choice for the whole batch
            source = every.scatter(0, dest, every[:slots])[:slots]  # kept slot i moves to dest[i]; others stay
        else:  # a choice per sequence: [B, C]
            rows = keep.shape[0]
            source = every.expand(rows, -1).scatter(1, dest, every[:slots].expand(rows, -1))[:, :slots]
        if positions is None:
            positions = self.seen.view(1, 1)
        position = positions[:, -1].to(self.held.device)
        frame = position - slot  # slot 0's position after this step
        k, v = self.keys[layer_idx], self.values[layer_idx]
        moved = _move(k, source)
        if rotation == "stored":  # turn each key by how far its slot and the frame moved
            moves = every[:slots] - source
            delta = (frame - self.frame)[:, None] + (moves if moves.dim() == 2 else moves[None])
            cos, sin = rotator.angles(delta)
            moved = rotator.rotate(moved, cos, sin)
        k.copy_(moved)
        v.copy_(_move(v, source))
        if rotation == "read":  # stored un-rotated, turned to slot positions on every read
            cos, sin = rotator.angles(positions[:, -1:].to(key_states.device))
            key_states = rotator.rotate(key_states, cos, sin, inverse=True)
        at = slot.view(1)
        k.index_copy_(2, at, key_states)
        v.index_copy_(2, at, value_states)
        self._write_slots(layer_idx, source, at, key_states)
        if layer_idx == len(self.keys) - 1:  # the step's counters, once every layer has used the old ones
            self.held.copy_(slot + 1)
            self.applied.add_(due.long())
            self.seen.add_(1)
            self.frame.copy_(frame.expand_as(self.frame))
        self.dirty = True
        if rotation == "read":
            cos, sin = rotator.angles(frame[:, None] + every[None, :slots])
            return rotator.rotate(k, cos, sin), v
        return k, v

    def _keep(self, layer_idx: int, row: torch.Tensor, due: torch.Tensor) -> torch.Tensor:
        """Which of the ``C`` slots survive this step (all of them unless a compaction is due): ``[C]``."""
        slots = self.slots
        drops = torch.where(due, self.drops.index_select(0, row)[0, layer_idx], slots)  # slot C: the no-op
        return torch.ones(slots + 1, dtype=torch.bool, device=drops.device).index_fill(0, drops, False)[:slots]

    def _write_slots(self, layer_idx: int, source: torch.Tensor, at: torch.Tensor, stored_key: torch.Tensor) -> None:
        """Move per-slot tensors besides keys and values like the keys (``source``), and fill the new slot ``at``."""

    # ----------------------------------------------------------------- back to the host (eager)
    def sync(self) -> None:
        """Bring the host path up to date with the tensor steps run since the last arm, then re-arm.

        Replays on the host what eager steps would have recorded: the token index, the rule's state
        (by planning the same compactions), the counters and the position frame. A compaction the
        last step decided but did not apply is applied as the host path applies it (``settle``);
        re-arming then finds the state in the schedule and keeps every tensor where it is.
        """
        if not self.dirty:
            return
        self.dirty = False
        cache = self.cache
        held, seen, applied = int(self.held), int(self.seen), int(self.applied)
        n, seen_before, k = self._host
        schedule = self.schedule
        pending = None
        for token in range(seen_before, seen):
            target = cache.points.after(token, n, 1, cache.policy.capacity(cache.budget))
            n += 1
            for layer in cache.layers:
                layer._tokens.add(token, token + 1)
            if target is None:
                continue
            event = schedule.event(k)
            plan = cache.policy.plan(n, target)  # advances the rule exactly as the host path would have
            if not (n == event.trigger and plan.kept == event.kept and np.array_equal(plan.index, event.plan.index)):
                raise RuntimeError("static decode diverged from its rule's plan: please report this")
            k += 1
            self.compactions += 1
            if k <= applied:  # applied by a later tensor step
                for layer in cache.layers:
                    layer._tokens.keep(plan.host_rows(layer.layer_idx))
                n = event.kept
            else:
                pending = plan
        if n != held or k - (pending is not None) != applied:
            raise RuntimeError(f"static decode holds {held} slots after {applied} compactions but the host replay "
                               f"counts {n} after {k}: please report this")
        self._hand_back(held, seen, seen_before)
        if pending is not None:
            for layer in cache.layers:
                layer.schedule(pending)
        self.arm()

    def _hand_back(self, held: int, seen: int, seen_before: int) -> None:
        """Set the host path's counters and position frame to where the tensor steps left them."""
        cache = self.cache
        cache._seen = seen
        cache._forwards += seen - seen_before
        frame = self.frame.tolist()
        for layer in cache.layers:
            layer.seen = seen
            layer._n = held
            if layer.shift.frame is not None:
                layer.shift.frame = frame * (len(layer.shift.frame) // len(frame) or 1)
