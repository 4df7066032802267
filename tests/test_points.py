"""Compaction points (``policies.points``): the one rule for when a bounded cache compacts, and its consumers.

The property (docs/method.md, "Same tokens, same answer"): for a rule with a period (``chunk >= 0`` and
``policy.amortises``), what every layer holds after token *n* is a function of tokens 1..*n* alone, however the
stream was split into passes that do not cross a compaction point. Four consumers replay the rule and must
agree on every pass structure: vLLM's ``RequestSlots`` (scheduler and workers), the transformers
``BoundedCache``, the static decode planner (``plan_decode`` / ``count_schedule``) and lacache's own
generation loop (``prefill_passes`` / ``stream_generate``).

* torch-free: ``split`` / ``after`` / ``pass_limit`` / ``peak`` on their own;
* the four consumers on random budgets, layer counts, chunks, streams and pass structures (tiny random model);
* ``stream_generate`` gives the same tokens and slots for any ``prefill_chunk`` (tiny model, then the bundled
  model in the integration tier).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from lacache import make_cache
from lacache.cache.decode_schedule import count_schedule, plan_decode
from lacache.cache.generation import prefill_passes, stream_generate
from lacache.policies.lacache import ladder_policy
from lacache.policies.points import CompactionPoints, points_for
from lacache.policies.streaming import streaming_policy
from lacache.vllm.config import parse_config

VOCAB = 96  # tiny_llama's vocabulary

# Hundreds of small forward passes: one thread is several times faster than two on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- a. the rule itself (torch-free)
periods = st.one_of(st.none(), st.integers(1, 40))


def _crosses(points: CompactionPoints, seen: int, q: int) -> bool:
    """Whether a pass of ``q`` tokens after ``seen`` passes, before its last token, a point where a cache may hold
    more than ``target`` (ending at one is fine; points up to ``target`` never compact: the cache holds every token
    seen until then)."""
    period = points.period
    return period is not None and any(p % period == 0 and p > points.target for p in range(seen + 1, seen + q))


@settings(max_examples=300, deadline=None)
@given(target=st.integers(1, 60), period=periods, seen=st.integers(0, 500), tokens=st.integers(0, 400),
       most=st.one_of(st.none(), st.integers(1, 60)))
def test_split_never_crosses_a_compacting_point_and_covers_the_tokens(target, period, seen, tokens, most):
    points = CompactionPoints(target, period)
    passes = points.split(seen, tokens, most)
    assert sum(passes) == tokens
    assert all(q >= 1 for q in passes)
    at = seen
    for q in passes:
        if most is not None:
            assert q <= most
        limit = points.pass_limit(at)
        if period is None:
            assert limit is None
        else:
            first = (target // period + 1) * period  # the first point past the target
            assert 1 <= limit and (at + limit) % period == 0  # a point
            assert at + limit == first if at < first else limit <= period  # the first one that may compact
            assert q <= limit
        assert not _crosses(points, at, q)
        # greedy: a pass stops only at a point, at ``most`` or at the end of the tokens
        assert q == min(x for x in (tokens - (at - seen), limit, most) if x is not None)
        at += q


@pytest.mark.parametrize("period", [None, 3])
def test_split_refuses_passes_of_no_tokens(period):
    with pytest.raises(ValueError, match="most=0"):
        CompactionPoints(5, period).split(0, 10, 0)


def _passes(draw, points: CompactionPoints, length: int, crossing: bool) -> list[int]:
    """A random split of ``length`` tokens: request sizes cut at the points by ``split`` (as vLLM's scheduler
    and ``stream_generate`` do), with, when ``crossing``, some passes left whole (a one-pass prefill)."""
    passes: list[int] = []
    seen = 0
    while seen < length:
        size = min(draw(st.integers(1, 80)), length - seen)
        whole = crossing and draw(st.booleans())
        pieces = [size] if whole else points.split(seen, size)
        passes += pieces
        seen += size
    return passes


@settings(max_examples=300, deadline=None)
@given(data=st.data(), target=st.integers(1, 60), period=st.integers(1, 40), length=st.integers(0, 600),
       crossing=st.booleans(), capacity=st.integers(1, 200))
def test_held_slots_with_a_period_are_a_function_of_the_stream_position(data, target, period, length, crossing,
                                                                        capacity):
    """Replayed through ``after``, a stream holds ``min(n, target + n % period)`` slots after token n whatever its
    passes (a crossing pass included): at most ``target + period`` while a pass that keeps to the points runs,
    at most ``target + period - 1`` (the budget) between passes. ``capacity`` is not read with a period."""
    points = CompactionPoints(target, period)
    passes = _passes(data.draw, points, length, crossing)
    held = seen = 0
    for q in passes:
        if not _crosses(points, seen, q):
            assert held + q <= target + period == points.peak(capacity, q)
        kept = points.after(seen, held, q, capacity)
        reached = (seen + q) // period > seen // period
        if kept is None:
            held += q
        else:
            assert reached and target <= kept < held + q  # only at a point, and only ever down
            held = kept
        seen += q
        assert held <= target + period - 1
        assert held == min(seen, target + seen % period)
    assert points.after(seen, held, 0, capacity) is None


@settings(max_examples=300, deadline=None)
@given(target=st.integers(1, 60), capacity=st.integers(1, 80), seen=st.integers(0, 10_000),
       held=st.integers(0, 80), q=st.integers(-2, 80), step=st.integers(1, 100))
def test_without_a_period_after_follows_the_capacity(target, capacity, seen, held, q, step):
    points = CompactionPoints(target, None)
    expected = target if q > 0 and held + q > capacity else None
    assert points.after(seen, held, q, capacity) == expected
    assert points.pass_limit(seen) is None
    assert points.peak(capacity, step) == capacity + step
    assert points.split(seen, 2 * step + 1, step) == [step, step, 1]


@pytest.mark.parametrize("make,amortises", [
    (lambda: ladder_policy(4, 64, schedule="capped"), True),
    (lambda: streaming_policy(4, 64), True),
    (lambda: ladder_policy(4, 64, schedule="reference"), False),
    (lambda: ladder_policy(4, 64), False),
])
def test_points_for_gives_a_period_only_to_rules_that_amortise_with_a_chunk(make, amortises):
    """A period of ``chunk + 1`` for a rule that amortises with ``chunk >= 1``; none for the authors' schedule
    nor with ``chunk=0`` (a point after every token would make a prefill token by token)."""
    policy = make()
    assert policy.amortises is amortises
    for chunk in (0, 1, 7):
        points = points_for(policy, 64, chunk)
        assert points.target == 64 - chunk
        assert points.period == (chunk + 1 if amortises and chunk >= 1 else None)


# ----------------------------------------------------------------- b. the four consumers agree
_MODELS: dict[int, torch.nn.Module] = {}


def _model(layers: int):
    if layers not in _MODELS:
        _MODELS[layers] = tiny_llama(layers=layers)
    return _MODELS[layers]


def _feed(model, cache, ids: torch.Tensor, q: int) -> None:
    """One forward pass of the next ``q`` tokens, positioned after the cache's slots (as ``stream_generate``)."""
    start = cache.seen
    with torch.no_grad():
        model(input_ids=ids[start:start + q][None], cache=cache,
              position_ids=torch.arange(cache.num_slots, cache.num_slots + q)[None])


