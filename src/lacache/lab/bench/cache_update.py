"""Time per token spent inside ``cache.update``, on synthetic keys/values, against the reference strategy.

No model runs here, so the figure is the cache's own cost (update, compaction, rotation) for a
given shape, measured the same way for the registry's caches and for two mechanisms of this
benchmark's own (named here and nowhere else): ``reference``, the authors' per-step mechanics
re-implemented (:class:`ReferenceLadderCache`), and ``ladder-step``, the default method's capped
ladder compacting at every step as the authors' storage does. The registry methods it can time are
the bounded ones that need no attention (``cache.update`` alone drives them: no model, no queries).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch

from ...registry import default_method, make_cache
from .authors_mechanics import ReferenceLadderCache
from .memory import _sync
from .method_names import (  # noqa: F401  (defined apart: the command line's parser reads them)
    _LADDER_STEP_OPTIONS,
    _REFERENCE_POSITIONS,
    LADDER_STEP,
    PSEUDO_METHODS,
    REFERENCE,
    cache_methods,
    default_cache_methods,
    registry_cache_methods,
)
from .standins import CacheStandIn

__all__ = ["LADDER_STEP", "PSEUDO_METHODS", "REFERENCE", "bench_cache_update", "cache_configurations", "cache_methods",
           "cache_summary", "default_cache_methods", "registry_cache_methods"]


def cache_configurations(layers: Sequence[int], budgets: Sequence[int], methods: Sequence[str],
                         positions: Sequence[str]) -> list[tuple[int, int, str, str]]:
    """Every ``(layers, budget, method, positions)`` a run times, in its order: what names a row (and the key
    an interrupted run records it under). The reference strategy takes no positions: one row per shape."""
    return [(n, b, m, mode) for n in layers for b in budgets for m in methods
            for mode in ([_REFERENCE_POSITIONS] if m == REFERENCE else positions)]


def _build_cache(method: str, stand_in: CacheStandIn, budget: int, track_tokens: bool = False):
    """A fresh cache for a microbenchmark method; registry methods are built by the registry, as everywhere else."""
    if method == LADDER_STEP:
        return make_cache(default_method(), stand_in, budget, **_LADDER_STEP_OPTIONS)
    if method == REFERENCE:
        return ReferenceLadderCache(stand_in.rotary_emb, stand_in.config.num_hidden_layers, budget,
                                    track_tokens=track_tokens)
    if method in registry_cache_methods():
        return make_cache(method, stand_in, budget)
    raise ValueError(f"method={method!r} is not one of {cache_methods()}; e.g. method={default_method()!r}")


def _every_step(method: str, cache) -> bool:
    """Whether ``cache`` compacts at every step once full (each step then costs the same, so few timed steps
    suffice): the reference strategy, and any cache that frees no extra slots per compaction (``chunk=0``)."""
    return method == REFERENCE or getattr(cache, "chunk", None) == 0


def _time_updates(cache, method: str, layers: int, budget: int, steps: int, warmup: int, positions: str,
                  kv_heads: int, head_dim: int, dtype, device, seed: int) -> float:
    """Seconds per token of ``steps`` one-token updates of every layer, after filling the cache."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = 8
    new_k = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen).to(device=device, dtype=dtype)
    new_v = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen).to(device=device, dtype=dtype)
    fill_k = torch.randn(1, kv_heads, budget, head_dim, generator=gen).to(device=device, dtype=dtype)
    fill_v = torch.randn(1, kv_heads, budget, head_dim, generator=gen).to(device=device, dtype=dtype)
    reference = method == REFERENCE
    if reference:
        for layer in range(layers):
            cache.update(fill_k, fill_v, layer)
        cache.end_step()
    else:
        pos = torch.arange(budget, device=device)[None]
        for layer in range(layers):
            cache.update(fill_k, fill_v, layer, position_ids=pos)
    seen = budget

    def step(i: int) -> None:
        nonlocal seen
        k, v = new_k[i % pool], new_v[i % pool]
        if reference:
            for layer in range(layers):
                cache.update(k, v, layer)
            cache.end_step()
        else:
            p = seen if positions == "absolute" else cache.num_slots
            pos = torch.tensor([[p]], device=device)
            for layer in range(layers):
                cache.update(k, v, layer, position_ids=pos)
        seen += 1

    for i in range(warmup):
        step(i)
    _sync(device)
    began = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    return (time.perf_counter() - began) / steps


