"""The LaCache authors' own compaction schedule, as slot arithmetic (``schedule="reference"``).

The ladder's geometry (rung ``B``, ``A`` slots kept per rung, layer ``l`` at offset
``l % (B - A + 1)``) is the same as lacache's own schedule (``lacache.policies.ladder_geometry``); what differs is
*when* and *where* rungs are taken. Their released code does it this way (read from their
``kv_cache.py``; written again here from that reading):

* **Capacity.** The cache is compacted when it holds more than ``C`` slots. The first time that
  happens ``C`` grows by ``floor(R / 2)`` (``R = B - A``, the slots a rung frees) and stays there,
  so the cache holds between ``C + floor(R/2) - R + 1`` and ``C + floor(R/2)`` slots afterwards,
  on average about ``C`` (one-slot rungs, ``R = 1``, change nothing).
* **Recent window.** A compaction takes ``ceil(need / R)`` rungs from the cursor, where ``need``
  is how far the cache is over ``C``, provided the cursor stays at or below ``C - L`` (``L`` the
  number of layers) once those rungs are compacted: the newest ``L``-odd slots are never touched.
* **Start over.** When that does not free enough, the pass is finished with every rung that still
  fits, and compaction starts again from the sinks with rungs ``t`` times as wide as needed:
  ``B' = B + (t - 1)(B - 1)`` slots of which each layer keeps ``A``, ``t`` apart, where ``t`` is
  how many whole passes the rest of the overflow would take. Decoding starts over once per pass
  (``t = 1``); a long prompt compacted in one call does it once with wide rungs, which keeps the
  oldest part evenly sparse instead of repeating normal passes.

Two departures, where their code breaks (documented in docs/method.md):

* With ``A > 1`` and ``t > 1`` their wide rungs let a layer's offset run past its rung, so the last
  rung stores tokens twice or out of order; here offsets are taken modulo ``t * R + 1``, the largest
  period that keeps all ``A`` slots of a layer inside its rung. Wherever their offsets stay inside,
  both periods give the same offsets.
* When the wide rungs would reach past the cache (their ``IndexError``), ``t`` is raised until they
  fit. Nothing else changes: where their code runs correctly, this gives the same slots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .ladder_geometry import LadderGeometry

__all__ = ["ReferenceState", "reference_compaction", "reference_min_budget"]


@dataclass(frozen=True)
class ReferenceState:
    """What the reference schedule carries from one compaction to the next."""

    capacity: int  # C: slots the cache may hold before it compacts (raised once, at the first overflow)
    cursor: int  # the next body slot to compact
    compensated: bool = False  # whether C already got its floor(R / 2)

    @classmethod
    def start(cls, budget: int, sinks: int) -> "ReferenceState":
        return cls(budget, sinks, False)


def reference_min_budget(geometry: LadderGeometry, sinks: int) -> int:
    """The smallest budget with room for one rung between the sinks and the ``L``-slot recent window."""
    return sinks + geometry.num_layers + geometry.keep


def _rungs(start: int, count: int, width: int, keep: int, stride: int, period: int, layers: int) -> np.ndarray:
    """``[layers, count * keep]``: in each rung of ``width`` slots from ``start``, layer ``l`` keeps
    ``keep`` slots ``stride`` apart from offset ``l % period``."""
    offsets = np.arange(layers, dtype=np.int64) % period
    within = offsets[:, None] + stride * np.arange(keep, dtype=np.int64)[None, :]  # [L, A]
    starts = start + width * np.arange(count, dtype=np.int64)  # [count]
    return (starts[None, :, None] + within[:, None, :]).reshape(layers, count * keep)


def _pass(n: int, start: int, count: int, width: int, keep: int, stride: int, period: int, layers: int):
    """Keep ``[0, start)``, the rungs, then ``[start + count * width, n)``: ``[layers, m]``."""
    head = np.broadcast_to(np.arange(start, dtype=np.int64), (layers, start))
    tail_start = start + count * width
    tail = np.broadcast_to(np.arange(tail_start, n, dtype=np.int64), (layers, max(0, n - tail_start)))
    return np.concatenate([head, _rungs(start, count, width, keep, stride, period, layers), tail], axis=1)


def reference_compaction(
    geometry: LadderGeometry, n: int, state: ReferenceState, sinks: int
) -> tuple[np.ndarray, ReferenceState, tuple[int, ...]]:
    """One call of the reference schedule on ``n`` slots.

    Returns ``(index, state, passes_started)`` like ``ladder_compaction``: ``index[l]`` lists the
    slots layer ``l`` keeps in slot order (``[1, n]`` when nothing is compacted), the state to carry
    to the next call, and the slot where each pass begun here started.
    """
    identity = np.arange(n, dtype=np.int64)[None, :]
    if n <= state.capacity:
        return identity, state, ()
    big_b, small_a, layers = geometry.rung, geometry.keep, geometry.num_layers
    freed = big_b - small_a  # R
    if not state.compensated:
        state = replace(state, capacity=state.capacity + freed // 2, compensated=True)
    capacity, cursor = state.capacity, state.cursor
    need = n - capacity
    if need <= 0:
        return identity, state, ()
    room = capacity - cursor - layers  # body slots this pass may still fill before the recent window
    first_rungs = max(0, room // small_a)
    if need <= first_rungs * freed:  # this pass can free it all
        count = -(-need // freed)
        index = _pass(n, cursor, count, big_b, small_a, 1, freed + 1, layers)
        return index, replace(state, cursor=cursor + count * small_a), ()
    # finish the pass with every rung that fits, then start over from the sinks with wider rungs
    first = _pass(n, cursor, first_rungs, big_b, small_a, 1, freed + 1, layers)
    m = first.shape[1]
    left = m - capacity
    per_pass = ((capacity - sinks - layers) // small_a) * freed
    widen = -(-left // per_pass)  # t
    while True:
        width = big_b + (widen - 1) * (big_b - 1)  # B'
        count = -(-left // (width - small_a))
        period = widen * freed + 1
        last = sinks + width * (count - 1) + min(layers - 1, period - 1) + widen * (small_a - 1)
        if last < m:
            break
        widen += 1  # their code reads past the cache here (IndexError); wider rungs fit
    second = _pass(m, sinks, count, width, small_a, widen, period, layers)
    index = np.take_along_axis(first, second, axis=1)
    return np.ascontiguousarray(index), replace(state, cursor=sinks + count * small_a), (sinks,)
