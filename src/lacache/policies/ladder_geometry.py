"""Pure slot arithmetic for ladder-shaped KV caches: the ladder's geometry and one compaction.

Everything here works on slot *indices* only: which slots each layer keeps when the cache is
compacted. No tensors and no transformers, so the rules can be checked exhaustively (the property
tests in ``tests/test_ladder.py``) and reused by every storage backend. The plan objects built
from these indices, and the policies that keep state between compactions, live in
``lacache.policies``; the vocabulary is explained in ``docs/method.md`` §1.

Vocabulary:

* ``L`` layers, each holding the same number of slots ``n``;
* ``S`` sink slots at the front and a recent window of ``W`` slots at the back are never compacted;
* a *rung* is ``B`` consecutive body slots; in a rung, layer ``l`` keeps the ``A`` slots starting
  at offset ``o(l)``, so different layers keep different tokens but the same *number* of them;
* a *cursor* ``c`` marks the next body slot to compact; when the next rung would reach into the
  recent window the pass is over and the cursor goes back to ``S``: older history is compacted
  again and gets sparser, while the total never grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checks import is_integer

__all__ = [
    "LadderGeometry",
    "default_span_overlap",
    "ladder_geometry",
    "ladder_compaction",
    "check_room",
    "LAYOUTS",
]

LAYOUTS = ("ladder", "band")


@dataclass(frozen=True)
class LadderGeometry:
    """The shape of one ladder: rung width, slots kept per rung, and each layer's offset."""

    num_layers: int
    span: int
    overlap: int
    rung: int  # B
    keep: int  # A
    layout: str
    offsets: tuple[int, ...]
    #: consecutive slots laddered as one unit (1: the paper's ladder); rung, keep and offsets count slots
    group: int = 1

    @property
    def freed_per_rung(self) -> int:
        """Slots each compacted rung frees in every layer (``B - A``)."""
        return self.rung - self.keep

    @property
    def keep_ratio(self) -> float:
        return self.keep / self.rung


def default_span_overlap(num_layers: int) -> tuple[int, int]:
    """Span/overlap defaults by model depth.

    Deep models (>= 28 layers) follow the reference's Llama settings: span ``L // 2``, overlap 0
    (32 layers -> 16/0, 28 -> 14/0: rungs of two slots, alternate layers keep alternate tokens).
    Shallower models follow its SmolLM2-1.7B setting scaled by depth: span ``round(3L/8)``,
    overlap ``span - 2`` (24 layers -> 9/7). A single layer cannot form a ladder at all.
    """
    if num_layers < 2:
        raise ValueError(
            f"num_layers={num_layers}: a ladder needs at least 2 layers; use StreamingLLMCache for 1-layer models"
        )
    if num_layers >= 28:
        return num_layers // 2, 0
    span = max(1, round(3 * num_layers / 8))
    return span, max(0, span - 2)


def _rung_and_keep(num_layers: int, span: int, overlap: int) -> tuple[int, int]:
    step = span - overlap
    rung = 1 + math.ceil((num_layers - span) / step)
    keep = min(math.ceil(span / step), rung)
    return rung, keep


def _working_span_overlap(num_layers: int) -> str:
    options = []
    for span in range(1, num_layers + 1):
        for overlap in range(span):
            b, a = _rung_and_keep(num_layers, span, overlap)
            if b > a:
                options.append((span, overlap))
    if not options:
        return "none exists for this depth"
    default = default_span_overlap(num_layers) if num_layers >= 2 else options[0]
    return f"e.g. span={default[0]}, overlap={default[1]}"