def _held(cache, layers: int) -> list[list[int]]:
    return [cache.token_positions(layer).tolist() for layer in range(layers)]


def _config(method: str, layers: int, budget: int, chunk: int | None):
    """The served config (vLLM's side) of ``method``; ``chunk`` (None: the default) is clamped into what the
    rule allows; None when the budget cannot hold the rule."""
    try:
        config = parse_config({"method": method, "budget": budget}, layers)
    except ValueError:
        return None  # a geometry this budget cannot hold: the factory says so
    if chunk is not None and config._policy.amortises:
        chunk = min(chunk, budget - config._policy.min_target())
        config = parse_config({"method": method, "budget": budget, "chunk": chunk}, layers)
    return config


def _tail_matches_the_plan(slots, cache, model, ids, steps: int, layers: int) -> None:
    """One-token steps from the state after the passes compact where and as ``plan_decode`` listed from it."""
    schedule = plan_decode(slots.policy, slots.points, slots.slots, slots.seen, slots.budget, layers)
    k = 0
    for _ in range(steps):
        before = slots.slots
        plan = slots.advance(1)
        _feed(model, cache, ids, 1)
        event = schedule.event(k)
        if plan is None:
            assert before + 1 < event.trigger  # the schedule lists no compaction here
        else:
            assert event.trigger == before + 1 and event.kept == plan.kept
            assert np.array_equal(event.plan.index, plan.index)
            k += 1
        assert _held(cache, layers) == [slots.token_positions(layer) for layer in range(layers)]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("method", ["lacache-capped", "streaming"])
