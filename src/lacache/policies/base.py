"""The contract between a bounded cache and the rule that decides which slots survive.

Every retention rule answers one question: *given this layer's view of the cache, which slots
survive a compaction down to ``target``?* It returns a plan (``policies.plan``). The view offers
the slot count at once and, lazily, what content-aware rules need: the stored keys and the new
queries' attention over them. Storage never asks what kind of policy it holds; it only reads the
two class flags below to know whether to build a view on steps that do not compact.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import checks

if TYPE_CHECKING:
    import torch

    from .plan import CompactionPlan, RowPlan

__all__ = ["LayerView", "RetentionPolicy", "IndexPolicy", "resolve_chunk", "rows_of", "key_norms", "head_norms",
           "round_norms", "rank_slots", "KeyStatistic", "KEY_NORM"]


def key_norms(keys: "torch.Tensor") -> "torch.Tensor":
    """Head-averaged L2 norms ``[B, n]`` of keys ``[B, H, n, D]``, rounded to 8 significant bits.

    A rotation leaves a key's norm unchanged, but only up to rounding: the same key written at another
    slot, re-rotated by a compaction, or computed by another backend's kernels differs in its last
    bits, and equal keys (a repeated token in the first layer) tie only up to them. Rounding the norm
    to bfloat16's 8 bits makes such keys compare *equal*, and ``rank_slots`` then breaks the tie by
    slot order, so both backends choose the same survivors; two norms that differ by more than 0.4%
    still rank by size. (A norm lying within rounding noise of a boundary between two 8-bit values can
    still round apart: rare, ~1e-4 of slots at float32 noise, and only matters at the cut.)"""
    return round_norms(head_norms(keys))


def head_norms(keys: "torch.Tensor") -> "torch.Tensor":
    """Head-averaged L2 norms ``[B, n]`` of keys ``[B, H, n, D]``, unrounded (``key_norms`` rounds them; a backend
    whose heads are split over processes averages these across them first)."""
    return keys.float().norm(dim=-1).mean(dim=1)


def round_norms(norms: "torch.Tensor") -> "torch.Tensor":
    """Norms rounded to bfloat16's 8 significant bits, as float32: what key-reading rules compare."""
    from .._lazy import torch

    return norms.to(torch.bfloat16).float()


class KeyStatistic:
    """What a key-reading rule ranks slots by: one value per slot, averaged over the layer's heads.

    Every backend computes it with this object, so both keep the same slots: the transformers cache from
    the keys it stores, vLLM's workers from the paged keys (averaging ``head_values`` over the ranks'
    heads under tensor parallel, then ``round``-ing). ``per_slot``: a slot's value depends on its own key
    alone and survives the position shift's rotations (the key norm), so a backend reads it once, when
    the slot is written, and keeps it; otherwise (a value relative to the layer's other keys) every
    slot's value is read again at each compaction. ``positioned``: the value is taken from keys as
    attention reads them, each at its slot's position (a common shift of every position leaves it
    unchanged), not from keys as a cache happens to store them.
    """

    def __init__(self, name: str, head_values: "Callable[[torch.Tensor], torch.Tensor]", per_slot: bool,
                 positioned: bool):
        self.name = name
        self.head_values = head_values  # keys [B, H, n, D] -> [B, n], unrounded
        self.per_slot = per_slot
        self.positioned = positioned

    def round(self, values: "torch.Tensor") -> "torch.Tensor":
        """Values rounded to the 8 significant bits both backends compare (``round_norms``)."""
        return round_norms(values)

    def __call__(self, keys: "torch.Tensor") -> "torch.Tensor":
        """The rounded values ``[B, n]`` of keys ``[B, H, n, D]``."""
        return self.round(self.head_values(keys))

    def __repr__(self) -> str:
        return f"KeyStatistic({self.name!r})"


#: the key norm (key-norm, the salient and group ladders)
KEY_NORM = KeyStatistic("key norm", head_norms, per_slot=True, positioned=False)


def rank_slots(score: "torch.Tensor", count: int) -> "torch.Tensor":
    """Indices ``[B, count]`` of the ``count`` highest ``score`` slots, ties going to the older (lower) slot.

    ``torch.topk`` leaves the order of equal scores unspecified (it differs by device, shape and
    version), so key-reading rules rank with a stable sort instead: the one tie rule of every backend."""
    return score.sort(dim=-1, descending=True, stable=True).indices[..., :count]


