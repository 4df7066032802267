"""The one table of cache methods: a method is a retention policy plus one ``register(Method(...))``.

A method's entry says everything the rest of lacache needs to know about it:

* ``policy(num_layers, budget, **options)`` builds its rule, validated (the rule lives in one file
  under ``lacache/policies/``, which also holds this registration);
* ``sees`` — what the rule reads: slot counts only (``"slots"``), the stored keys (``"keys"``) or
  the new queries' attention (``"attention"``). It decides what the backends must provide: the
  transformers cache observes queries for ``"attention"``; vLLM serves ``"slots"`` and ``"keys"`` rules;
* its option names and defaults (the factory's keyword parameters, plus the backend's
  ``positions`` and ``chunk``), the defaults a variant fixes, and the default method lists
  (``SUITES``) it is part of.

Everything else derives from this table: ``make_cache`` and ``custom_generate`` (through the
transformers backend, which installs itself as ``cache_builder``), the vLLM plugin's settings,
every command's method lists, the benchmarks, the inspector and the report. The module imports no
torch and no backend, so both backends (and a vLLM process) read it cheaply.

Built-in methods register when ``lacache`` is imported (``lacache.policies`` imports each method
file); methods of other packages register through the ``lacache.methods`` entry-point group
(``my_methods = "my_package.my_module"``), loaded on the first look-up.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policies.base import RetentionPolicy

__all__ = ["Method", "METHODS", "SUITES", "SEES", "BACKEND_OPTIONS", "method_spec", "variant", "default_methods",
           "check_methods", "make_cache", "register", "option_names", "unbounded_method", "baseline_method",
           "default_method", "served_default_method", "served_methods", "set_cache_builder", "load_plugins", "unregister"]

#: the runs whose default method list a method can be part of
SUITES = ("ppl", "passkey", "ruler", "longbench", "decode")
ALL_SUITES = frozenset(SUITES)
#: what a rule may read, cheapest first
SEES = ("slots", "keys", "attention")
#: options every bounded method takes from its backend, besides its policy's own: where keys are
#: positioned, how many extra slots a compaction frees, and whether decode steps run on fixed shapes
BACKEND_OPTIONS: Mapping[str, object] = MappingProxyType({"positions": "shift", "chunk": None, "static": False})

#: the entry-point group through which other packages add methods
ENTRY_POINT_GROUP = "lacache.methods"


@dataclass(frozen=True)
class Method:
    """One cache method as every part of lacache sees it."""

    name: str
    #: ``policy(num_layers, budget, **options)`` -> a validated ``RetentionPolicy``; None for the
    #: unbounded full cache
    policy: Callable[..., RetentionPolicy] | None
    summary: str
    #: what the rule reads: ``"slots"`` (index-only), ``"keys"`` or ``"attention"``
    sees: str = "slots"
    #: options this name fixes unless the caller gives them (a variant of another method)
    defaults: Mapping[str, object] = field(default_factory=dict)
    #: default method lists (see ``SUITES``) this method is part of
    suites: frozenset = ALL_SUITES
    #: ``chunk=None`` frees ``budget // 16`` slots per compaction (True: amortised) or none (False:
    #: the rule evicts to exactly the budget every step, as score rules do)
    chunked: bool = True
    #: the method this one is a variant of (its cache class, its family in tables)
    base: str | None = None
    #: served in vLLM: True by default for rules that read slots or keys (the workers read key norms from the
    #: paged keys); never for rules that read attention, which vLLM's fused kernels do not expose
    served: bool | None = None
    #: the bounded baseline of gap-closed tables (one entry)
    baseline: bool = False
    #: what commands run when no method is named (one entry)
    default: bool = False
    #: what the vLLM plugin serves when no method is named (one entry; else ``default``): chosen on retrieval
    #: measured through the engine, within the throughput of the rules that compact at points
    serving_default: bool = False
    #: what it serves when none is named and the engine runs in half precision (one entry, a rule that reads
    #: slots only; else ``serving_default``): there rules that rank keys are refused, because the keys' own
    #: rounding moves their statistic, so the slots kept would not be the transformers cache's
    serving_default_half: bool = False

    def __post_init__(self):
        if self.sees not in SEES:
            raise ValueError(f"Method {self.name!r}: sees={self.sees!r} must be one of {SEES}, e.g. sees='slots'")
        if self.served is None:
            object.__setattr__(self, "served", self.bounded and self.sees != "attention")
        elif self.served and self.sees == "attention":
            raise ValueError(f"Method {self.name!r}: served=True needs a rule that reads slots or keys; vLLM's "
                             f"fused attention exposes no {self.sees}")

    @property
    def bounded(self) -> bool:
        """False only for the full cache, which takes no budget."""
        return self.policy is not None

    @property
    def needs_attention(self) -> bool:
        """The cache must observe each new query's attention (hooks, extra cost per step)."""
        return self.sees == "attention"

    @property
    def family(self) -> str:
        """The method this one varies (itself for a base method): what its cache class is named for."""
        return self.base or self.name

    def options(self) -> dict[str, object]:
        """Every option name this method takes, with the default it gets when not given."""
        if not self.bounded:
            return {}
        params = list(inspect.signature(self.policy).parameters.values())[2:]  # after num_layers, budget
        own = {p.name: p.default for p in params
               if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
        return {**BACKEND_OPTIONS, **own, **self.defaults}

    def make_policy(self, num_layers: int, budget: int, **options) -> RetentionPolicy:
        """This method's rule for ``num_layers`` layers and ``budget`` slots, with the variant's defaults
        applied; the backend's options go to the rule only when its factory takes them (the ladder
        checks ``chunk`` against its schedule), never ``positions``."""
        if not self.bounded:
            raise ValueError(f"method={self.name!r} keeps every token: it has no retention rule")
        settings = {**self.defaults, **options}
        unknown = sorted(set(settings) - set(self.options()))
        if unknown:
            raise ValueError(f"method={self.name!r} takes no option {', '.join(unknown)}; it takes "
                             f"{', '.join(sorted(self.options()))}")
        takes = inspect.signature(self.policy).parameters
        return self.policy(num_layers, budget, **{k: v for k, v in settings.items()
                                                  if k not in BACKEND_OPTIONS or k in takes})

    def make(self, model, budget: int | None = None, **options):
        """A fresh transformers cache of this method for ``model`` (``budget`` slots per layer if bounded)."""
        if _CACHE_BUILDER is None:
            import importlib

            importlib.import_module("lacache.cache")  # the transformers backend installs itself on import
        if self.bounded and budget is None:
            raise ValueError(f"method={self.name!r} needs a budget (slots per layer), e.g. budget=512")
        return _CACHE_BUILDER(self, model, budget, {**self.defaults, **options})


_BY_NAME: dict[str, Method] = {}
METHODS: tuple[str, ...] = ()
_CACHE_BUILDER: Callable | None = None
_PLUGINS_LOADED = False


def set_cache_builder(build: Callable) -> None:
    """Called by the transformers backend (``lacache.cache``) when it is imported: ``build(method,
    model, budget, options)`` makes its caches. The registry stays free of any backend import."""
    global _CACHE_BUILDER
    _CACHE_BUILDER = build


def register(spec: Method) -> Method:
    """Add a method (a built-in policy file, a plugin, a notebook experiment); names are unique."""
    global METHODS
    if not isinstance(spec, Method):
        raise TypeError(f"register() takes a lacache.registry.Method; got {type(spec).__name__}")
    if spec.name in _BY_NAME:
        raise ValueError(f"method {spec.name!r} is already registered; pick another name")
    if spec.base is not None and spec.base not in _BY_NAME:
        raise ValueError(f"method {spec.name!r}: base={spec.base!r} is not registered; register it first")
    if spec.baseline and any(s.baseline for s in _BY_NAME.values()):
        raise ValueError(f"method {spec.name!r}: baseline=True, but {baseline_method()!r} is the baseline already")
    if spec.default and any(s.default for s in _BY_NAME.values()):
        raise ValueError(f"method {spec.name!r}: default=True, but {default_method()!r} is the default already")
    if spec.serving_default and not spec.served:
        raise ValueError(f"method {spec.name!r}: serving_default=True, but vLLM does not serve it (sees={spec.sees!r})")
    if spec.serving_default and any(s.serving_default for s in _BY_NAME.values()):
        raise ValueError(f"method {spec.name!r}: serving_default=True, but {served_default_method()!r} is the "
                         "serving default already")
    if spec.serving_default_half and (not spec.served or spec.sees != "slots"):
        raise ValueError(f"method {spec.name!r}: serving_default_half=True needs a served rule that reads slots "
                         f"only (sees={spec.sees!r}); rules that rank keys are refused in half precision")
    if spec.serving_default_half and any(s.serving_default_half for s in _BY_NAME.values()):
        raise ValueError(f"method {spec.name!r}: serving_default_half=True, but "
                         f"{served_default_method(half_precision=True)!r} is the half-precision serving default "
                         "already")
    _BY_NAME[spec.name] = spec
    METHODS = tuple(_BY_NAME)
    return spec


def unregister(name: str) -> None:
    """Remove a method (tests and notebooks that registered one for a while)."""
    global METHODS
    _BY_NAME.pop(name, None)
    METHODS = tuple(_BY_NAME)


def load_plugins() -> None:
    """Import the modules other packages name in the ``lacache.methods`` entry-point group (once)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def variant(name: str, base: str, **options) -> Method:
    """Register ``name`` as ``base`` with other default options (a research variant: ``lacache`` with
    ``group=8``); registering the same definition again is a no-op, another one under a taken name fails."""
    spec = method_spec(base)
    if not spec.bounded:
        raise ValueError(f"variant {name!r}: method {base!r} takes no options")
    unknown = sorted(set(options) - set(spec.options()))
    if unknown:
        raise ValueError(f"variant {name!r}: method {base!r} takes no option {', '.join(unknown)}; it takes "
                         f"{', '.join(sorted(spec.options()))}")
    made = Method(name, spec.policy, f"{base} with {', '.join(f'{k}={v}' for k, v in options.items())}",
                  sees=spec.sees, defaults=MappingProxyType({**spec.defaults, **options}), suites=frozenset(),
                  chunked=spec.chunked, base=spec.family, served=spec.served)
    existing = _BY_NAME.get(name)
    if existing is not None and existing.policy is made.policy and dict(existing.defaults) == dict(made.defaults):
        return existing
    return register(made)


def method_spec(name: str) -> Method:
    """The registry entry for ``name``; a ``ValueError`` listing the known names otherwise."""
    spec = _BY_NAME.get(name)
    if spec is None:
        load_plugins()
        spec = _BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"method={name!r} is not one of {METHODS}; e.g. method={default_method()!r}")
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


#: the names a dtype in float32 goes by (a ``--dtype`` argument, a torch dtype's ``str`` without "torch.")
FLOAT32_NAMES = ("float32", "float", "fp32")


def is_half_precision(dtype) -> bool:
    """``dtype`` (a name such as ``--dtype`` takes, or a torch dtype) is not float32: bfloat16 or float16, or
    ``auto``, which vLLM resolves to bfloat16 on a CPU for most checkpoints. ``None`` (nothing asked) is not:
    lacache's own default is float32. The one answer to "is this half precision" for every command and the
    plugin, so a method chosen from it and the plugin's refusal of key-reading rules always agree."""
    return dtype is not None and str(dtype).replace("torch.", "") not in FLOAT32_NAMES


def served_default_method(half_precision: bool = False) -> str:
    """The method the vLLM plugin serves when none is named. In float32 the entry marked ``serving_default``
    (``keydiff``: the served rule that finds the most pass keys through the engine, at half and at a quarter of
    the prompt, in the suite's filler and in running text; docs/serving.md "Which rule to serve"), else
    ``default_method()``. In half precision (``half_precision``: an engine in bfloat16 or float16) a rule that
    ranks keys is refused, so there it is the entry marked ``serving_default_half`` (``lacache-capped``)
    when the float32 default reads keys."""
    chosen = next((spec.name for spec in _BY_NAME.values() if spec.serving_default), None) or default_method()
    if half_precision and _BY_NAME[chosen].sees != "slots":
        return next((spec.name for spec in _BY_NAME.values() if spec.serving_default_half), chosen)
    return chosen


def served_methods() -> tuple[str, ...]:
    """The methods the vLLM plugin serves (index-only rules)."""
    load_plugins()
    return tuple(spec.name for spec in _BY_NAME.values() if spec.served)


def default_methods(suite: str) -> tuple[str, ...]:
    """The methods a run of ``suite`` (one of ``SUITES``) compares when none are named."""
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r} is not one of {SUITES}")
    load_plugins()
    return tuple(spec.name for spec in _BY_NAME.values() if suite in spec.suites)


