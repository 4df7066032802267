"""Chunked prefill of a long prompt through a bounded cache, against the computed size of a full cache.

Shows that a prompt far past the trained context can be read in bounded memory: the full cache's
size is computed from the model's shape, never allocated.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ...cache.generation import cache_bytes, cache_slots, next_positions, prefill_passes
from ...cache.memory import current_rss_bytes
from ...registry import default_method
from .decode import _budget, _close, _make_cache
from .memory import (
    _cuda_allocated,
    _device_of,
    _dtype_bytes,
    _fresh_phase,
    _sync,
    kv_bytes,
    model_geometry,
    peak_rss_since_reset,
)

__all__ = ["bench_prefill"]


@torch.no_grad()
def bench_prefill(
    model,
    input_ids: torch.Tensor,
    budget: int = 512,
    prefill_chunk: int = 512,
    method: str | None = None,
    method_options: dict | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Feed ``input_ids`` in chunks of ``prefill_chunk`` through a cache, as ``stream_tokens`` does (a bounded
    cache's passes also end at its compaction points: ``generation.prefill_passes``).

    Each chunk is positioned after the cache's slots and only its last logit is computed. One row per
    chunk: tokens so far, tokens/s of the chunk and overall, process RSS, cache bytes, CUDA memory.
    The summary adds the run's peak RSS (high-water mark of this phase), CUDA peak, and the bytes a
    full cache would need for the whole prompt (``kv_bytes``, computed, never allocated).
    ``method`` defaults to the registry's default method; the unbounded one (``full``) runs a
    ``DynamicCache`` the same way (only sensible within the trained context).
    """
    method = default_method() if method is None else method
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 1")
    device = _device_of(model)
    input_ids = input_ids.to(device)
    total = int(input_ids.shape[1])
    cache = _make_cache(method, model, budget, method_options)
    _fresh_phase(device)
    rss_before = current_rss_bytes()
    rows = []
    began = time.perf_counter()
    for start, length in prefill_passes(cache, total, prefill_chunk):
        piece = input_ids[:, start : start + length]
        t0 = time.perf_counter()
        model(input_ids=piece, position_ids=next_positions(cache, piece.shape[1], device), cache=cache,
              logits_to_keep=1)
        _sync(device)
        now = time.perf_counter()
        done = start + piece.shape[1]
        row = {
            "tokens": done,
            "chunk_tokens_per_s": piece.shape[1] / (now - t0),
            "tokens_per_s": done / (now - began),
            "seconds": now - began,
            "rss_bytes": current_rss_bytes(),
            "cache_bytes": cache_bytes(cache),
            "cache_slots": cache_slots(cache),
            "cuda_allocated_bytes": _cuda_allocated(device),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    seconds = time.perf_counter() - began
    geometry = model_geometry(model)
    dtype_bytes = _dtype_bytes(model)
    cuda = torch.device(device).type == "cuda"
    summary = {
        "method": method,
        "budget": _budget(method, budget),
        "prefill_chunk": prefill_chunk,
        "tokens": total,
        "seconds": seconds,
        "tokens_per_s": total / seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss_since_reset(),
        "cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "cache_bytes": rows[-1]["cache_bytes"],
        "cache_slots": rows[-1]["cache_slots"],
        "full_cache_bytes": kv_bytes(geometry["layers"], geometry["kv_heads"], geometry["head_dim"], dtype_bytes,
                                     total),
        "trained_context": geometry["trained_context"],
        "beyond_trained_context": bool(geometry["trained_context"] and total > geometry["trained_context"]),
        **{k: geometry[k] for k in ("layers", "kv_heads", "head_dim")},
        "dtype_bytes": dtype_bytes,
    }
    _close(cache)
    del cache
    _fresh_phase(device)
    return {"summary": summary, "rows": rows}

