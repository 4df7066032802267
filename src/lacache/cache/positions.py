"""How a bounded cache positions its keys: the three position-shift strategies.

A bounded cache keeps keys of tokens that were far apart and puts them side by side. With
``positions="shift"`` attention must see slot ``i`` of ``n`` at position ``p_last - (n - 1 - i)``
(``p_last`` = the newest token's position), as if the history were contiguous; with
``positions="original"`` keys keep the positions the model gave them. Three strategies do this,
one instance per layer, each owning what it needs:

* ``KeyPositions`` (``"none"``): keys are stored and read as the model rotated them;
* ``RotateOnRead`` (``"read"``): incoming keys are rotated back to position 0 once, stored that
  way, and every read rotates the whole layer to its slot positions. Each stored key is rounded
  once, so half-precision caches do not drift over long streams;
* ``StoredRotation`` (``"stored"``): keys are stored already at their slot positions, relative to
  a per-sequence *frame* (slot ``i`` of row ``b`` sits at ``frame[b] + i``), and are re-rotated
  only when a compaction moves them or the frame changes: one rotation per kept key per
  compaction, none per token. Float32 caches use it.

``StepPositions`` is what one forward pass shares across layers: the positions the model used,
and, built on first use, the angle tables per rotator and the frame of this pass.
"""

from __future__ import annotations

import copy
from functools import cached_property

import torch

from ..rope import Rotator

__all__ = ["StepPositions", "KeyPositions", "RotateOnRead", "StoredRotation", "STRATEGIES", "rotation_for"]


class StepPositions:
    """Positions of one forward pass and what every layer derives from them (computed once)."""

    def __init__(self, positions: torch.Tensor, slots_before: int, query_length: int, batch: int):
        self.positions = positions  # [B or 1, q] positions the model used for the new tokens
        self.slots_before = slots_before
        self.query_length = query_length
        self.batch = batch
        self._angles: dict = {}  # (device, rotator) -> (cos_new, sin_new, cos_read, sin_read)

    def angles(self, rotator: Rotator, device: torch.device):
        """cos/sin for the new tokens' own positions and for reading every slot at its slot position."""
        key = (device, id(rotator))  # layers of one type share a rotator, hence one table per step
        cached = self._angles.get(key)
        if cached is None:
            positions = self.positions.to(device)
            cos_new, sin_new = rotator.angles(positions)
            total = self.slots_before + self.query_length
            base = positions[:, -1:] - (total - 1)
            read = base + torch.arange(total, device=device)
            cos_read, sin_read = rotator.angles(read)
            cached = self._angles[key] = (cos_new, sin_new, cos_read, sin_read)
        return cached

    @cached_property
    def _host_rows(self) -> list[list[int]]:
        # one host read of this step's positions: frames are host integers so that deciding what to
        # rotate never needs a device sync of its own
        rows = self.positions.tolist()
        return rows * self.batch if len(rows) == 1 and self.batch > 1 else rows

    @property
    def first_positions(self) -> list[int]:
        """Per row, the position of this pass's first new token."""
        return [row[0] for row in self._host_rows]

    @cached_property
    def frame(self) -> list[int]:
        """Per row, the position slot 0 sits at after this pass."""
        total = self.slots_before + self.query_length
        return [r[-1] - (total - 1) for r in self._host_rows]

    @cached_property
    def new_delta(self) -> torch.Tensor | None:
        """How far each new key is from its slot position (None when they coincide, the usual case)."""
        first = self.slots_before
        off = [[p - (f + first + j) for j, p in enumerate(r)] for r, f in zip(self._host_rows, self.frame)]
        return torch.tensor(off, dtype=torch.long) if any(any(o) for o in off) else None


