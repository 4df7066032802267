"""Models the benchmarks can run without a download: a random tiny Llama and a cache-only stand-in.

A million-token stream or a cache microbenchmark at 80 layers must not need real weights: the
cache's cost and memory depend only on the shapes it is given, so these carry just the shapes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CacheStandIn", "tiny_model"]


def tiny_model(layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 256,
               seed: int = 0, dtype: torch.dtype = torch.float32, context: int = 8192) -> nn.Module:
    """A random Llama, small enough to stream a million tokens on a CPU (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval().to(dtype)


class CacheStandIn(nn.Module):
    """Just enough of a model for ``LaCache.from_model``/``StreamingLLMCache.from_model``: a Llama
    ``config`` with the given shape and the model's rotary module (``rotary_emb``, holding ``inv_freq``)."""

    def __init__(self, layers: int, kv_heads: int = 8, head_dim: int = 128, context: int = 8192):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = LlamaConfig(
            num_hidden_layers=layers, num_attention_heads=kv_heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, hidden_size=kv_heads * head_dim, intermediate_size=4, vocab_size=8,
            max_position_embeddings=context,
        )
        self.rotary_emb = LlamaRotaryEmbedding(self.config)