def bench_cache_update(
    budgets: Sequence[int] = (256, 1024, 4096),
    layers: Sequence[int] = (30, 80),
    kv_heads: int = 8,
    head_dim: int = 128,
    methods: Sequence[str] | None = None,
    positions: Sequence[str] = ("absolute",),
    steps: int | None = None,
    ref_steps: int | None = 32,
    warmup: int = 32,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
    finished: Mapping[tuple, dict] | None = None,
) -> list[dict]:
    """Time per token spent inside ``cache.update`` for every layer (update, compaction, rotation).

    Synthetic random keys/values (batch 1, one new token per step) after filling the cache to its
    budget and ``warmup`` more steps; timed over ``steps`` steps (default ``max(512, 2 * budget)``,
    covering many compactions: ours compact every ``budget // 16`` tokens). ``positions``: ``absolute``
    passes the absolute position of each new token as ``generate()`` does; ``slots`` the slot position
    (lacache's own loop). The reference strategy takes no positions (it always rotates to slots
    ``0..n-1``). ``methods`` are from :func:`cache_methods` (default :func:`default_cache_methods`).
    Methods that compact at every step once full (``reference``, ``ladder-step``, any cache with
    ``chunk == 0``) cost the same at every step, so they are timed over ``ref_steps`` steps (default
    32; ``None``: as ``steps``) after at most 4 warm-up steps. One row per (layers, budget, method,
    positions) (:func:`cache_configurations`); a row whose key is in ``finished`` (from an
    interrupted run) is reused, not timed again, and ``on_row`` gets each new row as soon as it is
    measured.
    """
    methods = default_cache_methods() if methods is None else tuple(methods)
    known = cache_methods()
    for method in methods:
        if method not in known:
            raise ValueError(f"method={method!r} is not one of {known}; e.g. methods={default_cache_methods()}")
    for mode in positions:
        if mode not in ("absolute", "slots"):
            raise ValueError(f"positions={mode!r} must be 'absolute' or 'slots'")
    device = torch.device(device)
    rows = []
    stand_ins: dict[int, CacheStandIn] = {}
    for num_layers, budget, method, mode in cache_configurations(layers, budgets, methods, positions):
        if finished and (num_layers, budget, method, mode) in finished:
            rows.append(finished[num_layers, budget, method, mode])
            continue
        if num_layers not in stand_ins:
            stand_ins.clear()  # one model shape at a time
            stand_ins[num_layers] = CacheStandIn(num_layers, kv_heads, head_dim).to(device)
        n_steps = max(512, 2 * budget) if steps is None else int(steps)
        cache = _build_cache(method, stand_ins[num_layers], budget)
        count, warm = n_steps, warmup
        if _every_step(method, cache):
            count = n_steps if ref_steps is None else min(n_steps, int(ref_steps))
            warm = min(warmup, 4)
        seconds = _time_updates(cache, method, num_layers, budget, count, warm, mode, kv_heads, head_dim, dtype,
                                device, seed)
        row = {
            "layers": num_layers,
            "budget": budget,
            "method": method,
            "positions": mode,
            "steps": count,
            "ms_per_token": 1000 * seconds,
            "us_per_layer": 1e6 * seconds / num_layers,
            "cache_slots": cache.num_slots,
            "cache_bytes": cache.memory_bytes(),
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
        del cache  # no reference cycles: freed here
    return rows


def cache_summary(rows: Sequence[dict]) -> list[dict]:
    """One row per (layers, budget, positions): ms/token per method and the ratio of the reference strategy
    to the default method it re-implements (``reference_over_lacache``)."""
    ours_name = default_method()
    out = []
    keys = dict.fromkeys((r["layers"], r["budget"]) for r in rows)
    for num_layers, budget in keys:
        mine = [r for r in rows if r["layers"] == num_layers and r["budget"] == budget]
        ref = next((r["ms_per_token"] for r in mine if r["method"] == REFERENCE), None)
        modes = list(dict.fromkeys(r["positions"] for r in mine if r["method"] != REFERENCE)) or [_REFERENCE_POSITIONS]
        for mode in modes:
            row = {"layers": num_layers, "budget": budget, "positions": mode}
            for method in dict.fromkeys(r["method"] for r in mine):
                hit = [r for r in mine if r["method"] == method and (method == REFERENCE or r["positions"] == mode)]
                row[f"{method}_ms"] = hit[0]["ms_per_token"] if hit else None
            ours = row.get(f"{ours_name}_ms")
            row[f"{REFERENCE}_over_{ours_name}"] = ref / ours if ref is not None and ours else None
            out.append(row)
    return out
