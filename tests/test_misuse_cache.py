"""Misuse of the cache API: threads, copies, the wrong model, reuse, bad values.

Every case here was once a silent wrong result or an internal traceback; each must now be either
exactly right or one clear ``ValueError`` that says what to do.
"""

import copy
import gc
import pickle
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from lacache import LaCache, make_cache
from lacache.cache.attach import hooks_for
from lacache.registry import METHODS

BOUNDED = [m for m in METHODS if m != "full"]
SCORE = ["tova", "h2o", "knorm"]
#: fits every registry method on a 4-layer model (lacache-group needs 41 with its salient pool), below every prompt here
BUDGET = 48
GREEDY = dict(do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama("eager")


def _ids(seed: int, length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache, tokens: int = 12):
    with torch.no_grad():
        out = model.generate(ids, cache=cache, max_new_tokens=tokens, **GREEDY)
    return out.sequences, torch.stack(out.logits)


def _attention_hooks(model) -> int:
    return sum(len(layer.self_attn._forward_pre_hooks) for layer in model.model.layers)


# ----------------------------------------------------------------------------- threads
@pytest.mark.parametrize("method", SCORE + ["lacache"])
def test_two_threads_sharing_a_model_match_the_serial_runs(model, method):
    """Each thread has its own cache on one shared model: a hook acts only for its own forward's cache."""
    prompts = [_ids(10, 70), _ids(11, 70)]
    serial = [_generate(model, p, make_cache(method, model, budget=BUDGET), tokens=30)[1] for p in prompts]
    for _ in range(2):
        results: dict[int, torch.Tensor] = {}
        barrier = threading.Barrier(2)

        def run(i: int) -> None:
            cache = make_cache(method, model, budget=BUDGET)
            barrier.wait()
            results[i] = _generate(model, prompts[i], cache, tokens=30)[1]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            assert torch.equal(results[i], serial[i]), f"thread {i} differs from its serial run"


def test_hooks_are_shared_per_model_and_released_with_the_last_cache():
    model = tiny_llama()
    caches = [make_cache("h2o", model, budget=16) for _ in range(20)]
    assert _attention_hooks(model) == 4, "one attention hook per layer, however many caches are alive"
    assert len(model.model._forward_pre_hooks) == 1
    ladder = make_cache("lacache", model, budget=16)
    del caches
    gc.collect()
    assert _attention_hooks(model) == 0, "attention hooks go with the last cache that reads attention"
    assert len(model.model._forward_pre_hooks) == 1  # the LaCache still needs the decoder hook
    del ladder
    gc.collect()
    assert not model.model._forward_pre_hooks and hooks_for(model) is None


def test_a_plain_forward_is_not_touched_by_live_score_caches():
    model = tiny_llama()
    ids = _ids(1, 40)
    with torch.no_grad():
        before = model(ids).logits
        caches = [make_cache("h2o", model, budget=16) for _ in range(5)]
        after = model(ids).logits
    assert torch.equal(before, after)
    assert all(c.observer._inputs == {} for c in caches), "no cache stashed another forward's inputs"


@pytest.mark.parametrize("method", ["tova", "h2o"])
def test_an_observer_holds_no_layer_input_after_its_forward(model, method):
    """Under budget (TOVA reads no attention) or over it, no hidden states outlive the layer's update."""
    cache = make_cache(method, model, budget=BUDGET)
    for length in (10, 60):
        with torch.no_grad():
            model(_ids(20, length), cache=cache)
        assert cache.observer._inputs == {} and cache.observer._queries == {}


# ----------------------------------------------------------------------------- copies
@pytest.mark.parametrize("method", BOUNDED)
def test_deepcopy_and_continue_equals_continuing_the_original(model, method):
    prompt = _ids(2, 70)
    original = make_cache(method, model, budget=BUDGET)
    with torch.no_grad():
        model(prompt, cache=original)
    first, second = copy.deepcopy(original), copy.deepcopy(original)
    a = torch.cat([prompt, _ids(3, 6)], dim=1)
    b = torch.cat([prompt, _ids(4, 9)], dim=1)
    seq_a, logits_a = _generate(model, a, first)
    seq_b, logits_b = _generate(model, b, second)  # after `first` ran: copies are independent
    seq_o, logits_o = _generate(model, a, original)
    assert torch.equal(seq_a, seq_o) and torch.equal(logits_a, logits_o)
    fresh = make_cache(method, model, budget=BUDGET)
    with torch.no_grad():
        model(prompt, cache=fresh)
    seq_f, logits_f = _generate(model, b, fresh)
    assert torch.equal(seq_b, seq_f) and torch.equal(logits_b, logits_f)


@pytest.mark.parametrize("method", ["lacache", "tova"])
def test_deepcopy_of_a_padded_batch_continues_like_the_original(model, method):
    ids = _ids(5, 30, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    original = make_cache(method, model, budget=16)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, cache=original, max_new_tokens=1, do_sample=False)
    twin = copy.deepcopy(original)
    assert twin.padded
    more = torch.cat([ids, _ids(6, 5, batch=2)], dim=1)
    more_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], dim=1)
    out = [model.generate(more, attention_mask=more_mask, cache=c, max_new_tokens=8, **GREEDY) for c in (twin, original)]
    assert torch.equal(out[0].sequences, out[1].sequences)
    assert torch.equal(torch.stack(out[0].logits), torch.stack(out[1].logits))


