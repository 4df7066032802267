"""lacache.generate as a transformers ``custom_generate`` (callable, hub folder) and in pipelines."""

import pytest
import torch

import lacache
from conftest import bundled_tokenizer_and_tiny_model, tiny_llama
from lacache import LaCache, StreamingLLMCache


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=4)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def built(monkeypatch):
    """Every cache lacache.generate builds during the test, in order."""
    caches = []
    real = lacache.cache.hub_generate.make_cache

    def spy(*args, **kwargs):
        caches.append(real(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(lacache.cache.hub_generate, "make_cache", spy)
    return caches


def _custom(model, ids, **kw):
    kw = {"max_new_tokens": 60, "do_sample": False, **kw}
    return model.generate(ids, custom_generate=lacache.generate, **kw)


def test_tokens_equal_generate_with_cache(model, prompt):
    expected = model.generate(prompt, cache=LaCache.from_model(model, budget=32), max_new_tokens=60, do_sample=False)
    got = _custom(model, prompt, lacache_method="lacache", lacache_budget=32)
    assert torch.equal(got, expected)
    # the method, budget and options reach make_cache
    expected = model.generate(
        prompt, cache=StreamingLLMCache.from_model(model, budget=24, sinks=2), max_new_tokens=60, do_sample=False
    )
    got = _custom(model, prompt, lacache_method="streaming", lacache_budget=24, lacache_options={"sinks": 2})
    assert torch.equal(got, expected)


def test_bounded_cache_changes_the_output(model, prompt):
    # a budget well below prompt + new tokens must evict, so the result differs from the full cache
    full = _custom(model, prompt, lacache_method="full")
    assert torch.equal(full, model.generate(prompt, max_new_tokens=60, do_sample=False))
    assert not torch.equal(_custom(model, prompt, lacache_budget=32), full)


def test_fresh_cache_per_call(model, prompt, built):
    first = _custom(model, prompt, lacache_budget=32)
    second = _custom(model, prompt, lacache_budget=32)
    assert torch.equal(first, second)
    assert len(built) == 2 and built[0] is not built[1]
    # each cache saw exactly one call: prompt + new tokens - 1 (the last token is never fed)
    assert [c.seen for c in built] == [40 + 59, 40 + 59]
    assert all(c.num_slots <= 32 for c in built)


def test_direct_call_and_sampling(model, prompt):
    expected = model.generate(prompt, cache=LaCache.from_model(model, budget=32), max_new_tokens=20, do_sample=False)
    assert torch.equal(lacache.generate(model, prompt, lacache_budget=32, max_new_tokens=20, do_sample=False), expected)
    torch.manual_seed(3)
    a = _custom(model, prompt, lacache_budget=32, max_new_tokens=20, do_sample=True, temperature=1.0)
    torch.manual_seed(3)
    b = model.generate(
        prompt, cache=LaCache.from_model(model, budget=32), max_new_tokens=20, do_sample=True, temperature=1.0
    )
    assert torch.equal(a, b)


def test_streamer_still_receives_tokens(model, prompt):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1))

        def end(self):
            self.ended = True

    streamer = Collect()
    out = _custom(model, prompt, lacache_budget=32, max_new_tokens=10, streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), out[0])


def test_assisted_decoding_refused(model, prompt):
    with pytest.raises(ValueError, match="assisted"):
        _custom(model, prompt, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="assistant_model"):
        _custom(model, prompt, assistant_model=tiny_llama(layers=2, seed=1))
    with pytest.raises(ValueError, match="assistant_model"):
        lacache.generate(model, prompt, assistant_model=model, max_new_tokens=3)


def test_bad_method_budget_options(model, prompt):
    with pytest.raises(ValueError, match="method='nope' is not one of"):
        _custom(model, prompt, lacache_method="nope")
    with pytest.raises(ValueError, match="budget=0 must be a positive"):
        _custom(model, prompt, lacache_budget=0)
    with pytest.raises(ValueError, match="lacache_options"):
        _custom(model, prompt, lacache_options=[("sinks", 2)])
    with pytest.raises(ValueError, match="not both"):
        _custom(model, prompt, cache=LaCache.from_model(model, budget=32))
    # a misspelt option is named with what the method takes (it used to be a TypeError from the builder)
    with pytest.raises(ValueError, match=r"lacache_options: lacache_method='streaming' does not take bogus; it takes "
                                         r"chunk, positions, sinks"):
        _custom(model, prompt, lacache_method="streaming", lacache_options={"bogus": 1})
    with pytest.raises(ValueError, match=r"lacache_method='full' does not take sinks; it takes no options"):
        _custom(model, prompt, lacache_method="full", lacache_options={"sinks": 1})


