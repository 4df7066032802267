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
import numbers
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from ..policies.base import LayerView, RetentionPolicy
from ..policies.points import CompactionPoints, points_for
from ..policies.scores import ScorePolicy
from ..rope import Rotator
from .generate_modes import generate_mode_refusal
from .observe import QueryObserver, attention_probs
from .padded import PaddedRows
from .positions import STRATEGIES, StepPositions, rotation_for
from .static import StaticDecode, static_refusal
from .static_scores import ScoredStaticDecode
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
        static: bool = False,
    ):
        super().__init__(layers=[SlotLayer(i, int(budget)) for i in range(num_layers)])
        self.budget = int(budget)
        self.chunk = int(chunk)
        self.policy = policy
        #: where this stream compacts (``policies.points``): passes split at them keep the same tokens
        self.points: CompactionPoints = points_for(policy, self.budget, self.chunk)
        self.positions = positions
        # one per layer (models mixing sliding and global layers use different RoPE frequencies)
        self.rotators: list[Rotator] = rotator if isinstance(rotator, list) else [rotator] * num_layers
        #: static=True: one-token steps run on fixed buffers and tensor counters (``cache.static``), which
        #: ``torch.compile`` captures whole; multi-token passes stay on the host path
        self._static: StaticDecode | None = None
        self.seen = 0
        self._forwards = 0
        self._step: _Step | None = None
        self.observer: QueryObserver | None = None  # set for caches whose policy needs attention
        self._rotation: str | None = None
        self._rotation_given: str | None = None  # set by the user: survives reset()
        self._padded: PaddedRows | None = None
        #: the model this cache is valid for (``cache.attach``); None for a cache driven by hand
        self.signature = None
        self._hooks = None  # the model's hooks while attached (not carried by a pickle)
        self._entered = False  # the model's decoder hook announced the current forward
        #: the ``position_ids`` the current forward was called with, seen by the decoder hook: attention
        #: layers of transformers before 5.2x call ``update`` without them
        self._forward_positions: torch.Tensor | None = None
        self._arm_after = False  # a host-path forward ran: the decoder's post-hook re-arms the static state
        if static:
            refusal = static_refusal(policy)
            if refusal is not None:
                raise ValueError(f"static=True: {refusal}; or leave static=False")
            self._static = (ScoredStaticDecode if isinstance(policy, ScorePolicy) else StaticDecode)(self)
            for layer in self.layers:
                layer.before_read = self._sync_static

    @property
    def seen(self) -> int:
        """Tokens this stream has seen (every forward's new tokens, evicted or not)."""
        if not torch.compiler.is_compiling() and self._static is not None and self._static.dirty:
            self._sync_static()
        return self._seen

    @seen.setter
    def seen(self, value: int) -> None:
        self._seen = value

    @property
    def static(self) -> bool:
        """Whether one-token decode steps run on fixed shapes (``static=True``), so ``torch.compile`` captures them whole."""
        return self._static is not None

    @property
    def is_compileable(self) -> bool:
        """True for a static cache (not a left-padded batch): ``generate()`` then compiles its decode steps
        (``compile_config``; on a GPU by itself), as it does for transformers' ``StaticCache``."""
        return self._static is not None and self._padded is None

    def _refuse_compiled_pass(self) -> None:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"a static {type(self).__name__} runs passes of several tokens (a prefill, a chat turn) eagerly: "
                "call the uncompiled model for them and the compiled one for one-token decode steps, as "
                "transformers' generate() does"
            )

    def _sync_static(self) -> None:
        """Before the host reads or changes slots: replay on the host what compiled steps did."""
        if self._static is not None and self._static.dirty:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"this static {type(self).__name__} was read on the host inside a compiled region; read it "
                    "(num_slots, token_positions, keys) outside the compiled call"
                )
            self._static.sync()

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
        self._rotation = self._rotation_given = mode

    @property
    def num_slots(self) -> int:
        """Slots currently held by every layer (in a padded batch, by its fullest sequence)."""
        if self._padded is not None:
            return self._padded.num_slots
        self._sync_static()
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
        layers = len(self.layers)
        if not isinstance(layer_idx, numbers.Integral) or isinstance(layer_idx, bool):
            raise ValueError(f"layer_idx={layer_idx!r} must be an integer layer index, e.g. layer_idx=0")
        if not 0 <= layer_idx < layers:
            raise IndexError(f"layer_idx={layer_idx} is out of range: this cache has {layers} layers (0 to {layers - 1})")
        if not isinstance(batch_index, numbers.Integral) or isinstance(batch_index, bool):
            raise ValueError(f"batch_index={batch_index!r} must be an integer, e.g. batch_index=0")
        if self.batch_size > 0 and not 0 <= batch_index < self.batch_size:
            raise IndexError(f"batch_index={batch_index} is out of range for a batch of {self.batch_size}")
        layer_idx, batch_index = int(layer_idx), int(batch_index)
        self._sync_static()
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

    def pass_limit(self) -> int | None:
        """The most tokens the next forward may bring without crossing a compaction point (None: any);
        ``split_passes`` splits a stream's tokens at them."""
        return self.points.pass_limit(self.seen)

    def split_passes(self, tokens: int, most: int | None = None) -> list[int]:
        """The lengths of the passes, of at most ``most`` tokens, that feed ``tokens`` more tokens to this cache
        without crossing a compaction point: fed this way a stream keeps the same slots however it is chunked."""
        return self.points.split(self.seen, int(tokens), most)

    def describe(self) -> dict:
        return {"cache": type(self).__name__, "budget": self.budget, "chunk": self.chunk,
                "positions": self.positions, **({"static": True} if self._static is not None else {}),
                **self.policy.describe()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "cache")
        return f"{type(self).__name__}({args}, slots={self.num_slots}, seen={self.seen})"

    # ----------------------------------------------------------------- transformers' Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        static = self._static
        if static is not None and static.armed:  # compiled steps count tokens seen on the device
            if torch.compiler.is_compiling():
                return static.seen
            if static.dirty:
                return int(static.seen)
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self._padded is not None:  # the layout of cache.padded: held columns, then the new tokens
            return self._padded.width() + query_length, 0
        if self._static is not None:  # keys counted by slot: the query's offset is its slot (get_query_offset)
            if self._static.armed and query_length == 1:
                return self._static.slots, 0
            self._refuse_compiled_pass()
            return self.num_slots + query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        if self._padded is not None:
            return self._padded.width()
        if self._static is not None:
            # the first new token's slot: the causal mask then hides a static buffer's free slots after it
            return self._static.new_slot()[2] if self._static.armed else self.num_slots
        return self.seen

    def reset(self) -> None:
        """Forget the stream: the cache then behaves exactly as a freshly built one (same settings, same model)."""
        super().reset()
        if self._static is not None:  # its buffers stay allocated: a compiled step keeps its addresses
            self._static.armed = self._static.dirty = False
            self._arm_after = False
        self.seen = 0
        self._forwards = 0
        self._step = None
        self._entered = False
        self._forward_positions = None
        self._rotation = self._rotation_given
        self.policy.reset()
        self._padded = None
        if self.observer is not None:
            self.observer.clear()

    # ----------------------------------------------------------------- copies
    def __deepcopy__(self, memo: dict) -> BoundedCache:
        """An independent copy holding the same stream (prompt reuse: prefill once, copy per continuation).

        The copy is attached to the same model as the original (the model's hooks are shared, not copied).
        """
        self._sync_static()
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        hooks = self._hooks
        if hooks is not None:
            memo[id(hooks)] = hooks
        if self.signature is not None:  # immutable: shared, so the per-forward check stays an identity test
            memo[id(self.signature)] = self.signature
        for name, value in self.__dict__.items():
            setattr(twin, name, copy.deepcopy(value, memo))
        for layer in twin.layers:  # bound methods are copied as they are: point them at the twin
            if getattr(layer, "before_read", None) is not None:
                layer.before_read = twin._sync_static
        if hooks is not None:
            hooks.acquire(twin)
        return twin

    def __getstate__(self) -> dict:
        self._sync_static()
        state = dict(self.__dict__)
        state["_hooks"] = None  # hooks live on a model in this process; attach(model) after unpickling
        state["_step"] = None
        return state

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot crop: evicted tokens cannot be restored, so assisted/speculative "
            "decoding is not supported; generate without assistant_model/prompt_lookup_num_tokens"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence ``b`` continues sequence ``beam_idx[b]``."""
        self._select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows([b for b in range(max(self.batch_size, 0)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(torch.arange(max(self.batch_size, 0))[indices].reshape(-1).tolist())

    def _select_rows(self, rows: list[int]) -> None:
        """Keep the sequences ``rows`` of the batch, in that order (a row may repeat).

        Everything held per sequence follows it: each layer's keys, values, position frame and token
        index, and the rule's per-sequence state (key-norm's norms, H2O's accumulated attention, the
        salient pool). A static cache does it on the host path (its compiled steps replayed first), then
        moves the reordered slots back into its fixed buffers (``arm``: same addresses, so a compiled
        step stays valid); a padded batch reorders its row caches whole.
        """
        self._sync_static()
        if self._padded is not None:
            self._padded.pick(rows)
            return
        for layer in self.layers:
            layer.select_rows(rows)
        self.policy.select_rows(rows)
        if self._static is not None and self._static.armed:
            self._static.arm()

    # ----------------------------------------------------------------- the update path
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        attn_kwargs = kwargs.get("kwargs")
        if attn_kwargs is None:
            attn_kwargs = args[0] if args and isinstance(args[0], dict) else kwargs
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"layer {layer_idx} does not exist in this {type(self).__name__}, built for a model of {len(self.layers)} "
                f"layers: build a new cache for this model with {type(self).__name__}.from_model(model, ...)"
            )
        static = self._static
        if static is not None and self._padded is None:
            if static.armed and key_states.shape[-2] == 1:
                if layer_idx == 0:
                    self._check_forward(layer_idx, key_states, attn_kwargs is not kwargs)
                positions = attn_kwargs.get("position_ids")
                if positions is None:
                    positions = self._forward_positions
                return static.update(layer_idx, key_states, value_states, positions, self._rotation,
                                     self.rotators[layer_idx])
            self._refuse_compiled_pass()
            if layer_idx == 0:
                self._sync_static()
                self._arm_after = True
        if self._padded is not None:
            if self._padded.begin_update(layer_idx):
                self._check_forward(layer_idx, key_states, attn_kwargs is not kwargs)
                self.seen += int(key_states.shape[-2])
            try:
                return self._padded.update(key_states, value_states, layer_idx, attn_kwargs)
            finally:
                if self.observer is not None:
                    self.observer.release(layer_idx)
        if layer_idx == 0 or self._step is None:
            self._check_forward(layer_idx, key_states, attn_kwargs is not kwargs)
            self._step = self._begin_step(key_states, attn_kwargs)
        step = self._step
        layer = self.layers[layer_idx]
        keys, visible_keys, values = layer.update(key_states, value_states, step.positions)
        policy = self.policy
        if step.over_budget or policy.observes_every_step:
            view = LayerView(layer_idx, int(keys.shape[-2]), step.query_length, step.index, keys,
                             self._attention_fn(layer_idx, visible_keys) if policy.needs_attention else None,
                             positioned_keys=visible_keys)
            if policy.observes_every_step:
                policy.observe(view)
            if step.over_budget:
                layer.schedule(policy.retain(view, step.target))
        if self.observer is not None:  # also when no policy asked: the layer's input is not held past its update
            self.observer.release(layer_idx)
        return visible_keys, values

    # ----------------------------------------------------------------- misuse checks
    def _misuse(self, problem: str) -> ValueError:
        name = type(self).__name__
        return ValueError(
            f"this {name} {problem}: a cache holds one stream. Build a new cache for each generate() call "
            f"({name}.from_model(model, ...)) or call cache.reset() first; to reuse a prompt, prefill one cache "
            "and copy.deepcopy it per continuation"
        )

    def _check_forward(self, layer_idx: int, key_states: torch.Tensor, from_model: bool) -> None:
        """At the first layer of a forward: refuse a forward this cache's stream cannot take.

        ``from_model``: the update came from a transformers attention layer (which passes its keyword
        arguments as one dict), not from code driving the cache by hand.
        """
        if layer_idx != 0:
            raise ValueError(
                f"this {type(self).__name__} got layer {layer_idx} first in a forward: it must be run by a model of "
                f"{len(self.layers)} layers, starting at layer 0; build a new cache for this model with from_model"
            )
        entered, self._entered = self._entered, False
        signature = self.signature
        if signature is None:
            return
        if from_model and not entered:
            raise ValueError(
                f"this {type(self).__name__} is being run by a model it is not attached to: a cache is valid only "
                f"with the model it was built for; build one with {type(self).__name__}.from_model(model, ...), "
                "or call cache.attach(model) (needed after unpickling a cache)"
            )
        heads, dim = int(key_states.shape[1]), int(key_states.shape[-1])
        if (heads, dim) != (signature.kv_heads, signature.head_dim):
            raise ValueError(
                f"this {type(self).__name__} was built for keys of {signature.kv_heads} heads x {signature.head_dim} "
                f"dims but got {heads} x {dim}: build a new cache for this model with from_model(model, ...)"
            )

    def _check_continues(self, step: StepPositions) -> None:
        """Refuse a forward whose positions go back into the stream already held (a second ``generate()``).

        A continuation's first new token sits at ``seen`` (absolute positions, as ``generate()`` counts)
        or at ``num_slots`` (positions counted by slot, as ``lacache.cache.generation`` does); later positions
        are allowed (gaps are the caller's choice).
        """
        if not self.seen:
            return
        slots = self.num_slots
        bad = [p for p in step.first_positions if p < self.seen and p != slots]
        if bad:
            raise self._misuse(
                f"already holds a stream of {self.seen} tokens and this forward starts at position {bad[0]} "
                f"(a continuation starts at {self.seen}, or at {slots} counting positions by slot)"
            )

    def _enter_forward(self, signature, args: tuple, kwargs: dict):
        """Called by the model's decoder hook before each forward with this cache (``cache.attach``).

        Checks that the model is one this cache is valid for and that the forward continues the
        stream, then lets a left-padded batch replace the attention mask; returns new
        ``(args, kwargs)`` for the decoder, or None to leave them as they are.
        """
        if self.signature is not None and signature is not self.signature and signature != self.signature:
            raise ValueError(
                f"this {type(self).__name__} was built for another model ({'; '.join(self.signature.differences(signature))}): "
                f"build a new cache for this model with {type(self).__name__}.from_model(model, ...)"
            )
        if not torch.compiler.is_compiling():  # a generate() mode the cache cannot serve (cache.generate_modes)
            refusal = generate_mode_refusal(type(self).__name__)
            if refusal is not None:
                raise ValueError(refusal)
        q, batch = _query_shape(args, kwargs)
        if self.seen and q == 0:
            raise self._misuse(
                f"already holds a stream of {self.seen} tokens and this forward brings no new token (a prompt no "
                "longer than what the cache already holds)"
            )
        if self.seen and batch is not None and self.batch_size > 0 and batch != self.batch_size:
            raise self._misuse(f"holds a batch of {self.batch_size} sequences but this forward brings {batch}")
        self._entered = True
        positions = kwargs.get("position_ids")
        self._forward_positions = positions if isinstance(positions, torch.Tensor) else None
        if q is None:
            return None
        layout = self._begin_padded_forward(kwargs.get("attention_mask"), q)
        if layout is None:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = layout
        return args, kwargs

    def _leave_forward(self) -> None:
        """Called by the model's decoder hook after each forward with this cache: after a host-path
        forward, a static cache moves its slots into its fixed buffers for the compiled steps."""
        if self._arm_after:
            self._arm_after = False
            if self._static is not None and self._padded is None:
                self._static.arm()

    def _attention_fn(self, layer_idx: int, visible_keys: torch.Tensor):
        observer = self.observer
        if observer is None:
            raise RuntimeError(f"{type(self).__name__}'s policy needs attention but no query observer is attached")
        return lambda: attention_probs(observer.query(layer_idx), visible_keys, observer.scaling[layer_idx])

    def _begin_step(self, key_states: torch.Tensor, kwargs: dict) -> _Step:
        q = int(key_states.shape[-2])
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # an attention layer that does not pass them on: the forward's own
            position_ids = self._forward_positions
        self._forward_positions = None
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
        positions = StepPositions(position_ids, slots_before, q, int(key_states.shape[0]))
        self._check_continues(positions)  # shares the step's one host read of its positions
        target = self.points.after(self.seen, slots_before, q, self.policy.capacity(self.budget))
        self.seen += q
        self._forwards += 1
        return _Step(self._forwards, q, positions, target if target is not None else self.budget - self.chunk,
                     target is not None)

    # ----------------------------------------------------------------- left-padded batches
    def _spawn(self) -> BoundedCache:
        """A single-row cache with this cache's settings and a fork of its policy (memoised plans shared)."""
        row = BoundedCache(num_layers=len(self.layers), budget=self.budget, policy=self.policy.fork(),
                           rotator=self.rotators, positions=self.positions, chunk=self.chunk)  # rows run on the host path
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
            if self.seen or mask is None:
                return None
            if mask.dim() == 4 and self._static is not None and _padded_4d(mask):
                raise ValueError(
                    f"static=True: this {type(self).__name__} got a left-padded batch as a 4D attention mask (generate() "
                    "builds one for a compileable cache), which the bounded cache cannot lay out; build the cache "
                    "with static=False (the default) for padded batches, or batch prompts of equal length"
                )
            if mask.dim() != 2 or bool(mask.all()):
                return None
            self._padded = PaddedRows(self._spawn, int(mask.shape[0]), len(self.layers), self.observer)
        return self._padded.begin_forward(mask, q)


def _padded_4d(mask: torch.Tensor) -> bool:
    """Whether a 4D mask of a stream's first forward hides some key from the last query (left padding):
    a causal mask lets the last query see every key. One host read, once per stream."""
    last = mask[:, :, -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    return not bool(visible.all())


def _query_shape(args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    """(new tokens, batch size) of a decoder forward, from ``input_ids`` or ``inputs_embeds``."""
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1]), int(value.shape[0])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[1]), int(args[0].shape[0])
    return None, None
