"""Properties of the pure slot arithmetic (ladder geometry and compaction plans)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lacache.policies.ladder import ladder_plan
from lacache.policies.ladder_geometry import default_span_overlap, ladder_geometry
from lacache.policies.plan import identity_plan
from lacache.policies.streaming import window_plan


def valid_geometries(max_layers=40):
    out = []
    for layers in range(2, max_layers + 1):
        for span in range(1, layers + 1):
            for overlap in range(span):
                step = span - overlap
                b = 1 + math.ceil((layers - span) / step)
                a = min(math.ceil(span / step), b)
                if b > a:
                    out.append((layers, span, overlap))
    return out


GEOMETRIES = valid_geometries()


def test_spec_examples():
    g = ladder_geometry(30, 9, 7)
    assert (g.rung, g.keep) == (12, 5)
    assert g.offsets[:9] == (0, 1, 2, 3, 4, 5, 6, 7, 0)
    g = ladder_geometry(30, 10, 0)
    assert (g.rung, g.keep) == (3, 1)
    assert [layer for layer in range(30) if g.offsets[layer] == 0] == list(range(0, 30, 3))
    g = ladder_geometry(32, 16, 0)
    assert (g.rung, g.keep) == (2, 1)
    assert g.offsets[:4] == (0, 1, 0, 1)


def test_default_span_overlap_matches_reference_settings():
    assert default_span_overlap(32) == (16, 0)
    assert default_span_overlap(28) == (14, 0)
    assert default_span_overlap(24) == (9, 7)
    for layers in range(2, 81):
        span, overlap = default_span_overlap(layers)
        ladder_geometry(layers, span, overlap)  # must be a compressing ladder


@pytest.mark.parametrize("layout", ["ladder", "band"])
def test_every_valid_geometry_keeps_rungs_inside(layout):
    for layers, span, overlap in GEOMETRIES:
        g = ladder_geometry(layers, span, overlap, layout)
        assert g.rung > g.keep >= 1
        assert all(0 <= o <= g.rung - g.keep for o in g.offsets), (layers, span, overlap)
        # every offset of the ladder's period is used once there are enough layers
        period = g.rung - g.keep + 1
        if layers >= period:
            assert set(g.offsets) == set(range(period))
        if layout == "band":
            assert list(g.offsets) == sorted(g.offsets)


def test_invalid_geometries_raise_with_a_working_suggestion():
    with pytest.raises(ValueError, match="span=31"):
        ladder_geometry(30, 31, 0)
    with pytest.raises(ValueError, match="overlap=9"):
        ladder_geometry(30, 9, 9)
    with pytest.raises(ValueError, match="cannot compress.*span="):
        ladder_geometry(30, 30, 0)
    with pytest.raises(ValueError, match="layout"):
        ladder_geometry(30, 9, 7, "zigzag")


scenario = st.fixed_dictionaries(
    {
        "geometry": st.sampled_from(GEOMETRIES),
        "sinks": st.integers(0, 8),
        "window": st.integers(1, 24),
        "extra": st.integers(0, 64),
        "chunk": st.integers(0, 16),
        "steps": st.lists(st.integers(1, 40), min_size=1, max_size=60),
        "group": st.sampled_from([1, 1, 2, 3, 8]),
    }
)


def _simulate(params):
    """Stream tokens through the planner like a cache would; check every invariant at every step."""
    layers, span, overlap = params["geometry"]
    g = ladder_geometry(layers, span, overlap, group=params.get("group", 1))
    sinks, window = params["sinks"], params["window"]
    budget = sinks + window + g.rung + params["extra"]
    target = max(sinks + window + g.rung - 1, budget - params["chunk"])
    held = np.broadcast_to(np.arange(0), (layers, 0))
    cursor, seen = sinks, 0
    for q in params["steps"]:
        new = np.arange(seen, seen + q)
        seen += q
        held = np.concatenate([held, np.broadcast_to(new, (layers, q))], axis=1)
        n = held.shape[1]
        if n <= budget:
            continue
        plan = ladder_plan(g, n, cursor, target, sinks, window)
        idx = plan.index
        # same count in every layer, never above the target
        assert idx.shape[0] == layers and idx.shape[1] <= target
        # strictly increasing: no duplicates, order preserved
        assert (np.diff(idx, axis=1) > 0).all()
        # sinks and the recent window are always kept
        assert (idx[:, :sinks] == np.arange(sinks)).all()
        if window:
            assert (idx[:, -window:] == np.arange(n - window, n)).all()
        # every pass starts at the oldest non-sink slot
        assert all(start == sinks for start in plan.passes_started)
        # a compaction that starts a pass drops slots from the first rung after the sinks
        if plan.passes_started and plan.passes_started[0] == sinks and cursor == sinks:
            dropped = np.setdiff1d(np.arange(n), idx[0])
            assert dropped.min() < sinks + g.rung
        # it frees no more than one rung below the target
        assert idx.shape[1] > target - g.freed_per_rung
        held = np.take_along_axis(held, idx, axis=1)
        cursor = plan.cursor
    return g, held, seen


@settings(max_examples=300, deadline=None)
@given(scenario)
def test_streamed_compaction_invariants(params):
    g, held, seen = _simulate(params)
    assert held.shape[1] <= max(held.shape[1], 0)
    # each layer holds distinct, increasing original tokens and always the newest one
    if held.shape[1]:
        assert (np.diff(held, axis=1) > 0).all()
        assert (held[:, -1] == seen - 1).all()


def test_budget_at_least_sequence_changes_nothing():
    g = ladder_geometry(30, 9, 7)
    for n in range(0, 200, 7):
        plan = ladder_plan(g, n, 4, 200, 4, 16)
        assert plan.index.shape == (1, n) and (plan.index[0] == np.arange(n)).all()
        assert plan.cursor == 4
    assert (identity_plan(5, 2).index == np.arange(5)).all()


def test_layers_keep_different_tokens_and_the_ladder_covers_more_than_a_layer():
    g = ladder_geometry(30, 9, 7)
    plan = ladder_plan(g, 1000, 4, 200, 4, 16)
    rows = {tuple(row) for row in plan.index}
    assert len(rows) == g.rung - g.keep + 1  # one distinct pattern per offset
    union = np.unique(plan.index)
    assert union.size > plan.index.shape[1]


def test_prompt_many_times_the_budget_takes_several_passes_and_gets_sparser_with_age():
    g = ladder_geometry(30, 10, 0)  # keep 1 of 3
    plan = ladder_plan(g, 20_000, 4, 256, 4, 32)
    assert len(plan.passes_started) >= 4
    row = plan.index[0]
    assert row.shape[0] <= 256
    body = row[4:-32]
    gaps = np.diff(body)
    # older history (front of the body) is sparser than newer history
    assert gaps[: len(gaps) // 4].mean() > gaps[-len(gaps) // 4 :].mean()


def test_density_after_passes():
    # Each full pass keeps A/B of the body: after p passes density is (A/B)^p.
    g = ladder_geometry(32, 16, 0)  # keep 1 of 2
    plan = ladder_plan(g, 4 + 64 * 4, 4, 4 + 64, 4, 0)
    gaps = np.diff(plan.index[0][4:])
    assert set(gaps.tolist()) == {4}


def test_window_plan_keeps_sinks_and_recent():
    plan = window_plan(100, 20, 4)
    assert plan.index[0].tolist() == list(range(4)) + list(range(84, 100))
    assert window_plan(10, 20, 4).index[0].tolist() == list(range(10))
    with pytest.raises(ValueError):
        window_plan(30, 4, 4)


def test_plan_rejects_target_without_room_for_a_rung():
    g = ladder_geometry(4, 2, 0)
    with pytest.raises(ValueError, match="target"):
        ladder_plan(g, 40, 2, 6, 2, 4)


def _steady_policy_plans(layers: int, budget: int, chunk: int, steps: int, warm: bool):
    """Drive a LadderPolicy through ``steps`` steady compactions, checking each plan against ladder_plan."""
    from lacache.policies.ladder import LadderPolicy

    geometry = ladder_geometry(layers, *default_span_overlap(layers))
    policy = LadderPolicy(geometry, sinks=4, window=budget // 4)
    n, target = budget + 1, budget - chunk
    if warm:
        policy.plan(n, target)
    planned, cursor = len(policy._plans), policy.cursor
    for _ in range(steps):
        expected = ladder_plan(geometry, n, cursor, target, 4, budget // 4)
        got = policy.plan(n, target)
        assert np.array_equal(got.index, expected.index) and got.cursor == expected.cursor
        cursor = got.cursor
    return policy, planned


@pytest.mark.parametrize("layers,budget,chunk", [(4, 64, 8), (30, 256, 16), (6, 40, 1)])
def test_ladder_policy_plans_the_whole_cycle_at_the_first_compaction(layers, budget, chunk):
    """After the first steady compaction no plan is built; every memoised plan is the one ladder_plan gives."""
    policy, planned = _steady_policy_plans(layers, budget, chunk, steps=500, warm=True)
    assert len(policy._plans) == planned


def test_ladder_policy_memo_stays_under_its_byte_cap_and_stays_correct():
    """80 layers x 4,096 slots: each plan is 2.6 MB, so only part of the cycle is memoised."""
    from lacache.policies import ladder as ladder_policy

    policy, _ = _steady_policy_plans(80, 4096, 256, steps=60, warm=False)
    held = sum(plan.index.nbytes for plan in policy._plans.values())
    assert 0 < held <= ladder_policy._MEMO_BYTES and held == policy._memo_bytes


# --------------------------------------------------------------------------- the group ladder


def test_group_scales_the_rung_and_keeps_the_stagger():
    for layers, span, overlap in GEOMETRIES[::37]:
        plain = ladder_geometry(layers, span, overlap)
        for group in (2, 5, 16):
            g = ladder_geometry(layers, span, overlap, group=group)
            assert (g.rung, g.keep, g.group) == (plain.rung * group, plain.keep * group, group)
            assert g.offsets == tuple(o * group for o in plain.offsets)
            assert g.freed_per_rung == plain.freed_per_rung * group
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="group="):
            ladder_geometry(30, 15, 0, group=bad)


@settings(max_examples=200, deadline=None)
@given(
    geometry=st.sampled_from(GEOMETRIES),
    group=st.integers(2, 12),
    sinks=st.integers(0, 8),
    window=st.integers(1, 24),
    runs=st.integers(1, 12),
)
def test_group_ladder_keeps_or_drops_whole_groups(geometry, group, sinks, window, runs):
    """In a pass, each layer keeps whole aligned runs of ``group`` consecutive slots, never part of one,
    and every run is kept by some layer once there are as many layers as offsets."""
    g = ladder_geometry(*geometry, group=group)
    n = sinks + window + (runs + 1) * g.rung
    target = n - runs * g.freed_per_rung  # exactly `runs` rungs, in the pass that starts at the sinks
    plan = ladder_plan(g, n, sinks, target, sinks, window)
    assert plan.index.shape[1] == target and plan.cursor == sinks + runs * g.keep
    for row in plan.index:
        body = row[sinks : sinks + runs * g.keep]
        pieces = body.reshape(-1, group)
        assert (np.diff(pieces, axis=1) == 1).all()  # consecutive inside a unit
        assert ((pieces[:, 0] - sinks) % group == 0).all()  # aligned to the units of the pass
    period = (g.rung - g.keep) // group + 1
    if geometry[0] >= period:
        covered = np.unique(plan.index[:, sinks : sinks + runs * g.keep])
        assert covered.size == runs * g.rung  # the union of layers still covers every slot of the rungs


def test_a_fact_inside_one_group_survives_whole_in_the_layers_that_keep_it():
    """The point of the group ladder: a 7-token fact (within one 8-slot unit) is whole or absent per
    layer, where the plain ladder splits it across layers (15/0: every layer keeps half of it)."""
    fact = np.arange(20, 27)  # 7 consecutive tokens after 4 sinks: unit 2 of the pass (slots 20..27)
    for group, expect_whole in ((1, False), (8, True)):
        g = ladder_geometry(30, 15, 0, group=group)
        plan = ladder_plan(g, 300, 4, 200, 4, 32)
        whole = [np.isin(fact, row).all() for row in plan.index]
        parts = [np.isin(fact, row).any() and not np.isin(fact, row).all() for row in plan.index]
        assert any(whole) == expect_whole and any(parts) != expect_whole
