"""Decode speed and memory per method: the ``decode`` and ``memory`` benchmarks share this one run.

Every method decodes through lacache's own loop (``stream_tokens``), so the only thing that differs
between rows of one run is the cache; readings are taken per window of decode steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch

from ...cache.generation import StreamStats, cache_bytes, cache_slots, stream_tokens
from ...cache.memory import current_rss_bytes
from ...registry import default_methods, make_cache, method_spec
from .memory import MB, _cuda_allocated, _device_of, _fresh_phase, _sync, peak_rss_since_reset

__all__ = ["DECODE_METHODS", "bench_decode", "decode_summary"]

#: methods the decode benchmark compares when none are named (the registry's "decode" suite)
DECODE_METHODS = default_methods("decode")


def _budget(method: str, budget: int) -> int | None:
    """``budget`` for a bounded method; None for the unbounded one (``full``), which takes none."""
    return budget if method_spec(method).bounded else None


def _make_cache(method: str, model, budget: int, options: dict | None):
    """A registry cache for ``method`` (the unbounded one gets no budget), so benchmarks and generation build alike."""
    return make_cache(method, model, _budget(method, budget), **(options or {}))


def _close(cache) -> None:
    """Release what a cache holds outside itself (attention hooks of tova/h2o) before the next method runs."""
    close = getattr(cache, "close", None)
    if callable(close):
        close()


def bench_decode(
    model,
    prompt_ids: torch.Tensor,
    methods: Sequence[str] = DECODE_METHODS,
    budget: int = 512,
    tokens: int = 8192,
    window: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    method_options: dict[str, dict] | None = None,
    on_row: Callable[[dict], None] | None = None,
    finished: Mapping[str, list[dict]] | None = None,
    on_method: Callable[[str, list[dict]], None] | None = None,
) -> list[dict]:
    """Decode ``tokens`` tokens per method with lacache's own loop; one row per window of ``window`` decode steps.

    Bounded methods use ``stream_tokens`` with their cache; ``full`` a ``DynamicCache`` through the
    same loop. A row holds the mean ms/token over its window (the forwards that produced tokens
    ``first..last``), and at the window's end the cache bytes and slots, the process RSS, its
    high-water mark since this method started, and CUDA memory when on a GPU. A method in
    ``finished`` (method -> its rows, from an interrupted run) is not decoded again; ``on_method``
    gets each method's rows as soon as it is done, so they can be kept before the next one starts.
    """
    if tokens < 2:
        raise ValueError(f"tokens={tokens} must be >= 2 (the first token comes from the prefill)")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    device = _device_of(model)
    rows: list[dict] = []
    for method in methods:
        if finished and method in finished:
            rows.extend(finished[method])
            continue
        first_row = len(rows)
        cache = _make_cache(method, model, budget, (method_options or {}).get(method))
        _fresh_phase(device)
        stats = StreamStats()
        stream = stream_tokens(model, prompt_ids, cache, tokens, temperature=temperature, seed=seed,
                               stats=stats, sample_every=1 << 62)
        next(stream)  # prefill and the first token: not a decode step
        _sync(device)
        start, first, produced = time.perf_counter(), 2, 1
        for _ in stream:
            produced += 1
            if (produced - 1) % window and produced < tokens:
                continue
            _sync(device)
            now = time.perf_counter()
            steps = produced - first + 1
            row = {
                "method": method,
                "budget": _budget(method, budget),
                "first": first,
                "last": produced,
                "context": int(prompt_ids.shape[-1]) + produced - 1,
                "ms_per_token": 1000.0 * (now - start) / steps,
                "tokens_per_s": steps / (now - start),
                "cache_slots": cache_slots(cache),
                "cache_bytes": cache_bytes(cache),
                "rss_bytes": current_rss_bytes(),
                "peak_rss_bytes": peak_rss_since_reset(),
                "cuda_allocated_bytes": _cuda_allocated(device),
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
            start, first = time.perf_counter(), produced + 1
        _close(cache)
        del cache, stream
        if on_method is not None:
            on_method(method, rows[first_row:])
    _fresh_phase(device)
    return rows


def decode_summary(rows: Sequence[dict]) -> list[dict]:
    """One row per method: ms/token in the first and last window and overall, final cache and peak RSS."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        steps = sum(r["last"] - r["first"] + 1 for r in mine)
        seconds = sum((r["last"] - r["first"] + 1) * r["ms_per_token"] / 1000 for r in mine)
        out.append({
            "method": method,
            "budget": mine[0]["budget"],
            "tokens": mine[-1]["last"],
            "ms_per_token_first": mine[0]["ms_per_token"],
            "ms_per_token_last": mine[-1]["ms_per_token"],
            "ms_per_token_mean": 1000 * seconds / steps,
            "tokens_per_s": steps / seconds,
            "cache_mb_last": mine[-1]["cache_bytes"] / MB,
            "rss_mb_last": mine[-1]["rss_bytes"] / MB,
            "peak_rss_mb": max(r["peak_rss_bytes"] for r in mine) / MB,
        })
    return out