@given(data=st.data(), layers=st.integers(2, 4), budget=st.integers(8, 40),
       chunk=st.one_of(st.none(), st.integers(1, 30)), length=st.integers(1, 150), tail=st.integers(0, 50))
def test_any_split_at_the_points_holds_what_token_by_token_holds(method, data, layers, budget, chunk, length,
                                                                  tail):
    """RequestSlots fed token by token == RequestSlots fed random passes == BoundedCache fed the same passes,
    after every pass and on every layer; then one-token steps compact as ``plan_decode`` planned."""
    config = _config(method, layers, budget, chunk)
    assume(config is not None and config.chunk >= 1)  # chunk 0 (the default below budget 16): no period
    points = config.points
    assert points.period == config.chunk + 1
    model = _model(layers)
    ids = torch.randint(0, VOCAB, (length + tail,), generator=torch.Generator().manual_seed(length))

    one = config.new_slots(track_tokens=True)  # token by token: the definition
    by_n = [None]
    for _ in range(length):
        one.advance(1)
        by_n.append([one.token_positions(layer) for layer in range(layers)])

    slots = config.new_slots(track_tokens=True)
    cache = make_cache(method, model, budget, chunk=config.chunk)
    assert cache.points == points
    for q in _passes(data.draw, points, length, crossing=False):
        slots.advance(q)
        _feed(model, cache, ids, q)
        held = [slots.token_positions(layer) for layer in range(layers)]
        assert held == by_n[slots.seen]
        assert _held(cache, layers) == held
        assert cache.seen == slots.seen and cache.num_slots == slots.slots <= budget
    _tail_matches_the_plan(slots, cache, model, ids, tail, layers)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), layers=st.integers(2, 3), budget=st.integers(12, 40), chunk=st.integers(1, 20),
       length=st.integers(1, 66), tail=st.integers(0, 30))
def test_a_score_rule_with_a_chunk_holds_the_same_slots_for_any_split(data, layers, budget, chunk, length, tail):
    """Key-norm (a score rule, transformers only: vLLM does not serve it) with ``chunk`` given: BoundedCache fed
    random passes cut at the points holds what it holds fed token by token; one-token steps then compact when
    and to what ``count_schedule`` says."""
    model = _model(layers)
    probe = make_cache("knorm", model, budget, chunk=0)
    chunk = min(chunk, budget - probe.policy.min_target())
    assume(chunk >= 1)
    # Distinct tokens: a repeated token has the same first-layer key norm as its twin (a rotation keeps norms),
    # an exact tie that rounding breaks either way depending on the pass (rows of one matmul differ by an ulp).
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(length))[:length + tail]

    one = make_cache("knorm", model, budget, chunk=chunk)
    points = one.points
    assert points.period == chunk + 1
    by_n = [None]
    for _ in range(length):
        _feed(model, one, ids, 1)
        by_n.append(_held(one, layers))

    cache = make_cache("knorm", model, budget, chunk=chunk)
    for q in _passes(data.draw, points, length, crossing=False):
        _feed(model, cache, ids, q)
        assert _held(cache, layers) == by_n[cache.seen]
        assert cache.num_slots <= budget

    schedule = count_schedule(points, cache.num_slots, cache.seen, cache.policy.capacity(budget), layers)
    k = 0
    for _ in range(tail):
        before = cache.num_slots
        _feed(model, cache, ids, 1)
        event = schedule.event(k)
        if cache.num_slots == before + 1:
            assert before + 1 < event.trigger
        else:
            assert (event.trigger, event.kept) == (before + 1, cache.num_slots)
            k += 1


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("method", ["lacache-capped", "streaming", "lacache"])
@given(data=st.data(), layers=st.integers(2, 4), budget=st.integers(9, 40), prompt=st.integers(1, 120),
       length=st.integers(0, 60), tail=st.integers(0, 30))
