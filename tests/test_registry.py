"""The registry is the one place a method is defined: a policy plus one entry reaches every entry point."""

import numpy as np
import pytest
import torch

import lacache
from conftest import tiny_llama
from lacache import registry
from lacache.cache import BoundedCache, build_bounded_cache
from lacache.cache.generation import stream_generate
from lacache.policies import CompactionPlan, IndexPolicy


class _NewestHalfPolicy(IndexPolicy):
    """A made-up rule for the test: keep the sinks and the newest ``target - sinks`` slots of even index."""

    def __init__(self, sinks: int):
        self.sinks = sinks

    def plan(self, n: int, target: int) -> CompactionPlan:
        if n <= target:
            return CompactionPlan(np.arange(n)[None], 0)
        body = np.arange(self.sinks, n)
        body = np.concatenate([body[:-1][::2], body[-1:]])[-(target - self.sinks):]
        return CompactionPlan(np.concatenate([np.arange(self.sinks), body])[None].astype(np.int64), 0)


def _newest_half(num_layers, budget, sinks=2):
    return _NewestHalfPolicy(sinks)


def test_a_registered_method_reaches_make_cache_the_default_lists_and_custom_generate():
    spec = registry.Method("test-newest-half", _newest_half, "made up for the registry test",
                           suites=frozenset({"ppl"}))
    registry.register(spec)
    try:
        assert "test-newest-half" in lacache.METHODS and "test-newest-half" in registry.default_methods("ppl")
        assert "test-newest-half" not in registry.default_methods("decode")
        model = tiny_llama("sdpa")
        cache = lacache.make_cache("test-newest-half", model, 24)
        ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
        tokens, _ = stream_generate(model, ids, cache, max_new_tokens=60)
        assert len(tokens) == 60 and cache.num_slots <= 24 and cache.seen == 69
        kept = cache.token_positions(0).tolist()
        assert kept[:2] == [0, 1] and kept[-1] == 68 and all(b > a for a, b in zip(kept, kept[1:]))
        out = model.generate(ids, custom_generate=lacache.generate, lacache_method="test-newest-half",
                             lacache_budget=24, max_new_tokens=40, do_sample=False)
        assert out.shape == (1, 50)
        with pytest.raises(ValueError, match="already registered"):
            registry.register(spec)
    finally:
        registry.unregister("test-newest-half")


def test_method_specs_say_what_each_needs():
    assert registry.method_spec("tova").needs_attention and registry.method_spec("h2o").needs_attention
    assert not registry.method_spec("lacache").needs_attention and not registry.method_spec("full").bounded
    assert registry.default_methods("decode") == ("full", "streaming", "lacache", "tova", "h2o")
    with pytest.raises(ValueError, match="method='nope' is not one of"):
        registry.method_spec("nope")
    with pytest.raises(ValueError, match="needs a budget"):
        registry.make_cache("lacache", tiny_llama("sdpa"))


def test_a_variant_is_a_named_method_with_other_defaults():
    try:
        spec = registry.variant("test-g2", "lacache-reference", sinks=2)
        assert spec.defaults == {"schedule": "reference", "sinks": 2} and spec.suites == frozenset()
        assert registry.variant("test-g2", "lacache-reference", sinks=2) is spec  # the same again: a no-op
        with pytest.raises(ValueError, match="already registered"):
            registry.variant("test-g2", "lacache", sinks=3)
        with pytest.raises(ValueError, match="takes no options"):
            registry.variant("test-full", "full", sinks=2)
        cache = registry.make_cache("test-g2", tiny_llama("sdpa"), 32)
        assert cache.describe()["schedule"] == "reference" and cache.policy.sinks == 2
    finally:
        registry.unregister("test-g2")


def test_build_bounded_cache_still_builds_a_cache_from_any_policy():
    """The lower-level builder a notebook may call directly, with no registry entry."""
    cache = build_bounded_cache(BoundedCache, tiny_llama("sdpa"), 24, lambda layers: _NewestHalfPolicy(2), sinks=2)
    assert cache.budget == 24 and cache.chunk == 1


def test_entries_say_what_their_rule_reads_and_whether_vllm_serves_it():
    sees = {name: registry.method_spec(name).sees for name in registry.METHODS}
    assert sees["tova"] == sees["h2o"] == "attention" and sees["knorm"] == sees["lacache-salient"] == "keys"
    assert sees["lacache"] == sees["streaming"] == "slots"
    assert set(registry.served_methods()) == {"streaming", "lacache", "lacache-capped", "lacache-reference", "knorm",
                                              "keydiff", "lacache-salient", "lacache-group"}
    assert (registry.unbounded_method(), registry.baseline_method(), registry.default_method()) == (
        "full", "streaming", "lacache")
    with pytest.raises(ValueError, match="served=True needs a rule that reads slots or keys"):
        registry.Method("x", _newest_half, "x", sees="attention", served=True)
    with pytest.raises(ValueError, match="sees='everything'"):
        registry.Method("x", _newest_half, "x", sees="everything")
    with pytest.raises(ValueError, match="base='nope' is not registered"):
        registry.register(registry.Method("x", _newest_half, "x", base="nope"))
    with pytest.raises(ValueError, match="is the baseline already"):
        registry.register(registry.Method("x", _newest_half, "x", baseline=True))
    # vLLM's defaults are their own marks: keydiff (the most pass keys through the engine), and in half precision,
    # where rules that rank keys are refused, the capped schedule; both compact every budget // 16 tokens
    assert registry.served_default_method() == "keydiff" != registry.default_method()
    assert registry.served_default_method(half_precision=True) == "lacache-capped"
    # one answer to "is this half precision" for --dtype names, torch dtypes and vLLM's resolved dtype
    import torch

    for dtype in ("bfloat16", "bf16", "float16", "half", "auto", torch.bfloat16, torch.float16):
        assert registry.is_half_precision(dtype), dtype
    for dtype in (None, "float32", "float", "fp32", torch.float32):
        assert not registry.is_half_precision(dtype), dtype
    with pytest.raises(ValueError, match="is the serving default already"):
        registry.register(registry.Method("x", _newest_half, "x", serving_default=True))
    with pytest.raises(ValueError, match="is the half-precision serving default already"):
        registry.register(registry.Method("x", _newest_half, "x", serving_default_half=True))
    with pytest.raises(ValueError, match="serving_default_half=True needs a served rule that reads slots only"):
        registry.register(registry.Method("x", _newest_half, "x", sees="keys", serving_default_half=True))
    with pytest.raises(ValueError, match="vLLM does not serve it"):
        registry.register(registry.Method("x", _newest_half, "x", sees="attention", serving_default=True))


def test_the_named_classes_are_their_methods_cache_classes():
    model = tiny_llama("sdpa")
    assert type(lacache.make_cache("lacache-capped", model, 48)) is lacache.LaCache
    assert type(lacache.make_cache("h2o", model, 48)) is lacache.H2OCache
    assert type(lacache.StreamingLLMCache.from_model(model, 48, sinks=2)) is lacache.StreamingLLMCache

    class Mine(lacache.LaCache):
        pass

    assert type(Mine.from_model(model, 48)) is Mine
    with pytest.raises(ValueError, match="takes no option bogus"):
        lacache.LaCache.from_model(model, 48, bogus=1)
