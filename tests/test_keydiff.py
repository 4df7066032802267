"""KeyDiff: the slots it keeps are the ones its definition picks, from keys as attention reads them.

The expected survivors are recomputed here from the independent reference forward's raw keys
(``ReferenceStream.history``), rotated to their slot positions with the model's own rotary module,
scored with a per-head loop written for this test (not ``lacache.policies.keydiff``), rounded to
bfloat16's 8 bits and ranked with the older slot winning ties. A slot is scored once, at the first
compaction that holds it, against the mean direction of the keys held then; its score is kept after.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from lacache import KeyDiffCache, make_cache
from lacache.policies.keydiff import KEY_DIVERGENCE, anchor_divergence
from oracle_forward import ReferenceStream


def _divergence(keys: torch.Tensor) -> torch.Tensor:
    """``[n]`` negative cosine of each key to its head's mean unit key, averaged over heads; keys ``[H, n, D]``."""
    per_head = []
    for head in keys.double():
        unit = head / head.norm(dim=-1, keepdim=True)
        anchor = unit.mean(dim=0)
        per_head.append(-(unit @ (anchor / anchor.norm())))
    return torch.stack(per_head).mean(dim=0).float()


def _expected(ref: ReferenceStream, layer: int, tokens: list[int], target: int, sinks: int, window: int,
              scored: dict) -> list[int]:
    """The survivors of one compaction of ``tokens``; ``scored[(layer, token)]`` holds every score already given."""
    raw = torch.stack([ref.history[layer][t][0] for t in tokens], dim=1)  # [kv, n, D]
    n = len(tokens)
    now = _divergence(ref._rope(raw, torch.arange(n))).to(torch.bfloat16).float().tolist()
    score = [scored.setdefault((layer, t), now[i]) for i, t in enumerate(tokens)]
    forced = [float("inf") if i < sinks or i >= n - window else score[i] for i in range(n)]
    best = sorted(range(n), key=lambda i: (-forced[i], i))[:target]
    return [tokens[i] for i in sorted(best)]


@pytest.mark.parametrize("rotation", ["stored", "read"])
def test_keydiff_keeps_the_keys_furthest_from_the_mean_direction(rotation):
    """Over a prompt and 36 decode steps, every compaction of every layer keeps exactly the sinks, the window and
    the top-scoring rest, each slot scored once on keys at their slot positions: with keys stored at their slots (float32's
    ``stored``) and with keys stored unrotated (``read``) alike, and the logits stay the reference forward's."""
    model = tiny_llama("sdpa")
    cache = make_cache("keydiff", model, budget=20, chunk=0)
    cache.rotation = rotation
    sinks, window = cache.policy.sinks, cache.policy.window
    ref = ReferenceStream(model)
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(3))
    start, compactions, worst, scored = 0, 0, 0.0, {}
    for size in [24] + [1] * 36:
        piece = ids[:, start : start + size]
        before = [cache.token_positions(layer).tolist() for layer in range(4)]
        pos = torch.arange(cache.num_slots, cache.num_slots + size)
        with torch.no_grad():
            out = model(input_ids=piece, position_ids=pos[None], cache=cache).logits
        worst = max(worst, (out[0] - ref.step(piece[0], pos, before)).abs().max().item())
        new = list(range(start, start + size))
        for layer in range(4):
            after = cache.token_positions(layer).tolist()
            held = before[layer] + new
            if after != held:
                compactions += 1
                assert after == _expected(ref, layer, held, len(after), sinks, window, scored), (start, layer)
        assert cache.num_slots <= 20
        start += size
    assert compactions >= 4 * 30 and worst <= 1e-4


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.integers(-500, 500), n=st.integers(2, 40))
def test_a_shift_common_to_every_position_leaves_the_scores_unchanged(seed, shift, n):
    """Keys at positions ``p`` and at ``p + shift`` score alike: any frame a backend stores keys in (the
    transformers cache's ``frame + slot``, vLLM's physical slot) gives the same survivors."""
    model = tiny_llama("sdpa")
    ref = ReferenceStream(model)
    raw = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(n)
    a = anchor_divergence(ref._rope(raw, positions)[None])
    b = anchor_divergence(ref._rope(raw, positions + shift + 600)[None])
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a[0], _divergence(ref._rope(raw, positions)), atol=1e-5)


def test_a_held_slot_keeps_the_score_it_was_first_given():
    """What a backend hands in for slots scored at an earlier compaction is ignored: only the new slots'
    values are read (so two backends that round a held key's value differently still keep the same slots)."""
    from lacache.policies.base import LayerView
    from lacache.policies.keydiff import keydiff_policy

    first = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.1, 0.3, 0.2, 0.4, 0.0]])
    kept = []
    for handed in (lambda held: held, lambda held: held.flip(1)):  # the same values, or the held ones shuffled
        policy = keydiff_policy(num_layers=1, budget=9, sinks=2, window=1)
        policy.retain(LayerView(0, 10, 10, 0, stats=first), 8)
        held = policy.state[0].clone()
        later = torch.cat([handed(held), torch.tensor([[0.45, 0.0]])], dim=1)
        kept.append(policy.retain(LayerView(0, 10, 2, 1, stats=later), 8).index.tolist())
    assert kept[0] == kept[1]


def test_keydiff_is_named_and_refuses_what_it_cannot_do():
    model = tiny_llama("sdpa")
    cache = KeyDiffCache.from_model(model, budget=32)
    assert cache.policy.key_statistic is KEY_DIVERGENCE and not KEY_DIVERGENCE.per_slot
    with pytest.raises(ValueError, match="static=True"):
        make_cache("keydiff", model, 32, static=True)
    with pytest.raises(ValueError, match="budget=8 is smaller than sinks=4 \\+ window=9"):
        make_cache("keydiff", model, budget=8, window=9)
