"""transformers ``Cache`` classes with a fixed number of slots per layer.

The glue between transformers and the pure slot arithmetic: it stores keys and values, asks a
policy which slots survive when the budget is exceeded, and re-positions keys by slot.

Facts this relies on (transformers 5.x, SPEC §5):

* the attention mask is sized from layer 0 via ``get_mask_sizes``; every layer therefore holds
  the same number of slots, though not the same tokens;
* ``get_seq_length`` must report tokens *seen* (generate slices prompts and chunked prefill with
  it), while the mask sees ``n_slots + q`` keys starting at offset ``seen - n_slots``;
* ``update`` returns the full pre-eviction states for this forward's attention; eviction happens
  after, so a new token always sees everything the cache held;
* ``generate()`` hands every layer the absolute ``position_ids`` of the new tokens (through the
  attention kwargs); the cache never assumes the query sits at ``n_slots``.

Position shift ("rotate on read"): incoming keys are rotated back to position 0 once and stored
that way; each read rotates slot ``i`` of ``n`` to ``p_last - (n - 1 - i)``, where ``p_last`` is the
position of the newest token. Attention then sees cached tokens as contiguous, however far apart
they originally were, with no drift in half precision (each stored key is rounded once).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .ladder import CompactionPlan, default_span_overlap, ladder_geometry
from .observe import QueryObserver
from .padding import first_real, layout_mask, watch_padding
from .policies import LadderPolicy, SlotPolicy, StreamingPolicy
from .policies.salient import SalientLadderPolicy
from .policies.scores import H2OPolicy, KNormPolicy, ScorePolicy, TOVAPolicy, attention_probs
from .rope import Rotator, check_supported_model, layer_rotators

__all__ = ["BoundedCache", "LaCache", "StreamingLLMCache", "TOVACache", "H2OCache", "KNormCache", "POSITION_MODES"]

POSITION_MODES = ("shift", "original")


class SlotLayer(CacheLayerMixin):
    """One layer's slots in a preallocated buffer. Bookkeeping shared by layers lives in the cache.

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

    def __init__(self, owner: "BoundedCache", layer_idx: int):
        super().__init__()
        # a proxy, not a reference: no cycle, so a dropped cache (and its hooks) goes away at once
        self.owner = weakref.proxy(owner)
        self.layer_idx = layer_idx
        self._reset_storage()

    def _reset_storage(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0  # slots physically in the buffer
        # (index row [m] shared by the batch, or [B, m] per sequence; first slot that moves; slots kept)
        self._pending: tuple[torch.Tensor, int, int] | None = None
        # original token index of every slot: [1, n] when all sequences hold the same tokens, else [B, n]
        self._token_index = torch.empty((1, 0), dtype=torch.long)
        # tokens appended since the index was last materialised are always the consecutive indices
        # [_tail_start, _tail_end): recorded as two integers, so a decode step costs no tensor work
        self._tail_start = self._tail_end = 0
        # "stored" rotation only: slot i of row b holds its key rotated to position frame[b] + i
        self.frame: list[int] | None = None

    # `keys`/`values` read as the live slots; transformers' base class assigns None to them.
    @property
    def keys(self) -> torch.Tensor | None:
        self._settle()
        return None if self._k is None else self._k[:, :, : self._n]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("SlotLayer.keys is read-only; use the cache's update()")

    @property
    def values(self) -> torch.Tensor | None:
        self._settle()
        return None if self._v is None else self._v[:, :, : self._n]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("SlotLayer.values is read-only; use the cache's update()")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._k = self._v = None
        self._n = 0
        self.is_initialized = True

    @property
    def num_slots(self) -> int:
        return self._pending[2] if self._pending is not None else self._n

    def _reserve(self, template_k: torch.Tensor, template_v: torch.Tensor, needed: int) -> None:
        capacity = 0 if self._k is None else self._k.shape[-2]
        if needed <= capacity:
            return
        # grow geometrically up to budget + headroom: short streams never pay for the whole budget
        size = max(needed, min(self.owner.budget + self.headroom, max(2 * capacity, 256)))
        b, h, _, dk = template_k.shape
        new_k = template_k.new_empty((b, h, size, dk))
        new_v = template_v.new_empty((b, template_v.shape[1], size, template_v.shape[-1]))
        if self._n:
            new_k[:, :, : self._n] = self._k[:, :, : self._n]
            new_v[:, :, : self._n] = self._v[:, :, : self._n]
        self._k, self._v = new_k, new_v

    def _settle(self, frame: list[int] | None = None) -> None:
        """Apply a pending compaction in place; with stored rotation, re-position keys to ``frame``.

        Stored keys sit at ``frame + slot``. A compaction moves slot ``row[i]`` to ``i`` and the new
        frame may differ from the old one, so each kept key turns by ``new - old + i - row[i]``:
        one rotation per kept key per compaction (every ``chunk`` tokens), none per token. With an
        unchanged frame the stable prefix does not move and is not touched.
        """
        frame = self.frame if frame is None or self.frame is None else frame
        if self._pending is None:
            if self.frame is not None and frame != self.frame and self._n:
                shift = torch.tensor(frame, device=self._k.device)[:, None] - torch.tensor(self.frame, device=self._k.device)[:, None]
                self._rotate_range(0, self._n, shift.expand(-1, self._n))
            self.frame = frame
            return
        row, start, kept = self._pending
        self._pending = None
        if row.dim() == 2:  # a different choice per sequence
            b, h, _, d = self._k.shape
            self._k[:, :, :kept] = self._k.gather(2, row[:, None, :, None].expand(b, h, kept, d))
            hv, dv = self._v.shape[1], self._v.shape[-1]
            self._v[:, :, :kept] = self._v.gather(2, row[:, None, :, None].expand(b, hv, kept, dv))
        elif start < kept:
            moved = row[start:]
            self._k[:, :, start:kept] = self._k.index_select(2, moved)
            self._v[:, :, start:kept] = self._v.index_select(2, moved)
        self._n = kept
        if self.frame is not None:
            shift = [new - old for new, old in zip(frame, self.frame)]
            first = start if row.dim() == 1 and not any(shift) else 0
            if first < kept:
                slots = torch.arange(first, kept, device=row.device)
                moved_by = slots - (row[first:kept] if row.dim() == 1 else row[:, first:kept])
                delta = torch.tensor(shift, device=row.device)[:, None] + moved_by
                self._rotate_range(first, kept, delta)
            self.frame = frame
        # give back the memory a long full prefill needed
        if self._k.shape[-2] > 2 * (self.owner.budget + self.headroom):
            size = self.owner.budget + self.headroom
            self._k = self._k[:, :, :size].clone()
            self._v = self._v[:, :, :size].clone()

    def _rotate_range(self, first: int, end: int, delta: torch.Tensor) -> None:
        """Turn stored keys of slots ``first:end`` by ``delta`` ([B or 1, end - first]) positions."""
        rotator = self.owner.rotators[self.layer_idx]
        cos, sin = rotator.angles(delta)
        self._k[:, :, first:end] = rotator.rotate(self._k[:, :, first:end], cos, sin)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new states after the live slots; return views of all of them (pre-eviction)."""
        self._settle()
        q = key_states.shape[-2]
        self._reserve(key_states, value_states, self._n + q)
        self._k[:, :, self._n : self._n + q] = key_states
        self._v[:, :, self._n : self._n + q] = value_states
        self._n += q
        return self._k[:, :, : self._n], self._v[:, :, : self._n]

    def schedule(self, plan: CompactionPlan) -> None:
        rows = plan.tensor(self._k.device)
        row = rows[self.layer_idx] if rows.shape[0] > 1 else rows[0]
        self._pending = (row, plan.stable_prefix, plan.kept)
        self.token_index = self.token_index[:, torch.from_numpy(plan.rows_for(self.layer_idx))]

    def schedule_rows(self, rows: torch.Tensor) -> None:
        """Keep slots ``rows`` ([B, m], ascending per row): each sequence its own choice."""
        rows_here = rows.to(self._k.device)
        # one sequence: the cheaper shared-row path (index_select instead of an expanded gather)
        self._pending = (rows_here[0] if rows.shape[0] == 1 else rows_here, 0, int(rows.shape[1]))
        index = self.token_index.expand(rows.shape[0], -1)
        self.token_index = index.gather(1, rows.cpu())

    def add_tokens(self, start: int, end: int) -> None:
        if self._tail_end != start:
            self.token_index  # materialise a non-contiguous tail first
            self._tail_start = start
        self._tail_end = end

    @property
    def token_index(self) -> torch.Tensor:
        """Original token index of every slot: ``[1, n]`` if all sequences hold the same tokens, else ``[B, n]``."""
        if self._tail_end > self._tail_start:
            index = self._token_index
            tail = torch.arange(self._tail_start, self._tail_end, dtype=torch.long)
            self._token_index = torch.cat([index, tail[None].expand(index.shape[0], -1)], dim=1)
            self._tail_start = self._tail_end
        return self._token_index

    @token_index.setter
    def token_index(self, value: torch.Tensor) -> None:
        self._token_index = value
        self._tail_start = self._tail_end

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.layer_idx, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.owner._rows is not None:  # a left-padded batch: the layout of lacache.padding
            return self.owner._layout_width() + query_length, 0
        n = self.num_slots
        return n + query_length, self.owner.seen - n

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

    def _select_batch(self, fn, rows: list[int]) -> None:
        self._settle()
        if self._k is not None:
            self._k, self._v = fn(self._k), fn(self._v)
        if self.frame is not None:
            self.frame = [self.frame[r] for r in rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)), beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = [r for r in range(len(self.frame or [])) for _ in range(repeats)]
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0), rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        rows = torch.arange(len(self.frame or []))[indices].tolist()
        self._select_batch(lambda t: t[indices, ...], rows)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self.owner).__name__} cannot crop: evicted tokens cannot be restored, so assisted/speculative "
            "decoding is not supported; generate without assistant_model/prompt_lookup_num_tokens"
        )


@dataclass
class _Step:
    """What one forward pass shares across layers: computed at layer 0, reused by the rest."""

    query_length: int
    slots_before: int
    positions: torch.Tensor  # [B or 1, q] positions the model used for the new tokens
    plan: CompactionPlan | None
    target: int
    over_budget: bool
    angles: dict = field(default_factory=dict)  # device -> (cos_new, sin_new, cos_read, sin_read)
    # "stored" rotation: per row, the position slot 0 must sit at, and how far each new key is from
    # its slot position (None when the new tokens sit exactly at their slots, the usual case)
    frame: list[int] | None = None
    new_delta: torch.Tensor | None = None


class _RowQueries:
    """One sequence's view of a batch's observed queries (its real tokens only), for a padded batch's row caches."""

    def __init__(self, observer: QueryObserver, row: int):
        self.observer, self.row, self.start = observer, row, 0
        self.scaling = observer.scaling

    def query(self, layer_idx: int) -> torch.Tensor:
        return self.observer.query(layer_idx)[self.row : self.row + 1, :, self.start :]


class BoundedCache(Cache):
    """A cache of at most ``budget`` slots per layer, compacted by a ``SlotPolicy``.

    Do not build it directly: use ``LaCache.from_model`` or ``StreamingLLMCache.from_model``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        budget: int,
        policy: SlotPolicy,
        rotator: Rotator | list[Rotator] | None,
        positions: str = "shift",
        chunk: int = 0,
    ):
        layers = [SlotLayer(self, i) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.budget = int(budget)
        self.chunk = int(chunk)
        self.policy = policy
        self.positions = positions
        # one per layer (models mixing sliding and global layers use different RoPE frequencies)
        self.rotators: list[Rotator] = rotator if isinstance(rotator, list) else [rotator] * num_layers
        self.seen = 0
        self._step: _Step | None = None
        self.observer: QueryObserver | None = None  # set for caches that need attention scores
        #: "stored" | "read" | "none"; chosen from the key dtype at the first update (see _rotation)
        self.rotation: str | None = None
        # left-padded batches (lacache.padding): one single-row cache per sequence, and this
        # forward's (layout width, first real token of each row)
        self._rows: list[BoundedCache] | None = None
        self._padded_step: tuple[int, list[int]] | None = None
        self._padded_active: tuple[int, list[int]] | None = None

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _validate_common(model: nn.Module, budget, sinks, positions) -> tuple[int, list[Rotator]]:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"budget={budget!r} must be a positive number of slots per layer, e.g. budget=512")
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks={sinks!r} must be a non-negative integer, e.g. sinks=4")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions={positions!r} must be one of {POSITION_MODES}; e.g. positions='shift'")
        rotary = check_supported_model(model, positions)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return int(config.num_hidden_layers), layer_rotators(model, rotary)

    @staticmethod
    def _resolve_chunk(chunk, budget: int, min_target: int) -> int:
        room = budget - min_target
        if chunk is None:
            return max(0, min(budget // 16, room))
        if not isinstance(chunk, int) or chunk < 0 or chunk > room:
            raise ValueError(
                f"chunk={chunk!r} must be between 0 and {max(room, 0)} for budget={budget} (it is how many slots "
                f"below the budget a compaction frees, to amortise it); e.g. chunk={max(0, min(budget // 16, room))}"
            )
        return chunk

    # ----------------------------------------------------------------- introspection
    @property
    def num_slots(self) -> int:
        """Slots currently held by every layer (in a padded batch, by its fullest sequence)."""
        if self._rows is not None:
            return max(row.num_slots for row in self._rows)
        return self.layers[0].num_slots if self.layers else 0

    @property
    def padded(self) -> bool:
        """Whether this stream is a left-padded batch kept as one single-row cache per sequence."""
        return self._rows is not None

    def token_positions(self, layer_idx: int, batch_index: int = 0) -> torch.Tensor:
        """Original indices (0-based over every token seen) of the tokens held by a layer, in slot order."""
        if self.batch_size > 0 and not 0 <= batch_index < self.batch_size:
            raise IndexError(f"batch_index={batch_index} is out of range for a batch of {self.batch_size}")
        if self._rows is not None:  # indices count the sequence's own real tokens, as if it were alone
            return self._rows[batch_index].token_positions(layer_idx)
        index = self.layers[layer_idx].token_index
        return index[batch_index if index.shape[0] > 1 else 0].clone()

    @property
    def batch_size(self) -> int:
        if self._rows is not None:
            return len(self._rows)
        keys = self.layers[0]._k if self.layers else None
        return -1 if keys is None else int(keys.shape[0])

    def memory_bytes(self) -> int:
        """Bytes allocated for keys and values across all layers (buffers of ``budget`` + headroom slots)."""
        if self._rows is not None:
            return sum(row.memory_bytes() for row in self._rows)
        return sum(layer.memory_bytes() for layer in self.layers)

    def describe(self) -> dict:
        return {
            "cache": type(self).__name__,
            "budget": self.budget,
            "chunk": self.chunk,
            "positions": self.positions,
            **self.policy.describe(),
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "cache")
        return f"{type(self).__name__}({args}, slots={self.num_slots}, seen={self.seen})"

    # ----------------------------------------------------------------- the update path
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self._step = None
        self.policy.reset()
        self._rows = self._padded_step = self._padded_active = None

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._layout_width() if self._rows is not None else self.seen

    # ----------------------------------------------------------------- left-padded batches
    def _spawn(self) -> "BoundedCache":
        """A single-row cache with this cache's settings and a fork of its policy (memoised plans shared)."""
        return BoundedCache(num_layers=len(self.layers), budget=self.budget, policy=self.policy.fork(),
                            rotator=self.rotators, positions=self.positions, chunk=self.chunk)

    def _twin(self) -> "BoundedCache":
        """An independent copy of this single-row cache (beam search repeating a sequence)."""
        twin = self._spawn()
        twin.seen, twin.rotation, twin.observer = self.seen, self.rotation, copy.copy(self.observer)
        for mine, theirs in zip(self.layers, twin.layers):
            mine._settle()
            state = {k: v for k, v in vars(mine).items() if k != "owner"}
            vars(theirs).update(state)
            if mine._k is not None:
                theirs._k, theirs._v = mine._k.clone(), mine._v.clone()
            if mine.frame is not None:
                theirs.frame = list(mine.frame)
        return twin

    def _layout_width(self) -> int:
        if self._padded_step is not None:
            return self._padded_step[0]
        return max(row.num_slots for row in self._rows)

    def _begin_padded_forward(self, mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
        """Called by the decoder hook before each forward: returns the layout's 2D mask, or None.

        The first forward of a stream decides: a 2D mask with zeros (one host read, once per stream)
        turns the cache into one single-row cache per sequence for the rest of the stream.
        """
        if self._rows is None:
            if self.seen or mask is None or mask.dim() != 2 or bool(mask.all()):
                return None
            self._rows = [self._spawn() for _ in range(int(mask.shape[0]))]
            if self.observer is not None:  # attention-score policies read their own row's queries
                for b, row in enumerate(self._rows):
                    row.observer = _RowQueries(self.observer, b)
        if mask is None or mask.dim() != 2:
            raise ValueError(
                "a left-padded batch needs its 2D attention_mask ([batch, tokens so far]) at every forward"
            )
        if mask.shape[0] != len(self._rows):
            raise ValueError(f"attention_mask has {mask.shape[0]} rows but the cache holds {len(self._rows)} sequences")
        new_mask = mask[:, -q:]
        starts = first_real(new_mask.tolist(), [row.seen > 0 for row in self._rows])
        held = [row.num_slots for row in self._rows]
        self._padded_step = (max(held), starts)
        return layout_mask(held, new_mask)

    def _padded_update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, attn_kwargs):
        if layer_idx == 0 or self._padded_active is None:
            if self._padded_step is None:
                raise RuntimeError(
                    "a left-padded batch must be run through the model this cache was built for (LaCache.from_model), "
                    "passing attention_mask and the cache as keyword arguments"
                )
            self._padded_active, self._padded_step = self._padded_step, None
            self.seen += int(key_states.shape[-2])
        width, starts = self._padded_active
        q = int(key_states.shape[-2])
        if layer_idx == len(self.layers) - 1:
            self._padded_active = None
        positions = attn_kwargs.get("position_ids")
        if positions is None:
            raise ValueError("a left-padded batch needs position_ids (generate() passes them)")
        if positions.dim() == 1:
            positions = positions[None]
        batch, heads, _, dim = key_states.shape
        out_k = key_states.new_zeros((batch, heads, width + q, dim))
        out_v = value_states.new_zeros((batch, value_states.shape[1], width + q, value_states.shape[-1]))
        for b, (row, start) in enumerate(zip(self._rows, starts)):
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

    def _pick_rows(self, indices: list[int]) -> None:
        taken: set[int] = set()
        rows = []
        for i in indices:
            rows.append(self._rows[i]._twin() if i in taken else self._rows[i])
            taken.add(i)
        for b, row in enumerate(rows):
            if row.observer is not None:
                row.observer.row = b
        self._rows = rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._rows is None:
            return super().reorder_cache(beam_idx)
        self._pick_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._rows is None:
            return super().batch_repeat_interleave(repeats)
        self._pick_rows([i for i in range(len(self._rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._rows is None:
            return super().batch_select_indices(indices)
        self._pick_rows(torch.arange(len(self._rows))[indices].tolist())

    def _begin_step(self, key_states: torch.Tensor, kwargs: dict) -> _Step:
        q = int(key_states.shape[-2])
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(self.seen, self.seen + q, device=key_states.device)[None]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        slots_before = self.num_slots
        total = slots_before + q
        over = total > self.budget
        target = self.budget - self.chunk
        plan = None
        if over and not isinstance(self.policy, ScorePolicy):
            plan = self.policy.plan(total, target)
        self.seen += q
        step = _Step(q, slots_before, position_ids, plan, target, over)
        if self._rotation(key_states) == "stored":
            self._frame_step(step, int(key_states.shape[0]))
        return step

    def _rotation(self, key_states: torch.Tensor) -> str:
        """How keys are re-positioned: not at all, rotated on every read, or stored rotated.

        Float32 caches store keys already rotated to their slot positions and re-rotate them only
        when a compaction moves them (no per-token rotation of the cache). Half-precision caches
        rotate on read instead: a stored bf16 key re-rotated at every compaction would be rounded
        again each time and drift over a long stream.
        """
        if self.positions != "shift":
            return "none"
        if self.rotation is None:
            self.rotation = "stored" if key_states.dtype == torch.float32 else "read"
        return self.rotation

    def _frame_step(self, step: _Step, batch: int) -> None:
        # one host read of this step's positions: frames are host integers so that deciding what to
        # rotate never needs a device sync of its own
        rows = step.positions.tolist()
        if len(rows) == 1 and batch > 1:
            rows = rows * batch
        total = step.slots_before + step.query_length
        frame = [r[-1] - (total - 1) for r in rows]
        step.frame = frame
        first = step.slots_before
        off = [[p - (f + first + j) for j, p in enumerate(r)] for r, f in zip(rows, frame)]
        if any(any(o) for o in off):
            step.new_delta = torch.tensor(off, dtype=torch.long)

    def _angles(self, step: _Step, device: torch.device, rotator: Rotator):
        key = (device, id(rotator))  # layers of one type share a rotator, hence one table per step
        cached = step.angles.get(key)
        if cached is None:
            positions = step.positions.to(device)
            cos_new, sin_new = rotator.angles(positions)
            total = step.slots_before + step.query_length
            base = positions[:, -1:] - (total - 1)
            read = base + torch.arange(total, device=device)
            cos_read, sin_read = rotator.angles(read)
            cached = step.angles[key] = (cos_new, sin_new, cos_read, sin_read)
        return cached

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is None:
            attn_kwargs = args[0] if args and isinstance(args[0], dict) else kwargs
        if self._rows is not None:
            return self._padded_update(key_states, value_states, layer_idx, attn_kwargs)
        if layer_idx == 0 or self._step is None:
            self._step = self._begin_step(key_states, attn_kwargs)
        step = self._step
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)

        mode = self._rotation(key_states)
        rotator = self.rotators[layer_idx]
        if mode == "stored":
            if layer.frame is None:
                layer.frame = list(step.frame)
            layer._settle(step.frame)
            if step.new_delta is not None:
                cos, sin = rotator.angles(step.new_delta.to(key_states.device))
                key_states = rotator.rotate(key_states, cos, sin)
            keys, values = layer.append(key_states, value_states)
            visible_keys = keys
        elif mode == "read":
            cos_new, sin_new, cos_read, sin_read = self._angles(step, key_states.device, rotator)
            key_states = rotator.rotate(key_states, cos_new, sin_new, inverse=True)
            keys, values = layer.append(key_states, value_states)
            visible_keys = rotator.rotate(keys, cos_read, sin_read)
        else:
            keys, values = layer.append(key_states, value_states)
            visible_keys = keys
        layer.add_tokens(self.seen - step.query_length, self.seen)
        policy = self.policy
        if isinstance(policy, ScorePolicy):
            if policy.accumulates or step.over_budget:
                probs = None
                if policy.needs_queries:
                    query = self.observer.query(layer_idx)
                    probs = attention_probs(query, visible_keys, self.observer.scaling[layer_idx])
                policy.observe(layer_idx, keys, probs, step.query_length)
            if step.over_budget:
                layer.schedule_rows(policy.select(layer_idx, step.target))
        elif step.plan is not None:
            layer.schedule(step.plan)
        return visible_keys, values


class LaCache(BoundedCache):
    """Ladder-shaped KV cache: fixed slots per layer, staggered retention, iterative compaction.

    ``LaCache.from_model(model, budget=512)`` is all most users need; see ``from_model`` for knobs.
    """

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        budget: int,
        span: int | None = None,
        overlap: int | None = None,
        sinks: int = 4,
        window: int | None = None,
        positions: str = "shift",
        layout: str = "ladder",
        chunk: int | None = None,
        salient: int | float | None = None,
        salient_radius: int = 0,
    ) -> "LaCache":
        """Build a cache sized for ``model``.

        Args:
            budget: slots per layer (per sequence); memory never grows beyond it.
            span, overlap: ladder shape (SPEC §2.1); default by depth, see ``default_span_overlap``.
            sinks: leading slots never compacted (attention sinks; raise it to keep a task prompt).
            window: most recent slots never compacted; default ``max(rung, budget // 4)``.
            positions: ``"shift"`` positions keys by slot (generation past the trained context);
                ``"original"`` keeps each key at its original position.
            layout: ``"ladder"`` (reference stagger) or ``"band"`` (contiguous layer bands).
            chunk: extra slots freed per compaction so it happens every ``chunk`` tokens, not every one;
                default ``budget // 16`` (capped so a rung still fits).
            salient: slots per layer (an int) or a fraction of the budget (a float below 1) kept for the
                tokens with the smallest key norms among those the ladder evicts, so multi-token facts
                survive whole in every layer (see ``policies/salient.py``; registry method
                ``lacache-salient`` uses an eighth of the budget); ``None``/0 (default): the ladder alone.
            salient_radius: a slot's salience is the smallest key norm within this many slots of it,
                so the pool keeps neighbours of salient tokens as well (multi-token facts).
        """
        num_layers, rotator = cls._validate_common(model, budget, sinks, positions)
        if span is None and overlap is None:
            span, overlap = default_span_overlap(num_layers)
        elif span is None or overlap is None:
            raise ValueError(
                f"span={span!r}, overlap={overlap!r}: give both or neither; for {num_layers} layers the default is "
                f"span={default_span_overlap(num_layers)[0]}, overlap={default_span_overlap(num_layers)[1]}"
            )
        geometry = ladder_geometry(num_layers, span, overlap, layout)
        if window is None:
            window = max(geometry.rung, budget // 4)
        if not isinstance(window, int) or window < 1:
            raise ValueError(
                f"window={window!r} must be a positive integer (the newest tokens must stay dense), "
                f"e.g. window={max(geometry.rung, budget // 4)}"
            )
        pool = cls._salient_slots(salient, budget)
        room = budget - sinks - window - pool
        if room < geometry.rung:
            need = sinks + window + pool + geometry.rung
            raise ValueError(
                f"budget={budget} is too small for sinks={sinks} + window={window} + salient={pool} + one rung of "
                f"{geometry.rung} slots: use budget >= {need}, or fewer sinks / a smaller window"
            )
        if pool:
            policy = SalientLadderPolicy(geometry, sinks, window, pool, salient_radius)
        else:
            policy = LadderPolicy(geometry, sinks, window)
        chunk = cls._resolve_chunk(chunk, budget, policy.min_target())
        cache = cls(
            num_layers=num_layers, budget=budget, policy=policy, rotator=rotator, positions=positions, chunk=chunk
        )
        watch_padding(model, cache)
        return cache


    @staticmethod
    def _salient_slots(salient, budget: int) -> int:
        if salient is None or salient == 0:
            return 0
        if isinstance(salient, float) and 0 < salient < 1:
            return max(1, int(salient * budget))
        if isinstance(salient, int) and salient > 0:
            return salient
        raise ValueError(
            f"salient={salient!r} must be a number of slots (an int >= 1), a fraction of the budget "
            f"(a float between 0 and 1, e.g. 0.125), or 0/None for the plain ladder"
        )


class StreamingLLMCache(BoundedCache):
    """StreamingLLM: ``sinks`` first tokens plus the most recent ones, identical in every layer."""

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        budget: int,
        sinks: int = 4,
        positions: str = "shift",
        chunk: int | None = None,
    ) -> "StreamingLLMCache":
        num_layers, rotator = cls._validate_common(model, budget, sinks, positions)
        if budget <= sinks:
            raise ValueError(f"budget={budget} must exceed sinks={sinks}: e.g. budget={sinks + 64}")
        policy = StreamingPolicy(sinks)
        chunk = cls._resolve_chunk(chunk, budget, policy.min_target())
        cache = cls(
            num_layers=num_layers, budget=budget, policy=policy, rotator=rotator, positions=positions, chunk=chunk
        )
        watch_padding(model, cache)
        return cache


class _ScoreCache(BoundedCache):
    """Shared construction for per-layer, per-sequence score-based caches."""

    _policy_cls: type[ScorePolicy]
    _default_sinks = 0

    @classmethod
    def _build(cls, model, budget, sinks, window, positions, chunk):
        sinks = cls._default_sinks if sinks is None else sinks
        num_layers, rotator = cls._validate_common(model, budget, sinks, positions)
        if not isinstance(window, int) or window < 1:
            raise ValueError(
                f"window={window!r} must be a positive integer (the newest token is always kept), e.g. window=16"
            )
        if sinks + window > budget:
            raise ValueError(
                f"budget={budget} is smaller than sinks={sinks} + window={window}: use budget >= {sinks + window} "
                "or a smaller window"
            )
        policy = cls._policy_cls(num_layers, sinks, window)
        chunk = 0 if chunk is None else cls._resolve_chunk(chunk, budget, policy.min_target())
        cache = cls(num_layers=num_layers, budget=budget, policy=policy, rotator=rotator, positions=positions, chunk=chunk)
        if policy.needs_queries:
            cache.observer = QueryObserver(model)
        watch_padding(model, cache)
        return cache

    def close(self) -> None:
        """Remove the query hooks from the model (also done when the cache is garbage-collected)."""
        if self.observer is not None:
            self.observer.close()


class TOVACache(_ScoreCache):
    """TOVA: per layer, keep the slots the newest query attends to most (head-averaged).

    Needs the query's attention over the cache, observed with forward pre-hooks on the attention
    modules (one extra query projection and one attention-score pass per layer per evicting step).
    """

    _policy_cls = TOVAPolicy

    @classmethod
    def from_model(cls, model, budget: int, sinks: int = 0, window: int = 1, positions: str = "shift",
                   chunk: int | None = None) -> "TOVACache":
        return cls._build(model, budget, sinks, window, positions, chunk)


class H2OCache(_ScoreCache):
    """H2O: heavy hitters by accumulated attention plus a recent window (default: half the budget each).

    Observes every query's attention at every step (hooks as for TOVA).
    """

    _policy_cls = H2OPolicy

    @classmethod
    def from_model(cls, model, budget: int, window: int | None = None, sinks: int = 0, positions: str = "shift",
                   chunk: int | None = None) -> "H2OCache":
        window = max(1, budget // 2) if window is None else window
        return cls._build(model, budget, sinks, window, positions, chunk)


class KNormCache(_ScoreCache):
    """Key-norm: keep the slots with the smallest key L2 norm (head-averaged), plus sinks and a recent window.

    Attention-free like LaCache: it needs no queries, so it costs one norm per new key.
    """

    _policy_cls = KNormPolicy
    _default_sinks = 4

    @classmethod
    def from_model(cls, model, budget: int, sinks: int = 4, window: int | None = None, positions: str = "shift",
                   chunk: int | None = None) -> "KNormCache":
        window = max(1, budget // 8) if window is None else window
        return cls._build(model, budget, sinks, window, positions, chunk)