@pytest.mark.parametrize("method", BOUNDED)
def test_a_pickled_cache_continues_once_attached_again(method):
    model = tiny_llama("eager")
    prompt = _ids(7, 70)
    longer = torch.cat([prompt, _ids(8, 4)], dim=1)
    original = make_cache(method, model, budget=BUDGET)
    with torch.no_grad():
        model(prompt, cache=original)
    data = pickle.dumps(original)
    # while the model holds hooks for another cache of the same shape, they adopt the restored one
    assert torch.equal(_generate(model, longer, pickle.loads(data))[1], _generate(model, longer, original)[1])
    del original
    gc.collect()
    assert hooks_for(model) is None
    restored = pickle.loads(data)
    with pytest.raises(ValueError, match=r"not attached.*cache\.attach\(model\)"):
        _generate(model, longer, restored)
    restored = pickle.loads(data)
    restored.attach(model)
    again = pickle.loads(data)
    again.attach(model)
    assert torch.equal(_generate(model, longer, restored)[1], _generate(model, longer, again)[1])


# ----------------------------------------------------------------------------- the wrong model
@pytest.mark.parametrize(
    "other",
    [dict(layers=8), dict(layers=2), dict(head_dim=32), dict(rope_theta=500.0), dict(num_key_value_heads=4)],
    ids=["more-layers", "fewer-layers", "head-dim", "rope-theta", "kv-heads"],
)
@pytest.mark.parametrize("hooked", [False, True], ids=["bare-model", "model-with-its-own-cache"])
def test_a_cache_refuses_a_model_it_was_not_built_for(model, other, hooked):
    cache = make_cache("lacache", model, budget=24)
    wrong = tiny_llama("eager", **other)
    keep = make_cache("lacache", wrong, budget=24) if hooked else None  # noqa: F841 (the model has hooks)
    with pytest.raises(ValueError, match=r"(built for another model|not attached|does not exist|built for keys).*from_model"):
        with torch.no_grad():
            wrong(_ids(9, 30), cache=cache)
    with pytest.raises(ValueError, match="built for another model"):
        pickle.loads(pickle.dumps(cache)).attach(wrong)


def test_attach_refuses_another_model_by_name():
    model = tiny_llama()
    cache = pickle.loads(pickle.dumps(make_cache("lacache", model, budget=24)))
    with pytest.raises(ValueError, match=r"layers: built for 4, this model has 8"):
        cache.attach(tiny_llama(layers=8))


# ----------------------------------------------------------------------------- reuse and reset
@pytest.mark.parametrize("method", BOUNDED)
def test_a_second_generate_is_refused_and_reset_gives_a_fresh_cache(model, method):
    prompt = _ids(12, 60)
    cache = make_cache(method, model, budget=BUDGET)
    seq, logits = _generate(model, prompt, cache)
    for again in (prompt, prompt[:, :10]):
        with pytest.raises(ValueError, match=r"one stream.*cache\.reset\(\)"):
            _generate(model, again, cache)
    with pytest.raises(ValueError, match=r"batch of 1 sequences but this forward brings 3"):
        _generate(model, torch.cat([prompt] * 3), cache)
    cache.reset()
    seq2, logits2 = _generate(model, prompt, cache)
    assert torch.equal(seq, seq2) and torch.equal(logits, logits2)
    cache.reset()  # reset after a padded batch too
    ids = _ids(13, 50, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=6, **GREEDY)
    cache.reset()
    fresh = make_cache(method, model, budget=BUDGET)
    again = model.generate(ids, attention_mask=mask, cache=fresh, max_new_tokens=6, **GREEDY)
    assert torch.equal(torch.stack(out.logits), torch.stack(again.logits))
    assert torch.equal(_generate(model, prompt, cache)[1], logits)