def ladder_geometry(num_layers: int, span: int, overlap: int, layout: str = "ladder", group: int = 1) -> LadderGeometry:
    """Validate ``span``/``overlap`` for ``num_layers`` layers and derive the ladder.

    The rung width is ``B = 1 + ceil((L - span) / (span - overlap))`` and each layer keeps
    ``A = min(ceil(span / (span - overlap)), B)`` slots of a rung (docs/method.md §1, "Geometry").
    ``layout="ladder"`` staggers offsets with period ``B - A + 1`` (the reference pattern);
    ``layout="band"`` gives each offset to a contiguous band of layers (an ablation).

    ``group=g`` ladders runs of ``g`` consecutive slots instead of single slots: a rung is ``B * g``
    slots and a layer keeps or drops whole runs, so a fact of up to ``g`` tokens that falls inside
    one run survives whole in the layers that keep it (docs/method.md, "Group ladder").
    """
    if not is_integer(group) or group < 1:
        raise ValueError(f"group={group!r} must be a positive integer (slots per ladder unit), e.g. group=1")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}; use layout='ladder'")
    if not 1 <= span <= num_layers:
        raise ValueError(
            f"span={span} must be between 1 and the number of layers ({num_layers}); "
            f"{_working_span_overlap(num_layers)}"
        )
    if not 0 <= overlap < span:
        raise ValueError(
            f"overlap={overlap} must satisfy 0 <= overlap < span={span}; e.g. overlap={max(0, span - 2)}"
        )
    rung, keep = _rung_and_keep(num_layers, span, overlap)
    if rung <= keep:
        raise ValueError(
            f"span={span}, overlap={overlap} with {num_layers} layers gives rungs of {rung} slots keeping {keep}: "
            f"the ladder cannot compress; {_working_span_overlap(num_layers)}"
        )
    period = rung - keep + 1
    if layout == "ladder":
        offsets = tuple(layer % period for layer in range(num_layers))
    else:
        offsets = tuple(layer * period // num_layers for layer in range(num_layers))
    return LadderGeometry(num_layers, span, overlap, rung * group, keep * group, layout,
                          tuple(o * group for o in offsets), group)


def check_room(n_target: int, sinks: int, window: int, rung: int) -> None:
    """Refuse a target that leaves no room for one rung between the sinks and the recent window."""
    if n_target - sinks - window < rung - 1:
        raise ValueError(
            f"target of {n_target} slots leaves no room for a rung of {rung} between {sinks} sinks and a "
            f"recent window of {window}: need target >= sinks + window + rung - 1 = {sinks + window + rung - 1}"
        )


def ladder_compaction(
    geometry: LadderGeometry, n: int, cursor: int, target: int, sinks: int, window: int
) -> tuple[np.ndarray, int, tuple[int, ...]]:
    """Compact ``n`` slots down to at most ``target`` by laddering rungs from ``cursor``.

    Returns ``(index, cursor, passes_started)``: ``index[l]`` lists the slots layer ``l`` keeps, in
    slot order (``[1, n]`` when nothing needs compacting), ``cursor`` is where the next compaction
    starts, and ``passes_started`` the slot where each pass begun here started (always the first
    non-sink slot). Rungs are taken in batches (as many as are needed and fit before the recent
    window) and each batch is one vectorised step, so a prompt many times the budget costs a few
    passes, not one Python iteration per rung.
    """
    if n <= target:
        return np.arange(n, dtype=np.int64)[None, :], cursor, ()
    big_b, small_a = geometry.rung, geometry.keep
    check_room(target, sinks, window, big_b)
    num_layers = geometry.num_layers
    offsets = np.asarray(geometry.offsets, dtype=np.int64)
    within = (offsets[:, None] + np.arange(small_a, dtype=np.int64)[None, :])  # [L, A]
    index = np.broadcast_to(np.arange(n, dtype=np.int64), (num_layers, n))
    m, c = n, cursor
    starts: list[int] = []
    while m > target:
        if c < sinks or c + big_b > m - window:
            c = sinks
            starts.append(c)
        available = (m - window - c) // big_b
        needed = -(-(m - target) // (big_b - small_a))
        r = min(available, needed)
        rung_starts = c + big_b * np.arange(r, dtype=np.int64)  # [r]
        body = (rung_starts[None, :, None] + within[:, None, :]).reshape(num_layers, r * small_a)
        keep = np.concatenate(
            [
                np.broadcast_to(np.arange(c, dtype=np.int64), (num_layers, c)),
                body,
                np.broadcast_to(np.arange(c + r * big_b, m, dtype=np.int64), (num_layers, m - c - r * big_b)),
            ],
            axis=1,
        )
        index = np.take_along_axis(index, keep, axis=1)
        m -= r * (big_b - small_a)
        c += r * small_a
    return np.ascontiguousarray(index), c, tuple(starts)
