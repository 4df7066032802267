"""One layer's slots: a preallocated buffer, deferred compaction, and the original index of each slot.

A layer owns its storage rule, as transformers' cache layers do: it appends keys and values,
applies compactions, and positions its keys through its own position-shift strategy
(``cache.positions``). It knows nothing of the cache that holds it or of the policy that chose
what to keep: it is handed a plan and applies it.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import CacheLayerMixin

from .positions import KeyPositions, StepPositions

__all__ = ["SlotLayer", "TokenIndex"]


class TokenIndex:
    """The original token index of every slot of a layer: ``[1, n]`` while all sequences hold the
    same tokens, ``[B, n]`` once a per-sequence plan made them differ.

    Tokens appended since the index was last materialised are always consecutive indices
    ``[start, end)`` and are recorded as two integers, so a decode step costs no tensor work.
    """

    def __init__(self):
        self._index = torch.empty((1, 0), dtype=torch.long)
        self._tail_start = self._tail_end = 0

    @classmethod
    def of(cls, index: torch.Tensor, seen: int) -> "TokenIndex":
        """An index holding ``index`` (``[1 or B, n]``) after ``seen`` tokens (the next one added is ``seen``)."""
        made = cls()
        made._index = index
        made._tail_start = made._tail_end = seen
        return made

    def add(self, start: int, end: int) -> None:
        """Tokens ``start .. end - 1`` were appended."""
        if self._tail_end != start:
            self.tensor  # materialise a non-contiguous tail first
            self._tail_start = start
        self._tail_end = end

    @property
    def tensor(self) -> torch.Tensor:
        if self._tail_end > self._tail_start:
            index = self._index
            tail = torch.arange(self._tail_start, self._tail_end, dtype=torch.long)
            self._index = torch.cat([index, tail[None].expand(index.shape[0], -1)], dim=1)
            self._tail_start = self._tail_end
        return self._index

    def select_rows(self, rows: list[int]) -> None:
        """The batch's sequences became ``rows`` of the old batch (beam search reordering or repeating
        sequences); an index shared by the whole batch stays shared."""
        index = self.tensor
        if index.shape[0] > 1:
            self._index = index[torch.tensor(rows, dtype=torch.long)]

    def keep(self, host_rows: torch.Tensor) -> None:
        """Keep the slots ``host_rows`` (``[m]`` for every sequence, or ``[B, m]`` per sequence)."""
        index = self.tensor
        if host_rows.dim() == 1:
            self._index = index[:, host_rows]
        else:  # a different choice per sequence
            self._index = index.expand(host_rows.shape[0], -1).gather(1, host_rows)


class SlotLayer(CacheLayerMixin):
    """One layer's slots in a buffer of ``budget`` + ``headroom`` slots (grown geometrically up to it).

    Compaction is *deferred*: ``update`` returns views of the buffer to attention, so the buffer
    may only be rearranged at the next ``update`` of this layer (or when someone reads it). The
    planned compaction is recorded and applied in place then; only slots after the plan's stable
    prefix move. ``num_slots`` always reports the count after any pending compaction.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    #: spare capacity beyond the budget, so appends rarely reallocate
    headroom = 64

    def __init__(self, layer_idx: int, budget: int, shift: KeyPositions | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.budget = budget
        #: how this layer positions its keys; installed by the cache at its first forward pass
        self.shift = shift or KeyPositions(None)
        #: called before the host reads the slots (a static cache replays its compiled steps first)
        self.before_read = None
        self._reset_storage()

    def _reset_storage(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0  # slots physically in the buffer
        self.seen = 0  # tokens this layer has been given
        # (index row [m] shared by the batch, or [B, m] per sequence; first slot that moves; slots kept)
        self._pending: tuple[torch.Tensor, int, int] | None = None
        self._tokens = TokenIndex()
        self.shift.reset()

    # `keys`/`values` read as the live slots; transformers' base class assigns None to them.
    @property
    def keys(self) -> torch.Tensor | None:
        if self.before_read is not None:
            self.before_read()
        self.settle()
        return None if self._k is None else self._k[:, :, : self._n]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("SlotLayer.keys is read-only; use the cache's update()")

    @property
    def values(self) -> torch.Tensor | None:
        if self.before_read is not None:
            self.before_read()
        self.settle()
        return None if self._v is None else self._v[:, :, : self._n]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("SlotLayer.values is read-only; use the cache's update()")

    @property
    def frame(self) -> list[int] | None:
        """Stored rotation only: per sequence, the position slot 0's key sits at."""
        return self.shift.frame

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._k = self._v = None
        self._n = 0
        self.is_initialized = True

    @property
    def num_slots(self) -> int:
        return self._pending[2] if self._pending is not None else self._n

    @property
    def batch_size(self) -> int:
        return -1 if self._k is None else int(self._k.shape[0])

    # ----------------------------------------------------------------- writing
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: StepPositions):
        """Append this pass's states; return (stored keys, keys as attention sees them, values), pre-eviction."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.shift.prepare(self, step)
        keys, values = self._append(self.shift.store(key_states, step), value_states)
        q = int(key_states.shape[-2])
        self._tokens.add(self.seen, self.seen + q)
        self.seen += q
        return keys, self.shift.read(keys, step), values

    def _reserve(self, template_k: torch.Tensor, template_v: torch.Tensor, needed: int) -> None:
        capacity = 0 if self._k is None else self._k.shape[-2]
        if needed <= capacity:
            return
        # grow geometrically up to budget + headroom: short streams never pay for the whole budget
        size = max(needed, min(self.budget + self.headroom, max(2 * capacity, 256)))
        b, h, _, dk = template_k.shape
        new_k = template_k.new_empty((b, h, size, dk))
        new_v = template_v.new_empty((b, template_v.shape[1], size, template_v.shape[-1]))
        if self._n:
            new_k[:, :, : self._n] = self._k[:, :, : self._n]
            new_v[:, :, : self._n] = self._v[:, :, : self._n]
        self._k, self._v = new_k, new_v

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new states after the live slots; return views of all of them."""
        q = key_states.shape[-2]
        self._reserve(key_states, value_states, self._n + q)
        self._k[:, :, self._n : self._n + q] = key_states
        self._v[:, :, self._n : self._n + q] = value_states
        self._n += q
        return self._k[:, :, : self._n], self._v[:, :, : self._n]

    # ----------------------------------------------------------------- compaction
    def schedule(self, plan) -> None:
        """Keep the slots ``plan`` gives this layer (applied lazily, at the next write or read)."""
        self._pending = (plan.layer_rows(self.layer_idx, self._k.device), plan.stable_prefix, plan.kept)
        self._tokens.keep(plan.host_rows(self.layer_idx))

    def settle(self, frame: list[int] | None = None) -> None:
        """Apply a pending compaction in place; the position strategy re-positions what moved (to ``frame``)."""
        moved, self._pending = self._pending, None
        if moved is not None:
            row, start, kept = moved
            if row.dim() == 2:  # a different choice per sequence
                b, h, _, d = self._k.shape
                self._k[:, :, :kept] = self._k.gather(2, row[:, None, :, None].expand(b, h, kept, d))
                hv, dv = self._v.shape[1], self._v.shape[-1]
                self._v[:, :, :kept] = self._v.gather(2, row[:, None, :, None].expand(b, hv, kept, dv))
            elif start < kept:
                tail = row[start:]
                self._k[:, :, start:kept] = self._k.index_select(2, tail)
                self._v[:, :, start:kept] = self._v.index_select(2, tail)
            self._n = kept
        if self._k is not None:
            self.shift.realign(self._k, self._n, moved, frame)
        if moved is not None and self._k.shape[-2] > 2 * (self.budget + self.headroom):
            # give back the memory a long full prefill needed
            size = self.budget + self.headroom
            self._k = self._k[:, :, :size].clone()
            self._v = self._v[:, :, :size].clone()

    @property
    def token_index(self) -> torch.Tensor:
        """Original token index of every slot: ``[1, n]`` if all sequences hold the same tokens, else ``[B, n]``."""
        return self._tokens.tensor

    # ----------------------------------------------------------------- transformers' layer API
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # attention sees the held slots then the new tokens; the slots stand for the last n tokens seen
        n = self.num_slots
        return n + query_length, self.seen - n

    def get_max_length(self) -> int:
        # The stream itself is unbounded; the slot budget is `cache.budget`.
        return -1

    def memory_bytes(self) -> int:
        """Bytes allocated for this layer's keys and values (the whole buffer, not just live slots)."""
        if self._k is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def reset(self) -> None:
        self._reset_storage()
        self.is_initialized = False

    def clone(self) -> "SlotLayer":
        """An independent copy (beam search repeating a sequence of a padded batch)."""
        self.settle()
        twin = copy.copy(self)
        twin.shift = self.shift.clone()
        twin._tokens = copy.copy(self._tokens)  # its tensor is replaced, never written in place
        if self._k is not None:
            twin._k, twin._v = self._k.clone(), self._v.clone()
        return twin

    def select_rows(self, rows: list[int]) -> None:
        """Keep the sequences ``rows`` of the batch, in that order (a row may repeat): keys, values, the
        position frame and the token index follow their sequence (beam search)."""
        self.settle()
        if self._k is not None:
            index = torch.tensor(rows, dtype=torch.long, device=self._k.device)
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
        self.shift.select_rows(rows)
        self._tokens.select_rows(rows)

    def _rows(self) -> list[int]:
        """The batch's sequences, in order (none before the first update)."""
        return list(range(max(self.batch_size, 0)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows([r for r in self._rows() for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(torch.tensor(self._rows(), dtype=torch.long)[indices].reshape(-1).tolist())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a bounded cache cannot crop: evicted tokens cannot be restored, so assisted/speculative "
            "decoding is not supported; generate without assistant_model/prompt_lookup_num_tokens"
        )
