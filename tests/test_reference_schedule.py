"""schedule="reference": the LaCache authors' released schedule, against a replay of their rules.

``AuthorsReplay`` re-plays, with plain Python lists, what the authors' ``LaCache.__call__`` does to
a cache of ``n`` slots (read from their code and restated here, including what goes wrong in it: it
reports duplicate or out-of-order slots and reads past the cache instead of raising). It shares no
code with ``lacache.policies.authors_schedule``; the tests compare the two on index streams, then the cache
built with ``schedule="reference"`` on a model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from lacache import LaCache, make_cache
from lacache.policies.authors_schedule import ReferenceState, reference_compaction
from lacache.policies.ladder_geometry import ladder_geometry
from oracle_forward import ReferenceStream


class AuthorsReplay:
    """The authors' rules on slot indices. ``step(n)`` -> per-layer kept slots, or ``None`` when their
    code would store a slot twice, out of order, or read past the cache (``self.broken`` says which)."""

    def __init__(self, layers: int, span: int, overlap: int, cache_size: int, start_size: int):
        self.layers, self.cache_size, self.start = layers, cache_size, start_size
        self.before = 1 + math.ceil((layers - span) / (span - overlap))  # B
        self.after = min(math.ceil(span / (span - overlap)), self.before)  # A
        self.cursor = start_size
        self.compensated = False
        self.broken = ""

    def step(self, n: int):
        L, B, A, S = self.layers, self.before, self.after, self.start
        if n <= self.cache_size:
            return [list(range(n)) for _ in range(L)]
        R = B - A
        if not self.compensated:
            self.cache_size += R // 2
            self.compensated = True
        need = n - self.cache_size
        remaining = self.cache_size - self.cursor - L
        can = (remaining // A) * R
        startover = need > can
        increment = math.ceil(need / R) * A if not startover else remaining
        rungs = increment // A
        out = []
        for i in range(L):
            kept = list(range(self.cursor))
            kept += [self.cursor + i % (R + 1) + B * j + k for j in range(rungs) for k in range(A)]
            kept += list(range(self.cursor + B * rungs, n))
            if startover:
                per_pass = ((self.cache_size - S - L) // A) * R
                left = need - can
                t = math.ceil(left / per_pass)
                wide = B + (t - 1) * (B - 1)
                wide_r = wide - A
                wide_rungs = math.ceil(left / wide_r) * A // A
                second = list(range(S))
                second += [S + i % (wide_r + 1) + wide * j + t * k for j in range(wide_rungs) for k in range(A)]
                second += list(range(S + wide * wide_rungs, len(kept)))
                if max(second) >= len(kept):
                    self.broken = "reads past the cache"
                    return None
                kept = [kept[s] for s in second]
            if kept != sorted(set(kept)):
                self.broken = "duplicate or out-of-order slots"
                return None
            out.append(kept)
        if startover:
            self.cursor = S + wide_rungs * A
        else:
            self.cursor += increment
        return out


class Ours:
    def __init__(self, layers, span, overlap, cache_size, start_size):
        self.geometry = ladder_geometry(layers, span, overlap)
        self.state = ReferenceState.start(cache_size, start_size)
        self.sinks = start_size

    def step(self, n: int):
        index, self.state, _ = reference_compaction(self.geometry, n, self.state, self.sinks)
        if index.shape[0] == 1:
            index = np.broadcast_to(index, (self.geometry.num_layers, index.shape[1]))
        return index.tolist()


def run_streams(config, calls):
    """Drive both with the same calls: each call appends ``q`` tokens then compacts. Compares the
    tokens every layer holds after every call; stops where the authors' code breaks (their state is
    no longer meaningful) and returns how far it got and whether it broke."""
    layers = config[0]
    theirs, ours = AuthorsReplay(*config), Ours(*config)
    held_t = [[] for _ in range(layers)]
    held_o = [[] for _ in range(layers)]
    seen = 0
    for number, q in enumerate(calls):
        new = list(range(seen, seen + q))
        seen += q
        held_t = [h + new for h in held_t]
        held_o = [h + new for h in held_o]
        kept_t = theirs.step(len(held_t[0]))
        kept_o = ours.step(len(held_o[0]))
        held_o = [[h[s] for s in k] for h, k in zip(held_o, kept_o)]
        for h in held_o:  # ours is always well formed
            assert h == sorted(set(h)) and len(h) == len(held_o[0])
            assert h[: config[4]] == list(range(min(config[4], seen)))
        assert len(held_o[0]) <= ours.state.capacity
        if kept_t is None:
            return number, True
        held_t = [[h[s] for s in k] for h, k in zip(held_t, kept_t)]
        assert held_o == held_t, f"call {number} (q={q}, seen={seen}) differs"
        assert ours.state.capacity == theirs.cache_size and ours.state.cursor == theirs.cursor
    return len(calls), False


# (layers, span, overlap): R = B - A
R1 = [(32, 16, 0), (30, 15, 0), (28, 14, 0), (4, 2, 0)]  # B=2, A=1
R_MORE = [(30, 10, 0), (32, 8, 4), (24, 9, 7), (32, 9, 3), (32, 9, 7), (30, 6, 3)]


def test_geometries_cover_one_and_several_freed_slots():
    freed = {ladder_geometry(*g).rung - ladder_geometry(*g).keep for g in R1 + R_MORE}
    keeps = {ladder_geometry(*g).keep for g in R_MORE}
    assert freed >= {1, 2, 3} and max(keeps) > 1


@pytest.mark.parametrize("geometry", R1 + R_MORE)
@pytest.mark.parametrize("sinks", [4, 64, 128])
def test_decode_from_the_first_token(geometry, sinks):
    budget = sinks + geometry[0] + 40
    got, broke = run_streams((*geometry, budget, sinks), [1] * (3 * budget))
    assert not broke and got == 3 * budget


@pytest.mark.parametrize("geometry", R1 + R_MORE)
@pytest.mark.parametrize("sinks", [4, 64, 128])
@pytest.mark.parametrize("prompt_factor", [1.3, 2, 5])
def test_long_prefill_then_decode(geometry, sinks, prompt_factor):
    budget = sinks + geometry[0] + 60
    prompt = int(prompt_factor * budget)
    got, broke = run_streams((*geometry, budget, sinks), [prompt] + [1] * budget)
    if broke:  # only where their wide rungs overrun (A > 1); ours stayed well formed up to there
        assert ladder_geometry(*geometry).keep > 1 and got == 0
    else:
        assert got == budget + 1


@pytest.mark.parametrize("geometry", R1 + R_MORE)
def test_several_restarts_inside_one_call(geometry):
    """Chunks much larger than a pass frees: the wide-rung restart inside each call, repeatedly."""
    budget = 4 + geometry[0] + 24
    calls = [3 * budget, 1, 1, 4 * budget, 7, 1, 10 * budget, 1]
    got, broke = run_streams((*geometry, budget, 4), calls)
    assert got == len(calls) or (broke and ladder_geometry(*geometry).keep > 1)


def test_their_known_breakages_are_not_reproduced():
    """Settings where the authors' code stores a slot twice or reads past the cache; ours stays valid."""
    cases = [
        ((32, 9, 3, 875, 4), [3500]),  # several restarts with A > 1: duplicates
        ((32, 9, 7, 1875, 128), [7500]),  # (their LongBench default of 128 sinks)
        ((32, 9, 3, 175, 128), [700]),  # IndexError in their code
    ]
    for config, calls in cases:
        got, broke = run_streams(config, calls + [1] * 50)
        assert broke and got == 0, config
        ours = Ours(*config)
        for q in calls:  # and ours goes on decoding within its capacity
            n = q
            for _ in range(50):
                kept = ours.step(n)
                assert all(k == sorted(set(k)) for k in kept)
                n = len(kept[0]) + 1


