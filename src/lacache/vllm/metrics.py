"""Prometheus metrics of the vLLM plugin: what compaction does inside a serving engine.

* ``lacache_compactions_total`` (counter): compactions run, one per request each time it overflows
  its budget;
* ``lacache_evicted_tokens_total`` (counter): tokens those compactions dropped, per layer: the sum of
  every request's ``seen - slots`` (logical tokens minus the slots it holds);
* ``lacache_moved_slot_layers_total`` (counter): slots rewritten by compaction, counted once per
  layer they move in (a slot moved in every layer of a 30-layer model counts 30);
* ``lacache_held_slots`` (gauge): KV slots per layer held by the running requests, summed over them,
  as of the engine's latest step;
* ``lacache_reused_requests_total`` / ``lacache_reused_tokens_total`` (counters): requests that took
  over a finished request's compacted cache (a chat's next turn, ``reuse``), and the tokens they did
  not recompute;
* ``lacache_kept_caches`` / ``lacache_kept_blocks`` (gauges): finished requests' caches kept for a
  continuation, and the KV blocks they hold (given back to the pool whenever a request needs them;
  recorded by the scheduler after each step).

The worker (``worker.WorkerState``) records the rest. With tensor parallelism every rank compacts
its own heads, so only tensor-parallel rank 0 records: a compaction counts once. With pipeline
parallelism each stage moves its own layers: every stage's rank 0 adds the slot-layers it moved, and
the first stage alone counts compactions, evicted tokens and held slots. Each data-parallel engine
counts its own requests; the gauge is summed over live processes (``multiprocess_mode="livesum"``).

``prometheus_client`` is imported on first use, not with this module, and the metrics are built
then; without it (or if it cannot write its files) every function here does nothing, and serving
goes on.

Where the numbers appear. The worker runs in vLLM's engine-core process (or its own worker
process), never in the API server that answers ``/metrics``. vLLM's server merges the metrics of
all processes only in prometheus_client's multiprocess mode, which prometheus_client switches on
from the environment variable ``PROMETHEUS_MULTIPROC_DIR`` *when it is first imported*:

* ``lacache serve`` does it for you (a fresh temporary directory, removed when the server exits;
  see :func:`multiprocess_dir`).
* plain ``vllm serve`` / ``python -m vllm.entrypoints.openai.api_server`` with
  ``--additional-config '{"lacache": {...}}'``: export ``PROMETHEUS_MULTIPROC_DIR`` to a new, empty
  directory before starting the server (``export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)``), and
  wipe or replace it between runs, or old counts add up. Without it vLLM's ``/metrics`` shows its
  own metrics only: vLLM sets the variable itself only when it runs several API servers.
* ``vllm.LLM``: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (everything in one process) the metrics
  are in ``prometheus_client.REGISTRY`` (``prometheus_client.generate_latest()``); otherwise set
  ``PROMETHEUS_MULTIPROC_DIR`` before importing vLLM and read them with
  ``prometheus_client.multiprocess.MultiProcessCollector(prometheus_client.CollectorRegistry())``.
  ``LLM.get_metrics()`` lists only vLLM's own ``vllm:`` metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator

__all__ = ["COMPACTIONS", "EVICTED_TOKENS", "MOVED_SLOT_LAYERS", "HELD_SLOTS", "REUSED_REQUESTS", "REUSED_TOKENS", "KEPT_CACHES", "KEPT_BLOCKS",
           "MULTIPROC_ENV", "record_compaction", "record_held_slots", "record_reuse",
           "multiprocess_dir"]

logger = logging.getLogger("lacache.vllm")

#: metric names as scraped (counters get ``_total`` from prometheus_client)
COMPACTIONS = "lacache_compactions"
EVICTED_TOKENS = "lacache_evicted_tokens"
MOVED_SLOT_LAYERS = "lacache_moved_slot_layers"
HELD_SLOTS = "lacache_held_slots"
REUSED_REQUESTS = "lacache_reused_requests"
REUSED_TOKENS = "lacache_reused_tokens"
KEPT_CACHES = "lacache_kept_caches"
KEPT_BLOCKS = "lacache_kept_blocks"
#: the variable that puts prometheus_client in multiprocess mode (read when it is first imported)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_metrics: dict | None = None
_disabled = False
#: each request's ``evicted`` at its last compaction (a recomputed request gets a new RequestSlots)
_evicted_before: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: this worker's (tensor-parallel, pipeline-parallel) ranks, once vLLM's groups answered (they never change)
_rank_cache: tuple[int, int] | None = None


def _build() -> dict | None:
    """The four metrics, built once per process; None (for good) without a working prometheus_client."""
    global _metrics, _disabled
    if _disabled:
        return None
    if _metrics is not None:
        return _metrics
    try:
        import prometheus_client as prom

        _metrics = {
            COMPACTIONS: _metric(prom.Counter, COMPACTIONS, "Compactions of a request's KV cache by lacache"),
            EVICTED_TOKENS: _metric(prom.Counter, EVICTED_TOKENS,
                                    "Tokens dropped from requests' KV caches by lacache's compactions (per layer)"),
            MOVED_SLOT_LAYERS: _metric(prom.Counter, MOVED_SLOT_LAYERS,
                                       "KV slots rewritten by lacache's compactions, counted once per layer"),
            HELD_SLOTS: _metric(prom.Gauge, HELD_SLOTS,
                                "KV slots per layer held by running requests under lacache (sum over requests)",
                                multiprocess_mode="livesum"),
            REUSED_REQUESTS: _metric(prom.Counter, REUSED_REQUESTS,
                                     "Requests that continued a finished request's compacted KV cache (lacache reuse)"),
            REUSED_TOKENS: _metric(prom.Counter, REUSED_TOKENS,
                                   "Tokens not recomputed because a request continued a kept lacache cache"),
            KEPT_CACHES: _metric(prom.Gauge, KEPT_CACHES,
                                 "Finished requests' compacted caches kept for a continuation (lacache reuse)",
                                 multiprocess_mode="livesum"),
            KEPT_BLOCKS: _metric(prom.Gauge, KEPT_BLOCKS,
                                 "KV blocks held by kept caches (given back whenever a request needs them)",
                                 multiprocess_mode="livesum"),
        }
    except ImportError:
        _disabled = True
    except Exception as err:  # e.g. PROMETHEUS_MULTIPROC_DIR names a folder that is gone: serve without metrics
        _disabled = True
        logger.warning("lacache: metrics off: %s", err)
    return _metrics


def _metric(kind, name: str, documentation: str, **kwargs):
    """A metric in the default registry, or the one of that name already there (a module imported twice)."""
    from prometheus_client import REGISTRY

    try:
        return kind(name, documentation, **kwargs)
    except ValueError:  # "Duplicated timeseries": registered before in this process
        existing = REGISTRY._names_to_collectors.get(name)
        if existing is None:
            raise
        return existing


def _ranks() -> tuple[int, int]:
    """(tensor-parallel rank, pipeline-parallel rank) of this worker; (0, 0) outside a vLLM worker.

    Asked at every step (``record_held_slots``), so the answer is kept once vLLM's groups give it."""
    global _rank_cache
    if _rank_cache is not None:
        return _rank_cache
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        _rank_cache = (0, 0)
        return _rank_cache
    try:
        _rank_cache = (int(parallel_state.get_tensor_model_parallel_rank()),
                       int(parallel_state.get_pipeline_model_parallel_rank()))
    except AssertionError:  # no parallel groups (yet): a test's runner, not an engine's; ask again next time
        return 0, 0
    return _rank_cache


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """Metrics never stop a step: the first failure is logged and switches them off."""
    global _disabled
    try:
        yield
    except Exception as err:
        _disabled = True
        logger.warning("lacache: metrics off after an error: %s", err)


