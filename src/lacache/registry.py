"""One entry point for every cache method, so evaluations and users can compare them by name."""

from __future__ import annotations

from collections.abc import Callable

from transformers import DynamicCache

from .cache import H2OCache, KNormCache, LaCache, StreamingLLMCache, TOVACache

__all__ = ["METHODS", "make_cache"]

def _salient_ladder(model, budget: int, **kwargs):
    """LaCache with a salient pool of an eighth of the budget: retrieves, at some perplexity cost."""
    kwargs.setdefault("salient", 0.125)
    return LaCache.from_model(model, budget=budget, **kwargs)


_BUILDERS: dict[str, Callable] = {
    "streaming": StreamingLLMCache.from_model,
    "lacache": LaCache.from_model,
    "lacache-salient": _salient_ladder,
    "tova": TOVACache.from_model,
    "h2o": H2OCache.from_model,
    "knorm": KNormCache.from_model,
}
METHODS = ("full", *_BUILDERS)


def make_cache(method: str, model, budget: int | None = None, **kwargs):
    """A fresh cache for ``model``: ``full`` (unbounded ``DynamicCache``) or a bounded method.

    Extra keyword arguments go to the method's ``from_model`` (e.g. ``span=9, overlap=7`` for
    lacache, ``window=64`` for h2o).
    """
    if method == "full":
        if kwargs:
            raise ValueError(f"method='full' takes no options; got {sorted(kwargs)}")
        return DynamicCache(config=model.config)
    if method not in _BUILDERS:
        raise ValueError(f"method={method!r} is not one of {METHODS}; e.g. method='lacache'")
    if budget is None:
        raise ValueError(f"method={method!r} needs a budget (slots per layer), e.g. budget=512")
    return _BUILDERS[method](model, budget=budget, **kwargs)