def test_a_crossing_pass_keeps_the_transformers_cache_and_vllm_in_step(method, data, layers, budget, prompt,
                                                                       length, tail):
    """A one-pass prefill crosses points (compacting once, at its end), and later passes may too: for the same
    passes BoundedCache and RequestSlots still hold the same tokens on every layer, and one-token steps after
    them follow ``plan_decode``. ``lacache`` (the authors' schedule: no period) is exact only this way."""
    config = _config(method, layers, budget, None)
    assume(config is not None)
    points = config.points
    model = _model(layers)
    ids = torch.randint(0, VOCAB, (prompt + length + tail,), generator=torch.Generator().manual_seed(prompt))
    slots = config.new_slots(track_tokens=True)
    cache = make_cache(method, model, budget)
    assert cache.points == points
    passes = [prompt] + _passes(data.draw, points, length, crossing=True)
    for q in passes:
        slots.advance(q)
        _feed(model, cache, ids, q)
        assert _held(cache, layers) == [slots.token_positions(layer) for layer in range(layers)]
        assert cache.num_slots == slots.slots
        if points.period is not None:  # never more than token-by-token feeding holds at this position
            most = min(slots.seen, points.target + slots.seen % points.period)
            assert slots.slots == most if method == "streaming" else slots.slots <= most  # a ladder may keep fewer
    _tail_matches_the_plan(slots, cache, model, ids, tail, layers)


# ----------------------------------------------------------------- c. stream_generate, any prefill chunk
@pytest.mark.parametrize("method", ["lacache-capped", "streaming"])
def test_stream_generate_gives_the_same_tokens_and_slots_for_any_prefill_chunk(method):
    """Budget 40 and a 300-token prompt: compaction happens during the prefill. Prefill chunks of 1, 7, 64 and
    300 tokens, each cut at the cache's points (``prefill_passes``), end in the same tokens and the same slots.

    ``chunk=12`` makes the period 13 tokens, so 1-token, 7-token and 13-token passes (what 64 and 300 become)
    are different pass structures; at the default chunk (2, a period of 3) all but 1 would give passes of 3.
    For contrast, not asserted: ``model(prompt)`` in one pass (a crossing pass, as ``model.generate`` runs
    it) compacts once at its end to ``target + 300 % period`` slots, which other tokens may fill than the
    chunked prefills keep; decoding after it meets the same points, but it may give other tokens.
    """
    model = _model(4)
    ids = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(7))
    options = {"chunk": 12}
    results = []
    for prefill_chunk in (1, 7, 64, 300):
        cache = make_cache(method, model, 40, **options)
        passes = [length for _, length in prefill_passes(make_cache(method, model, 40, **options), 300,
                                                         prefill_chunk)]
        # the first pass may run to the first point past the target (no point before it compacts)
        assert passes[0] <= prefill_chunk and max(passes[1:]) <= min(prefill_chunk, cache.points.period)
        tokens, _ = stream_generate(model, ids, cache, 60, prefill_chunk=prefill_chunk)
        assert len(tokens) == 60 and cache.seen == 359 and cache.num_slots <= 40
        results.append((prefill_chunk, tokens, _held(cache, 4)))
    first = results[0]
    for other in results[1:]:
        assert other[1] == first[1], f"prefill_chunk={other[0]} gave other tokens than {first[0]}"
        assert other[2] == first[2], f"prefill_chunk={other[0]} holds other tokens than {first[0]}"


# ----------------------------------------------------------------- d. the bundled model (integration)
@pytest.fixture(scope="module")
def smol():
    from lacache import load_model

    return load_model()


