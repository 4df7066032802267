"""Observe each attention layer's queries without touching its forward method.

Attention-score eviction (TOVA, H2O) needs the new queries' attention over the cache, but a
``Cache.update`` only receives keys and values. A forward *pre-hook* on every attention module sees
the hidden states and the rotary (cos, sin) the layer is about to use; from them it recomputes the
query exactly as the module will (projection, optional q-norm, rotate-half RoPE). That duplicates
one query projection per layer per step — part of the extra cost these methods pay, and one reason
attention-free caches (LaCache, StreamingLLM, key-norm) are cheaper and work with fused attention.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["QueryObserver", "attention_modules", "attention_probs"]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention modules in layer order (modules with ``q_proj`` and a ``layer_idx``)."""
    found = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-averaged attention of the new queries over all visible slots: ``[B, q, n]``.

    ``query`` is ``[B, Hq, q, D]`` (post-RoPE), ``keys`` ``[B, Hkv, n, D]`` as attention sees them;
    the last ``q`` slots are the new tokens, attended causally.
    """
    b, hq, q, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    groups = hq // hkv
    qg = query.float().reshape(b, hkv, groups * q, d)
    scores = (qg @ keys.float().transpose(-1, -2)) * scaling  # [B, Hkv, groups*q, n]
    scores = scores.view(b, hkv, groups, q, n)
    if q > 1:
        causal = torch.ones(q, n, dtype=torch.bool, device=keys.device).tril(n - q)
        scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class QueryObserver:
    """Keeps the latest post-RoPE query of every attention layer, ``[B, heads, q, head_dim]``."""

    def __init__(self, model: nn.Module):
        modules = attention_modules(model)
        if not modules:
            raise ValueError(
                f"model={type(model).__name__} has no attention modules with q_proj/layer_idx to observe; "
                "attention-score caches (tova, h2o) support Llama-style attention"
            )
        self.queries: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}
        owner = weakref.ref(self)
        self._handles = []
        for module in modules:
            head_dim = getattr(module, "head_dim", None)
            self.scaling[module.layer_idx] = float(getattr(module, "scaling", head_dim**-0.5))
            self._handles.append(
                module.register_forward_pre_hook(_make_hook(owner, module, head_dim), with_kwargs=True)
            )

    def query(self, layer_idx: int) -> torch.Tensor:
        try:
            return self.queries[layer_idx]
        except KeyError:
            raise RuntimeError(
                f"no query observed for layer {layer_idx}: the cache must be used with the model it was built for"
            ) from None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.queries.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _make_hook(owner, module: nn.Module, head_dim: int):
    def hook(mod, args, kwargs=None):
        observer = owner()
        # kwargs is None only if the hook was removed while the module was already running its hooks
        if observer is None or kwargs is None:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            q = mod.q_proj(hidden).view(*hidden.shape[:-1], -1, head_dim)
            if hasattr(mod, "q_norm"):
                q = mod.q_norm(q)
            q = q.transpose(1, 2)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            rot = cos.shape[-1]
            q_rot = q[..., :rot] * cos + _rotate_half(q[..., :rot]) * sin
            q = torch.cat([q_rot, q[..., rot:]], dim=-1) if rot < head_dim else q_rot
        observer.queries[mod.layer_idx] = q
        return None

    return hook