def record_compaction(slots, moved_slot_layers: int) -> None:
    """One compaction of the request ``slots`` (its ``RequestSlots``, already compacted) that moved
    ``moved_slot_layers`` slots, summed over this worker's layers."""
    metrics = _build()
    if metrics is None:
        return
    with _guard():
        tp_rank, pp_rank = _ranks()
        if tp_rank != 0:
            return
        metrics[MOVED_SLOT_LAYERS].inc(moved_slot_layers)
        if pp_rank != 0:
            return
        evicted = int(slots.evicted)
        dropped = evicted - _evicted_before.get(slots, 0)
        _evicted_before[slots] = evicted
        metrics[COMPACTIONS].inc()
        if dropped > 0:
            metrics[EVICTED_TOKENS].inc(dropped)


def record_held_slots(held: int) -> None:
    """The slots per layer this engine's running requests hold now."""
    metrics = _build()
    if metrics is None:
        return
    with _guard():
        if _ranks() == (0, 0):
            metrics[HELD_SLOTS].set(held)


def record_reuse(tokens: int) -> None:
    """A request took over a kept cache of ``tokens`` tokens instead of computing them."""
    metrics = _build()
    if metrics is None:
        return
    with _guard():
        if _ranks() == (0, 0):
            metrics[REUSED_REQUESTS].inc()
            metrics[REUSED_TOKENS].inc(tokens)


def record_kept(caches: int, blocks: int) -> None:
    """The scheduler's kept caches and the blocks they hold, after each step (the scheduler is one process)."""
    metrics = _build()
    if metrics is None:
        return
    with _guard():
        metrics[KEPT_CACHES].set(caches)
        metrics[KEPT_BLOCKS].set(blocks)


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[str | None]:
    """Put prometheus_client in multiprocess mode for this process and its children: ``PROMETHEUS_MULTIPROC_DIR``
    set to a new temporary directory, removed (and the variable restored) on leaving.

    Enter it before vLLM or prometheus_client is imported. A variable the user set already is left
    alone (theirs to wipe), and so is a process that imported prometheus_client earlier (too late to
    switch; a warning says so); the context then yields None.
    """
    import sys

    if os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()):
        yield None
        return
    if "prometheus_client" in sys.modules:
        logger.warning("lacache: prometheus_client was imported before %s was set; lacache's metrics will not "
                       "reach /metrics", MULTIPROC_ENV)
        yield None
        return
    folder = tempfile.mkdtemp(prefix="lacache-prometheus-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield folder
    finally:
        if os.environ.get(MULTIPROC_ENV) == folder:
            del os.environ[MULTIPROC_ENV]
        shutil.rmtree(folder, ignore_errors=True)
