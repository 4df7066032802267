"""The cache classes users build: ``LaCache``, ``StreamingLLMCache``, ``TOVACache``, ``H2OCache``, ``KNormCache``.

Each ``from_model`` validates its settings against the model (one ``ValueError`` that names the
parameter and a value that works), builds its retention policy and hands both to
``build_bounded_cache``, which does what every method shares: RoPE support, chunk sizing, the
query observer for policies that read attention, and the padding hook.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

from torch import nn

from .. import checks
from ..policies import (
    H2OPolicy,
    KNormPolicy,
    LadderPolicy,
    ReferenceLadderPolicy,
    RetentionPolicy,
    SalientLadderPolicy,
    ScorePolicy,
    StreamingPolicy,
    TOVAPolicy,
)
from ..policies.authors_schedule import reference_min_budget
from ..policies.ladder_geometry import default_span_overlap, ladder_geometry
from ..rope import Rotator, check_supported_model, layer_rotators
from .attach import attach_cache, model_signature
from .bounded import POSITION_MODES, BoundedCache
from .observe import QueryObserver

__all__ = ["SCHEDULES", "resolve_schedule", "ModelCache", "LaCache", "StreamingLLMCache", "TOVACache", "H2OCache", "KNormCache", "build_bounded_cache",
           "validate_common", "resolve_chunk", "ladder_policy", "streaming_policy"]


def validate_common(model: nn.Module, budget, sinks, positions) -> tuple[int, list[Rotator]]:
    """Check the settings every bounded cache shares; return the model's layer count and rotators."""
    if not checks.is_integer(budget) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive number of slots per layer, e.g. budget=512")
    checks.integer("sinks", sinks, example=4)
    checks.choice("positions", positions, POSITION_MODES)
    rotary = check_supported_model(model, positions)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers), layer_rotators(model, rotary)


