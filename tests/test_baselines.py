"""TOVA, H2O and key-norm: selection rules on hand-made scores, observed queries, exactness."""

import pytest
import torch

from conftest import policy_observe, policy_select, tiny_llama
from lacache import H2OCache, KeyDiffCache, KNormCache, TOVACache, make_cache
from lacache.cache.observe import attention_probs
from lacache.policies import H2OPolicy, KNormPolicy, TOVAPolicy, keep_top
from oracle_forward import ReferenceStream


def test_keep_top_forces_sinks_and_window_and_sorts():
    score = torch.tensor([[0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 0.5, 0.1]])
    idx = keep_top(score, target=5, sinks=1, window=2)
    assert idx.tolist() == [[0, 1, 3, 6, 7]]  # sink 0, window 6-7, then the two best: 1 (9.0), 3 (8.0)
    idx = keep_top(torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]]), target=2, sinks=0, window=0)
    assert idx.tolist() == [[0, 2], [1, 2]]  # each sequence its own choice, ascending


def test_tova_keeps_what_the_newest_query_attends_to():
    policy = TOVAPolicy(num_layers=1, sinks=0, window=1)
    probs = torch.tensor([[[0.9, 0.0, 0.0, 0.1, 0.0], [0.05, 0.4, 0.05, 0.3, 0.2]]])  # [B=1, q=2, n=5]
    policy_observe(policy, 0, keys=None, probs=probs, q=2)
    assert policy_select(policy, 0, target=3).tolist() == [[1, 3, 4]]  # last query's top-2 + the newest slot


def test_h2o_accumulates_attention_over_queries_and_steps():
    policy = H2OPolicy(num_layers=1, sinks=0, window=1)
    policy_observe(policy, 0, None, torch.tensor([[[1.0, 0.0, 0.0], [0.1, 0.8, 0.1]]]), q=2)
    policy_observe(policy, 0, None, torch.tensor([[[0.0, 0.1, 0.2, 0.7]]]), q=1)
    assert torch.allclose(policy.state[0], torch.tensor([[1.1, 0.9, 0.3, 0.7]]))
    assert policy_select(policy, 0, target=2).tolist() == [[0, 3]]
    assert torch.allclose(policy.state[0], torch.tensor([[1.1, 0.7]]))  # scores follow the kept slots


def test_knorm_keeps_smallest_norm_keys():
    policy = KNormPolicy(num_layers=1, sinks=1, window=1)
    norms = torch.tensor([5.0, 4.0, 1.0, 3.0, 0.5, 9.0])
    keys = torch.zeros(1, 2, 6, 4)
    keys[..., 0] = norms  # both heads
    policy_observe(policy, 0, keys, None, q=6)
    assert policy_select(policy, 0, target=4).tolist() == [[0, 2, 4, 5]]  # sink, smallest (4: 0.5, 2: 1.0), newest


def test_attention_probs_matches_manual_softmax_with_gqa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8)
    k = torch.randn(2, 2, 6, 8)
    probs = attention_probs(q, k, 0.5)
    k_full = k.repeat_interleave(2, dim=1)
    scores = (q @ k_full.transpose(-1, -2)) * 0.5
    mask = torch.ones(3, 6, dtype=torch.bool).tril(3)
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1).mean(1)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_observed_queries_reproduce_the_models_attention_weights():
    """An H2O cache's observer recomputes layer 2's query from the input its hook stashed; the
    head-averaged attention it gives equals the model's own attention weights."""
    model = tiny_llama("eager")
    cache = H2OCache.from_model(model, budget=64)
    seen = {}
    observer = cache.observer
    release = observer.release

    def keep_layer_two(layer_idx):  # read the query before the cache drops it
        if layer_idx == 2:
            seen["query"] = observer.query(2)
        release(layer_idx)

    observer.release = keep_layer_two
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, output_attentions=True)
        keys = cache.layers[2].keys
        probs = attention_probs(seen["query"], keys, observer.scaling[2])
    assert torch.allclose(probs, out.attentions[2].mean(dim=1), atol=1e-5)
    cache.close()
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("cls", [TOVACache, H2OCache, KNormCache, KeyDiffCache])
def test_score_caches_match_reference_per_sequence(attn, cls):
    model = tiny_llama(attn)
    cache = cls.from_model(model, budget=20)
    ids = torch.randint(0, 96, (2, 60), generator=torch.Generator().manual_seed(1))
    refs = [ReferenceStream(model), ReferenceStream(model)]
    worst, start = 0.0, 0
    for size in [24] + [1] * 36:
        piece = ids[:, start : start + size]
        pos = torch.arange(cache.num_slots, cache.num_slots + size)
        kept = [[cache.token_positions(layer, b).tolist() for layer in range(4)] for b in range(2)]
        with torch.no_grad():
            out = model(input_ids=piece, position_ids=pos[None], cache=cache).logits
        for b in range(2):
            worst = max(worst, (out[b] - refs[b].step(piece[b], pos, kept[b])).abs().max().item())
        assert cache.num_slots <= 20
        start += size
    assert worst <= 1e-4
    rows = [tuple(cache.token_positions(1, b).tolist()) for b in range(2)]
    assert rows[0] != rows[1], "different sequences choose different slots"
    layers = {tuple(cache.token_positions(layer, 0).tolist()) for layer in range(4)}
    assert len(layers) > 1, "different layers choose different slots"
    if hasattr(cache, "close"):
        cache.close()


def test_score_caches_work_in_generate():
    model = tiny_llama("sdpa")
    prompt = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    for method in ("tova", "h2o", "knorm", "keydiff"):
        cache = make_cache(method, model, budget=16)
        with torch.no_grad():
            out = model.generate(prompt, cache=cache, max_new_tokens=20, do_sample=False)
        assert out.shape[1] == 50 and cache.num_slots <= 16


def test_registry_errors():
    model = tiny_llama("sdpa")
    with pytest.raises(ValueError, match="method='snap' is not one of"):
        make_cache("snap", model, budget=16)
    with pytest.raises(ValueError, match="needs a budget"):
        make_cache("lacache", model)
    with pytest.raises(ValueError, match="budget=8 is smaller than sinks=0 \\+ window=9"):
        make_cache("h2o", model, budget=8, window=9)
