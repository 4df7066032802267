"""LaCache with a salient pool: exact attention over what it reports, and the pool rule itself."""

import pytest
import torch

from conftest import policy_observe, policy_select, tiny_llama
from lacache import LaCache
from lacache.policies.ladder import ladder_plan
from lacache.policies.ladder_geometry import ladder_geometry
from lacache.policies.salient import SalientLadderPolicy
from test_cache import kept_sets, run_against_reference


@pytest.mark.parametrize("positions_mode", ["slots", "absolute"])
def test_salient_ladder_matches_reference(attn, positions_mode):
    model = tiny_llama(attn)
    cache = LaCache.from_model(model, budget=32, sinks=2, salient=6)
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(4))
    err = run_against_reference(model, cache, ids, [50] + [1] * 60 + [9, 11] + [1] * 20, positions_mode)
    assert err <= 1e-4
    sets = kept_sets(cache)
    assert len({tuple(s) for s in sets}) > 1 and all(s[:2] == [0, 1] for s in sets)


def _keys(norms: torch.Tensor) -> torch.Tensor:
    """Keys [1, 1, n, 2] whose per-slot L2 norms are ``norms``."""
    return torch.stack([norms, torch.zeros_like(norms)], dim=-1)[None, None]


def test_pool_keeps_lowest_norm_evicted_slots_and_ladder_runs_on_the_rest():
    geometry = ladder_geometry(4, 2, 0)  # B=3, A=1
    policy = SalientLadderPolicy(geometry, sinks=2, window=4, pool=3)
    n, target = 40, 20
    norms = torch.linspace(5.0, 9.0, n)
    norms[[7, 13, 30]] = torch.tensor([0.1, 0.2, 0.3])  # salient tokens somewhere in the body
    expected_ladder = ladder_plan(geometry, n, 2, target - 3, 2, 4)
    for layer in range(4):
        policy_observe(policy, layer, _keys(norms), None, 1)
        kept = policy_select(policy, layer, target)[0].tolist()
        ladder = expected_ladder.rows_for(layer).tolist()
        assert len(kept) == target
        assert set(ladder) <= set(kept)  # the ladder is untouched
        rescued = set(kept) - set(ladder)
        evicted = set(range(n)) - set(ladder)
        assert rescued == set(sorted(evicted, key=lambda i: norms[i].item())[:3])
        assert policy.state[layer][0].tolist() == [i in rescued for i in kept]
    assert policy.cursor == expected_ladder.cursor


def test_pool_members_compete_with_newly_evicted_slots():
    geometry = ladder_geometry(2, 1, 0)  # B=2, A=1
    policy = SalientLadderPolicy(geometry, sinks=1, window=2, pool=2)
    norms = torch.full((20,), 5.0)
    norms[3], norms[6] = 1.0, 4.0
    policy_observe(policy, 0, _keys(norms), None, 1)
    first = policy_select(policy, 0, 12, step=1)[0]
    pool = first[policy.state[0][0]].tolist()
    assert 3 in pool or 3 in first.tolist()
    # new slots arrive; one has a smaller norm than a pool member and must displace it
    stored = norms[first]
    arrived = torch.tensor([0.5, 5.0, 5.0, 5.0, 5.0, 5.0])
    policy_observe(policy, 0, _keys(torch.cat([stored, arrived])), None, 6)
    second = policy_select(policy, 0, 12, step=2)[0]
    new_pool_norms = torch.cat([stored, arrived])[second[policy.state[0][0]]]
    assert len(second) <= 12 and new_pool_norms.max() <= 4.0


def test_salient_errors_and_describe():
    model = tiny_llama("sdpa")
    with pytest.raises(ValueError, match="salient"):
        LaCache.from_model(model, budget=32, salient=-1)
    with pytest.raises(ValueError, match="salient"):
        LaCache.from_model(model, budget=32, salient=1.5)
    with pytest.raises(ValueError, match="too small"):
        LaCache.from_model(model, budget=32, sinks=2, salient=22)
    cache = LaCache.from_model(model, budget=64, sinks=2, salient=0.125)
    assert cache.describe()["salient"] == 8
