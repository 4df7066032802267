"""A method is one policy file plus one ``register(...)``: ``tests/methods/every_kth.py`` is written like
that, and here it is found by every entry point a built-in method has — ``make_cache`` and the
cache's own class, ``custom_generate``, ``lacache eval ppl --methods``, ``lacache inspect --compare``,
the default method lists, and the vLLM plugin's settings (it is index-only, so it is served; the
engine itself runs it in tests/serving/test_vllm_new_method.py)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

import lacache
from conftest import bundled_tokenizer_and_tiny_model, save_tiny_model, tiny_llama
from lacache import registry
from lacache.cache.generation import stream_generate
from lacache.vllm.config import parse_config

sys.path.insert(0, str(Path(__file__).parent / "methods"))


@pytest.fixture
def every_kth():
    """Import (register) the method file; the conftest fixture unregisters it after the test."""
    module = sys.modules.get("every_kth")
    if module is None:
        return importlib.import_module("every_kth")
    if "every-kth" not in registry.METHODS:  # imported by an earlier test, since unregistered
        importlib.reload(module)
    return module


def test_it_is_a_registry_method_with_its_options(every_kth):
    spec = registry.method_spec("every-kth")
    assert spec.sees == "slots" and spec.served and spec.bounded and not spec.needs_attention
    assert registry.option_names("every-kth") == {"sinks", "window", "k", "positions", "chunk", "static"}
    assert "every-kth" in registry.default_methods("ppl") and "every-kth" not in registry.default_methods("decode")
    assert "every-kth" in lacache.METHODS


def test_make_cache_builds_it_and_it_stays_in_budget(every_kth):
    model = tiny_llama("sdpa")
    cache = lacache.make_cache("every-kth", model, 24, k=3, sinks=2)
    assert isinstance(cache, lacache.BoundedCache) and cache.describe()["policy"] == "EveryKthPolicy"
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    tokens, _ = stream_generate(model, ids, cache, max_new_tokens=80)
    assert len(tokens) == 80 and cache.num_slots <= 24 and cache.seen == 89
    kept = cache.token_positions(0).tolist()
    assert kept[:2] == [0, 1] and kept[-1] == 88 and kept == sorted(set(kept))
    with pytest.raises(ValueError, match="k=1"):
        lacache.make_cache("every-kth", model, 24, k=1)
    with pytest.raises(ValueError, match="takes no option span"):
        lacache.make_cache("every-kth", model, 24, span=3)
    out = model.generate(ids, custom_generate=lacache.generate, lacache_method="every-kth", lacache_budget=24,
                         max_new_tokens=40, do_sample=False)
    assert out.shape == (1, 50)


def test_it_runs_static_decode_steps_with_no_code_of_its_own(every_kth):
    """A new index-only rule gets fixed-shape (compileable) decode steps: the same tokens as its host path."""
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    host = lacache.make_cache("every-kth", model, 24, k=3, sinks=2)
    static = lacache.make_cache("every-kth", model, 24, k=3, sinks=2, static=True)
    expected, _ = stream_generate(model, ids, host, max_new_tokens=120)
    got, _ = stream_generate(model, ids, static, max_new_tokens=120)
    assert static.is_compileable and got == expected
    assert static.token_positions(0).tolist() == host.token_positions(0).tolist()


def test_lacache_eval_ppl_runs_it(every_kth, tmp_path, capsys):
    from lacache.cli.main import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    code = main(["eval", "ppl", "--model", str(save_tiny_model(tmp_path / "tiny")), "--text-file", str(text),
                 "--tokens", "80", "--budgets", "32", "--methods", "full,every-kth", "--option", "every-kth.k=3",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "ppl.json").read_text())["results"]
    mine = next(r for r in results if r["method"] == "every-kth")
    assert mine["options"] == {"k": 3} and mine["budget"] == 32


def test_lacache_inspect_compares_it(every_kth, tmp_path, monkeypatch):
    import lacache.lab.models
    from lacache.cli.main import main

    tokenizer, model = bundled_tokenizer_and_tiny_model(layers=4)
    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: (model, tokenizer))
    out = tmp_path / "insp"
    assert main(["inspect", "--compare", "every-kth,lacache", "--budget", "32", "--tokens", "80", "--at", "0,10",
                 "--out", str(out), "--quiet"]) == 0
    maps = json.loads((out / "inspect.json").read_text())["maps"]
    assert [m["method"] for m in maps] == ["every-kth", "every-kth", "lacache", "lacache"]


def test_the_vllm_plugin_serves_it_keeping_the_transformers_caches_tokens(every_kth):
    config = parse_config({"method": "every-kth", "budget": 24, "sinks": 2, "k": 3}, 4)
    assert config.method == "every-kth" and config.chunk == 1  # budget // 16, as every index-only rule
    model = tiny_llama("sdpa")
    cache = lacache.make_cache("every-kth", model, 24, sinks=2, k=3)
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    stream_generate(model, ids, cache, max_new_tokens=50, prefill_chunk=30)
    slots = config.new_slots(track_tokens=True)
    for q in config.points.split(0, 30, 30) + [1] * 49:  # the passes stream_generate ran (cut at the points)
        slots.advance(q)
    assert slots.seen == cache.seen and slots.slots == cache.num_slots
    assert slots.token_positions(0) == cache.token_positions(0).tolist()


def test_key_reading_methods_are_served_and_attention_methods_refused_with_the_reason():
    assert parse_config({"method": "knorm", "budget": 64}, 4).reads_keys  # key norms: read from the paged keys
    with pytest.raises(ValueError, match="attention scores"):
        parse_config({"method": "h2o", "budget": 64}, 4)


def test_other_packages_add_methods_through_the_entry_point_group(monkeypatch, every_kth):
    """``[project.entry-points."lacache.methods"]`` in another package: loaded on the first look-up of a
    name the registry does not know."""
    import importlib.metadata

    registry.unregister("every-kth")
    loaded = []

    class Entry:
        def load(self):
            loaded.append(True)
            return importlib.reload(every_kth)

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [Entry()] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    assert registry.method_spec("every-kth").name == "every-kth" and loaded == [True]
