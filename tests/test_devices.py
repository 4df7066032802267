"""Each layer's slots live on the device of the keys that layer receives (models split by device_map).

Only one real device exists here, so odd layers get tensors on the ``meta`` device: any tensor the
cache created on the wrong device (a hidden transfer, or an index built on another layer's device)
would fail to combine with them or end up on the wrong device.
"""

import pytest
import torch

from lacache import LaCache, StreamingLLMCache
from lacache.lab.bench import CacheStandIn

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


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.05), (torch.bfloat16, 0.3)])
def test_half_precision_caches_keep_their_dtype_and_track_float32(dtype, tolerance):
    """fp16/bf16: storage in the model's dtype, rotation on read (each key rounded once), memory by the
    formula with 2-byte elements, and logits under eviction close to the same cache in float32."""
    from conftest import tiny_llama

    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(9))
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    fp32 = tiny_llama("sdpa")
    half = tiny_llama("sdpa", dtype=dtype)
    c32, c16 = LaCache.from_model(fp32, budget=32, sinks=2), LaCache.from_model(half, budget=32, sinks=2)
    want = fp32.generate(ids, cache=c32, **kwargs)
    got = half.generate(ids, cache=c16, **kwargs)
    assert c16.rotation == "read" and c32.rotation == "stored"
    assert all(layer.keys.dtype == dtype and layer.values.dtype == dtype for layer in c16.layers)
    assert c16.memory_bytes() == 2 * 4 * 2 * 16 * 2 * (32 + 64)  # layers, kv heads, head_dim, 2 bytes
    assert c16.num_slots <= 32 and c16.seen == c32.seen
    first = (got.logits[0].float() - want.logits[0]).abs().max().item()
    assert first <= tolerance, first
