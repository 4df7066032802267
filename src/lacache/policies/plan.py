"""What a retention policy answers: which slots of a layer survive a compaction.

Two shapes of answer, one interface for the storage that applies them:

* ``CompactionPlan`` — index-only rules (ladder, window): one host-side index for every layer at
  once (``[layers, m]``, or ``[1, m]`` when every layer keeps the same slots), shared by all the
  sequences of a batch. Pure and cheap to memoise; its device tensor is built once per device.
* ``RowPlan`` — content-aware rules (scores, the salient pool): one layer's choice per sequence,
  a ``[B, m]`` index already on the device.

Storage calls only ``kept``, ``stable_prefix``, ``layer_rows`` and ``host_rows``, so it never
needs to know which rule produced a plan. This module imports torch lazily: the index-only path
(and its property tests) stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["CompactionPlan", "RowPlan", "identity_plan"]


@dataclass(frozen=True)
class CompactionPlan:
    """Which current slots survive a compaction, per layer, in slot order.

    ``index`` has shape ``[rows, m]`` with ``rows`` either the number of layers (each layer its own
    choice) or 1 (every layer keeps the same slots). ``cursor`` is the ladder cursor after the plan.
    ``passes_started`` lists, for each pass begun inside this plan, the slot where it began (property
    tests use it to check that every pass starts at the oldest non-sink slot).
    """

    index: np.ndarray
    cursor: int
    passes_started: tuple[int, ...] = ()
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def kept(self) -> int:
        return int(self.index.shape[1])

    @cached_property
    def stable_prefix(self) -> int:
        """Leading slots that stay where they are in every layer (sinks and history before the cursor)."""
        moved = self.index != np.arange(self.index.shape[1])
        columns = np.flatnonzero(moved.any(axis=0))
        return int(columns[0]) if columns.size else int(self.index.shape[1])

    def rows_for(self, layer: int) -> np.ndarray:
        return self.index[layer if self.index.shape[0] > 1 else 0]

    def tensor(self, device) -> "torch.Tensor":
        """The index as a LongTensor on ``device``, built once per device and reused."""
        key = str(device)
        t = self._tensors.get(key)
        if t is None:
            import torch

            t = torch.as_tensor(self.index, dtype=torch.long).to(device)
            self._tensors[key] = t
        return t

    def layer_rows(self, layer: int, device) -> "torch.Tensor":
        """Slots layer ``layer`` keeps, ``[m]`` on ``device`` (the same for every sequence)."""
        rows = self.tensor(device)
        return rows[layer] if rows.shape[0] > 1 else rows[0]

    def host_rows(self, layer: int) -> "torch.Tensor":
        """The same slots on the host, to update the token index without a device sync."""
        import torch

        return torch.from_numpy(self.rows_for(layer))


def identity_plan(n: int, cursor: int) -> CompactionPlan:
    return CompactionPlan(np.arange(n, dtype=np.int64)[None, :], cursor)


class RowPlan:
    """One layer's kept slots per sequence: ``index`` ``[B, m]``, ascending in each row."""

    #: a per-sequence choice can move any slot
    stable_prefix = 0

    def __init__(self, index: "torch.Tensor"):
        self.index = index

    @property
    def kept(self) -> int:
        return int(self.index.shape[1])

    def layer_rows(self, layer: int, device) -> "torch.Tensor":
        """``[B, m]`` on ``device``; a single sequence gets its row as ``[m]`` (the cheaper shared-row path)."""
        rows = self.index.to(device)
        return rows[0] if rows.shape[0] == 1 else rows

    def host_rows(self, layer: int) -> "torch.Tensor":
        rows = self.index.cpu()
        return rows[0] if rows.shape[0] == 1 else rows
