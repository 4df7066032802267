"""The LaCache authors' per-step strategy, re-implemented so the cache microbenchmark has a baseline.

It keeps the same tokens as ``LaCache(schedule="capped", chunk=0)`` (checked by the tests) but with the
reference implementation's mechanics, so timing the two isolates what the mechanics cost.
"""

from __future__ import annotations

import torch
from torch import nn

from ...policies.ladder_geometry import default_span_overlap, ladder_geometry

__all__ = ["ReferenceLadderCache"]


class ReferenceLadderCache:
    """The per-step strategy of the LaCache authors' public implementation, re-implemented for timing.

    That implementation keeps a list of per-layer key/value tensors (a ``DynamicCache``) and, per
    generated token:

    1. appends the new key/value to each layer by concatenation (a fresh allocation every step);
    2. stores keys *un-rotated* and, in each attention layer, rotates every cached key to its slot
       position ``0..n-1`` (a precomputed cos/sin table, ``k * cos + rotate_half(k) * sin``) before
       attention — the whole cache is rotated at every step;
    3. after the forward, whenever a layer holds more than the budget, builds each layer's keep-index
       list in Python — sinks and history before the cursor, then, rung by rung of ``B`` slots, the
       ``A`` slots starting at offset ``i % (B - A + 1)`` for layer ``i``, then everything after the
       compacted rungs up to the recent tokens — turns it into an index tensor and gathers keys and
       values of every layer into new tensors.

    The ladder schedule (cursor, wrap-around to the sinks when a rung would reach the recent window,
    ``B``/``A`` from :func:`lacache.policies.ladder_geometry.ladder_geometry`) is the same as LaCache's with no salient
    pool and no chunking, so both keep the same tokens (``tests/test_bench.py`` checks it); only the
    mechanics differ. ``track_tokens`` records which original token each slot holds (off for timing).
    """

    def __init__(self, rotary_emb: nn.Module, num_layers: int, budget: int, span: int | None = None,
                 overlap: int | None = None, sinks: int = 4, window: int | None = None, track_tokens: bool = False):
        if span is None or overlap is None:
            span, overlap = default_span_overlap(num_layers)
        self.geometry = ladder_geometry(num_layers, span, overlap)
        self.rotary_emb = rotary_emb
        self.num_layers = num_layers
        self.budget = int(budget)
        self.sinks = int(sinks)
        self.window = max(self.geometry.rung, budget // 4) if window is None else int(window)
        if self.budget - self.sinks - self.window < self.geometry.rung - 1:
            raise ValueError(f"budget={budget} leaves no room for a rung between {sinks} sinks and a window of "
                             f"{self.window}")
        self.cursor = self.sinks
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.tokens: list[torch.Tensor] | None = [torch.empty(0, dtype=torch.long)] * num_layers if track_tokens else None
        self.seen = 0
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _table(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[-2] < n or self._cos.device != like.device:
            size = max(n, 2 * self.budget + 64)
            positions = torch.arange(size, device=like.device)[None]
            cos, sin = self.rotary_emb(like, positions)  # [1, size, D]
            self._cos, self._sin = cos[:, None], sin[:, None]  # [1, 1, size, D]
        return self._cos[:, :, :n], self._sin[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Append this step's states to a layer; return (all keys rotated to slots 0..n-1, all values)."""
        from transformers.models.llama.modeling_llama import rotate_half

        if layer_idx == 0:
            self.seen += key_states.shape[-2]
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        if old_k is None:
            k, v = key_states, value_states
        else:
            k = torch.cat([old_k, key_states], dim=-2)
            v = torch.cat([old_v, value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        if self.tokens is not None:
            q = key_states.shape[-2]
            new = torch.arange(self.seen - q, self.seen, dtype=torch.long)
            self.tokens[layer_idx] = torch.cat([self.tokens[layer_idx], new])
        cos, sin = self._table(k.shape[-2], k)
        rotated = k * cos + rotate_half(k) * sin
        return rotated, v

    def keep_lists(self, n: int) -> list[list[int]]:
        """Each layer's kept slots (Python lists) to bring ``n`` slots back within the budget; advances the cursor."""
        big_b, small_a = self.geometry.rung, self.geometry.keep
        period = big_b - small_a + 1
        lists = [list(range(n)) for _ in range(self.num_layers)]
        m, c = n, self.cursor
        while m > self.budget:
            if c < self.sinks or c + big_b > m - self.window:
                c = self.sinks  # start over: compact the oldest history again
            rungs = min((m - self.window - c) // big_b, -(-(m - self.budget) // (big_b - small_a)))
            for i in range(self.num_layers):
                keep = (
                    list(range(c))
                    + [c + big_b * j + i % period + k for j in range(rungs) for k in range(small_a)]
                    + list(range(c + big_b * rungs, m))
                )
                previous = lists[i]
                lists[i] = [previous[x] for x in keep]
            m -= rungs * (big_b - small_a)
            c += rungs * small_a
        self.cursor = c
        return lists

    def end_step(self) -> None:
        """After the forward: compact every layer when over budget (Python index lists, gather, new tensors)."""
        n = self.keys[0].shape[-2]
        if n <= self.budget:
            return
        for i, keep in enumerate(self.keep_lists(n)):
            k, v = self.keys[i], self.values[i]
            index = torch.tensor(keep, dtype=torch.long, device=k.device)
            gather_k = index.view(1, 1, -1, 1).expand(k.shape[0], k.shape[1], -1, k.shape[3])
            gather_v = index.view(1, 1, -1, 1).expand(v.shape[0], v.shape[1], -1, v.shape[3])
            self.keys[i] = torch.gather(k, 2, gather_k)
            self.values[i] = torch.gather(v, 2, gather_v)
            if self.tokens is not None:
                self.tokens[i] = self.tokens[i][index.cpu()]

    @property
    def num_slots(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[-2])

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

