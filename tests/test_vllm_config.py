"""The vLLM plugin's settings and slot replay, which need no vLLM: checked in the main suite."""

import pytest
import torch

from conftest import tiny_llama
from lacache import LaCache
from lacache.generation import stream_generate
from lacache.vllm.config import parse_config
from lacache.vllm.slots import RequestSlots


@pytest.mark.parametrize("raw, match", [
    ({"method": "tova", "budget": 256}, "not served in vLLM .*attention scores"),
    ({"method": "nope", "budget": 256}, "lacache.method='nope'"),
    ({"method": "lacache"}, "budget is required"),
    ({"budget": 0}, "budget=0 must be a positive integer"),
    ({"budget": "256"}, "budget='256'"),
    ({"budget": 256, "bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
    ({"budget": 256, "positions": "original"}, "positions='original'"),
    ({"budget": 256, "salient": 0.125}, "salient"),
    ({"budget": 8, "sinks": 4, "window": 4}, "budget=8 is too small"),
    ({"budget": 256, "span": 3}, "give both or neither"),
    ({"budget": 256, "chunk": 999}, "chunk=999"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_settings_are_one_clear_error(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_config(raw, 30)


def test_settings_mirror_from_model_defaults():
    config = parse_config({"budget": 256}, 30)
    cache_defaults = {"sinks": 4, "window": 64, "span": 15, "overlap": 0}
    assert {k: config.describe()[k] for k in cache_defaults} == cache_defaults
    assert config.chunk == 16 and config.target == 240
    assert parse_config({"method": "streaming", "budget": 64, "sinks": 2}, 30).describe()["sinks"] == 2


@pytest.mark.parametrize("method", ["lacache", "streaming"])
def test_slot_replay_keeps_the_tokens_the_transformers_cache_keeps(method):
    """Scheduler and workers replay a request through RequestSlots; it must agree with the cache itself."""
    model = tiny_llama("sdpa")
    config = parse_config({"method": method, "budget": 24, "sinks": 2}, 4)
    cache = (LaCache.from_model(model, budget=24, sinks=2) if method == "lacache" else
             __import__("lacache").StreamingLLMCache.from_model(model, budget=24, sinks=2))
    assert cache.chunk == config.chunk
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    stream_generate(model, ids, cache, max_new_tokens=50, prefill_chunk=30)
    slots = RequestSlots(config.new_policy(), config.budget, config.target, 4, track_tokens=True)
    slots.advance(30)
    for _ in range(49):  # the last sampled token is never fed back
        slots.advance(1)
    assert slots.seen == cache.seen and slots.slots == cache.num_slots
    for layer in range(4):
        assert slots.token_positions(layer) == cache.token_positions(layer).tolist()


def test_each_request_gets_a_fresh_rule_sharing_plans():
    config = parse_config({"budget": 64}, 30)
    a, b = config.new_policy(), config.new_policy()
    a.plan(65, 60)
    assert b.cursor == b.sinks and a is not b and a._plans is b._plans
