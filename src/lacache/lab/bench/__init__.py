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

import importlib

#: public name -> the module that defines it; imported on first use, so that the command line's
#: parser (which reads the method names) does not wait for torch
_WHERE = {
    'cache_bytes': 'lacache.cache.generation',
    'ReferenceLadderCache': '.authors_mechanics',
    'LADDER_STEP': '.method_names',
    'PSEUDO_METHODS': '.method_names',
    'REFERENCE': '.method_names',
    'bench_cache_update': '.cache_update',
    'cache_configurations': '.cache_update',
    'cache_methods': '.method_names',
    'cache_summary': '.cache_update',
    'default_cache_methods': '.method_names',
    'DECODE_METHODS': '.decode',
    'bench_decode': '.decode',
    'decode_summary': '.decode',
    'kv_bytes': '.memory',
    'model_geometry': '.memory',
    'peak_rss_since_reset': '.memory',
    'reset_peak_rss': '.memory',
    'plot_cache': '.plots',
    'plot_decode': '.plots',
    'plot_memory': '.plots',
    'plot_prefill': '.plots',
    'plot_stream': '.plots',
    'bench_prefill': '.prefill',
    'CacheStandIn': '.standins',
    'tiny_model': '.standins',
    'bench_stream': '.stream',
    'bench_cache_stream': '.stream',
}


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


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