def rows_of(state: "torch.Tensor | None", rows: list[int]) -> "torch.Tensor | None":
    """The sequences ``rows`` of a per-sequence state ``[B, ...]`` (None stays None)."""
    if state is None:
        return None
    from .._lazy import torch

    return state.index_select(0, torch.tensor(rows, dtype=torch.long, device=state.device))


class LayerView:
    """One layer at one forward pass, as a retention policy may look at it.

    ``num_slots`` counts the layer's slots including this forward's new tokens (the newest last);
    ``step`` numbers the forward passes of the stream, so a rule that plans every layer at once
    knows when a new pass began. ``keys()`` are the stored keys ``[B, H, n, D]``;
    ``positioned_keys()`` the same keys as attention reads them, each at its slot's position (the
    stored ones when no positioned copy was handed in); ``stats(statistic)`` every slot's value of a
    key-reading rule's ``KeyStatistic`` ``[B, n]``: computed from the keys, or handed in by a backend
    that reads them itself (vLLM's workers read them from the paged keys); ``norms()`` is
    ``stats(KEY_NORM)``. ``attention()`` is the head-averaged attention of the new queries over all
    slots ``[B, q, n]``, computed on first use and only for caches that observe queries.
    """

    __slots__ = ("layer_idx", "num_slots", "query_length", "step", "_keys", "_positioned", "_stats", "_attention",
                 "_attention_fn")

    def __init__(self, layer_idx: int, num_slots: int, query_length: int, step: int,
                 keys: "torch.Tensor | None" = None, attention: "Callable[[], torch.Tensor] | None" = None,
                 stats: "torch.Tensor | None" = None, positioned_keys: "torch.Tensor | None" = None):
        self.layer_idx = layer_idx
        self.num_slots = num_slots
        self.query_length = query_length
        self.step = step
        self._keys = keys
        self._positioned = positioned_keys
        self._stats = stats
        self._attention_fn = attention
        self._attention = None

    def keys(self) -> "torch.Tensor":
        if self._keys is None:
            raise RuntimeError("this view carries no keys")
        return self._keys

    def positioned_keys(self) -> "torch.Tensor":
        return self._positioned if self._positioned is not None else self.keys()

    @property
    def carries_stats(self) -> bool:
        """The backend handed in every slot's statistic (the rule must not read it from its own state)."""
        return self._stats is not None

    def stats(self, statistic: KeyStatistic) -> "torch.Tensor":
        """Every slot's ``statistic`` ``[B, n]``, as the key-reading rules compare it."""
        if self._stats is None:
            self._stats = statistic(self.positioned_keys() if statistic.positioned else self.keys())
        return self._stats

    def norms(self) -> "torch.Tensor":
        """Every slot's key norm ``[B, n]`` as the key-reading rules compare them (``key_norms``)."""
        return self.stats(KEY_NORM)

    def attention(self) -> "torch.Tensor":
        if self._attention is None:
            if self._attention_fn is None:
                raise RuntimeError(
                    "this cache does not observe queries: a policy that reads attention must set needs_attention"
                )
            self._attention = self._attention_fn()
        return self._attention


