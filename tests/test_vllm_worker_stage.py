"""The vLLM worker gives each layer the plan row of the model's own layer number, not its local index.

On a later pipeline-parallel stage a worker holds layers k, k+1, ... of the model as its local layers
0, 1, ...; a ladder plan has one row per model layer, so taking the local index would silently keep
layer 0's tokens in layer k (hidden when the ladder repeats every few layers). No second stage is
needed to check it: a worker whose attention layers are the model's layers 2 and 3 of 4, over a fake
paged cache, must hold exactly the tokens the slot replay says layers 2 and 3 hold. Runs without vLLM.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fake_pages import plain_pages as _pages
from lacache.vllm.config import parse_config
from lacache.vllm.worker import WorkerState, _layer_number

HEADS, HEAD_DIM, BLOCK, BLOCKS = 2, 4, 16, 4


class _PlainWriter:
    """A backend writer with plain pages (as vLLM's CPU backend lays them out for keys and values)."""

    def do_kv_cache_update(self, layer, key, value, cache, slot_mapping):
        k_pages, v_pages = _pages(cache)
        blocks, offsets = slot_mapping // BLOCK, slot_mapping % BLOCK
        k_pages[blocks, :, offsets] = key
        v_pages[blocks, :, offsets] = value


class _IdentityRotary(torch.nn.Module):
    """A rotary module whose angle table is all zero angles, so re-rotation leaves keys as they are."""

    rotary_dim = HEAD_DIM
    is_neox_style = True

    def __init__(self):
        super().__init__()
        self.cos_sin_cache = self._compute_cos_sin_cache()

    def _compute_cos_sin_cache(self):
        half = HEAD_DIM // 2
        return torch.cat([torch.ones(64, half), torch.zeros(64, half)], dim=1)


def _worker(layer_names, config):
    layers = {name: SimpleNamespace(impl=_PlainWriter(), kv_cache=torch.zeros(BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM))
              for name in layer_names}
    runner = SimpleNamespace(
        model=torch.nn.Sequential(_IdentityRotary()),
        compilation_config=SimpleNamespace(static_forward_context=layers),
        cache_config=SimpleNamespace(block_size=BLOCK),
        requests={"r": SimpleNamespace(block_ids=[[0, 1, 2]])},
        input_batch=SimpleNamespace(req_id_to_index={}),
    )
    return WorkerState(runner, config), layers


def test_a_later_pipeline_stage_keeps_its_own_layers_tokens():
    # the authors' schedule with one-slot rungs over 4 layers: every layer keeps other tokens
    config = parse_config({"method": "lacache-reference", "budget": 24, "sinks": 2, "span": 1, "overlap": 0}, 4)
    names = ["model.layers.2.self_attn.attn", "model.layers.3.self_attn.attn"]  # the second stage of two
    state, layers = _worker(names, config)
    slots = config.new_slots(track_tokens=True)
    prompt = 40
    for name in names:  # slot p of every layer holds token p (keys and values), as vLLM wrote them
        token = torch.arange(prompt, dtype=torch.float32)[:, None, None].expand(prompt, HEADS, HEAD_DIM)
        layers[name].impl.do_kv_cache_update(None, token, token + 1000, layers[name].kv_cache,
                                             torch.arange(prompt))
    plan = slots.advance(prompt)
    assert plan is not None and not np.array_equal(plan.rows_for(0), plan.rows_for(2))  # the check can fail
    state._compact("r", slots, plan)
    for local, name in enumerate(names):
        k_pages, v_pages = _pages(layers[name].kv_cache)
        held = torch.arange(plan.kept)
        keys = k_pages[held // BLOCK, :, held % BLOCK][:, 0, 0].long().tolist()
        values = (v_pages[held // BLOCK, :, held % BLOCK][:, 0, 0] - 1000).long().tolist()
        assert keys == values == slots.token_positions(_layer_number(name)), name
    assert state.layer_numbers == [2, 3]


def test_a_layer_name_without_a_number_is_refused():
    with pytest.raises(ValueError, match="no layer number"):
        _layer_number("model.attn")
