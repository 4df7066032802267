"""The transformers backend's cache builder, and the classes users build: ``LaCache``, ``StreamingLLMCache``,
``TOVACache``, ``H2OCache``, ``KNormCache``.

Every bounded cache is built the same way (``build_cache``): the method's registry entry makes its
validated retention rule, and ``build_bounded_cache`` adds what every method shares on this
backend — RoPE support, chunk sizing, the query observer for rules that read attention, and the
model's hooks. The named classes exist so that ``LaCache.from_model(model, budget)`` and
``isinstance(cache, LaCache)`` keep working; each is its registry method's (and its variants')
cache class. A method without one gets a plain ``ModelCache``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import DynamicCache

from .. import checks
from ..policies import RetentionPolicy, resolve_chunk
from ..policies.lacache import SCHEDULES, ladder_policy, resolve_schedule  # noqa: F401  (older import path)
from ..policies.streaming import streaming_policy  # noqa: F401  (older import path)
from ..registry import Method, method_spec, set_cache_builder
from ..rope import Rotator, check_supported_model, layer_rotators
from .attach import attach_cache, model_signature
from .bounded import POSITION_MODES, BoundedCache
from .observe import QueryObserver

__all__ = ["ModelCache", "LaCache", "StreamingLLMCache", "TOVACache", "H2OCache", "KNormCache", "KeyDiffCache", "build_cache",
           "build_bounded_cache", "validate_common", "resolve_chunk"]


def validate_common(model: nn.Module, budget, positions, sinks=None) -> tuple[int, list[Rotator]]:
    """Check the settings every bounded cache shares; return the model's layer count and rotators."""
    if not checks.is_integer(budget) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive number of slots per layer, e.g. budget=512")
    if sinks is not None:
        checks.integer("sinks", sinks, example=4)
    checks.choice("positions", positions, POSITION_MODES)
    rotary = check_supported_model(model, positions)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers), layer_rotators(model, rotary)


def build_bounded_cache(
    cls: type[BoundedCache],
    model: nn.Module,
    budget: int,
    make_policy: Callable[[int], RetentionPolicy],
    *,
    sinks: int | None = None,
    positions: str = "shift",
    chunk: int | None = None,
    chunk_by_default: bool = True,
    static: bool = False,
) -> BoundedCache:
    """A bounded cache of class ``cls`` for ``model`` whose policy is ``make_policy(num_layers)``.

    ``chunk=None`` means ``budget // 16`` when ``chunk_by_default`` (index-only rules amortise
    compaction) and 0 otherwise (score rules evict to exactly the budget every step). ``sinks`` is
    only checked here (the policy holds it). ``static=True`` runs one-token decode steps on fixed
    shapes, which ``torch.compile`` captures whole (``lacache.cache.static``; index-only methods and key-norm).
    """
    num_layers, rotators = validate_common(model, budget, positions, sinks)
    budget = int(budget)
    policy = make_policy(num_layers)
    if (chunk is None and not chunk_by_default) or not policy.amortises:
        chunk = 0
    else:
        chunk = int(resolve_chunk(chunk, budget, policy.min_target()))
    if not isinstance(static, bool):
        raise ValueError(f"static={static!r} must be True or False, e.g. static=True to compile decode steps")
    cache = cls(num_layers=num_layers, budget=budget, policy=policy, rotator=rotators, positions=positions,
                chunk=chunk, static=static)
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


#: the cache class of each method family (a method without one gets ``ModelCache``)
_CLASSES: dict[str, type[ModelCache]] = {}


class _MethodCache(ModelCache):
    """A cache class named for one registry method: ``from_model`` builds that method."""

    #: the registry method this class builds (its variants share the class)
    method: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method and cls.method not in _CLASSES:
            _CLASSES[cls.method] = cls

    @classmethod
    def from_model(cls, model: nn.Module, budget: int, **options) -> "_MethodCache":
        """A cache of this class's method for ``model``, ``budget`` slots per layer; ``options`` are the
        method's (``lacache.registry.option_names(method)``; each named in its policy factory's docstring)."""
        return build_cache(method_spec(cls.method), model, budget, options, cls=cls)


def build_cache(spec: Method, model: nn.Module, budget: int | None, options: dict, cls: type | None = None):
    """The transformers cache of registry method ``spec`` (with ``options`` already holding its variant
    defaults): a ``DynamicCache`` for the unbounded method, else a bounded cache of ``cls`` (default: the
    method family's class)."""
    if not spec.bounded:
        if options:
            raise ValueError(f"method={spec.name!r} takes no options; got {sorted(options)}")
        return DynamicCache(config=model.config)
    options = dict(options)
    positions = options.pop("positions", "shift")
    static = options.pop("static", False)
    cls = cls or _CLASSES.get(spec.family, ModelCache)
    return build_bounded_cache(cls, model, budget, lambda layers: spec.make_policy(layers, budget, **options),
                               positions=positions, chunk=options.get("chunk"), chunk_by_default=spec.chunked,
                               static=static)


set_cache_builder(lambda spec, model, budget, options: build_cache(spec, model, budget, options))


class LaCache(_MethodCache):
    """Ladder-shaped KV cache: fixed slots per layer, staggered retention, iterative compaction.

    ``LaCache.from_model(model, budget=512)`` is all most users need; its options (span, overlap,
    sinks, window, layout, chunk, salient, salient_radius, schedule, group, positions) are described
    in ``lacache.policies.lacache.ladder_policy``.
    """

    method = "lacache"


class StreamingLLMCache(_MethodCache):
    """StreamingLLM: ``sinks`` first tokens plus the most recent ones, identical in every layer."""

    method = "streaming"


class TOVACache(_MethodCache):
    """TOVA: per layer, keep the slots the newest query attends to most (head-averaged).

    Needs the query's attention over the cache, observed with forward pre-hooks on the attention
    modules (one extra query projection and one attention-score pass per layer per evicting step).
    """

    method = "tova"


class H2OCache(_MethodCache):
    """H2O: heavy hitters by accumulated attention plus a recent window (default: half the budget each).

    Observes every query's attention at every step (hooks as for TOVA).
    """

    method = "h2o"


class KNormCache(_MethodCache):
    """Key-norm: keep the slots with the smallest key L2 norm (head-averaged), plus sinks and a recent window.

    Attention-free like LaCache: it needs no queries, so it costs one norm per new key.
    """

    method = "knorm"


class KeyDiffCache(_MethodCache):
    """KeyDiff: keep the slots whose keys point furthest from the layer's mean key direction, plus sinks and a
    recent window.

    Attention-free like key-norm; each compaction compares the layer's keys with their mean direction.
    """

    method = "keydiff"