def test_continuing_a_stream_in_pieces_is_not_refused(model):
    """The legitimate continuations: absolute positions (generate) and slot positions (lacache.cache.generation)."""
    cache = make_cache("lacache", model, budget=24)
    with torch.no_grad():
        model(_ids(14, 40), cache=cache)
        model(_ids(15, 3), cache=cache)  # positions default to seen..seen+3
        for step in range(30):  # positions counted by slot: below `seen` once the cache compacts
            slots = cache.num_slots
            model(_ids(16 + step, 1), cache=cache, position_ids=torch.tensor([[slots]]))
    assert cache.get_seq_length() == 73 and cache.num_slots < 73


# ----------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "options, name",
    [
        (dict(sinks=True), "sinks"),
        (dict(salient=True), "salient"),
        (dict(salient=2, salient_radius=2.5), "salient_radius"),
        (dict(span=5, overlap=1.5), "overlap"),
        (dict(span=3.0, overlap=1), "span"),
        (dict(span="3", overlap=1), "span"),
        (dict(window=1.5), "window"),
        (dict(window=float("nan")), "window"),
        (dict(group=2.0), "group"),
        (dict(chunk="4", schedule="capped"), "chunk"),
        (dict(budget=24.0), "budget"),
        (dict(positions=["shift"]), "positions"),
        (dict(schedule=1), "schedule"),
        (dict(layout=None), "layout"),
    ],
)
def test_a_setting_of_the_wrong_type_is_one_error_naming_it(model, options, name):
    options = {"budget": 24, **options}
    with pytest.raises(ValueError, match=rf"^{name}=") as err:
        LaCache.from_model(model, **options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method, extra", [("h2o", {"window": np.int32(8)}), ("knorm", {"sinks": np.int64(2)}),
                                           ("lacache", {"span": np.int64(2), "overlap": np.int8(0)}),
                                           ("lacache-capped", {"window": np.float32(0.25), "chunk": np.int16(1)}),
                                           ("streaming", {"sinks": np.uint8(2)})])
def test_numpy_numbers_are_numbers(model, method, extra):
    ids = _ids(18, 60)
    ours = make_cache(method, model, budget=np.int64(BUDGET), **extra)
    plain = make_cache(method, model, budget=BUDGET, **{k: v.item() for k, v in extra.items()})
    assert type(ours.budget) is int and ours.describe() == plain.describe()
    assert torch.equal(_generate(model, ids, ours)[1], _generate(model, ids, plain)[1])


def test_introspection_errors_name_the_argument(model):
    cache = make_cache("lacache", model, budget=24)
    with pytest.raises(IndexError, match=r"layer_idx=99 is out of range: this cache has 4 layers"):
        cache.token_positions(99)
    with pytest.raises(ValueError, match=r"layer_idx='0' must be an integer"):
        cache.token_positions("0")
    with pytest.raises(NotImplementedError, match=r"^LaCache cannot crop"):
        cache.crop(1)


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 80), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["3", "", "ladder", "band", "reference", "capped", "shift", "original"]),
    st.builds(np.int64, st.integers(-2, 60)), st.lists(st.integers(0, 3), max_size=2),
)
_OPTIONS = ["budget", "sinks", "span", "overlap", "window", "chunk", "salient", "salient_radius", "group",
            "schedule", "layout", "positions"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(_OPTIONS), _VALUES, max_size=5), budget=st.integers(1, 70))
def test_fuzzed_lacache_settings_either_work_or_fail_in_one_line(model, options, budget):
    options.setdefault("budget", budget)
    try:
        cache = LaCache.from_model(model, **options)
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and "=" in message, message
        return
    ids = _ids(19, 60)
    with torch.no_grad():
        model.generate(ids, cache=cache, max_new_tokens=3, do_sample=False)
    assert cache.num_slots <= cache.policy.most_slots(cache.budget)