@pytest.mark.integration
@pytest.mark.parametrize("method", ["lacache-capped", "streaming"])
def test_the_bundled_model_gives_the_same_tokens_for_any_prefill_chunk(smol, method):
    """SmolLM2 as users get it (``load_model()``: float32) at budget 128 (default chunk 8: a point every 9
    tokens, target 120), a 600-token essay prompt and 150 greedy tokens: prefill chunks of 7, 64 and 300 give
    the same tokens and hold the same slots on every layer.

    Not budget 127: its default chunk 7 leaves a target of 120 = 15 periods of 8, so the first overflow
    (slot 128) falls on a point whatever the split, and the rule before points (compact when a pass leaves
    more than the budget) keeps the same slots as the points do: the test could not tell them apart there.
    Cut at the points, the three chunks give three pass structures (asserted): 7 -> (7, 7, ..., 7, 2, 7, 2, ...);
    64 -> (64, 62, 9, 9, ...); 300 -> (126, 9, 9, ...): the first pass may run to the first point past the target,
    126, since no point before it compacts."""
    from lacache.lab.texts import load_essays

    model, tok = smol
    ids = tok(load_essays(max_chars=6000), return_tensors="pt")["input_ids"][:, :600]
    assert ids.shape[1] == 600
    layers = model.config.num_hidden_layers
    runs: dict[tuple[int, ...], tuple[list[int], list[list[int]]]] = {}
    for prefill_chunk in (7, 64, 300):
        probe = make_cache(method, model, 128)
        assert probe.points == CompactionPoints(120, 9)
        passes = tuple(length for _, length in prefill_passes(probe, 600, prefill_chunk))
        at = 0
        for q in passes:  # passes end at the first point past the target (126), then at every point
            assert q <= prefill_chunk and (at + q <= 126 if at < 126 else q <= 9)
            at += q
        assert passes not in runs
        cache = make_cache(method, model, 128)
        tokens, _ = stream_generate(model, ids, cache, 150, prefill_chunk=prefill_chunk)
        assert len(tokens) == 150 and cache.seen == 749 and cache.num_slots <= 128
        runs[passes] = tokens, _held(cache, layers)
    (tokens_7, held_7), *others = runs.values()
    for chunk, (tokens, held) in zip((64, 300), others):
        assert tokens == tokens_7, f"prefill_chunk={chunk} gave other tokens than prefill_chunk=7"
        assert held == held_7, f"prefill_chunk={chunk} holds other tokens than prefill_chunk=7"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.parametrize("method", ["knorm", "keydiff", "lacache-salient", "lacache-group"])
@given(data=st.data(), budget=st.integers(40, 90), length=st.integers(1, 400))
def test_key_reading_rules_count_on_the_scheduler_what_the_worker_keeps(method, data, budget, length):
    """vLLM serves a rule that ranks slots by a key statistic in two halves: the scheduler replays only how many
    slots survive (``count_after``), the worker hands in every layer's statistic and keeps one row per layer.
    Over any split at the points both hold the same count after every pass, every row is ascending and holds the
    sinks and the recent window, and a kept row is what the rule chooses from those values (a per-slot
    statistic's values of the survivors follow them, as the worker does; KeyDiff's are drawn afresh for every
    held slot, and the rule uses only the new slots', a slot keeping the score of its first compaction).
    Values are drawn from a few, so ties are common: the older slot wins them."""
    try:
        config = parse_config({"method": method, "budget": budget}, 4)
    except ValueError:
        assume(False)
    assert config.reads_keys and config.points.period == config.chunk + 1
    scheduler, worker = config.new_slots(), config.new_slots(track_tokens=True)
    held: dict[int, torch.Tensor] = {}
    rng = np.random.default_rng(length)
    sinks, window = worker.policy.sinks, worker.policy.window
    per_slot = worker.policy.key_statistic.per_slot
    for q in _passes(data.draw, config.points, length, crossing=False):
        read = {}

        def stats(layer, n):  # a per-slot statistic (the key norm) is read once per slot, any other every time
            old = held.get(layer, torch.zeros(0)) if per_slot else torch.zeros(0)
            every = torch.cat([old, torch.from_numpy(rng.choice([1.0, 1.5, 2.0], n - old.shape[0])).float()])
            read[layer] = every
            return every[None]

        scheduler.advance(q)
        plan = worker.advance(q, stats=stats, layers=range(4))
        assert scheduler.slots == worker.slots <= budget and scheduler.seen == worker.seen
        if plan is None:
            continue
        for layer in range(4):
            rows = plan.rows_for(layer)
            assert (np.diff(rows) > 0).all() and rows[:sinks].tolist() == list(range(sinks))
            n = read[layer].shape[0]
            assert rows[-window:].tolist() == list(range(n - window, n))
            used = read[layer]
            if not per_slot and layer in held:  # the held slots' first scores, the new slots' read now
                used = torch.cat([held[layer], read[layer][held[layer].shape[0]:]])
            if method in ("knorm", "keydiff"):  # the smallest norms / the largest divergence, the older of equal ones
                score = (-used if method == "knorm" else used).clone()
                score[:sinks] = score[n - window:] = float("inf")
                order = sorted(range(n), key=lambda i: (-float(score[i]), i))[:len(rows)]
                assert rows.tolist() == sorted(order)
            held[layer] = used[torch.from_numpy(rows)]
