"""A family-independent reference for position-shifted bounded caches.

``tests/oracle_forward.py`` re-implements a Llama forward by hand; that does not scale to q/k norms,
fused projections, partial rotary, soft-capping or sliding-window layers. This reference runs the
model's *own* forward instead and replaces only the cache and the attention mask:

* ``ReplayCache`` keeps every token's key and value exactly as the model produced them (rotated to
  the position the model was given), forever. For each forward the test tells it which tokens each
  layer holds (taken from the cache under test *before* the forward, as in ``oracle_forward.py``); each
  layer then attends exactly those tokens plus the new ones, with every key rotated from its
  original position to its slot position ``p_last - (n - 1 - i)`` by the textbook rotate-half
  formula and *that layer's own* ``inv_freq`` (Gemma 3 has one per layer type).
* the mask is built here, explicitly, in position space: a key at slot position ``p`` is visible to
  a query at position ``P`` iff ``p <= P`` and, on sliding-window layers, ``P - p < window``.
  Under the position shift a sliding window therefore covers the newest ``window`` slots.

Only *which* tokens are kept comes from the cache under test; keys, values, rotations and masks are
the reference's own, so it shares no arithmetic with lacache.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_inv_freqs(model) -> list[torch.Tensor]:
    """Each decoder layer's RoPE ``inv_freq``, read from the model's rotary module by layer type."""
    config = model.config.get_text_config()
    rotary = model.model.rotary_emb
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    out = []
    for layer_type in types[: config.num_hidden_layers]:
        inv = getattr(rotary, f"{layer_type}_inv_freq", None)
        if inv is None:
            inv = rotary.inv_freq
        out.append(inv.detach().to(torch.float32))
    return out


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ([H, n, D]) by ``delta`` ([n]) positions: the first ``2 * len(inv_freq)`` features turn."""
    rot = 2 * inv_freq.shape[0]
    freqs = delta.to(torch.float32)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    head = x[..., :rot].float()
    turned = head * emb.cos() + _rotate_half(head) * emb.sin()
    return torch.cat((turned.to(x.dtype), x[..., rot:]), dim=-1)


class ReplayCache:
    """Duck-typed cache for the model's own forward (batch 1); see the module docstring."""

    is_compileable = False

    def __init__(self, model):
        config = model.config.get_text_config()
        self.num_layers = config.num_hidden_layers
        self.inv_freqs = layer_inv_freqs(model)
        self.layer_types = (getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers)[
            : self.num_layers
        ]
        # every layer of a Mistral-style model slides; hybrid models slide only on their sliding layers
        window = getattr(config, "sliding_window", None)
        hybrid = "sliding_attention" in self.layer_types
        self.windows = {
            "full_attention": None if hybrid else window,
            "sliding_attention": window,
        }
        self.hybrid = hybrid or len(set(self.layer_types)) > 1
        # per layer: token index -> (key [kv, D] rotated to `position`, value [kv, D], position)
        self.history: list[dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = [
            {} for _ in range(self.num_layers)
        ]
        self.seen = 0
        self._kept: list[list[int]] | None = None
        self._positions: list[int] = []

    # the model may ask; positions are always passed explicitly, so this is informational only
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def begin(self, kept: list[list[int]], positions: torch.Tensor, dtype=torch.float32):
        """Prepare one forward of ``len(positions)`` new tokens; return the ``attention_mask`` to pass."""
        assert len(kept) == self.num_layers
        n = len(kept[0])
        assert all(len(k) == n for k in kept), "a bounded cache holds the same number of slots in every layer"
        self._kept = [list(k) for k in kept]
        self._positions = [int(p) for p in positions]
        q = len(self._positions)
        p_last = self._positions[-1]
        key_pos = torch.arange(p_last - (n + q - 1), p_last + 1)
        query_pos = torch.tensor(self._positions)
        masks = {}
        for layer_type, window in self.windows.items():
            allowed = key_pos[None, :] <= query_pos[:, None]
            if window is not None:
                allowed &= (query_pos[:, None] - key_pos[None, :]) < window
            mask = torch.zeros(q, n + q, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            masks[layer_type] = mask[None, None]
        return masks if self.hybrid else masks["full_attention"]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        assert key_states.shape[0] == 1, "the reference handles one sequence"
        q = key_states.shape[-2]
        assert q == len(self._positions)
        history = self.history[layer_idx]
        new = list(range(self.seen, self.seen + q))
        for j, t in enumerate(new):
            history[t] = (key_states[0, :, j], value_states[0, :, j], self._positions[j])
        tokens = self._kept[layer_idx] + new
        n = len(tokens)
        p_last = self._positions[-1]
        slot_pos = torch.arange(p_last - (n - 1), p_last + 1)
        orig_pos = torch.tensor([history[t][2] for t in tokens])
        keys = torch.stack([history[t][0] for t in tokens], dim=1)  # [kv, n, D]
        values = torch.stack([history[t][1] for t in tokens], dim=1)
        keys = rotate_by(keys, slot_pos - orig_pos, self.inv_freqs[layer_idx])
        if layer_idx == self.num_layers - 1:
            self.seen += q
        return keys[None], values[None]
