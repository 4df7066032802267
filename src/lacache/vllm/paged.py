"""Moving keys and values inside vLLM's paged KV cache, whatever its backend's page layout.

Writes go through the attention backend's own writer (``impl.do_kv_cache_update``, the op vLLM
uses for new tokens), so they are right for any layout that backend chooses. Reads need to know
the layout; it is detected once per engine by writing a random key and value with that writer into
a scratch page and finding the reader that gets them back. An unknown layout is refused, never
guessed.
"""

from __future__ import annotations

import torch

__all__ = ["PagedKV"]


def _pages(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value pages ``[blocks, heads, block_size, head_dim]`` as the CPU backend views them."""
    blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, block_size * 2, -1).chunk(2, dim=2)


def _read_plain(pages: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return pages[blocks, :, offsets]  # [n, heads, head_dim]


def _read_transposed(pages: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # each (block, head) page holds the keys as [head_dim, block_size]
    b, h, bs, d = pages.shape
    flipped = pages.reshape(b, h, bs * d).view(b, h, d, bs)
    return flipped[blocks, :, :, offsets]  # [n, heads, head_dim]


_READERS = {"plain": _read_plain, "transposed": _read_transposed}


class PagedKV:
    """Read and write whole slots of one request across the layers of a paged cache."""

    def __init__(self, layers: list, kv_caches: list[torch.Tensor], block_size: int):
        self.layers = layers  # vLLM Attention modules, in layer order (their .impl writes pages)
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.key_layout, self.value_layout = self._detect()

    def _detect(self) -> tuple[str, str]:
        layer, cache = self.layers[0], self.kv_caches[0]
        _, heads, block_size, width = cache.shape
        scratch = torch.zeros((1, heads, block_size, width), dtype=cache.dtype, device=cache.device)
        gen = torch.Generator(device="cpu").manual_seed(0)
        key = torch.randn(1, heads, width // 2, generator=gen).to(cache)
        value = torch.randn(1, heads, width // 2, generator=gen).to(cache)
        slot = torch.tensor([3], dtype=torch.int64, device=cache.device)
        layer.impl.do_kv_cache_update(layer, key, value, scratch, slot)
        k_pages, v_pages = _pages(scratch)
        where = (torch.tensor([0]), torch.tensor([3]))
        found = []
        for pages, want in ((k_pages, key), (v_pages, value)):
            match = [name for name, read in _READERS.items() if torch.equal(read(pages, *where), want)]
            if not match:
                raise RuntimeError(
                    "lacache cannot read this attention backend's KV page layout (neither plain nor transposed "
                    f"pages for {type(layer.impl).__name__}); serving with eviction is not supported on it"
                )
            found.append(match[0])
        return found[0], found[1]

    def _addresses(self, block_ids: list[int], slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.as_tensor(block_ids, dtype=torch.int64)
        return table[slots // self.block_size], slots % self.block_size

    def read(self, layer: int, block_ids: list[int], slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, heads, head_dim]`` of physical ``slots`` of one request."""
        k_pages, v_pages = _pages(self.kv_caches[layer])
        blocks, offsets = self._addresses(block_ids, slots)
        keys = _READERS[self.key_layout](k_pages, blocks, offsets).clone()
        values = _READERS[self.value_layout](v_pages, blocks, offsets).clone()
        return keys, values

    def write(self, layer: int, block_ids: list[int], slots: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store ``keys``/``values`` ``[n, heads, head_dim]`` at physical ``slots`` with the backend's writer."""
        blocks, offsets = self._addresses(block_ids, slots)
        mapping = (blocks * self.block_size + offsets).to(self.kv_caches[layer].device)
        module = self.layers[layer]
        module.impl.do_kv_cache_update(module, keys.contiguous(), values.contiguous(), self.kv_caches[layer], mapping)