def test_nan_top_p_is_refused_not_ignored(model, prompt):
    """transformers lets top_p=nan through (and then samples without the nucleus cut)."""
    with pytest.raises(ValueError, match=r"top_p=nan must be a number in \(0, 1\]"):
        _custom(model, prompt, do_sample=True, top_p=float("nan"), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"top_p=nan must be a number in \(0, 1\]"):
        lacache.generate(model, prompt, do_sample=True, top_p=float("nan"), max_new_tokens=3)


def test_hub_folder_contract(model, prompt, tmp_path):
    """What transformers does with custom_generate="<repo or folder>": load custom_generate/generate.py."""
    folder = tmp_path / "repo" / "custom_generate"
    folder.mkdir(parents=True)
    (folder / "generate.py").write_text("from lacache.cache.hub_generate import generate  # noqa: F401\n")
    (folder / "requirements.txt").write_text("lacache\n")
    expected = model.generate(prompt, cache=LaCache.from_model(model, budget=32), max_new_tokens=30, do_sample=False)
    got = model.generate(
        prompt, custom_generate=str(tmp_path / "repo"), trust_remote_code=True, lacache_budget=32,
        max_new_tokens=30, do_sample=False,
    )
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def chat_pipe():
    from transformers import pipeline

    tokenizer, tiny = bundled_tokenizer_and_tiny_model()
    tiny.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    tiny.generation_config.eos_token_id = None  # random weights: never stop early, so budgets matter
    return pipeline("text-generation", model=tiny, tokenizer=tokenizer), tiny, tokenizer


def test_pipeline_fresh_cache_per_prompt(chat_pipe, built):
    pipe, tiny, tokenizer = chat_pipe
    settings = dict(custom_generate=lacache.generate, lacache_budget=64, max_new_tokens=80, do_sample=False)
    first, second = "The lighthouse keeper " * 12, "A map of the islands"
    alone = pipe(second, **settings)[0]["generated_text"]
    both = pipe([first, second], **settings)
    assert both[1][0]["generated_text"] == alone
    assert len(built) == 3 and len({id(c) for c in built}) == 3
    assert all(c.num_slots <= 64 for c in built)
    # and it is the bounded cache at work: matches generate(cache=LaCache(64)) on the same ids
    ids = tokenizer(second, return_tensors="pt")["input_ids"]
    out = tiny.generate(ids, cache=LaCache.from_model(tiny, budget=64), max_new_tokens=80, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True) == alone


def test_pipeline_batches_left_padded_prompts_exactly(chat_pipe, built):
    """batch_size=2 pads the shorter prompt; each output must equal that prompt run alone."""
    pipe, tiny, tokenizer = chat_pipe
    settings = dict(custom_generate=lacache.generate, lacache_budget=64, max_new_tokens=80, do_sample=False)
    prompts = ["The lighthouse keeper " * 12, "A map of the islands"]  # the first evicts first
    alone = [pipe(p, **settings)[0]["generated_text"] for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batched = pipe(prompts, batch_size=2, **settings)
    finally:
        tokenizer.padding_side = side
    assert [b[0]["generated_text"] for b in batched] == alone
    assert built[-1].padded and built[-1].batch_size == 2  # one padded batch, kept as two rows


def test_transformers_still_drops_streamer_and_assistant_for_a_callable(model, prompt):
    """Why ``hub_generate._dropped_by_generate`` reads ``generate()``'s frame: a callable ``custom_generate``
    receives neither ``streamer`` nor ``assistant_model``. If this fails, transformers now passes them and the
    frame read can go (the explicit arguments already take precedence)."""
    seen = {}

    def recording(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                  **kwargs):
        seen.update(kwargs, generation_config=generation_config)
        return input_ids

    streamer = type("Quiet", (), {"put": lambda self, value: None, "end": lambda self: None})()
    model.generate(prompt, custom_generate=recording, streamer=streamer, max_new_tokens=3)
    assert "streamer" not in seen and "assistant_model" not in seen
    assert seen["generation_config"].max_new_tokens == 3  # what does arrive: the prepared config, model kwargs


def test_explicit_streamer_and_assistant_win_over_the_frame():
    from lacache.cache.hub_generate import _dropped_by_generate

    given = {"assistant_model": object(), "streamer": object()}
    assert _dropped_by_generate(dict(given)) == given
    assert _dropped_by_generate({}) == {}  # called outside generate(): nothing to read
