"""Every bad setting fails early with one ValueError that names the parameter and a value that works."""

import pytest
import torch

from conftest import tiny_llama
from lacache import LaCache, StreamingLLMCache


@pytest.fixture(scope="module")
def model():
    return tiny_llama("sdpa", layers=8)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(span=9, overlap=0), r"span=9 must be between 1 and the number of layers \(8\); e\.g\. span=3"),
        (dict(span=4, overlap=4), r"overlap=4 must satisfy 0 <= overlap < span=4; e\.g\. overlap=2"),
        (dict(span=8, overlap=0), r"cannot compress; e\.g\. span=3, overlap=1"),
        (dict(span=3), r"give both or neither.*span=3, overlap=1"),
        (dict(budget=20, sinks=4, window=16), r"budget=20 is too small.*use budget >= 24"),
        (dict(budget=20, sinks=4, window=16, salient=0.125), r"budget=20 is too small.*salient=2.*use budget >= 26"),
        (dict(budget=0), r"budget=0 must be a positive number"),
        (dict(sinks=-1), r"sinks=-1 must be an integer >= 0, e.g. sinks=4"),
        (dict(window=0), r"window=0 must be an integer >= 1, e.g. window="),
        (dict(window=1.5), r"window=1.5 must be a number of slots .* or a fraction of the budget"),
        (dict(window=True), r"window=True must be a number of slots"),
        (dict(group=0), r"group=0 must be an integer >= 1, e.g. group=1"),
        (dict(group=40), r"budget=64 is too small.*one rung"),
        (dict(schedule="reference", group=2), r"group=2: schedule='reference'.*group=1"),
        (dict(positions="absolute"), r"positions='absolute' must be one of"),
        (dict(layout="zigzag"), r"layout='zigzag' must be one of .*e.g. layout='ladder'"),
        (dict(chunk=500), r"chunk=500 must be between 0 and"),
    ],
)
def test_lacache_configuration_errors(model, kwargs, pattern):
    kwargs = {"budget": 64, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        LaCache.from_model(model, **kwargs)


def test_window_as_a_fraction_of_the_budget(model):
    assert LaCache.from_model(model, budget=64, window=0.5).policy.window == 32
    assert LaCache.from_model(model, budget=64, window=0.01).policy.window == LaCache.from_model(
        model, budget=64).policy.geometry.rung  # never below one rung


def test_streaming_configuration_errors(model):
    with pytest.raises(ValueError, match=r"budget=4 must exceed sinks=4"):
        StreamingLLMCache.from_model(model, budget=4, sinks=4)


def test_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match=r"model=GPT2LMHeadModel has no rotary position embedding"):
        LaCache.from_model(gpt2, budget=64)


def test_mla_model_is_refused():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1,
    )
    with pytest.raises(ValueError, match=r"multi-head latent attention \(MLA\)"):
        LaCache.from_model(DeepseekV3ForCausalLM(config), budget=64)


def test_dynamic_rope_is_refused_for_shift_but_allowed_with_original_positions():
    model = tiny_llama("sdpa", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"rope_type='dynamic'.*positions='original'"):
        LaCache.from_model(model, budget=64)
    cache = LaCache.from_model(model, budget=64, positions="original")
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (1, 10)), cache=cache)
    assert cache.num_slots == 10


def test_crop_is_refused_clearly(model):
    cache = LaCache.from_model(model, budget=64)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (1, 10)), cache=cache)
    with pytest.raises(NotImplementedError, match="assisted"):
        cache.crop(-2)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(max_new_tokens=-3), r"max_new_tokens=-3 must be an integer >= 0, or None to never stop; e\.g\. max_new_tokens=256"),
    (dict(max_new_tokens=2.5), r"max_new_tokens=2\.5 must be an integer >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan must be a finite number >= 0 \(0 = greedy\), e\.g\. temperature=0\.7"),
    (dict(temperature=float("inf")), r"temperature=inf must be a finite number"),
    (dict(temperature=-1.0), r"temperature=-1\.0 must be a finite number >= 0"),
    (dict(top_p=-1.0), r"top_p=-1\.0 must be a number in \(0, 1\] \(1 = no nucleus cut\), e\.g\. top_p=0\.9"),
    (dict(top_p=0.0), r"top_p=0\.0 must be a number in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p=nan must be a number in \(0, 1\]"),
    (dict(top_p=1.5, temperature=0.7), r"top_p=1\.5 must be"),
    (dict(seed=2**70), r"seed=\d+ must be an integer .*e\.g\. seed=0"),
    (dict(sample_every=0), r"sample_every=0 must be a positive integer, e\.g\. sample_every=250"),
])
def test_stream_generate_refuses_bad_sampling_settings(model, kwargs, pattern):
    """Before, a negative count silently returned [] and NaN/negative sampling settings failed inside
    torch.multinomial (or quietly meant greedy); each is now one ValueError naming the parameter."""
    from lacache.cache.generation import stream_generate

    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        stream_generate(model, torch.randint(0, 96, (1, 6)), LaCache.from_model(model, budget=64), **kwargs)


def test_stream_generate_with_zero_new_tokens_returns_nothing(model):
    from lacache.cache.generation import stream_generate

    ids, stats = stream_generate(model, torch.randint(0, 96, (1, 6)), LaCache.from_model(model, budget=64), 0,
                                 temperature=0.7, top_p=1.0, seed=3)
    assert ids == [] and stats.prompt_tokens == 6
