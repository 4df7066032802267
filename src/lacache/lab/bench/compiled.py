"""Decode ms/token, eager against ``torch.compile``, for the full, static and bounded caches at the same slots.

On a GPU, decode with a small batch is bound by kernel launches and Python, not arithmetic: the remedy
is a cache of fixed shapes that ``torch.compile`` captures whole (transformers' ``StaticCache``),
replayed as CUDA graphs. A static bounded cache (``static=True``) is such a cache, and stays fixed
however long the stream. This benchmark compares, in one run with the setups interleaved round by
round (so a noisy machine slows them alike):

* ``full``: transformers' ``DynamicCache`` (eager; it grows, so compiling it recompiles every step);
* ``StaticCache``: as many slots as the bounded caches' fixed buffers, eager and compiled;
* each bounded method three ways: its host path (eager, the default cache), ``static=True`` eager,
  and ``static=True`` compiled.

The bounded caches start from a prompt of twice their budget, so every timed step is in the
compacting regime; ``StaticCache`` starts from a short prompt and never fills (its attention always
spans all its slots, masked, so its cost per step does not depend on how full it is).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, StaticCache

from ...registry import make_cache
from .memory import _device_of, _sync

__all__ = ["bench_compile", "compile_summary", "COMPILE_METHODS"]

#: bounded methods compared by default: the default ladder and StreamingLLM
COMPILE_METHODS = ("lacache", "streaming")
#: untimed steps after the prefill (the compiled setups compile here)
WARMUP = 3
#: tokens of StaticCache's prompt (it must leave room for every timed step)
STATIC_PROMPT = 8


class _Setup:
    """One cache decoding greedily through one callable, step by step, keeping its own next token."""

    def __init__(self, name: str, cache_name: str, compiled: bool, cache, call, prompt: torch.Tensor, model):
        self.name, self.cache_name, self.compiled = name, cache_name, compiled
        self.cache, self.call = cache, call
        with torch.no_grad():
            out = model(input_ids=prompt, cache=cache, position_ids=torch.arange(prompt.shape[1], device=prompt.device)[None])
        self.token = out.logits[:, -1:].argmax(-1)
        self.position = int(prompt.shape[1])
        self.compile_s = 0.0

    def steps(self, n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                position = torch.tensor([[self.position]], device=self.token.device)
                out = self.call(input_ids=self.token, cache=self.cache, position_ids=position)
                self.token = out.logits[:, -1:].argmax(-1)
                self.position += 1


def bench_compile(
    model,
    prompt_ids: torch.Tensor,
    methods: Sequence[str] = COMPILE_METHODS,
    budget: int = 256,
    window: int = 32,
    rounds: int = 6,
    backend: str = "inductor",
    mode: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per (setup, round): the mean ms/token over ``window`` greedy decode steps.

    ``prompt_ids`` must hold at least ``2 * budget`` tokens. Setups are interleaved: round ``r`` runs
    ``window`` steps of every setup before round ``r + 1`` starts.
    """
    if prompt_ids.shape[-1] < 2 * budget:
        raise ValueError(f"the prompt has {prompt_ids.shape[-1]} tokens; the compile benchmark needs 2 x budget "
                         f"= {2 * budget} so the bounded caches compact from the first step")
    log = log or (lambda message: None)
    device = _device_of(model)
    compiled_model = torch.compile(model, fullgraph=True, backend=backend, mode=mode)
    long_prompt = prompt_ids[:, : 2 * budget].to(device)
    setups: list[_Setup] = []
    slots = 0
    for method in methods:
        for static, compiled in ((False, False), (True, False), (True, True)):
            cache = make_cache(method, model, budget, static=static)
            name = f"{method}{' static' if static else ''}{' compiled' if compiled else ''}"
            setups.append(_Setup(name, method, compiled, cache, compiled_model if compiled else model,
                                 long_prompt, model))
            if static:
                slots = max(slots, cache._static.slots)
    need = STATIC_PROMPT + WARMUP + rounds * window
    if need > slots:
        raise ValueError(f"StaticCache gets the bounded caches' {slots} slots, too few for {WARMUP + rounds * window} "
                         f"steps after an {STATIC_PROMPT}-token prompt: use fewer --rounds x --window, or a larger --budget")
    short_prompt = prompt_ids[:, :STATIC_PROMPT].to(device)
    for compiled in (False, True):
        cache = StaticCache(config=model.config, max_cache_len=slots)
        setups.insert(0, _Setup(f"StaticCache{' compiled' if compiled else ''}", "StaticCache", compiled, cache,
                                compiled_model if compiled else model, short_prompt, model))
    full_prompt = prompt_ids[:, :budget].to(device)
    setups.insert(0, _Setup("full", "DynamicCache", False, DynamicCache(config=model.config), model, full_prompt, model))
    for setup in setups:  # warm-up: compiles the compiled ones
        _sync(device)
        start = time.perf_counter()
        setup.steps(WARMUP)
        _sync(device)
        setup.compile_s = time.perf_counter() - start
        log(f"[bench compile] {setup.name}: warm-up {setup.compile_s:.1f} s")
    rows = []
    for round_ in range(rounds):
        for setup in setups:
            _sync(device)
            start = time.perf_counter()
            setup.steps(window)
            _sync(device)
            ms = 1000 * (time.perf_counter() - start) / window
            rows.append({"setup": setup.name, "cache": setup.cache_name, "compiled": setup.compiled, "slots": slots,
                         "budget": None if setup.cache_name in ("DynamicCache", "StaticCache") else budget,
                         "round": round_, "window": window, "ms_per_token": ms, "warmup_s": setup.compile_s})
        log(f"[bench compile] round {round_ + 1}/{rounds}: " + ", ".join(
            f"{r['setup']} {r['ms_per_token']:.1f}" for r in rows[-len(setups):]))
    return rows


def compile_summary(rows: Sequence[dict]) -> list[dict]:
    """Per setup: the median ms/token over rounds, and its ratio to compiled StaticCache and to the
    same method's eager host path."""
    by_setup: dict[str, list[dict]] = {}
    for row in rows:
        by_setup.setdefault(row["setup"], []).append(row)
    median = {name: statistics.median(r["ms_per_token"] for r in mine) for name, mine in by_setup.items()}
    static = median.get("StaticCache compiled")
    out = []
    for name, mine in by_setup.items():
        eager = median.get(mine[0]["cache"]) if mine[0]["budget"] is not None else None
        out.append({
            "setup": name,
            "compiled": mine[0]["compiled"],
            "slots": mine[0]["slots"],
            "ms_per_token": median[name],
            "vs_compiled_static_cache": median[name] / static if static else None,
            "vs_eager_host_path": median[name] / eager if eager else None,
            "warmup_s": mine[0]["warmup_s"],
        })
    return out