def test_wide_rungs_keep_the_oldest_part_evenly_sparse():
    """The issue's example: 28 layers, 14/0, C = 300, 64 sinks, a 600-token prompt."""
    ours = Ours(28, 14, 0, 300, 64)
    layer0 = ours.step(600)[0]
    assert layer0[:64] == list(range(64))
    assert layer0[64:] == list(range(64, 432, 4)) + list(range(432, 480, 2)) + list(range(480, 600))


@settings(max_examples=120, deadline=None)
@given(
    geometry=st.sampled_from(R1 + R_MORE),
    sinks=st.integers(0, 70),
    extra=st.integers(0, 80),
    calls=st.lists(st.integers(1, 900), min_size=1, max_size=8),
)
def test_any_stream_stays_well_formed_and_matches_where_theirs_runs(geometry, sinks, extra, calls):
    budget = sinks + geometry[0] + ladder_geometry(*geometry).keep + extra
    got, broke = run_streams((*geometry, budget, sinks), calls)
    assert got == len(calls) or broke


# --------------------------------------------------------------------------- the cache on a model


def kept_sets(cache):
    return [cache.token_positions(layer).tolist() for layer in range(len(cache.layers))]


@pytest.mark.parametrize("layers,span,overlap", [(4, 2, 0), (8, 3, 0)])
def test_cache_holds_what_the_replay_holds_and_matches_the_reference_forward(layers, span, overlap):
    model = tiny_llama("eager", layers=layers)
    budget, sinks = 24, 2
    cache = LaCache.from_model(model, budget=budget, span=span, overlap=overlap, sinks=sinks, schedule="reference")
    replay = AuthorsReplay(layers, span, overlap, budget, sinks)
    ref = ReferenceStream(model, shift=True)
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(4))
    held = [[] for _ in range(layers)]
    start, worst = 0, 0.0
    for size in [70] + [1] * 40 + [9, 30] + [1] * 1:
        piece = ids[start : start + size]
        pos = torch.arange(cache.num_slots, cache.num_slots + size)
        kept_before = kept_sets(cache)
        with torch.no_grad():
            out = model(input_ids=piece[None], position_ids=pos[None], cache=cache).logits[0]
        worst = max(worst, (out - ref.step(piece, pos, kept_before)).abs().max().item())
        held = [h + list(range(start, start + size)) for h in held]
        kept = replay.step(len(held[0]))
        held = [[h[s] for s in k] for h, k in zip(held, kept)]
        assert kept_sets(cache) == held
        start += size
    assert worst <= 1e-4
    assert cache.num_slots <= budget + (ladder_geometry(layers, span, overlap).rung - 1) // 2


def test_registry_method_and_describe():
    model = tiny_llama("sdpa", layers=4)
    cache = make_cache("lacache-reference", model, 32)
    info = cache.describe()
    assert info["schedule"] == "reference" and info["window"] == 4 and cache.chunk == 0


@pytest.mark.parametrize("bad,message", [
    ({"window": 8}, "takes no window"),
    ({"chunk": 4}, "takes no chunk"),
    ({"salient": 0.125}, "takes no salient"),
    ({"layout": "band"}, "layout='ladder'"),
    ({"budget": 6}, "budget=6 is too small.*budget >= 7"),
    ({"schedule": "authors"}, "schedule='reference'"),
])
def test_reference_settings_are_refused_with_a_working_value(bad, message):
    model = tiny_llama("sdpa", layers=4)
    kwargs = {"budget": 32, "sinks": 2, "schedule": "reference", **bad}
    with pytest.raises(ValueError, match=message):
        LaCache.from_model(model, **kwargs)
