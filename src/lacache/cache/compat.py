"""Differences between the transformers versions lacache supports (5.16 and later).

transformers renamed the forward argument that carries the KV cache from ``past_key_values`` to
``cache``; vLLM pins a version from before the rename, so lacache's own loops pass the cache under
whichever name the model's ``forward`` takes.
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["cache_argument"]


@functools.lru_cache(maxsize=64)
def _name_for(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model, cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``, as ``model.forward`` expects."""
    return {_name_for(type(model)): cache}
