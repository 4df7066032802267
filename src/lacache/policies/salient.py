"""LaCache with a salient pool: the ladder decides coverage, key norms rescue what it would drop.

Measured on pass-key retrieval (docs/results.md): at a budget of half the prompt a ladder has to
compact almost the whole prompt, so each layer keeps only every other token of a multi-token fact
(a 5-digit key is five tokens) and no layer holds it whole. A small pool per layer fixes that
without giving up the ladder's positional coverage: the ladder runs exactly as in ``LadderPolicy``
on the slots outside the pool (same cursor, same staggered rungs), and every slot it evicts
competes with the pool's current members for a place in the pool by key norm (smallest kept,
the attention-free salience signal of Devoto et al. 2024). Keys' norms do not change under RoPE,
so they are read from the stored keys at compaction time: no per-token work, no attention scores.
"""

from __future__ import annotations

import torch

from ..ladder import LadderGeometry, ladder_plan
from .scores import ScorePolicy

__all__ = ["SalientLadderPolicy"]


class SalientLadderPolicy(ScorePolicy):
    """Ladder over the non-pool slots plus a pool of ``pool`` lowest-key-norm evicted slots per layer."""

    def __init__(self, geometry: LadderGeometry, sinks: int, window: int, pool: int, radius: int = 0):
        super().__init__(geometry.num_layers, sinks, window)
        if radius < 0:
            raise ValueError(f"salient_radius={radius} must be >= 0; e.g. salient_radius=2")
        # a slot's salience is the best key norm within ``radius`` slots of it, so the pool takes the
        # neighbours of a salient token too (a number is several tokens)
        self.radius = radius
        if pool < 1:
            raise ValueError(f"salient pool={pool} must be >= 1 slot; e.g. salient=budget // 8")
        self.geometry = geometry
        self.pool = pool
        self.cursor = sinks
        self._plan_rows: torch.Tensor | None = None  # this step's ladder plan, [L, m] in ladder coordinates
        self._norms: list[torch.Tensor | None] = [None] * geometry.num_layers
        self._pooled = [0] * geometry.num_layers  # pool members per layer (equal in every row), host-side

    def min_target(self) -> int:
        return self.sinks + self.window + self.geometry.rung - 1 + self.pool

    def observe(self, layer_idx, keys, probs, q):
        self._norms[layer_idx] = keys.float().norm(dim=-1).mean(dim=1)  # [B, n]; RoPE keeps norms

    def _in_pool(self, layer_idx: int, batch: int, n: int, device) -> torch.Tensor:
        mask = self.state[layer_idx]
        if mask is None:
            return torch.zeros(batch, n, dtype=torch.bool, device=device)
        if mask.shape[1] < n:  # slots appended since the last compaction are ladder slots
            mask = torch.cat([mask, mask.new_zeros(batch, n - mask.shape[1])], dim=1)
        return mask.to(device)

    def _ladder_rows(self, layer_idx: int, n_ladder: int, target: int, device) -> torch.Tensor:
        if layer_idx == 0 or self._plan_rows is None:
            plan = ladder_plan(self.geometry, n_ladder, self.cursor, target, self.sinks, self.window)
            self.cursor = plan.cursor
            self._plan_rows = plan.tensor(device)
        rows = self._plan_rows
        return rows[layer_idx] if rows.shape[0] > 1 else rows[0]

    def select(self, layer_idx: int, target: int) -> torch.Tensor:
        norms = self._norms[layer_idx]
        batch, n = norms.shape
        device = norms.device
        in_pool = self._in_pool(layer_idx, batch, n, device)
        pooled = self._pooled[layer_idx]  # counted on the host: no device sync on this path
        ladder_slots = (~in_pool).nonzero()[:, 1].view(batch, n - pooled)  # ascending per row
        keep_rows = self._ladder_rows(layer_idx, n - pooled, target - self.pool, device)
        kept = ladder_slots.gather(1, keep_rows[None].expand(batch, -1))
        # candidates for the pool: its members and whatever the ladder just evicted
        candidate = in_pool.clone()
        candidate.scatter_(1, ladder_slots, True)
        candidate.scatter_(1, kept, False)
        take = min(self.pool, pooled + (n - pooled) - keep_rows.shape[0])
        salience = -norms
        if self.radius:
            salience = torch.nn.functional.max_pool1d(salience[:, None], 2 * self.radius + 1, 1, self.radius)[:, 0]
        score = torch.where(candidate, salience, torch.full_like(norms, float("-inf")))
        chosen = score.topk(take, dim=-1).indices
        new_pool = torch.zeros_like(in_pool)
        new_pool.scatter_(1, chosen, True)
        index = torch.cat([kept, chosen], dim=1).sort(dim=-1).values
        self.state[layer_idx] = new_pool.gather(1, index)
        self._norms[layer_idx] = None
        self._pooled[layer_idx] = take
        return index

    def reset(self) -> None:
        super().reset()
        self.cursor = self.sinks
        self._plan_rows = None
        self._norms = [None] * self.num_layers
        self._pooled = [0] * self.num_layers

    def describe(self) -> dict:
        g = self.geometry
        return {"policy": "ladder+salient", "sinks": self.sinks, "window": self.window, "span": g.span,
                "overlap": g.overlap, "layout": g.layout, "rung": g.rung, "keep": g.keep, "salient": self.pool,
                "salient_radius": self.radius}
