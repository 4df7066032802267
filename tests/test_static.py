"""Static caches (``static=True``): one-token decode steps that ``torch.compile`` captures whole.

The oracle is the host-path cache of the same method (itself checked against the independent reference
forward in test_cache / test_reference_schedule): a static cache must keep the same tokens, give the
same logits, and report the same state afterwards, whether its steps ran eagerly or compiled.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from lacache import make_cache
from lacache.cache.decode_schedule import plan_decode
from lacache.policies.base import resolve_chunk
from lacache.policies.lacache import ladder_policy
from lacache.policies.points import points_for
from lacache.policies.streaming import streaming_policy

METHODS = ("lacache", "lacache-capped", "streaming")
PROMPT = 40


# ----------------------------------------------------------------- the plan made ahead (torch-free)
def _rule(kind: str, layers: int, budget: int):
    if kind == "streaming":
        policy, chunk = streaming_policy(layers, budget), resolve_chunk(None, budget, 5)
    else:
        policy = ladder_policy(layers, budget, schedule=kind)
        chunk = 0 if not policy.amortises else resolve_chunk(None, budget, policy.min_target())
    return policy, points_for(policy, budget, chunk)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["reference", "capped", "streaming"]), layers=st.integers(2, 12),
       extra=st.integers(0, 60), prompt=st.integers(1, 300), steps=st.integers(1, 600))
def test_the_schedule_made_ahead_is_the_rule_driven_step_by_step(kind, layers, extra, prompt, steps):
    """Every compaction the schedule lists (its cycle unrolled) is the one the rule makes, at the same step."""
    budget = {"reference": 2 * layers + 8, "capped": 2 * layers + 24, "streaming": 8}[kind] + extra
    try:
        policy, points = _rule(kind, layers, budget)
    except ValueError:
        return  # a geometry this budget cannot hold: the factory says so
    n, seen = 0, prompt  # a one-pass prefill of the prompt (it may cross compaction points)
    target = points.after(0, 0, prompt, policy.capacity(budget))
    n = policy.plan(prompt, target).kept if target is not None else prompt
    schedule = plan_decode(policy, points, n, seen, budget, layers)
    assert 0 <= schedule.cycle_start < len(schedule.events)
    k = 0
    for _ in range(steps + 2 * len(schedule.events) * max(1, budget // 4)):
        target = points.after(seen, n, 1, policy.capacity(budget))
        n += 1
        seen += 1
        if target is None:
            continue
        plan = policy.plan(n, target)
        event = schedule.event(k)
        assert event.trigger == n and event.kept == plan.kept
        assert np.array_equal(event.plan.index, plan.index)
        for layer in range(layers):
            kept = plan.rows_for(layer)
            assert sorted(set(kept) | set(event.drops[layer])) == list(range(n))
        k += 1
        n = plan.kept
        if k > 3 * len(schedule.events):
            break
    assert schedule.most_slots >= max(e.trigger for e in schedule.events)


# ----------------------------------------------------------------- eager static steps = the host path
def _decode(model, cache, steps: int, call=None, recompile_after: int | None = None):
    """Prefill eagerly, then ``steps`` greedy one-token steps through ``call``; (tokens, logits)."""
    call = model if call is None else call
    ids = torch.arange(1, PROMPT + 1)[None] % 90 + 3
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, position_ids=torch.arange(PROMPT)[None])
        token = out.logits[:, -1:].argmax(-1)
        tokens, logits = [], []
        try:
            for step in range(steps):
                if recompile_after is not None and step == recompile_after:
                    dynamo.config.error_on_recompile = True
                out = call(input_ids=token, cache=cache, position_ids=torch.tensor([[PROMPT + step]]))
                token = out.logits[:, -1:].argmax(-1)
                tokens.append(int(token))
                logits.append(out.logits[0, -1].float().clone())
        finally:
            dynamo.config.error_on_recompile = False
    return tokens, torch.stack(logits)


def _same_state(host, static, layers: int, atol: float = 1e-5) -> None:
    assert (static.seen, static.num_slots) == (host.seen, host.num_slots)
    for layer in range(layers):
        assert torch.equal(static.token_positions(layer), host.token_positions(layer))
        a, b = static.layers[layer].keys, host.layers[layer].keys
        assert torch.allclose(a, b, atol=atol), (a - b).abs().max()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rotation", ["stored", "read", "none"])
def test_eager_static_steps_equal_the_host_path(method, rotation):
    model = tiny_llama()
    options = {"positions": "original"} if rotation == "none" else {}
    host = make_cache(method, model, 32, **options)
    static = make_cache(method, model, 32, static=True, **options)
    if rotation != "none":
        host.rotation = static.rotation = rotation
    expected, expected_logits = _decode(model, host, 150)
    got, logits = _decode(model, static, 150)
    assert got == expected
    assert torch.allclose(logits, expected_logits, atol=1e-5), (logits - expected_logits).abs().max()
    _same_state(host, static, 4)
    assert static._static.compactions >= 5


def test_a_static_cache_continues_on_the_host_path_and_back():
    """A second turn (several tokens) after static steps, then static steps again: as the host path does."""
    model = tiny_llama()
    host, static = make_cache("lacache", model, 32), make_cache("lacache", model, 32, static=True)
    for cache in (host, static):
        _decode(model, cache, 45)
    turn = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        outs = [model(input_ids=turn, cache=c, position_ids=torch.arange(85, 92)[None]).logits for c in (host, static)]
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        assert static._static.armed  # the decoder hook moved the slots back into the fixed buffers
        token = outs[0][:, -1:].argmax(-1)
        for step in range(40):
            pos = torch.tensor([[92 + step]])
            a = model(input_ids=token, cache=host, position_ids=pos).logits
            b = model(input_ids=token, cache=static, position_ids=pos).logits
            assert torch.allclose(a, b, atol=1e-5)
            token = a[:, -1:].argmax(-1)
    _same_state(host, static, 4)
    twin = copy.deepcopy(static)  # a copy holds the same stream and goes on alone
    assert twin.num_slots == static.num_slots and torch.equal(twin.token_positions(2), static.token_positions(2))


# ----------------------------------------------------------------- compiled
# ----------------------------------------------------------------- key-norm: the step chooses by score
def _fed(model, cache, feed: torch.Tensor, steps: int, call=None, recompile_after: int | None = None):
    """Prefill ``feed[:, :PROMPT]`` eagerly, then feed its next ``steps`` tokens one per step; the logits.

    Key-norm keeps the smallest key norms, so equal keys (a greedy tiny model repeats itself) tie and
    float rounding picks among them; distinct fed tokens keep every score distinct."""
    call = model if call is None else call
    start = cache.seen
    logits = []
    with torch.no_grad():
        if not start:
            model(input_ids=feed[:, :PROMPT], cache=cache, position_ids=torch.arange(PROMPT)[None])
            start = PROMPT
        try:
            for step in range(start, start + steps):
                if recompile_after is not None and step == start + recompile_after:
                    dynamo.config.error_on_recompile = True
                out = call(input_ids=feed[:, step : step + 1], cache=cache, position_ids=torch.tensor([[step]]))
                logits.append(out.logits[:, -1].float().clone())
        finally:
            dynamo.config.error_on_recompile = False
    return torch.stack(logits)


def _distinct_tokens(rows: int, length: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.stack([torch.randperm(vocab, generator=generator)[:length] for _ in range(rows)])


@pytest.mark.parametrize("rotation,rows", [("stored", 1), ("read", 1), ("none", 1), ("stored", 2)])
def test_knorm_static_steps_choose_what_the_host_rule_chooses(rotation, rows):
    """Each sequence's survivors chosen inside the step (a top-k per row) are the host rule's, through a
    later host pass (a chat turn: the last step's compaction replayed on the host) and back."""
    model = tiny_llama(vocab_size=512)
    # chunk=0: key-norm evicts to exactly the budget at every step, a compaction inside every static step
    options = {"positions": "original", "chunk": 0} if rotation == "none" else {"chunk": 0}
    host = make_cache("knorm", model, 32, **options)
    static = make_cache("knorm", model, 32, static=True, **options)
    if rotation != "none":
        host.rotation = static.rotation = rotation
    feed = _distinct_tokens(rows, 300, 512)
    steps = 150 if rows == 1 else 60  # batched one-token steps are slow on CPU for a tiny model
    expected, got = (_fed(model, cache, feed, steps) for cache in (host, static))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    _same_state(host, static, 4)
    assert static._static.compactions == steps  # key-norm with chunk 0 compacts at every step once full
    assert static.layers[1].token_index.shape == (rows, 32)
    kept = static.token_positions(2, rows - 1).tolist()
    assert kept[:4] == [0, 1, 2, 3] and kept[4:] != list(range(kept[-1] - 27, kept[-1] + 1))  # sinks, then by norm
    at = PROMPT + steps
    turn = feed[:, at : at + 7]
    with torch.no_grad():
        a, b = (model(input_ids=turn, cache=c, position_ids=torch.arange(at, at + 7)[None]).logits for c in (host, static))
    assert torch.allclose(a, b, atol=1e-5) and static._static.armed
    expected, got = (_fed(model, cache, feed, 20 if rows > 1 else 60) for cache in (host, static))
    assert torch.allclose(got, expected, atol=1e-5)
    _same_state(host, static, 4)


def test_knorm_compiled_decode_runs_without_recompiling():
    dynamo.reset()
    """Every step past the budget compacts (key-norm with chunk=0): 400 compactions inside the graph."""
    model = tiny_llama(vocab_size=512)
    feed = _distinct_tokens(1, 512, 512)
    host, static = make_cache("knorm", model, 32, chunk=0), make_cache("knorm", model, 32, chunk=0, static=True)
    expected = _fed(model, host, feed, 400)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _fed(model, static, feed, 400, call=compiled, recompile_after=2)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    _same_state(host, static, 4, atol=1e-4)
    assert static._static.compactions == 400


@pytest.mark.parametrize("method", METHODS + ("knorm",))
def test_a_decode_step_is_one_graph_without_breaks(method):
    model = tiny_llama()
    cache = make_cache(method, model, 32, static=True)
    _decode(model, cache, 70)  # past several compactions
    token = torch.tensor([[7]])
    with torch.no_grad():
        explained = dynamo.explain(model)(input_ids=token, cache=cache, position_ids=torch.tensor([[PROMPT + 70]]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("method,backend", [("lacache", "inductor"), ("lacache-capped", "aot_eager")])
def test_compiled_decode_runs_thousands_of_steps_without_recompiling(method, backend):
    """2,000 steps under torch.compile(fullgraph=True), error_on_recompile after the warm-up: the tokens,
    logits and final state of the host-path cache."""
    dynamo.reset()
    model = tiny_llama()
    host, static = make_cache(method, model, 32), make_cache(method, model, 32, static=True)
    expected, expected_logits = _decode(model, host, 2000)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got, logits = _decode(model, static, 2000, call=compiled, recompile_after=2)
    assert got == expected
    assert torch.allclose(logits, expected_logits, atol=1e-4), (logits - expected_logits).abs().max()
    # keys re-rotated at each of ~2,000 compactions by fused kernels drift apart by float32 rounding only
    _same_state(host, static, 4, atol=1e-3)
    assert static._static.compactions >= 5  # all inside the graph


def test_half_precision_compiled_steps_are_bit_exact_with_eager_steps():
    """bf16 rotates on read; through dynamo and AOT autograd (no kernel fusion) the logits are bit-identical
    (inductor's fused kernels round half precision differently, for StaticCache as for this cache)."""
    dynamo.reset()
    model = tiny_llama(dtype=torch.bfloat16)
    host, static = make_cache("lacache", model, 32), make_cache("lacache", model, 32, static=True)
    expected, expected_logits = _decode(model, host, 300)
    got, logits = _decode(model, static, 300, call=torch.compile(model, fullgraph=True, backend="aot_eager"),
                          recompile_after=2)
    assert static.rotation == "read"
    assert got == expected and torch.equal(logits, expected_logits)


def test_generate_compiles_a_static_cache_and_matches_the_host_path():
    from transformers.generation import CompileConfig

    dynamo.reset()
    model = tiny_llama()
    model.generation_config.pad_token_id = 0
    ids = torch.arange(3, 3 + 2 * PROMPT).view(2, PROMPT) % 90 + 3
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # generate compiles by itself on GPUs only
    host, static = make_cache("lacache", model, 32), make_cache("lacache", model, 32, static=True)
    assert static.is_compileable and not host.is_compileable
    kwargs = dict(max_new_tokens=120, min_new_tokens=120, do_sample=False)
    expected = model.generate(ids, cache=host, **kwargs)
    got = model.generate(ids, cache=static, compile_config=config, **kwargs)
    assert torch.equal(got, expected)
    turn = torch.cat([expected, torch.full((2, 5), 9)], 1)  # a second turn continues both streams
    assert torch.equal(model.generate(turn, cache=static, compile_config=config, **kwargs),
                       model.generate(turn, cache=host, **kwargs))


# ----------------------------------------------------------------- misuse
def test_static_is_refused_for_rules_without_a_static_path():
    model = tiny_llama()
    for method, why in (("tova", "attention"), ("h2o", "attention"), ("lacache-salient", "no static decode path"),
                        ("lacache-group", "no static decode path"), ("keydiff", "no static decode path")):
        with pytest.raises(ValueError, match=rf"static=True: .*{why}.*index-only methods .* and key-norm"):
            make_cache(method, model, 64, static=True)
    with pytest.raises(ValueError, match=r"static='yes' must be True or False"):
        make_cache("lacache", model, 32, static="yes")


def test_a_padded_batch_works_eagerly_with_its_2d_mask_and_is_refused_as_a_4d_one():
    model = tiny_llama()
    model.generation_config.pad_token_id = 0
    ids = torch.arange(3, 3 + 2 * PROMPT).view(2, PROMPT) % 90 + 3
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with pytest.raises(ValueError, match="static=False"):
        model.generate(ids, attention_mask=mask, cache=make_cache("lacache", model, 32, static=True), max_new_tokens=4)
    host, static = make_cache("lacache", model, 32), make_cache("lacache", model, 32, static=True)
    with torch.no_grad():  # the model called directly gets the 2D mask: the padded rows run on the host path
        a = model(input_ids=ids, attention_mask=mask, cache=host).logits
        b = model(input_ids=ids, attention_mask=mask, cache=static).logits
    assert static.padded and not static.is_compileable and torch.allclose(a, b, atol=1e-6)


def test_a_prefill_inside_a_compiled_region_is_refused_with_the_fix():
    dynamo.reset()
    model = tiny_llama()
    cache = make_cache("lacache", model, 32, static=True)
    _decode(model, cache, 3)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="uncompiled model"):
        with torch.no_grad():
            compiled(input_ids=torch.tensor([[4, 5, 6]]), cache=cache, position_ids=torch.tensor([[43, 44, 45]]))


def test_a_pickled_or_copied_static_cache_continues_exactly_as_the_original():
    import pickle

    model = tiny_llama()
    cache = make_cache("lacache", model, 32, static=True)
    _decode(model, cache, 30)  # dozens of tensor steps since the last host pass
    restored = pickle.loads(pickle.dumps(cache))
    restored.attach(model)
    twin = copy.deepcopy(cache)
    token = torch.tensor([[5]])
    with torch.no_grad():
        for step in range(20):
            positions = torch.tensor([[PROMPT + 30 + step]])
            logits = [model(input_ids=token, cache=c, position_ids=positions).logits for c in (cache, restored, twin)]
            assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2]), step
            token = logits[0][:, -1:].argmax(-1)
    assert restored.token_positions(3).tolist() == cache.token_positions(3).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_chunked_prefill_runs_on_the_host_path_and_decode_continues_static(method):
    """A long prompt fed in chunks (lacache's own loop): each chunk is a host-path pass, re-armed after it."""
    from lacache.cache.generation import stream_generate

    model = tiny_llama()
    ids = torch.randint(3, 90, (1, 150), generator=torch.Generator().manual_seed(1))
    expected, _ = stream_generate(model, ids, make_cache(method, model, 32), max_new_tokens=60, prefill_chunk=16)
    static = make_cache(method, model, 32, static=True)
    got, _ = stream_generate(model, ids, static, max_new_tokens=60, prefill_chunk=16)
    assert got == expected and static._static.armed
