"""Memory readings shared by the benchmarks: computed KV sizes, model shape, RSS and CUDA figures.

The benchmarks compare what a cache *should* take (``kv_bytes`` from the model's shape) with what
the cache reports and what the process really holds (RSS and its high-water mark, CUDA memory), so
these readings live in one place and every benchmark takes them the same way.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MB", "kv_bytes", "model_geometry", "peak_rss_since_reset", "reset_peak_rss"]

MB = 2**20


def kv_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, slots: int, batch: int = 1) -> int:
    """Bytes of keys and values for ``slots`` tokens: ``2 * layers * kv_heads * head_dim * dtype_bytes * slots * batch``."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes * slots * batch


def model_geometry(model: nn.Module) -> dict:
    """Layers, KV heads, head size and trained context of a transformers causal LM (or a stand-in)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "layers": int(config.num_hidden_layers),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "trained_context": getattr(config, "max_position_embeddings", None),
    }


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    """The process's RSS high-water mark (``VmHWM``) since the last :func:`reset_peak_rss`; 0 if unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cuda_allocated(device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.memory_allocated(device))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _fresh_phase(device) -> None:
    """Start new peak readings (caches hold no reference cycles: dropping one frees it at once)."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()



def _dtype_bytes(model) -> int:
    """Bytes per element of the model's weights, taken as the cache's dtype for ``kv_bytes``."""
    return next(model.parameters()).element_size()


def _headroom(cache) -> int:
    """Slots a bounded cache allocates beyond its budget (0 for a cache without slot layers)."""
    layers = getattr(cache, "layers", None)
    return int(getattr(layers[0], "headroom", 0)) if layers else 0

