"""The ``lacache`` key of vLLM's ``additional_config``: parsed and checked once, at engine start.

``vllm.LLM(..., additional_config={"lacache": {"method": "lacache", "budget": 256, ...}})`` or
``vllm serve MODEL --additional-config '{"lacache": {...}}'``. The option names and defaults are
those of ``LaCache.from_model`` / ``StreamingLLMCache.from_model``; the retention rule is built by
the same functions the transformers cache uses, so both backends keep the same tokens. This
module imports no vLLM: it is tested without it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..cache.classes import LaCache, StreamingLLMCache, ladder_policy, resolve_chunk, streaming_policy
from ..policies.base import RetentionPolicy

__all__ = ["KEY", "SERVED_METHODS", "ServingConfig", "parse_config", "serving_config"]

#: the key of ``additional_config`` that switches the plugin on
KEY = "lacache"

# Index-only rules need nothing but slot counts, so a paged engine can run them on the host. The
# attention-score methods (tova, h2o) need every query's attention over the cache, which vLLM's
# fused kernels never materialise; key-norm and the salient pool need key norms per slot (left
# for a later version).
_BUILDERS: dict[str, tuple[Callable, Callable]] = {
    "lacache": (LaCache.from_model, ladder_policy),
    "lacache-reference": (LaCache.from_model, functools.partial(ladder_policy, schedule="reference")),
    "lacache-capped": (LaCache.from_model, functools.partial(ladder_policy, schedule="capped")),
    "streaming": (StreamingLLMCache.from_model, streaming_policy),
}
SERVED_METHODS = tuple(_BUILDERS)
_NOT_SERVED = {"tova", "h2o", "knorm", "lacache-salient", "full"}


def _options_of(from_model: Callable) -> dict[str, object]:
    """Option names and defaults of a ``from_model`` (what the plugin accepts besides method/budget)."""
    params = inspect.signature(from_model).parameters
    return {name: p.default for name, p in params.items() if name not in ("cls", "model", "budget")}


@dataclass(frozen=True)
class ServingConfig:
    """What the scheduler and the workers need to keep every request inside its budget."""

    method: str
    budget: int
    chunk: int
    options: Mapping[str, object]
    num_layers: int
    _policy: RetentionPolicy

    @property
    def capacity(self) -> int:
        """The most slots a request holds between passes: the budget, or a little more for the authors'
        schedule (``floor(R/2)``; none with one-slot rungs)."""
        return self._policy.most_slots(self.budget)

    @property
    def target(self) -> int:
        """Slots a compaction leaves: ``budget - chunk``."""
        return self.budget - self.chunk

    def new_policy(self) -> RetentionPolicy:
        """A fresh rule for one request; index-only rules share their memoised plans."""
        policy = self._policy.fork()
        policy.reset()
        return policy

    def describe(self) -> dict:
        return {"method": self.method, "budget": self.budget, "chunk": self.chunk, **self._policy.describe()}


def parse_config(raw: object, num_layers: int) -> ServingConfig:
    """Check ``additional_config["lacache"]`` for a model of ``num_layers`` layers; one ``ValueError``
    that names the key and a value that works otherwise."""
    if not isinstance(raw, Mapping):
        raise ValueError(f'additional_config["{KEY}"] must be a JSON object, e.g. {{"method": "lacache", "budget": 256}}')
    settings = dict(raw)
    method = settings.pop("method", "lacache")
    if method not in _BUILDERS:
        why = (" (it needs attention scores or key norms, which vLLM's fused attention does not expose)"
               if method in _NOT_SERVED else "")
        raise ValueError(f'{KEY}.method={method!r} is not served in vLLM{why}; use one of {SERVED_METHODS}, '
                         'e.g. "method": "lacache"')
    if "budget" not in settings:
        raise ValueError(f'{KEY}.budget is required: slots per layer per request, e.g. "budget": 256')
    budget = settings.pop("budget")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f'{KEY}.budget={budget!r} must be a positive integer (slots per layer), e.g. "budget": 256')
    from_model, make_policy = _BUILDERS[method]
    accepted = _options_of(from_model)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"{KEY}: unknown option(s) {unknown} for method {method!r}; accepted: {sorted(accepted)}")
    positions = settings.pop("positions", "shift")
    if positions != "shift":
        raise ValueError(f'{KEY}.positions={positions!r}: vLLM serving re-positions keys by slot only; use "shift"')
    chunk = settings.pop("chunk", None)
    if settings.get("salient"):
        raise ValueError(f"{KEY}.salient: the salient pool needs key norms per slot and is not served in vLLM yet; "
                         "leave it out (the plain ladder)")
    if method in ("lacache-reference", "lacache-capped") and "schedule" in settings:
        raise ValueError(f'{KEY}.schedule: method "{method}" fixes the schedule; leave it out')
    sinks = settings.get("sinks", accepted.get("sinks", 4))
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f'{KEY}.sinks={sinks!r} must be a non-negative integer, e.g. "sinks": 4')
    try:
        if method.startswith("lacache"):  # ladder rules take the chunk: a given one picks the capped schedule
            policy = make_policy(num_layers, budget, chunk=chunk, **settings)
        else:
            policy = make_policy(num_layers, budget, **settings)
        chunk = resolve_chunk(chunk, budget, policy.min_target()) if policy.amortises else 0
    except (TypeError, ValueError) as err:  # the shared builders name the parameter; say where it came from
        raise ValueError(f"{KEY}: {err}") from None
    return ServingConfig(method, budget, chunk, dict(raw), num_layers, policy)


def serving_config(vllm_config) -> ServingConfig | None:
    """The parsed ``lacache`` settings of an engine, or None when the plugin is off for it."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if KEY not in extra:
        return None
    cached = getattr(vllm_config, "_lacache_parsed", None)
    if cached is not None:
        return cached
    text = vllm_config.model_config.hf_text_config
    parsed = parse_config(extra[KEY], int(text.num_hidden_layers))
    try:
        object.__setattr__(vllm_config, "_lacache_parsed", parsed)
    except Exception:  # a frozen or slotted config: parse again next time (cheap)
        pass
    return parsed
