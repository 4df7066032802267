"""An independent reference forward for bounded caches (a test oracle).

It recomputes a Llama-family forward by hand, one layer at a time, attending in each layer
exactly the tokens a cache says that layer holds, with keys rotated (by the model's own rotary
module) to their slot positions. It shares no code with lacache: only *which* tokens are kept is
taken from the cache under test, the keys and values come from the reference's own history.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class ReferenceStream:
    def __init__(self, model, shift: bool = True):
        self.model = model
        self.shift = shift
        self.core = model.model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        # per layer: token index -> (raw key [kv, D], value [kv, D], original position)
        self.history: list[dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = [{} for _ in range(self.num_layers)]
        self.seen = 0

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [H, n, D] by integer positions [n] with the model's own rotary module."""
        cos, sin = self.core.rotary_emb(x[None].float(), positions[None])
        rotated, _ = apply_rotary_pos_emb(x[None].float(), x[None].float(), cos, sin)
        return rotated[0]

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, positions: torch.Tensor, kept: list[list[int]]) -> torch.Tensor:
        """Process new tokens (1-D ids, 1-D positions) given each layer's kept token indices; return logits [q, V]."""
        q = token_ids.shape[0]
        new_idx = list(range(self.seen, self.seen + q))
        h = self.core.embed_tokens(token_ids[None])[0].float()  # [q, hidden]
        for li, layer in enumerate(self.core.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h[None])[0]
            qs = attn.q_proj(x).view(q, self.num_heads, self.head_dim).transpose(0, 1)
            ks = attn.k_proj(x).view(q, self.num_kv, self.head_dim).transpose(0, 1)
            vs = attn.v_proj(x).view(q, self.num_kv, self.head_dim).transpose(0, 1)
            qs = self._rope(qs, positions)
            for j, t in enumerate(new_idx):
                self.history[li][t] = (ks[:, j], vs[:, j], int(positions[j]))
            tokens = list(kept[li]) + new_idx
            keys = torch.stack([self.history[li][t][0] for t in tokens], dim=1)  # [kv, n, D]
            values = torch.stack([self.history[li][t][1] for t in tokens], dim=1)
            n = len(tokens)
            if self.shift:
                key_pos = positions[-1] - (n - 1) + torch.arange(n)
            else:
                key_pos = torch.tensor([self.history[li][t][2] for t in tokens])
            keys = self._rope(keys, key_pos)
            groups = self.num_heads // self.num_kv
            keys = keys.repeat_interleave(groups, dim=0)
            values = values.repeat_interleave(groups, dim=0)
            scores = qs @ keys.transpose(-1, -2) * self.head_dim**-0.5  # [H, q, n]
            # query j may see every kept slot and new tokens up to itself
            allowed = torch.ones(q, n, dtype=torch.bool)
            allowed[:, n - q :] = torch.tril(torch.ones(q, q, dtype=torch.bool))
            scores = scores.masked_fill(~allowed, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ values  # [H, q, D]
            out = out.transpose(0, 1).reshape(q, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h[None])[0])
        self.seen += q
        h = self.core.norm(h[None])[0]
        return self.model.lm_head(h)