def resolve_chunk(chunk, budget: int, min_target: int) -> int:
    """Slots freed below the budget per compaction: ``budget // 16`` by default, within what the policy allows."""
    room = budget - min_target
    if chunk is None:
        return max(0, min(budget // 16, room))
    if not checks.is_integer(chunk) or chunk < 0 or chunk > room:
        raise ValueError(
            f"chunk={chunk!r} must be between 0 and {max(room, 0)} for budget={budget} (it is how many slots "
            f"below the budget a compaction frees, to amortise it); e.g. chunk={max(0, min(budget // 16, room))}"
        )
    return chunk


def build_bounded_cache(
    cls: type[BoundedCache],
    model: nn.Module,
    budget: int,
    make_policy: Callable[[int], RetentionPolicy],
    *,
    sinks: int,
    positions: str = "shift",
    chunk: int | None = None,
    chunk_by_default: bool = True,
) -> BoundedCache:
    """A bounded cache of class ``cls`` for ``model`` whose policy is ``make_policy(num_layers)``.

    This is all a new method needs besides its policy: ``chunk=None`` means ``budget // 16`` when
    ``chunk_by_default`` (index-only rules amortise compaction) and 0 otherwise (score rules evict
    to exactly the budget every step).
    """
    num_layers, rotators = validate_common(model, budget, sinks, positions)
    budget, sinks = int(budget), int(sinks)
    policy = make_policy(num_layers)
    if (chunk is None and not chunk_by_default) or not policy.amortises:
        chunk = 0
    else:
        chunk = int(resolve_chunk(chunk, budget, policy.min_target()))
    cache = cls(num_layers=num_layers, budget=budget, policy=policy, rotator=rotators, positions=positions,
                chunk=chunk)
    if policy.needs_attention:
        cache.observer = QueryObserver.for_model(model)
    attach_cache(model, cache, model_signature(model, rotators))
    return cache


class ModelCache(BoundedCache):
    """A bounded cache built for a model (``from_model``) and attached to it.

    Attached means the model's hooks (``lacache.cache.attach``) see each forward that uses this
    cache: they check that the model is one the cache is valid for and that the forward continues
    the cache's stream, lay out left-padded batches, and hand attention-score policies their
    queries. ``from_model`` attaches; ``copy.deepcopy`` keeps the copy attached; a pickled cache
    is attached again with ``attach(model)``.
    """

    def attach(self, model: nn.Module) -> None:
        """Attach this cache to ``model`` (after unpickling it, or after ``detach()``); refuses a model of
        another shape or RoPE than the one it was built for."""
        if self._hooks is not None:
            return
        rotators = layer_rotators(model, check_supported_model(model, self.positions))
        if self.policy.needs_attention and self.observer is None:
            self.observer = QueryObserver.for_model(model)
        attach_cache(model, self, model_signature(model, rotators))

    def detach(self) -> None:
        """Release the model's hooks now instead of when the cache is garbage-collected."""
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.release(self)

    def close(self) -> None:
        """Same as ``detach()``."""
        self.detach()


def _salient_slots(salient, budget: int) -> int:
    """Slots of the salient pool: ``salient`` slots, or that fraction of the budget; 0 for none."""
    if isinstance(salient, numbers.Real) and not isinstance(salient, bool) and salient == 0:
        return 0
    try:
        salient = checks.size_or_fraction("salient", salient, example=0.125)
    except ValueError:
        raise ValueError(
            f"salient={salient!r} must be a number of slots (an int >= 1), a fraction of the budget "
            f"(a number between 0 and 1, e.g. 0.125), or 0/None for the plain ladder"
        ) from None
    if salient is None:
        return 0
    return max(1, int(salient * budget)) if isinstance(salient, float) else salient


SCHEDULES = ("reference", "capped")
#: options only the capped schedule has: giving one (without ``schedule``) selects it
CAPPED_ONLY = ("window", "chunk", "salient", "group", "layout")


def resolve_schedule(schedule: str | None, **options) -> str:
    """``schedule`` as given, or the default: the authors' schedule (``"reference"``, which held-out
    perplexity favoured, docs/results.md) unless an option only the capped schedule has is set."""
    if schedule is None:
        unset = {"window": (None,), "chunk": (None, 0), "salient": (None, 0), "group": (1,), "layout": ("ladder",)}
        capped = any(options.get(name, values[0]) not in values for name, values in unset.items())
        return "capped" if capped else "reference"
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}; e.g. schedule='reference'")
    return schedule


def _reference_policy(geometry, budget: int, sinks: int, window, layout: str, salient, chunk) -> RetentionPolicy:
    """The authors' schedule: its own recent window (the layer count) and compaction points."""
    refused = {"window": window, "chunk": chunk or None, "salient": salient or None}
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise ValueError(
            f"schedule='reference' takes no {'/'.join(given)}: the authors' schedule keeps a recent window "
            f"of the layer count ({geometry.num_layers}) and compacts as soon as the cache is over budget; "
            "leave them unset, or use schedule='capped'"
        )
    if layout != "ladder":
        raise ValueError(f"layout={layout!r}: schedule='reference' staggers layers as the authors do; use layout='ladder'")
    need = reference_min_budget(geometry, sinks)
    if budget < need:
        raise ValueError(
            f"budget={budget} is too small for sinks={sinks} + the {geometry.num_layers}-slot recent window of "
            f"schedule='reference' + one rung keeping {geometry.keep}: use budget >= {need}, or fewer sinks"
        )
    return ReferenceLadderPolicy(geometry, sinks, budget)


def ladder_policy(num_layers: int, budget: int, *, span: int | None = None, overlap: int | None = None,
                  sinks: int = 4, window: int | None = None, layout: str = "ladder",
                  salient: int | float | None = None, salient_radius: int = 0,
                  schedule: str | None = None, chunk: int | None = None, group: int = 1) -> RetentionPolicy:
    """LaCache's retention rule for ``num_layers`` layers and ``budget`` slots, validated.

    Shared by every storage backend (the transformers cache here, vLLM's paged cache in
    ``lacache.vllm``), so both keep exactly the same tokens. ``chunk`` is only checked here (the
    reference schedule refuses it); the cache applies it.
    """
    budget = checks.integer("budget", budget, minimum=1, example=512)
    sinks = checks.integer("sinks", sinks, example=4)
    span = checks.optional_integer("span", span, minimum=1, example=default_span_overlap(num_layers)[0])
    overlap = checks.optional_integer("overlap", overlap, example=default_span_overlap(num_layers)[1])
    window = checks.size_or_fraction("window", window, example=max(1, budget // 4))
    chunk = checks.optional_integer("chunk", chunk, example=budget // 16)
    salient_radius = checks.integer("salient_radius", salient_radius, example=2)
    group = checks.integer("group", group, minimum=1, example=1)
    checks.choice("layout", layout, ("ladder", "band"))
    if schedule is not None:
        checks.choice("schedule", schedule, SCHEDULES)
    _salient_slots(salient, budget)  # its type, before the schedule decides whether it applies
    schedule = resolve_schedule(schedule, window=window, chunk=chunk, salient=salient, group=group, layout=layout)
    if span is None and overlap is None:
        span, overlap = default_span_overlap(num_layers)
    elif span is None or overlap is None:
        default = default_span_overlap(num_layers)
        raise ValueError(
            f"span={span!r}, overlap={overlap!r}: give both or neither; for {num_layers} layers the "
            f"default is span={default[0]}, overlap={default[1]}"
        )
    geometry = ladder_geometry(num_layers, span, overlap, layout, group)
    if schedule == "reference":
        if group != 1:
            raise ValueError(f"group={group}: schedule='reference' ladders single slots as the authors do; use group=1")
        return _reference_policy(geometry, budget, sinks, window, layout, salient, chunk)
    if window is None:
        window = max(geometry.rung, budget // 4)
    elif isinstance(window, float) and 0 < window < 1:  # a fraction of the budget (budgets that scale with prompts)
        window = max(geometry.rung, int(window * budget))
    if not checks.is_integer(window) or window < 1:
        raise ValueError(
            f"window={window!r} must be a positive integer (the newest tokens must stay dense) or a fraction "
            f"of the budget between 0 and 1, e.g. window={max(geometry.rung, budget // 4)} or window=0.25"
        )
    pool = _salient_slots(salient, budget)
    if budget - sinks - window - pool < geometry.rung:
        need = sinks + window + pool + geometry.rung
        raise ValueError(
            f"budget={budget} is too small for sinks={sinks} + window={window} + salient={pool} + one rung "
            f"of {geometry.rung} slots: use budget >= {need}, or fewer sinks / a smaller window"
        )
    if pool:
        return SalientLadderPolicy(geometry, sinks, window, pool, salient_radius)
    return LadderPolicy(geometry, sinks, window)


def streaming_policy(num_layers: int, budget: int, sinks: int = 4) -> RetentionPolicy:
    """StreamingLLM's rule (the same in every layer), validated against ``budget``."""
    budget = checks.integer("budget", budget, minimum=1, example=512)
    sinks = checks.integer("sinks", sinks, example=4)
    if budget <= sinks:
        raise ValueError(f"budget={budget} must exceed sinks={sinks}: e.g. budget={sinks + 64}")
    return StreamingPolicy(sinks)


class LaCache(ModelCache):
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
        schedule: str | None = None,
        group: int = 1,
    ) -> "LaCache":
        """Build a cache sized for ``model``.

        Args:
            budget: slots per layer (per sequence); memory never grows beyond it (beyond
                ``budget + floor(R/2)`` with the reference schedule, see ``schedule``).
            span, overlap: ladder shape (docs/method.md §1, "Geometry"); default by depth, see
                ``default_span_overlap``.
            sinks: leading slots never compacted (attention sinks; raise it to keep a task prompt).
            window: capped schedule: most recent slots never compacted (an int, or a float below 1
                for that fraction of the budget); default ``max(rung, budget // 4)``.
            positions: ``"shift"`` positions keys by slot (generation past the trained context);
                ``"original"`` keeps each key at its original position.
            layout: ``"ladder"`` (reference stagger) or ``"band"`` (contiguous layer bands).
            chunk: capped schedule: extra slots freed per compaction so it happens every ``chunk``
                tokens, not every one; default ``budget // 16`` (capped so a rung still fits).
            salient: slots per layer (an int) or a fraction of the budget (a float below 1) kept for the
                tokens with the smallest key norms among those the ladder evicts, so multi-token facts
                survive whole in every layer (see ``policies/salient.py``; registry method
                ``lacache-salient`` uses an eighth of the budget); ``None``/0 (default): the ladder alone.
            salient_radius: a slot's salience is the smallest key norm within this many slots of it,
                so the pool keeps neighbours of salient tokens as well (multi-token facts).
            schedule: ``"reference"`` (the LaCache authors' released schedule: recent window of the layer
                count, ``floor(R/2)`` extra slots after the first overflow, so ``budget + floor(R/2)``
                slots at most, none extra with one-slot rungs; wide rungs for long prompts; see
                ``lacache.policies.authors_schedule``) or ``"capped"`` (a hard cap of ``budget`` slots, the
                ``window`` above, compaction every ``chunk`` tokens). Default: ``"reference"``, which
                the held-out perplexity comparison favoured (docs/results.md), unless one of ``window``,
                ``chunk``, ``salient``, ``group`` or ``layout="band"`` is given: those exist only in the
                capped schedule, which they then select. Registry methods ``lacache-reference`` and
                ``lacache-capped`` fix it.
            group: ladder runs of ``group`` consecutive slots as one unit (1: the paper's ladder), so
                each layer keeps short multi-token facts whole or not at all (registry method
                ``lacache-group``; docs/method.md, "Group ladder").
        """

        def make_policy(num_layers: int) -> RetentionPolicy:
            return ladder_policy(num_layers, budget, span=span, overlap=overlap, sinks=sinks, window=window,
                                 layout=layout, salient=salient, salient_radius=salient_radius,
                                 schedule=schedule, chunk=chunk, group=group)

        return build_bounded_cache(cls, model, budget, make_policy, sinks=sinks, positions=positions, chunk=chunk)



class StreamingLLMCache(ModelCache):
    """StreamingLLM: ``sinks`` first tokens plus the most recent ones, identical in every layer."""

    @classmethod
    def from_model(cls, model: nn.Module, budget: int, sinks: int = 4, positions: str = "shift",
                   chunk: int | None = None) -> "StreamingLLMCache":
        return build_bounded_cache(cls, model, budget, lambda layers: streaming_policy(layers, budget, sinks), sinks=sinks, positions=positions, chunk=chunk)


class _ScoreCache(ModelCache):
    """Shared construction for per-layer, per-sequence score-based caches."""

    _policy_cls: type[ScorePolicy]

    @classmethod
    def _build(cls, model, budget, sinks, window, positions, chunk):
        def make_policy(num_layers: int) -> RetentionPolicy:
            if not checks.is_integer(window) or window < 1:
                raise ValueError(
                    f"window={window!r} must be a positive integer (the newest token is always kept), e.g. window=16"
                )
            if sinks + window > budget:
                raise ValueError(
                    f"budget={budget} is smaller than sinks={sinks} + window={window}: use budget >= {sinks + window} "
                    "or a smaller window"
                )
            return cls._policy_cls(num_layers, int(sinks), int(window))

        return build_bounded_cache(cls, model, budget, make_policy, sinks=sinks, positions=positions, chunk=chunk,
                                   chunk_by_default=False)


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
        window = max(1, budget // 2) if window is None and checks.is_integer(budget) else window
        return cls._build(model, budget, sinks, window, positions, chunk)


class KNormCache(_ScoreCache):
    """Key-norm: keep the slots with the smallest key L2 norm (head-averaged), plus sinks and a recent window.

    Attention-free like LaCache: it needs no queries, so it costs one norm per new key.
    """

    _policy_cls = KNormPolicy

    @classmethod
    def from_model(cls, model, budget: int, sinks: int = 4, window: int | None = None, positions: str = "shift",
                   chunk: int | None = None) -> "KNormCache":
        window = max(1, budget // 8) if window is None and checks.is_integer(budget) else window
        return cls._build(model, budget, sinks, window, positions, chunk)
