"""Each layer's slots live on the device of the keys that layer receives (models split by device_map).

Only one real device exists here, so odd layers get tensors on the ``meta`` device: any tensor the
cache created on the wrong device (a hidden transfer, or an index built on another layer's device)
would fail to combine with them or end up on the wrong device.
"""

import pytest
import torch

from lacache import LaCache, StreamingLLMCache
from lacache.bench import CacheStandIn

DEVICES = [torch.device("cpu"), torch.device("meta"), torch.device("cpu"), torch.device("meta")]


@pytest.mark.parametrize("build", [
    lambda m: LaCache.from_model(m, budget=32, sinks=2),
    lambda m: LaCache.from_model(m, budget=32, sinks=2, positions="original"),
    lambda m: StreamingLLMCache.from_model(m, budget=32, sinks=2),
], ids=["lacache", "lacache-original", "streaming"])
def test_every_layer_keeps_its_slots_on_its_own_device(build):
    cache = build(CacheStandIn(len(DEVICES), kv_heads=2, head_dim=16))
    seen = 0
    for q in [40] + [1] * 30 + [7]:  # a prefill over budget, decode with compactions, a chunk
        positions = torch.arange(seen, seen + q)[None]
        for layer, device in enumerate(DEVICES):
            keys = torch.randn(1, 2, q, 16, device=device)
            out_k, out_v = cache.update(keys, torch.randn_like(keys), layer, position_ids=positions.to(device))
            assert out_k.device == device and out_v.device == device
        seen += q
    assert cache.num_slots <= 32
    for layer, device in enumerate(DEVICES):
        assert cache.layers[layer].keys.device == device and cache.layers[layer].values.device == device


def test_beam_search_reorders_rows_consistently():
    """Beams reorder and repeat rows (reorder_cache, batch_repeat_interleave): with a budget above
    the length LaCache must give DynamicCache's beams exactly, and under eviction it must still run."""
    from transformers import DynamicCache

    from conftest import tiny_llama

    model = tiny_llama("eager")
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=20, num_beams=3, do_sample=False, early_stopping=False)
    expected = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    got = model.generate(ids, cache=LaCache.from_model(model, budget=64, sinks=2), **kwargs)
    assert torch.equal(got, expected)
    cache = LaCache.from_model(model, budget=16, sinks=2)
    out = model.generate(ids, cache=cache, **kwargs)
    assert out.shape == (1, 32) and cache.num_slots <= 16
    frames = cache.layers[0].frame  # one per beam, all at the same positions
    assert len(frames) == 3 and len(set(frames)) == 1
