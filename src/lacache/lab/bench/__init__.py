"""Performance benchmarks: decode speed, memory, constant-memory streams, cache updates, chunked prefill.

Every benchmark is a pure function returning rows (dicts of plain numbers and strings) that the
``lacache bench`` command (:mod:`lacache.cli.bench`) prints as tables and writes as CSV/JSON, plus
a ``plot_*`` function drawing a PNG. Keeping them free of the command line lets tests and notebooks
call them directly:

* :func:`bench_decode` (:mod:`.decode`) — decode ms/token in windows of generated tokens, with
  cache bytes and process RSS at each window end (the ``decode`` and ``memory`` benchmarks share one run);
* :func:`bench_stream` / :func:`bench_cache_stream` (:mod:`.stream`) — a continuous stream at
  constant memory, sampled at intervals, with the verdict "memory after N tokens vs memory once
  the cache first filled";
* :func:`bench_cache_update` (:mod:`.cache_update`) — time per token spent inside ``cache.update``
  over all layers, on synthetic keys/values, against :class:`ReferenceLadderCache` (the reference
  implementation's per-step strategy, re-implemented in :mod:`.reference`) and StreamingLLM;
* :func:`bench_prefill` (:mod:`.prefill`) — chunked prefill of a long prompt, against the computed
  size of a full cache.

Memory is read (:mod:`.memory`) from the process (RSS, and its high-water mark reset per phase
through ``/proc/self/clear_refs``), from the cache (``memory_bytes``) and from CUDA when on a GPU.
Models that need no download are in :mod:`.standins`, prompts in :mod:`.prompts`, plots in
:mod:`.plots`; :mod:`.report` turns rows into the result documents (``kind`` ``bench.<name>``),
files and printed tables that ``lacache bench`` leaves.
"""

from __future__ import annotations

from ...cache.generation import cache_bytes
from .authors_mechanics import ReferenceLadderCache
from .cache_update import (
    LADDER_STEP,
    PSEUDO_METHODS,
    REFERENCE,
    bench_cache_update,
    cache_configurations,
    cache_methods,
    cache_summary,
    default_cache_methods,
)
from .decode import DECODE_METHODS, bench_decode, decode_summary
from .memory import kv_bytes, model_geometry, peak_rss_since_reset, reset_peak_rss
from .plots import plot_cache, plot_decode, plot_memory, plot_prefill, plot_stream
from .prefill import bench_prefill
from .standins import CacheStandIn, tiny_model
from .stream import bench_cache_stream as bench_cache_stream  # importable, though not in today's __all__
from .stream import bench_stream

__all__ = [
    "DECODE_METHODS",
    "LADDER_STEP",
    "PSEUDO_METHODS",
    "REFERENCE",
    "CacheStandIn",
    "ReferenceLadderCache",
    "bench_cache_update",
    "bench_decode",
    "bench_prefill",
    "bench_stream",
    "cache_bytes",
    "cache_configurations",
    "cache_methods",
    "cache_summary",
    "decode_summary",
    "default_cache_methods",
    "kv_bytes",
    "model_geometry",
    "peak_rss_since_reset",
    "plot_cache",
    "plot_decode",
    "plot_memory",
    "plot_prefill",
    "plot_stream",
    "reset_peak_rss",
    "tiny_model",
]