def check_methods(names: Iterable[str], what: str = "methods") -> list[str]:
    """``names`` as a list, or one ``ValueError`` naming the unknown ones (``what`` names the setting)."""
    names = list(names)
    if any(n not in _BY_NAME for n in names):
        load_plugins()
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown or not names:
        raise ValueError(f"--{what} {','.join(unknown) or '(empty)'} not known; choose from {','.join(METHODS)}")
    return names


def make_cache(method: str, model, budget: int | None = None, **kwargs):
    """A fresh cache for ``model``: ``full`` (unbounded ``DynamicCache``) or a bounded method.

    Extra keyword arguments are the method's options (e.g. ``span=9, overlap=7`` for lacache,
    ``window=64`` for h2o, ``positions``/``chunk`` for any bounded method); a variant's own defaults
    (``lacache-salient``: ``salient=0.125``) apply unless given.
    """
    spec = method_spec(method)
    accepted = option_names(method)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"method={method!r} takes no option {', '.join(unknown)}; it takes {', '.join(sorted(accepted)) or 'none'}"
        )
    return spec.make(model, budget, **kwargs)


def option_names(name: str) -> frozenset[str]:
    """The option names method ``name`` takes: what a command line checks ``--option`` keys against
    before any model loads (an empty set for the unbounded ``full`` cache)."""
    return frozenset(method_spec(name).options())


register(Method("full", None, "every token (transformers' DynamicCache): the unbounded reference", sees="slots"))
