"""Left-padded batches: every row gives the tokens and logits it gives alone (SPEC §5)."""

import pytest
import torch

from conftest import tiny_llama
from lacache import H2OCache, KNormCache, LaCache, StreamingLLMCache, TOVACache
from lacache.cache.padded import first_real, layout_mask

LENGTHS = (30, 22, 9)  # budget 24: row 0 evicts during the prompt, row 1 a few tokens in, row 2 much later
NEW = 40


def _batch(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 96, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    return prompts, ids, mask


def _factory(method, model, rotation):
    def make():
        if method == "lacache":
            cache = LaCache.from_model(model, budget=24, sinks=2)
        elif method == "lacache-salient":
            cache = LaCache.from_model(model, budget=24, sinks=2, window=6, salient=3)
        elif method == "tova":
            cache = TOVACache.from_model(model, budget=24)
        elif method == "h2o":
            cache = H2OCache.from_model(model, budget=24)
        elif method == "knorm":
            cache = KNormCache.from_model(model, budget=24)
        else:
            cache = StreamingLLMCache.from_model(model, budget=24, sinks=2)
        cache.rotation = rotation
        return cache
    return make


GREEDY = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("method,rotation,prefill_chunk", [
    ("lacache", "stored", None),
    ("lacache", "read", None),
    ("lacache", "stored", 8),
    ("lacache-salient", "stored", None),
    ("streaming", "stored", None),
    ("tova", "stored", None),
    ("h2o", "stored", 8),
    ("lacache", "read", 8),
])
def test_padded_batch_rows_equal_rows_alone(attn, method, rotation, prefill_chunk):
    model = tiny_llama(attn)
    prompts, ids, mask = _batch()
    make = _factory(method, model, rotation)
    extra = {} if prefill_chunk is None else {"prefill_chunk_size": prefill_chunk}
    cache = make()
    out = model.generate(ids, attention_mask=mask, cache=cache, **GREEDY, **extra)
    assert cache.padded and cache.batch_size == 3 and cache.num_slots <= 24
    width = ids.shape[1]
    for b, prompt in enumerate(prompts):
        alone_cache = make()
        alone = model.generate(prompt[None], cache=alone_cache, **GREEDY, **extra)
        assert torch.equal(out.sequences[b, width:], alone.sequences[0, len(prompt):]), f"row {b}"
        worst = max((got[b] - want[0]).abs().max().item() for got, want in zip(out.logits, alone.logits))
        assert worst <= 1e-4, f"row {b}: logits differ by {worst}"
        # the row holds exactly the tokens it holds alone, in every layer
        for layer in range(len(model.model.layers)):
            assert torch.equal(cache.token_positions(layer, b), alone_cache.token_positions(layer))
        assert cache._rows[b].seen == alone_cache.seen == len(prompt) + NEW - 1


def test_rows_evict_at_different_times():
    """The premise of the test above: after the prompt one row has evicted and another has not."""
    model = tiny_llama("eager")
    _, ids, mask = _batch()
    cache = LaCache.from_model(model, budget=24, sinks=2)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
    held = [row.num_slots for row in cache._rows]
    assert held[0] < LENGTHS[0] and held[2] == LENGTHS[2]
    assert cache.get_seq_length() == ids.shape[1]  # generate slices its inputs by columns seen


def test_a_naively_compacted_padded_layout_is_wrong():
    """Without the per-row layout (padding hidden from the cache) the padded rows' logits go wrong."""
    model = tiny_llama("eager")
    prompts, ids, mask = _batch()
    cache = LaCache.from_model(model, budget=24, sinks=2)
    cache._begin_padded_forward = lambda mask, q: None  # the cache never learns about the padding
    cache._check_continues = lambda positions: None  # (so its rows' differing positions are not refused either)
    out = model.generate(ids, attention_mask=mask, cache=cache, **GREEDY)
    alone = model.generate(prompts[2][None], cache=LaCache.from_model(model, budget=24, sinks=2), **GREEDY)
    worst = max((got[2] - want[0]).abs().max().item() for got, want in zip(out.logits, alone.logits))
    assert not cache.padded and worst > 1e-2


def test_unpadded_batches_keep_the_shared_layout():
    model = tiny_llama()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = LaCache.from_model(model, budget=16, sinks=2)
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=8, do_sample=False)
    assert not cache.padded and cache.batch_size == 2


@pytest.mark.parametrize("method", ["lacache", "tova"])
def test_beam_search_over_a_padded_batch_equals_each_row_alone(method):
    model = tiny_llama("eager")
    prompts, ids, mask = _batch(lengths=(20, 11))
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, num_beams=3, do_sample=False, pad_token_id=0,
                  early_stopping=False)
    make = _factory(method, model, "stored")
    cache = make()
    out = model.generate(ids, attention_mask=mask, cache=cache, **kwargs)
    assert cache.padded and cache.batch_size == 6
    for b, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], cache=make(), **kwargs)
        assert torch.equal(out[b, ids.shape[1]:], alone[0, len(prompt):]), f"row {b}"


def test_right_padding_is_refused():
    model = tiny_llama()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        model(input_ids=ids, attention_mask=mask, cache=LaCache.from_model(model, budget=16))


def test_first_real_and_layout_mask():
    assert first_real([[0, 0, 1], [1, 1, 1], [0, 0, 0]], [False, False, False]) == [2, 0, 3]
    with pytest.raises(ValueError, match="row 0"):
        first_real([[1, 0, 1]], [False])
    with pytest.raises(ValueError, match="row 1"):
        first_real([[1], [0]], [True, True])  # padding after real tokens, in a later forward
    mask = layout_mask([3, 1, 0], torch.tensor([[1, 1], [0, 1], [1, 1]]))
    assert mask.tolist() == [[True, True, True, True, True],
                             [False, False, True, False, True],
                             [False, False, False, True, True]]


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_padded_batches_with_sliding_window_layers_equal_rows_alone(family):
    """A sliding window counts columns back from the query, so each row's slots must end right
    before the new tokens (right-aligned), as they sit alone."""
    from test_families import build

    model = build(family, "eager", sliding_window=6)
    model.generation_config.eos_token_id = None
    prompts, ids, mask = _batch()
    prompts = [p % 90 + 3 for p in prompts]
    ids = torch.where(mask.bool(), ids % 90 + 3, ids)
    make = lambda: LaCache.from_model(model, budget=24, sinks=2)  # noqa: E731
    out = model.generate(ids, attention_mask=mask, cache=make(), **GREEDY)
    for b, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], cache=make(), **GREEDY)
        assert torch.equal(out.sequences[b, ids.shape[1]:], alone.sequences[0, len(prompt):]), f"row {b}"
        worst = max((got[b] - want[0]).abs().max().item() for got, want in zip(out.logits, alone.logits))
        assert worst <= 1e-4, f"row {b}: logits differ by {worst}"
