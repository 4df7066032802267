"""Left-padded batches, exactly: each sequence compacts as if it were alone.

A bounded cache evicts different tokens at different times in each sequence of a padded batch:
a row with more padding has seen fewer real tokens and fills its budget later. Compacting the
padded layout as one block is wrong (a ladder applied to pad slots moves real tokens into positions
the mask then hides, and the padding mask transformers builds from the 2D ``attention_mask``
assumes every row still holds its pads at the front). So a bounded cache that sees padding keeps
one single-row cache per sequence, holding only that sequence's real tokens, and hands attention
a *layout*: a left-padded batch of the rows' caches (unused columns, then row ``b``'s held slots),
then this forward's new tokens at columns shared by every row. Causality among the new tokens is
the plain causal mask, and each row's slots end right before its new tokens, as they do alone, so
masks that count columns back from the query (sliding windows) see what they see alone.

transformers derives the padding part of the mask from the 2D ``attention_mask``, which describes
the original padded sequences, not this layout. The model's decoder pre-hook (``cache.attach``)
replaces it with the layout's own 2D mask for that forward (``layout_mask``), and the cache reports
matching sizes:
``get_mask_sizes(q) = (width + q, 0)`` and ``get_query_offset() = width``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["first_real", "layout_mask", "PaddedRows"]


def first_real(new_valid: Sequence[Sequence[int]], started: Sequence[bool]) -> list[int]:
    """Index of the first real token of this forward's chunk in each row (``q`` if none).

    ``new_valid`` holds the ``attention_mask`` columns of the new tokens; ``started`` says which
    rows already hold real tokens. Only left padding is supported: in each row the padding comes
    before every real token.
    """
    starts = []
    for row, (valid, began) in enumerate(zip(new_valid, started)):
        q = len(valid)
        start = next((i for i, v in enumerate(valid) if v), q)
        if any(not v for v in valid[start:]) or (began and start > 0):
            raise ValueError(
                f"row {row} of the batch has padding after real tokens (attention_mask {list(valid)} in this "
                "forward): bounded caches support left padding only; tokenize with padding_side='left'"
            )
        starts.append(start)
    return starts


def layout_mask(held: Sequence[int], new_mask: torch.Tensor) -> torch.Tensor:
    """The 2D mask of the layout attention sees: ``max(held) - held[b]`` unused columns, row ``b``'s
    ``held[b]`` slots, then the new tokens' own mask columns ``new_mask`` ([B, q])."""
    width = max(held) if held else 0
    device = new_mask.device
    columns = torch.arange(width, device=device)[None, :]
    kept = columns >= width - torch.tensor(list(held), device=device)[:, None]
    return torch.cat([kept, new_mask.to(torch.bool)], dim=1)


class _RowQueries:
    """One sequence's view of a batch's observed queries (its real tokens only), for a padded batch's row caches."""

    def __init__(self, observer, row: int):
        self.observer, self.row, self.start = observer, row, 0
        self.scaling = observer.scaling

    def query(self, layer_idx: int) -> torch.Tensor:
        return self.observer.query(layer_idx)[self.row : self.row + 1, :, self.start :]

    def release(self, layer_idx: int) -> None:
        """The batch's observer drops the layer's query once the whole batch's update is done."""

    def clear(self) -> None:
        pass


class PaddedRows:
    """The padded-batch backend of a bounded cache: one single-row cache per sequence.

    ``spawn()`` makes a fresh single-row cache with the parent's settings (and a fork of its
    policy); the parent hands every ``update`` of a padded stream to ``update`` here, which runs
    each row's cache on that row's real tokens and lays the results out for attention.
    """

    def __init__(self, spawn: Callable, batch: int, num_layers: int, observer=None):
        self.rows = [spawn() for _ in range(batch)]
        self.num_layers = num_layers
        if observer is not None:  # attention-score policies read their own row's queries
            for b, row in enumerate(self.rows):
                row.observer = _RowQueries(observer, b)
        # this forward's (layout width, first real token of each row): set by the decoder hook, taken
        # by the first layer's update
        self._next: tuple[int, list[int]] | None = None
        self._active: tuple[int, list[int]] | None = None

    @property
    def num_slots(self) -> int:
        return max(row.num_slots for row in self.rows)

    def width(self) -> int:
        """Columns of held slots attention sees (the fullest row's count)."""
        return self._next[0] if self._next is not None else self.num_slots

    def begin_forward(self, mask: torch.Tensor | None, q: int) -> torch.Tensor:
        """Plan this forward's layout from the batch's 2D attention mask; return the layout's mask."""
        if mask is None or mask.dim() != 2:
            raise ValueError(
                "a left-padded batch needs its 2D attention_mask ([batch, tokens so far]) at every forward"
            )
        if mask.shape[0] != len(self.rows):
            raise ValueError(f"attention_mask has {mask.shape[0]} rows but the cache holds {len(self.rows)} sequences")
        new_mask = mask[:, -q:]
        starts = first_real(new_mask.tolist(), [row.seen > 0 for row in self.rows])
        held = [row.num_slots for row in self.rows]
        self._next = (max(held), starts)
        return layout_mask(held, new_mask)

    def begin_update(self, layer_idx: int) -> bool:
        """Called by every layer's update; True at the first layer of a forward (tokens to count)."""
        if layer_idx == 0 or self._active is None:
            if self._next is None:
                raise RuntimeError(
                    "a left-padded batch must be run through the model this cache was built for (LaCache.from_model), "
                    "passing attention_mask and the cache as keyword arguments"
                )
            self._active, self._next = self._next, None
            return True
        return False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, attn_kwargs: dict):
        width, starts = self._active
        q = int(key_states.shape[-2])
        if layer_idx == self.num_layers - 1:
            self._active = None
        positions = attn_kwargs.get("position_ids")
        if positions is None:
            raise ValueError("a left-padded batch needs position_ids (generate() passes them)")
        if positions.dim() == 1:
            positions = positions[None]
        batch, heads, _, dim = key_states.shape
        out_k = key_states.new_zeros((batch, heads, width + q, dim))
        out_v = value_states.new_zeros((batch, value_states.shape[1], width + q, value_states.shape[-1]))
        for b, (row, start) in enumerate(zip(self.rows, starts)):
            if start == q:  # only padding in this forward: the row holds nothing yet
                continue
            pos = positions[b if positions.shape[0] > 1 else 0, start:][None]
            if row.observer is not None:
                row.observer.start = start
            keys, values = row.update(key_states[b : b + 1, :, start:], value_states[b : b + 1, :, start:],
                                      layer_idx, position_ids=pos)
            # right-aligned: the row's slots end where the new tokens begin, as they do alone, so
            # masks that count columns back from the query (sliding windows) see what they see alone
            held = keys.shape[-2] - (q - start)
            out_k[b, :, width - held : width] = keys[0, :, :held]
            out_v[b, :, width - held : width] = values[0, :, :held]
            out_k[b, :, width + start :] = keys[0, :, held:]
            out_v[b, :, width + start :] = values[0, :, held:]
        return out_k, out_v

    def pick(self, indices: list[int]) -> None:
        """Reorder / repeat rows (beam search); a row taken twice is copied."""
        taken: set[int] = set()
        rows = []
        for i in indices:
            rows.append(self.rows[i].twin() if i in taken else self.rows[i])
            taken.add(i)
        for b, row in enumerate(rows):
            if row.observer is not None:
                row.observer.row = b
        self.rows = rows
