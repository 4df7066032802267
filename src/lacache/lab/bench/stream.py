"""Constant-memory streams: generate (or drive a cache) for many tokens and judge whether memory stayed flat.

A bounded cache's promise is that memory stops growing once it is full; this benchmark samples a
long stream and compares its last reading with the one right after the first compaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ...cache.generation import StreamStats, cache_bytes, cache_slots, stream_tokens
from ...cache.memory import current_rss_bytes
from ...registry import default_method, method_spec
from .cache_update import REFERENCE, _build_cache
from .decode import _close, _make_cache
from .memory import (
    _cuda_allocated,
    _device_of,
    _dtype_bytes,
    _fresh_phase,
    _headroom,
    _sync,
    kv_bytes,
    model_geometry,
)
from .standins import CacheStandIn

__all__ = ["bench_cache_stream", "bench_stream"]


def _stream_sample(cache, produced: int, elapsed: float, interval_tokens: int, interval_s: float, device) -> dict:
    return {
        "tokens": produced,
        "seconds": elapsed,
        "tokens_per_s": interval_tokens / interval_s if interval_s > 0 else float("nan"),
        "cache_bytes": cache_bytes(cache),
        "cuda_allocated_bytes": _cuda_allocated(device),
        "rss_bytes": current_rss_bytes(),
        "num_slots": cache_slots(cache),
        "seen": int(cache.get_seq_length()),
    }


_MEMORY_KEYS = ("cache_bytes", "rss_bytes", "cuda_allocated_bytes")


class _StreamMonitor:
    """Samples a stream every ``interval`` tokens and judges whether its memory stayed flat.

    Two early readings are kept. ``filled`` is taken at the first token that overflows the cache
    (its first compaction is planned but not yet applied). ``reference`` is taken one token later,
    once that compaction has been applied: the first compaction is where a bounded cache does its
    one-off set-up work (the allocator's first large temporaries for moving and re-rotating slots,
    the plans of its compaction cycle), so the steady state starts there. The verdict compares the
    final reading with ``reference``; ratios against ``filled`` are reported beside it.
    """

    def __init__(self, cache, device, interval: int, tokens: int, tolerance: float,
                 on_sample: Callable[[dict], None] | None):
        self.cache, self.device = cache, device
        self.interval, self.tokens, self.tolerance = interval, tokens, tolerance
        self.on_sample = on_sample
        self.samples: list[dict] = []
        self.filled: dict | None = None
        self.reference: dict | None = None
        self.began = self.last_time = time.perf_counter()
        self.last_tokens = 0

    def _reading(self, produced: int) -> dict:
        now = time.perf_counter()
        return _stream_sample(self.cache, produced, now - self.began, produced, now - self.began, self.device)

    def step(self, produced: int) -> None:
        if self.filled is not None and self.reference is None:
            self.reference = self._reading(produced)
        if self.filled is None and self.cache.seen > self.cache.num_slots:
            self.filled = self._reading(produced)
        if produced % self.interval and produced < self.tokens:
            return
        _sync(self.device)
        now = time.perf_counter()
        sample = _stream_sample(self.cache, produced, now - self.began, produced - self.last_tokens,
                                now - self.last_time, self.device)
        self.samples.append(sample)
        if self.on_sample is not None:
            self.on_sample(sample)
        self.last_time, self.last_tokens = now, produced

    def verdict(self) -> dict:
        final = self.samples[-1]
        verdict: dict = {"tolerance": self.tolerance, "final_tokens": final["tokens"],
                         "reference_tokens": self.reference and self.reference["tokens"],
                         "filled_tokens": self.filled and self.filled["tokens"]}
        ok = self.reference is not None
        for key in _MEMORY_KEYS:
            if self.reference is not None and self.reference[key]:
                ratio = final[key] / self.reference[key]
                verdict[f"{key}_ratio"] = ratio
                ok = ok and abs(ratio - 1) <= self.tolerance
            if self.filled is not None and self.filled[key]:
                verdict[f"{key}_ratio_vs_filled"] = final[key] / self.filled[key]
        verdict["flat"] = bool(ok)
        return verdict

    def result(self) -> dict:
        return {"reference": self.reference, "filled": self.filled, "final": self.samples[-1],
                "verdict": self.verdict(), "samples": self.samples,
                "tokens_per_s": self.samples[-1]["tokens"] / (self.samples[-1]["seconds"] or float("nan"))}


def bench_stream(
    model,
    prompt_ids: torch.Tensor,
    tokens: int,
    budget: int = 512,
    interval: int | None = None,
    method: str | None = None,
    method_options: dict | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    tolerance: float = 0.01,
    on_sample: Callable[[dict], None] | None = None,
) -> dict:
    """Generate ``tokens`` tokens with a bounded cache and check that memory stays flat.

    Samples every ``interval`` tokens (default ``tokens // 50``, at least 100): tokens/s over the
    interval, ``cache.memory_bytes()``, CUDA allocated memory (on a GPU), process RSS and the cache's
    slots; the verdict compares the last sample with the reading once the cache's first compaction
    was applied (see ``_StreamMonitor``): each ratio must be within ``tolerance``. Nothing per
    token is kept. ``method`` defaults to the registry's default method.
    """
    method = default_method() if method is None else method
    if not method_spec(method).bounded:
        raise ValueError(f"method={method!r} keeps every token: the stream benchmark needs a bounded cache; "
                         f"e.g. method={default_method()!r}")
    if tokens < 2:
        raise ValueError(f"tokens={tokens} must be >= 2")
    interval = max(100, tokens // 50) if interval is None else int(interval)
    if interval < 1:
        raise ValueError(f"interval={interval} must be >= 1")
    device = _device_of(model)
    cache = _make_cache(method, model, budget, method_options)
    _fresh_phase(device)
    stream = stream_tokens(model, prompt_ids, cache, tokens, temperature=temperature, seed=seed,
                           stats=StreamStats(), sample_every=1 << 62)
    monitor = _StreamMonitor(cache, device, interval, tokens, tolerance, on_sample)
    produced = 0
    for _ in stream:
        produced += 1
        monitor.step(produced)
    geometry = model_geometry(model)
    result = {
        "method": method,
        "budget": budget,
        "tokens": produced,
        "interval": interval,
        "cache": cache.describe() if hasattr(cache, "describe") else {"cache": type(cache).__name__},
        "expected_cache_bytes": kv_bytes(geometry["layers"], geometry["kv_heads"], geometry["head_dim"],
                                         _dtype_bytes(model), budget + _headroom(cache)),
        **monitor.result(),
    }
    _close(cache)
    return result


def bench_cache_stream(
    tokens: int = 1_000_000,
    budget: int = 512,
    layers: int = 30,
    kv_heads: int = 3,
    head_dim: int = 64,
    method: str | None = None,
    interval: int | None = None,
    tolerance: float = 0.01,
    seed: int = 0,
    on_sample: Callable[[dict], None] | None = None,
) -> dict:
    """``bench_stream`` without a model: ``tokens`` one-token updates of every layer with random K/V.

    A million decode steps of even a tiny model take about an hour on a 2-core CPU (the model's own
    per-call overhead), while the cache's memory behaviour only depends on the updates it receives;
    this drives the cache the way decoding does (absolute positions, one token per step) at the
    cache's own speed. Same samples and verdict as ``bench_stream``; ``method`` (default: the
    registry's default method) is one of the cache-update benchmark's registry methods.
    """
    method = default_method() if method is None else method
    if tokens < 2:
        raise ValueError(f"tokens={tokens} must be >= 2")
    if method == REFERENCE:
        raise ValueError(f"method={method!r} is the cache-update benchmark's reference strategy, not a cache to "
                         f"stream; e.g. method={default_method()!r}")
    interval = max(100, tokens // 50) if interval is None else int(interval)
    stand_in = CacheStandIn(layers, kv_heads=kv_heads, head_dim=head_dim)
    cache = _build_cache(method, stand_in, budget)
    gen = torch.Generator().manual_seed(seed)
    pool = 16
    new_k = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen)
    new_v = torch.randn(pool, 1, kv_heads, 1, head_dim, generator=gen)
    monitor = _StreamMonitor(cache, torch.device("cpu"), interval, tokens, tolerance, on_sample)
    for produced in range(1, tokens + 1):
        pos = torch.tensor([[produced - 1]])
        k, v = new_k[produced % pool], new_v[produced % pool]
        for layer in range(layers):
            cache.update(k, v, layer, position_ids=pos)
        monitor.step(produced)
    return {
        "method": method, "budget": budget, "tokens": tokens, "interval": interval, "driver": "cache-only",
        "shape": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim},
        "cache": cache.describe(),
        "expected_cache_bytes": kv_bytes(layers, kv_heads, head_dim, 4, budget + _headroom(cache)),
        **monitor.result(),
    }

