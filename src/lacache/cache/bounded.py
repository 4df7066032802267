"""The bounded cache itself: a thin transformers ``Cache`` that dispatches to its layers.

Facts this relies on (transformers 5.x; docs/method.md §2-3):

* the attention mask is sized from the layers via ``get_mask_sizes``; every layer holds the same
  number of slots, though not the same tokens;
* ``get_seq_length`` must report tokens *seen* (generate slices prompts and chunked prefill with
  it), while the mask sees ``n_slots + q`` keys starting at offset ``seen - n_slots``;
* ``update`` returns the full pre-eviction states for this forward's attention; eviction happens
  after, so a new token always sees everything the cache held;
* ``generate()`` hands every layer the absolute ``position_ids`` of the new tokens (through the
  attention kwargs); the cache never assumes the query sits at ``n_slots``.

Per forward pass the cache decides once (at the first layer) whether the pass overflows the
budget; per layer it appends through the layer's storage and, when a policy needs to see the
layer or the pass overflows, asks the policy which slots survive and hands the plan back to the
layer. A left-padded batch is handed to the padded-rows backend (``cache.padded``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from ..observe import QueryObserver, attention_probs
from ..policies.base import LayerView, RetentionPolicy
from ..rope import Rotator
from .padded import PaddedRows
from .positions import STRATEGIES, StepPositions, rotation_for
from .storage import SlotLayer

__all__ = ["BoundedCache", "POSITION_MODES"]

POSITION_MODES = ("shift", "original")


@dataclass
class _Step:
    """What one forward pass shares across layers: decided at the first layer, reused by the rest."""

    index: int  # forward passes so far in this stream, this one included
    query_length: int
    positions: StepPositions
    target: int
    over_budget: bool


class BoundedCache(Cache):
    """A cache of at most ``budget`` slots per layer, compacted by a ``RetentionPolicy``.

    Build it with a method's ``from_model`` (``LaCache.from_model`` ...) or ``lacache.make_cache``.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        budget: int,
        policy: RetentionPolicy,
        rotator: Rotator | list[Rotator] | None,
        positions: str = "shift",
        chunk: int = 0,
    ):
        super().__init__(layers=[SlotLayer(i, int(budget)) for i in range(num_layers)])
        self.budget = int(budget)
        self.chunk = int(chunk)
        self.policy = policy
        self.positions = positions
        # one per layer (models mixing sliding and global layers use different RoPE frequencies)
        self.rotators: list[Rotator] = rotator if isinstance(rotator, list) else [rotator] * num_layers
        self.seen = 0
        self._forwards = 0
        self._step: _Step | None = None
        self.observer: QueryObserver | None = None  # set for caches whose policy needs attention
        self._rotation: str | None = None
        self._padded: PaddedRows | None = None

    # ----------------------------------------------------------------- introspection
    @property
    def rotation(self) -> str | None:
        """How keys are re-positioned: ``"stored"``, ``"read"`` or ``"none"`` (``cache.positions``);
        chosen from the key dtype at the first update unless set before it."""
        return self._rotation

    @rotation.setter
    def rotation(self, mode: str | None) -> None:
        if mode is not None and mode not in STRATEGIES:
            raise ValueError(f"rotation={mode!r} must be one of {tuple(STRATEGIES)}; e.g. rotation='read'")
        self._rotation = mode

    @property
    def num_slots(self) -> int:
        """Slots currently held by every layer (in a padded batch, by its fullest sequence)."""
        if self._padded is not None:
            return self._padded.num_slots
        return self.layers[0].num_slots if self.layers else 0

    @property
    def padded(self) -> bool:
        """Whether this stream is a left-padded batch kept as one single-row cache per sequence."""
        return self._padded is not None

    @property
    def _rows(self) -> list[BoundedCache] | None:
        return None if self._padded is None else self._padded.rows

    def token_positions(self, layer_idx: int, batch_index: int = 0) -> torch.Tensor:
        """Original indices (0-based over every token seen) of the tokens held by a layer, in slot order."""
        if self.batch_size > 0 and not 0 <= batch_index < self.batch_size:
            raise IndexError(f"batch_index={batch_index} is out of range for a batch of {self.batch_size}")
        if self._padded is not None:  # indices count the sequence's own real tokens, as if it were alone
            return self._padded.rows[batch_index].token_positions(layer_idx)
        index = self.layers[layer_idx].token_index
        return index[batch_index if index.shape[0] > 1 else 0].clone()

    @property
    def batch_size(self) -> int:
        if self._padded is not None:
            return len(self._padded.rows)
        return self.layers[0].batch_size if self.layers else -1

    def memory_bytes(self) -> int:
        """Bytes allocated for keys and values across all layers (buffers of ``budget`` + headroom slots)."""
        if self._padded is not None:
            return sum(row.memory_bytes() for row in self._padded.rows)
        return sum(layer.memory_bytes() for layer in self.layers)

    def describe(self) -> dict:
        return {"cache": type(self).__name__, "budget": self.budget, "chunk": self.chunk,
                "positions": self.positions, **self.policy.describe()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "cache")
        return f"{type(self).__name__}({args}, slots={self.num_slots}, seen={self.seen})"

    # ----------------------------------------------------------------- transformers' Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self._padded is not None:  # the layout of cache.padded: held columns, then the new tokens
            return self._padded.width() + query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._padded.width() if self._padded is not None else self.seen

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self._step = None
        self.policy.reset()
        self._padded = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot crop: evicted tokens cannot be restored, so assisted/speculative "
            "decoding is not supported; generate without assistant_model/prompt_lookup_num_tokens"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._padded is None:
            return super().reorder_cache(beam_idx)
        self._padded.pick(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._padded is None:
            return super().batch_repeat_interleave(repeats)
        self._padded.pick([i for i in range(len(self._padded.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._padded is None:
            return super().batch_select_indices(indices)
        self._padded.pick(torch.arange(len(self._padded.rows))[indices].tolist())

    # ----------------------------------------------------------------- the update path
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is None:
            attn_kwargs = args[0] if args and isinstance(args[0], dict) else kwargs
        if self._padded is not None:
            if self._padded.begin_update(layer_idx):
                self.seen += int(key_states.shape[-2])
            return self._padded.update(key_states, value_states, layer_idx, attn_kwargs)
        if layer_idx == 0 or self._step is None:
            self._step = self._begin_step(key_states, attn_kwargs)
        step = self._step
        layer = self.layers[layer_idx]
        keys, visible_keys, values = layer.update(key_states, value_states, step.positions)
        policy = self.policy
        if step.over_budget or policy.observes_every_step:
            view = LayerView(layer_idx, int(keys.shape[-2]), step.query_length, step.index, keys,
                             self._attention_fn(layer_idx, visible_keys) if policy.needs_attention else None)
            if policy.observes_every_step:
                policy.observe(view)
            if step.over_budget:
                layer.schedule(policy.retain(view, step.target))
        return visible_keys, values

    def _attention_fn(self, layer_idx: int, visible_keys: torch.Tensor):
        observer = self.observer
        if observer is None:
            raise RuntimeError(f"{type(self).__name__}'s policy needs attention but no query observer is attached")
        return lambda: attention_probs(observer.query(layer_idx), visible_keys, observer.scaling[layer_idx])

    def _begin_step(self, key_states: torch.Tensor, kwargs: dict) -> _Step:
        q = int(key_states.shape[-2])
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(self.seen, self.seen + q, device=key_states.device)[None]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        if self._rotation is None:
            self._rotation = rotation_for(self.positions, key_states.dtype)
        if self._forwards == 0:  # each layer gets its own instance of the stream's strategy
            strategy = STRATEGIES[self._rotation]
            for layer, rotator in zip(self.layers, self.rotators):
                layer.shift = strategy(rotator)
        slots_before = self.num_slots
        self.seen += q
        self._forwards += 1
        positions = StepPositions(position_ids, slots_before, q, int(key_states.shape[0]))
        over = slots_before + q > self.policy.capacity(self.budget)
        return _Step(self._forwards, q, positions, self.budget - self.chunk, over)

    # ----------------------------------------------------------------- left-padded batches
    def _spawn(self) -> BoundedCache:
        """A single-row cache with this cache's settings and a fork of its policy (memoised plans shared)."""
        row = BoundedCache(num_layers=len(self.layers), budget=self.budget, policy=self.policy.fork(),
                           rotator=self.rotators, positions=self.positions, chunk=self.chunk)
        row.rotation = self._rotation
        return row

    def twin(self) -> BoundedCache:
        """An independent copy of this single-row cache (beam search repeating a sequence)."""
        twin = self._spawn()
        twin.seen, twin._forwards, twin.observer = self.seen, self._forwards, copy.copy(self.observer)
        twin.layers = [layer.clone() for layer in self.layers]
        return twin

    def _begin_padded_forward(self, mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
        """Called by the decoder hook before each forward: returns the layout's 2D mask, or None.

        The first forward of a stream decides: a 2D mask with zeros (one host read, once per stream)
        turns the cache into one single-row cache per sequence for the rest of the stream.
        """
        if self._padded is None:
            if self.seen or mask is None or mask.dim() != 2 or bool(mask.all()):
                return None
            self._padded = PaddedRows(self._spawn, int(mask.shape[0]), len(self.layers), self.observer)
        return self._padded.begin_forward(mask, q)
