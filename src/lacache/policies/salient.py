"""LaCache with a salient pool: the ladder decides coverage, key norms rescue what it would drop.

Measured on pass-key retrieval (docs/results.md): at a budget of half the prompt a ladder has to
compact almost the whole prompt, so each layer keeps only every other token of a multi-token fact
(a 5-digit key is five tokens) and no layer holds it whole. A small pool per layer fixes that
without giving up the ladder's positional coverage: a ``LadderPolicy`` (same cursor, same
staggered rungs, same memoised plans) runs on the slots outside the pool, and every slot it
evicts competes with the pool's current members for a place in the pool by key norm (smallest
kept, the attention-free salience signal of Devoto et al. 2024). Keys' norms do not change under
RoPE, so they are read from the stored keys at compaction time: no per-token work, no attention
scores.
"""

from __future__ import annotations

import copy

from .._lazy import torch
from .base import KEY_NORM, LayerView, RetentionPolicy, rank_slots, rows_of
from .ladder import LadderPolicy
from .ladder_geometry import LadderGeometry
from .plan import RowPlan

__all__ = ["SalientLadderPolicy"]


class SalientLadderPolicy(RetentionPolicy):
    """Ladder over the non-pool slots plus a pool of ``pool`` lowest-key-norm evicted slots per layer."""

    key_statistic = KEY_NORM

    def __init__(self, geometry: LadderGeometry, sinks: int, window: int, pool: int, radius: int = 0):
        if sinks < 0:
            raise ValueError(f"sinks={sinks} must be >= 0; e.g. sinks=4")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1 (the newest token is always kept); e.g. window=16")
        if radius < 0:
            raise ValueError(f"salient_radius={radius} must be >= 0; e.g. salient_radius=2")
        if pool < 1:
            raise ValueError(f"salient pool={pool} must be >= 1 slot; e.g. salient=budget // 8")
        self.ladder = LadderPolicy(geometry, sinks, window)
        self.sinks, self.window, self.pool = sinks, window, pool
        # a slot's salience is the best key norm within ``radius`` slots of it, so the pool takes the
        # neighbours of a salient token too (a number is several tokens)
        self.radius = radius
        self.num_layers = geometry.num_layers
        #: per layer, which kept slots are pool members ([B, m] bools), None before the first compaction
        self.state: list[torch.Tensor | None] = [None] * self.num_layers
        self._pooled = [0] * self.num_layers  # pool members per layer (equal in every row), host-side
        self._plan_step: int | None = None
        self._plan_rows: torch.Tensor | None = None  # this step's ladder plan, [L, m] in ladder coordinates

    @property
    def geometry(self) -> LadderGeometry:
        return self.ladder.geometry

    @property
    def cursor(self) -> int:
        return self.ladder.cursor

    def min_target(self) -> int:
        return self.ladder.min_target() + self.pool

    def _in_pool(self, layer_idx: int, batch: int, n: int, device) -> torch.Tensor:
        mask = self.state[layer_idx]
        if mask is None:
            return torch.zeros(batch, n, dtype=torch.bool, device=device)
        if mask.shape[1] < n:  # slots appended since the last compaction are ladder slots
            mask = torch.cat([mask, mask.new_zeros(batch, n - mask.shape[1])], dim=1)
        return mask.to(device)

    def _ladder_rows(self, view: LayerView, n_ladder: int, target: int, device) -> torch.Tensor:
        """This layer's ladder plan over the non-pool slots; planned once per forward pass."""
        if self._plan_step != view.step or self._plan_rows is None:
            self._plan_rows = self.ladder.plan(n_ladder, target).tensor(device)
            self._plan_step = view.step
        rows = self._plan_rows
        return rows[view.layer_idx] if rows.shape[0] > 1 else rows[0]

    def retain(self, view: LayerView, target: int) -> RowPlan:
        layer_idx = view.layer_idx
        norms = view.norms()  # [B, n]; RoPE keeps norms
        batch, n = norms.shape
        device = norms.device
        in_pool = self._in_pool(layer_idx, batch, n, device)
        pooled = self._pooled[layer_idx]  # counted on the host: no device sync on this path
        ladder_slots = (~in_pool).nonzero()[:, 1].view(batch, n - pooled)  # ascending per row
        keep_rows = self._ladder_rows(view, n - pooled, target - self.pool, device)
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
        chosen = rank_slots(score, take)  # equal salience: the older slot
        new_pool = torch.zeros_like(in_pool)
        new_pool.scatter_(1, chosen, True)
        index = torch.cat([kept, chosen], dim=1).sort(dim=-1).values
        self.state[layer_idx] = new_pool.gather(1, index)
        self._pooled[layer_idx] = take
        return RowPlan(index)

    def count_after(self, n: int, target: int) -> int:
        """Slots a compaction of ``n`` to ``target`` leaves, advancing the ladder and the pool's size but not
        which slots are in it: what vLLM's scheduler replays (it never sees keys)."""
        pooled = self._pooled[0]
        ladder = self.ladder.plan(n - pooled, target - self.pool).kept
        take = min(self.pool, n - ladder)
        self._pooled = [take] * self.num_layers
        return ladder + take

    def slot_roles(self, layer_idx: int, slots: int, batch_index: int = 0) -> list[str]:
        """The ladder's roles, with this layer's pool members (of sequence ``batch_index``) marked ``"salient"``."""
        roles = super().slot_roles(layer_idx, slots, batch_index)
        mask = self.state[layer_idx]
        if mask is not None:
            row = mask[batch_index if mask.shape[0] > 1 else 0].tolist()
            for slot, member in enumerate(row[:slots]):
                if member:
                    roles[slot] = "salient"
        return roles

    def select_rows(self, rows: list[int]) -> None:
        self.state = [rows_of(state, rows) for state in self.state]  # pool members, per sequence

    def reset(self) -> None:
        self.ladder.reset()
        self.state = [None] * self.num_layers
        self._pooled = [0] * self.num_layers
        self._plan_step = self._plan_rows = None

    def fork(self) -> "SalientLadderPolicy":
        """A copy for another sequence: its own pool state, the ladder's memoised plans shared."""
        twin = copy.copy(self)
        twin.ladder = self.ladder.fork()
        twin.state = [None if s is None else s.clone() for s in self.state]
        twin._pooled = list(self._pooled)
        return twin

    def describe(self) -> dict:
        g = self.geometry
        return {"policy": "ladder+salient", "schedule": "capped", "sinks": self.sinks, "window": self.window,
                "span": g.span, "overlap": g.overlap, "layout": g.layout, "rung": g.rung, "keep": g.keep,
                "group": g.group, "salient": self.pool, "salient_radius": self.radius}
