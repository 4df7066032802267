"""The one place that defines a cache method: its name, builder, defaults and what it needs.

Every command, evaluation and benchmark reads this table, so a method added here (with its policy
file under ``policies/``) appears in ``make_cache``, ``lacache generate|chat|eval|bench``,
``custom_generate`` and the default method lists without touching anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from transformers import DynamicCache

from .cache import H2OCache, KNormCache, LaCache, StreamingLLMCache, TOVACache

__all__ = ["Method", "METHODS", "unbounded_method", "baseline_method", "default_method", "SUITES", "method_spec", "variant", "default_methods", "check_methods", "make_cache", "register",
           "option_names"]

#: the runs whose default method list a method can be part of
SUITES = ("ppl", "passkey", "ruler", "longbench", "decode")
_ALL = frozenset(SUITES)


def _full_cache(model, budget=None, **options):
    if options:
        raise ValueError(f"method='full' takes no options; got {sorted(options)}")
    return DynamicCache(config=model.config)


@dataclass(frozen=True)
class Method:
    """One cache method as the rest of lacache sees it."""

    name: str
    #: ``build(model, budget=..., **options)`` -> a transformers ``Cache``
    build: Callable
    summary: str
    #: options this method name sets unless the caller gives them (a variant of another method)
    defaults: Mapping[str, object] = field(default_factory=dict)
    #: whether the cache must observe each new query's attention (hooks, extra cost per step)
    needs_attention: bool = False
    #: False only for the full cache, which takes no budget
    bounded: bool = True
    #: default method lists (see ``SUITES``) this method is part of
    suites: frozenset = _ALL
    #: the bounded baseline of gap-closed tables (one entry)
    baseline: bool = False
    #: what commands run when no method is named (one entry)
    default: bool = False

    def make(self, model, budget: int | None = None, **options):
        """A fresh cache of this method for ``model`` (``budget`` slots per layer if bounded)."""
        if not self.bounded:
            return self.build(model, **options)
        if budget is None:
            raise ValueError(f"method={self.name!r} needs a budget (slots per layer), e.g. budget=512")
        return self.build(model, budget=budget, **{**self.defaults, **options})


_SPECS = (
    Method("full", _full_cache, "every token (transformers' DynamicCache): the unbounded reference", bounded=False),
    Method("streaming", StreamingLLMCache.from_model, "StreamingLLM: sinks + the most recent tokens", baseline=True),
    Method("lacache", LaCache.from_model,
           "LaCache at its defaults: the ladder on the authors' schedule (chosen on held-out perplexity)",
           default=True),
    Method("lacache-capped", LaCache.from_model,
           "LaCache on the capped schedule: never over budget, window budget/4, compaction every budget/16 tokens",
           defaults=MappingProxyType({"schedule": "capped"}), suites=frozenset({"ppl", "passkey", "ruler"})),
    Method("lacache-reference", LaCache.from_model,
           "LaCache with the authors' released schedule: recent window of L slots, floor(R/2) extra slots, "
           "wide rungs for long prompts",
           defaults=MappingProxyType({"schedule": "reference"}), suites=frozenset()),  # = lacache today
    Method("lacache-salient", LaCache.from_model,
           "the ladder plus a pool of the lowest-key-norm evicted tokens (an eighth of the budget)",
           defaults=MappingProxyType({"salient": 0.125}), suites=_ALL - {"decode"}),
    Method("lacache-group", LaCache.from_model,
           "research: the ladder over runs of 8 tokens plus a key-norm pool (budget/8) that keeps neighbours",
           defaults=MappingProxyType({"group": 8, "salient": 0.125, "salient_radius": 3}),
           suites=frozenset({"ppl", "passkey", "ruler"})),
    Method("tova", TOVACache.from_model, "TOVA: the slots the newest query attends to most", needs_attention=True),
    Method("h2o", H2OCache.from_model, "H2O: heavy hitters by accumulated attention + a recent window",
           needs_attention=True),
    Method("knorm", KNormCache.from_model, "key-norm: the smallest key norms + sinks + a recent window",
           suites=frozenset({"ppl", "passkey"})),
)
_BY_NAME: dict[str, Method] = {spec.name: spec for spec in _SPECS}
METHODS: tuple[str, ...] = tuple(_BY_NAME)


def register(spec: Method) -> None:
    """Add a method from outside the package (a plugin, a notebook experiment); names are unique."""
    global METHODS
    if spec.name in _BY_NAME:
        raise ValueError(f"method {spec.name!r} is already registered; pick another name")
    _BY_NAME[spec.name] = spec
    METHODS = tuple(_BY_NAME)


def variant(name: str, base: str, **options) -> Method:
    """Register ``name`` as ``base`` with other default options (a research variant: ``lacache`` with
    ``group=8``); registering the same definition again is a no-op, another one under a taken name fails."""
    spec = method_spec(base)
    if not spec.bounded:
        raise ValueError(f"variant {name!r}: method {base!r} takes no options")
    made = Method(name, spec.build, f"{base} with {', '.join(f'{k}={v}' for k, v in options.items())}",
                  defaults=MappingProxyType({**spec.defaults, **options}), needs_attention=spec.needs_attention,
                  suites=frozenset())
    existing = _BY_NAME.get(name)
    if existing is not None and existing.build is made.build and dict(existing.defaults) == dict(made.defaults):
        return existing
    register(made)
    return made


def method_spec(name: str) -> Method:
    """The registry entry for ``name``; a ``ValueError`` listing the known names otherwise."""
    spec = _BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"method={name!r} is not one of {METHODS}; e.g. method='lacache'")
    return spec


def unbounded_method() -> str:
    """The method every bounded one is compared with: the one entry that takes no budget (``full``)."""
    return next(spec.name for spec in _BY_NAME.values() if not spec.bounded)


def baseline_method() -> str:
    """The bounded baseline of gap-closed tables (how much of the gap between it and the unbounded
    cache a method closes): the entry marked ``baseline`` (``streaming``)."""
    return next(spec.name for spec in _BY_NAME.values() if spec.baseline)


def default_method() -> str:
    """The method a command runs when none is named: the entry marked ``default`` (``lacache``)."""
    return next(spec.name for spec in _BY_NAME.values() if spec.default)


def default_methods(suite: str) -> tuple[str, ...]:
    """The methods a run of ``suite`` (one of ``SUITES``) compares when none are named."""
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r} is not one of {SUITES}")
    return tuple(spec.name for spec in _BY_NAME.values() if suite in spec.suites)


def check_methods(names: Iterable[str], what: str = "methods") -> list[str]:
    """``names`` as a list, or one ``ValueError`` naming the unknown ones (``what`` names the setting)."""
    names = list(names)
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown or not names:
        raise ValueError(f"--{what} {','.join(unknown) or '(empty)'} not known; choose from {','.join(METHODS)}")
    return names


def make_cache(method: str, model, budget: int | None = None, **kwargs):
    """A fresh cache for ``model``: ``full`` (unbounded ``DynamicCache``) or a bounded method.

    Extra keyword arguments go to the method's builder (e.g. ``span=9, overlap=7`` for lacache,
    ``window=64`` for h2o); a variant's own defaults (``lacache-salient``: ``salient=0.125``) apply
    unless given.
    """
    accepted = option_names(method)
    unknown = sorted(set(kwargs) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"method={method!r} takes no option {', '.join(unknown)}; it takes {', '.join(sorted(accepted)) or 'none'}"
        )
    return method_spec(method).make(model, budget, **kwargs)


def option_names(name: str) -> frozenset[str] | None:
    """The option names method ``name`` takes (its builder's keyword parameters besides ``model`` and
    ``budget``): what a command line checks ``--option`` keys against before any model loads, instead
    of letting a misspelt key reach the builder as a ``TypeError``. ``None`` when the builder takes
    ``**kwargs`` and checks them itself; an empty set for the unbounded ``full`` cache."""
    import inspect

    spec = method_spec(name)
    if not spec.bounded:
        return frozenset()
    parameters = inspect.signature(spec.build).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters) - {"model", "budget"}
