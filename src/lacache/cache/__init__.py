"""The transformers backend: a bounded ``Cache`` and the loops that drive it, as small parts with one job each.

* ``storage``   — ``SlotLayer``: one layer's buffer, deferred compaction, token index;
* ``positions`` — the position-shift strategies (none / rotate on read / stored rotation);
* ``padded``    — left-padded batches: one single-row cache per sequence, and its decoder hook;
* ``bounded``   — ``BoundedCache``: the thin container that dispatches to its layers and policy;
* ``attach``    — the model's hooks, one set per model shared by its caches;
* ``observe``   — a cache's observed queries, for rules that read attention;
* ``classes``   — ``build_cache`` (any registry method) and the user-facing classes (``LaCache``, ...);
* ``generation``, ``hub_generate``, ``compat`` — lacache's own streaming loop, ``custom_generate``, and
  the transformers versions it supports.
"""

from .bounded import POSITION_MODES, BoundedCache
from .classes import (
    H2OCache,
    KeyDiffCache,
    KNormCache,
    LaCache,
    ModelCache,
    StreamingLLMCache,
    TOVACache,
    build_bounded_cache,
    build_cache,
)
from .storage import SlotLayer

__all__ = ["BoundedCache", "ModelCache", "build_cache", "LaCache", "StreamingLLMCache", "TOVACache", "H2OCache",
           "KNormCache", "KeyDiffCache", "SlotLayer", "POSITION_MODES", "build_bounded_cache"]
