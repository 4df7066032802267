"""What every retrieval task shares: one greedy answer from a model under a bounded cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..._lazy import torch
from ...registry import make_cache, method_spec

__all__ = ["PREFILLS", "resolve_budget", "fresh_cache", "greedy_answer"]

PREFILLS = ("full", "chunked")


def resolve_budget(budget: float, prompt_tokens: int) -> int:
    """``budget`` below 1 is a fraction of the prompt (the paper's setting); 1 or more is slots per layer."""
    if budget <= 0:
        raise ValueError(f"budget={budget} must be > 0: a fraction of the prompt (e.g. 0.5) or slots (e.g. 512)")
    return max(1, int(budget * prompt_tokens)) if budget < 1 else int(budget)


@contextmanager
def fresh_cache(method: str, model, slots: int | None, options: dict | None = None) -> Iterator:
    """A new cache of ``method`` for one run, closed however the run ends.

    Closing matters for score-based caches: they hook the model's attention, and a hook left behind
    would keep observing (and slowing) every later run. ``slots`` is ignored for the unbounded method.
    """
    cache = make_cache(method, model, slots if method_spec(method).bounded else None, **(options or {}))
    try:
        yield cache
    finally:
        if hasattr(cache, "close"):
            cache.close()


def greedy_answer(
    model,
    input_ids: torch.Tensor,
    method: str,
    slots: int | None,
    options: dict | None = None,
    prefill: str = "full",
    prefill_chunk: int = 128,
    new_tokens: int = 8,
    stop_ids: set[int] | None = None,
) -> list[int]:
    """Greedy continuation of ``input_ids`` ([1, n]) with a fresh cache of ``method``.

    ``prefill="full"`` attends over the whole prompt exactly and compacts once afterwards (the
    the authors' NIAH flow; memory grows with the prompt); ``"chunked"`` feeds ``prefill_chunk`` tokens
    per forward and compacts after each (memory bounded by budget + chunk). ``slots`` is ignored
    for ``method="full"``. Generation stops early at any token in ``stop_ids``.
    """
    if prefill not in PREFILLS:
        raise ValueError(f"prefill={prefill!r} must be one of {PREFILLS}")
    chunk = input_ids.shape[1] if prefill == "full" else prefill_chunk
    ids: list[int] = []
    with fresh_cache(method, model, slots, options) as cache:
        from ...cache.generation import stream_tokens  # the transformers backend: on first use

        for token in stream_tokens(model, input_ids, cache, new_tokens, prefill_chunk=chunk):
            if stop_ids and token in stop_ids:
                break
            ids.append(token)
    return ids