class KeyPositions:
    """Keys stay at the positions the model gave them (``positions="original"``)."""

    name = "none"
    #: position of slot 0 per sequence; only ``StoredRotation`` keeps one
    frame: list[int] | None = None

    def __init__(self, rotator: Rotator | None):
        self.rotator = rotator

    def prepare(self, storage, step: StepPositions) -> None:
        """Bring ``storage`` up to date before this pass appends to it."""
        storage.settle()

    def store(self, key_states: torch.Tensor, step: StepPositions) -> torch.Tensor:
        """The new keys as they are to be stored."""
        return key_states

    def read(self, keys: torch.Tensor, step: StepPositions) -> torch.Tensor:
        """The stored keys as attention must see them in this pass."""
        return keys

    def realign(self, k: torch.Tensor, n: int, moved: tuple | None, frame: list[int] | None) -> None:
        """After ``moved`` = (row, start, kept) slots were compacted in ``k``, re-position what moved."""

    def select_rows(self, rows: list[int]) -> None:
        """The batch was reordered or repeated (beam search): follow it."""

    def reset(self) -> None:
        pass

    def clone(self) -> "KeyPositions":
        return copy.copy(self)


class RotateOnRead(KeyPositions):
    """Store keys un-rotated (position 0); rotate the whole layer to slot positions on every read."""

    name = "read"

    def store(self, key_states, step):
        cos_new, sin_new, _, _ = step.angles(self.rotator, key_states.device)
        return self.rotator.rotate(key_states, cos_new, sin_new, inverse=True)

    def read(self, keys, step):
        _, _, cos_read, sin_read = step.angles(self.rotator, keys.device)
        return self.rotator.rotate(keys, cos_read, sin_read)


class StoredRotation(KeyPositions):
    """Store keys at ``frame + slot``; re-rotate only the keys a compaction or a new frame moves."""

    name = "stored"

    def __init__(self, rotator: Rotator | None):
        super().__init__(rotator)
        self.frame = None

    def prepare(self, storage, step):
        if self.frame is None:
            self.frame = list(step.frame)
        storage.settle(step.frame)

    def store(self, key_states, step):
        delta = step.new_delta
        if delta is None:
            return key_states
        cos, sin = self.rotator.angles(delta.to(key_states.device))
        return self.rotator.rotate(key_states, cos, sin)

    def realign(self, k, n, moved, frame):
        """Turn each kept key by ``new frame - old frame + slot - old slot``.

        A compaction moves slot ``row[i]`` to ``i`` and the new frame may differ from the old one.
        With an unchanged frame the stable prefix does not move and is not touched.
        """
        frame = self.frame if frame is None or self.frame is None else frame
        if moved is None:
            if self.frame is not None and frame != self.frame and n:
                shift = torch.tensor(frame, device=k.device)[:, None] - torch.tensor(self.frame, device=k.device)[:, None]
                self._rotate_range(k, 0, n, shift.expand(-1, n))
            self.frame = frame
            return
        row, start, kept = moved
        if self.frame is None:
            return
        shift = [new - old for new, old in zip(frame, self.frame)]
        first = start if row.dim() == 1 and not any(shift) else 0
        if first < kept:
            slots = torch.arange(first, kept, device=row.device)
            moved_by = slots - (row[first:kept] if row.dim() == 1 else row[:, first:kept])
            delta = torch.tensor(shift, device=row.device)[:, None] + moved_by
            self._rotate_range(k, first, kept, delta)
        self.frame = frame

    def _rotate_range(self, k: torch.Tensor, first: int, end: int, delta: torch.Tensor) -> None:
        """Turn stored keys of slots ``first:end`` by ``delta`` ([B or 1, end - first]) positions."""
        cos, sin = self.rotator.angles(delta)
        k[:, :, first:end] = self.rotator.rotate(k[:, :, first:end], cos, sin)

    def select_rows(self, rows):
        if self.frame is not None:
            self.frame = [self.frame[r] for r in rows]

    def reset(self) -> None:
        self.frame = None

    def clone(self) -> "StoredRotation":
        twin = copy.copy(self)
        twin.frame = None if self.frame is None else list(self.frame)
        return twin


STRATEGIES = {cls.name: cls for cls in (KeyPositions, RotateOnRead, StoredRotation)}


def rotation_for(positions: str, dtype: torch.dtype) -> str:
    """The strategy a cache uses: none without position shift; stored rotation in float32; rotate on
    read in half precision, where a stored key re-rotated at every compaction would be rounded again
    each time and drift over a long stream."""
    if positions != "shift":
        return "none"
    return "stored" if dtype == torch.float32 else "read"
