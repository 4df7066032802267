"""The transformers ``Cache`` side of lacache, as small parts with one job each.

* ``storage``   — ``SlotLayer``: one layer's buffer, deferred compaction, token index;
* ``positions`` — the position-shift strategies (none / rotate on read / stored rotation);
* ``padded``    — left-padded batches: one single-row cache per sequence, and its decoder hook;
* ``bounded``   — ``BoundedCache``: the thin container that dispatches to its layers and policy;
* ``methods``   — the user-facing classes and their ``from_model`` builders.
"""

from .bounded import POSITION_MODES, BoundedCache
from .classes import H2OCache, KNormCache, LaCache, StreamingLLMCache, TOVACache, build_bounded_cache
from .storage import SlotLayer

__all__ = ["BoundedCache", "LaCache", "StreamingLLMCache", "TOVACache", "H2OCache", "KNormCache", "SlotLayer",
           "POSITION_MODES", "build_bounded_cache"]
