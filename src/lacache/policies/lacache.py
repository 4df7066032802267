"""LaCache as a method: the ladder rule on one of its two schedules, and its registry entries.

``ladder_policy`` is the one factory of LaCache's rules, shared by every backend (the transformers
cache, vLLM's paged cache), so both keep exactly the same tokens. It picks the schedule and the
rule: the authors' schedule (``authors_ladder.py``), the capped ladder (``ladder.py``) or the
ladder with a salient pool (``salient.py``). The variants below (capped, reference, salient,
group) are the same factory with other defaults.
"""

from __future__ import annotations

import numbers
from types import MappingProxyType

from .. import checks
from ..registry import ALL_SUITES, Method, register
from .authors_ladder import ReferenceLadderPolicy
from .authors_schedule import reference_min_budget
from .base import RetentionPolicy
from .ladder import LadderPolicy
from .ladder_geometry import default_span_overlap, ladder_geometry
from .salient import SalientLadderPolicy

__all__ = ["SCHEDULES", "CAPPED_ONLY", "resolve_schedule", "ladder_policy"]


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

    ``chunk`` is only checked here (the reference schedule refuses it, a given one selects the capped
    schedule); the backend applies it.

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


_LADDER_SUMMARY = "LaCache at its defaults: the ladder on the authors' schedule (chosen on held-out perplexity)"
register(Method("lacache", ladder_policy, _LADDER_SUMMARY, default=True))
register(Method("lacache-capped", ladder_policy,
                "LaCache on the capped schedule: never over budget, window budget/4, compaction every budget/16 tokens",
                defaults=MappingProxyType({"schedule": "capped"}), suites=frozenset({"ppl", "passkey", "ruler"}),
                base="lacache", serving_default_half=True))
register(Method("lacache-reference", ladder_policy,
                "LaCache with the authors' released schedule: recent window of L slots, floor(R/2) extra slots, "
                "wide rungs for long prompts",
                defaults=MappingProxyType({"schedule": "reference"}), suites=frozenset(), base="lacache"))
register(Method("lacache-salient", ladder_policy,
                "the ladder plus a pool of the lowest-key-norm evicted tokens (an eighth of the budget)",
                defaults=MappingProxyType({"salient": 0.125}), sees="keys", suites=ALL_SUITES - {"decode"},
                base="lacache"))
register(Method("lacache-group", ladder_policy,
                "research: the ladder over runs of 8 tokens plus a key-norm pool (budget/8) that keeps neighbours",
                defaults=MappingProxyType({"group": 8, "salient": 0.125, "salient_radius": 3}), sees="keys",
                suites=frozenset({"ppl", "passkey", "ruler"}), base="lacache"))