class RetentionPolicy(ABC):
    """Decides, when the cache is over budget, which slots each layer keeps."""

    #: slots at the front that are never evicted
    sinks: int = 0
    #: the cache must observe each new query (hooks on the attention modules) to offer ``view.attention()``
    needs_attention: bool = False
    #: ``observe`` must see every forward pass, not only the ones that compact
    observes_every_step: bool = False
    #: the cache may free ``chunk`` extra slots per compaction; False for a rule that sets its own points
    amortises: bool = True
    #: what a rule that reads keys but not attention ranks slots by (a backend that never hands it the keys,
    #: vLLM's workers, computes it for the rule); None for index-only and attention rules
    key_statistic: "KeyStatistic | None" = None

    @abstractmethod
    def retain(self, view: LayerView, target: int) -> "CompactionPlan | RowPlan":
        """The slots of ``view``'s layer that survive a compaction to at most ``target`` (advancing any state)."""

    def observe(self, view: LayerView) -> None:
        """Record what this forward pass shows (scores that accumulate); called before ``retain``."""

    def min_target(self) -> int:
        """The smallest ``target`` this policy can compact to."""
        return self.sinks + 1

    def count_after(self, n: int, target: int) -> int:
        """Slots a compaction of ``n`` slots down to ``target`` leaves, advancing whatever that count depends
        on, without reading keys: what a backend that never sees keys replays (vLLM's scheduler sizes each
        request's row with it while its workers choose the slots). A rule whose count depends on what it
        reads has none."""
        raise NotImplementedError(f"{type(self).__name__}: how many slots survive depends on what it reads")

    def capacity(self, budget: int) -> int:
        """Slots the cache may hold before a forward pass must compact: the budget, unless the rule
        sets its own (the authors' schedule raises it by ``floor(R / 2)`` at the first overflow)."""
        return budget

    def most_slots(self, budget: int) -> int:
        """The most slots a cache of ``budget`` ever holds between forward passes (memory sizing)."""
        return budget

    def recent_window(self) -> int:
        """Newest slots no compaction touches (0 if the rule has no such window)."""
        return int(getattr(self, "window", 0) or 0)

    def slot_roles(self, layer_idx: int, slots: int, batch_index: int = 0) -> list[str]:
        """What each of a layer's ``slots`` held slots is to this rule, in slot order: ``"sink"`` (the
        leading slots never compacted), ``"window"`` (the newest slots no compaction touches) or
        ``"kept"`` (slots that survived, or will face, compaction); a rule with a pool of its own
        marks its members ``"salient"``. Pictures of the cache (``lacache inspect``) read it."""
        sinks = min(self.sinks, slots)
        window = min(self.recent_window(), slots - sinks)
        return ["sink"] * sinks + ["kept"] * (slots - sinks - window) + ["window"] * window

    def select_rows(self, rows: list[int]) -> None:
        """The batch's sequences became ``rows`` of the old batch, in that order (beam search reordering or
        repeating sequences): per-sequence state must follow its sequence. Nothing to do for a rule whose
        state is shared by the batch (every index-only rule)."""

    def reset(self) -> None:
        """Forget per-stream state (a new sequence starts)."""

    def fork(self) -> "RetentionPolicy":
        """An independent copy carrying this stream's state (a padded batch's rows, beams)."""
        return copy.deepcopy(self)

    def describe(self) -> dict:
        return {"policy": type(self).__name__, "sinks": self.sinks}


class IndexPolicy(RetentionPolicy):
    """A rule that looks at slot indices only: one plan per forward pass serves every layer.

    Subclasses implement ``plan(n, target)``; ``retain`` calls it once per forward pass (at the
    first layer that asks) and hands the same plan to every layer, which takes its own row.
    """

    _planned_step: int | None = None
    _step_plan: "CompactionPlan | None" = None

    @abstractmethod
    def plan(self, n: int, target: int) -> "CompactionPlan":
        """Plan the compaction of ``n`` slots down to at most ``target`` (and advance any state)."""

    def count_after(self, n: int, target: int) -> int:
        return self.plan(n, target).kept

    def retain(self, view: LayerView, target: int) -> "CompactionPlan":
        if self._planned_step != view.step or self._step_plan is None:
            self._step_plan = self.plan(view.num_slots, target)
            self._planned_step = view.step
        return self._step_plan

    def decode_state(self) -> object:
        """What this rule carries from one compaction to the next, hashable.

        Two compactions from equal (slot count, state) plan alike, so the compactions of a run of
        decode steps repeat once a state recurs: ``cache.decode_schedule`` plans them ahead for
        static caches. By default: the rule's public attributes (a rule keeping its state in
        ``_private`` attributes must override this); an unhashable one makes ``static=True`` refuse
        the rule rather than guess.
        """
        return tuple(sorted((name, value) for name, value in vars(self).items() if not name.startswith("_")))

    def reset(self) -> None:
        self._planned_step = self._step_plan = None

    def fork(self) -> "IndexPolicy":
        """A copy with this stream's state; memoised plans are pure, so both share them."""
        return copy.copy(self)


def resolve_chunk(chunk, budget: int, min_target: int) -> int:
    """Slots freed below the budget per compaction: ``budget // 16`` by default, within what the policy
    allows (``min_target``); the same arithmetic for every backend."""
    room = budget - min_target
    if chunk is None:
        return max(0, min(budget // 16, room))
    if not checks.is_integer(chunk) or chunk < 0 or chunk > room:
        raise ValueError(
            f"chunk={chunk!r} must be between 0 and {max(room, 0)} for budget={budget} (it is how many slots "
            f"below the budget a compaction frees, to amortise it); e.g. chunk={max(0, min(budget // 16, room))}"
        )
    return chunk
