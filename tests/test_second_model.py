"""The second real model: Gemma 3 270M (sliding-window layers mixed with global ones), offline."""

import importlib.util

import pytest

from conftest import generate_like_full_cache
from lacache import LaCache, load_model
from lacache.lab.models import SECOND_GGUF_PACKAGE, SECOND_MODEL_NAME
from test_families import kept_sets, replay_error

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec(SECOND_GGUF_PACKAGE) is None,
                       reason="Gemma 3 270M packages not installed (make test installs them)"),
]


@pytest.fixture(scope="module")
def gemma():
    return load_model(SECOND_MODEL_NAME)


def test_it_is_gemma3_with_sliding_and_global_layers(gemma):
    model, tokenizer = gemma
    config = model.config.get_text_config()
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types)
    cache = LaCache.from_model(model, budget=64)
    assert len({id(r) for r in cache.rotators}) == 2  # local and global RoPE frequencies
    assert tokenizer.decode(tokenizer("The lighthouse")["input_ids"], skip_special_tokens=True) == "The lighthouse"


def test_large_budget_generates_exactly_like_the_full_cache(gemma):
    model, tokenizer = gemma
    ids = tokenizer("The history of the lighthouse begins", return_tensors="pt")["input_ids"]
    same, worst = generate_like_full_cache(model, ids, LaCache.from_model(model, budget=128), max_new_tokens=12)
    assert same and worst <= 1e-4, worst


def test_eviction_matches_the_replay_reference(gemma):
    model, tokenizer = gemma
    text = "Lighthouses guide ships along dangerous coasts at night. " * 8
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0, :56]
    cache = LaCache.from_model(model, budget=32, sinks=2, chunk=2)
    err = replay_error(model, cache, ids, [40] + [1] * 16)
    assert len({tuple(k) for k in kept_sets(cache)}) > 1, "layers should hold different tokens"
    assert err <= 1e-4, err
