"""Observe each attention layer's queries without touching its forward method.

Attention-score eviction (TOVA, H2O) needs the new queries' attention over the cache, but a
``Cache.update`` only receives keys and values. A forward *pre-hook* on every attention module sees
the hidden states and the rotary (cos, sin) the layer is about to use (installed once per model and
acting only for the forward's own cache, ``lacache.cache.attach``); from them the query is
recomputed exactly as the module will (projection, optional q-norm, rotate-half RoPE). That duplicates
one query projection per layer per step — part of the extra cost these methods pay, and one reason
attention-free caches (LaCache, StreamingLLM, key-norm) are cheaper and work with fused attention.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QueryObserver", "attention_modules", "attention_probs", "project_query"]


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
    """One cache's window on the queries of the forward it is in, ``[B, heads, q, head_dim]`` per layer.

    The model's attention pre-hooks (``cache.attach``) hand it each attention layer's input as the
    layer is about to run, for the cache of that forward only; the query is recomputed from it the
    first time the cache's policy asks, and both are dropped once the layer's update is done, so a
    long prefill holds one layer's input at a time and a step that needs no attention costs nothing.
    A copy or a pickle of a cache carries no forward's inputs (nor the modules they came from).
    """

    def __init__(self, scaling: dict[int, float]):
        self.scaling = dict(scaling)
        self._inputs: dict[int, tuple] = {}
        self._queries: dict[int, torch.Tensor] = {}

    @classmethod
    def for_model(cls, model: nn.Module) -> "QueryObserver":
        """An observer for ``model``'s attention layers (their softmax scaling); refuses models it cannot observe."""
        modules = attention_modules(model)
        if not modules:
            raise ValueError(
                f"model={type(model).__name__} has no attention modules with q_proj/layer_idx to observe; "
                "attention-score caches (tova, h2o) support Llama-style attention"
            )
        scaling = {}
        for module in modules:
            head_dim = getattr(module, "head_dim", None)
            scaling[module.layer_idx] = float(getattr(module, "scaling", head_dim**-0.5))
        return cls(scaling)

    def stash(self, module: nn.Module, hidden: torch.Tensor, position_embeddings) -> None:
        """Layer ``module.layer_idx`` is about to run on ``hidden`` with rotary ``(cos, sin)``."""
        self._inputs[module.layer_idx] = (module, hidden, position_embeddings)
        self._queries.pop(module.layer_idx, None)

    def query(self, layer_idx: int) -> torch.Tensor:
        """The post-RoPE query of ``layer_idx`` in the current forward."""
        query = self._queries.get(layer_idx)
        if query is None:
            try:
                module, hidden, position_embeddings = self._inputs[layer_idx]
            except KeyError:
                raise RuntimeError(
                    f"no query observed for layer {layer_idx}: an attention-score cache must be run by the model it "
                    "is attached to (from_model attaches it; after unpickling, call cache.attach(model))"
                ) from None
            query = self._queries[layer_idx] = project_query(module, hidden, position_embeddings)
        return query

    def release(self, layer_idx: int) -> None:
        """The layer's update is done: drop its input and query."""
        self._inputs.pop(layer_idx, None)
        self._queries.pop(layer_idx, None)

    def clear(self) -> None:
        self._inputs.clear()
        self._queries.clear()

    def __getstate__(self) -> dict:
        return {"scaling": self.scaling}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["scaling"])


def project_query(module: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The post-RoPE query an attention module computes from ``hidden``: ``[B, heads, q, head_dim]``.

    Projection, optional per-head q-norm, then rotate-half RoPE on the first ``cos.shape[-1]``
    features (partial-rotary models leave the rest alone), as Llama-style attention does.
    """
    head_dim = module.head_dim
    cos, sin = position_embeddings
    with torch.no_grad():
        q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, head_dim)
        if hasattr(module, "q_norm"):
            q = module.q_norm(q)
        q = q.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rot = cos.shape[-1]
        q_rot = q[..., :rot] * cos + _rotate_half(q[..., :rot]) * sin
        return torch.cat([q_rot, q[..., rot:]], dim=-1) if rot < head_dim else q_rot
