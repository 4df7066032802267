"""The vLLM plugin's settings and slot replay, which need no vLLM: checked in the main suite."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from lacache import LaCache
from lacache.cache.generation import stream_generate
from lacache.vllm.config import parse_config


@pytest.mark.parametrize("raw, match", [
    ({"method": "tova", "budget": 256}, "not served in vLLM .*attention scores"),
    ({"method": "nope", "budget": 256}, "lacache.method='nope'"),
    ({"method": "lacache"}, "budget is required"),
    ({"budget": 0}, "budget=0 must be a positive integer"),
    ({"budget": "256"}, "budget='256'"),
    ({"budget": 256, "bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
    ({"budget": 256, "positions": "original"}, "positions='original'"),
    ({"budget": 256, "static": True}, "static: vLLM's own CUDA graphs"),
    ({"method": "h2o", "budget": 256}, "not served in vLLM .*attention scores"),
    ({"method": "lacache-reference", "budget": 256, "window": 8}, "takes no window"),
    ({"method": "lacache-reference", "budget": 256, "chunk": 8}, "takes no chunk"),
    ({"method": "lacache-reference", "budget": 256, "schedule": "reference"}, "leave it out"),
    ({"method": "lacache-capped", "budget": 8, "sinks": 4, "window": 4}, "budget=8 is too small"),
    ({"budget": 8, "sinks": 4, "window": 9}, "budget=8 is smaller than sinks=4 \\+ window=9"),
    ({"method": "lacache-capped", "budget": 256, "span": 3}, "give both or neither"),
    ({"budget": 256, "span": 3}, "unknown option"),
    ({"budget": 256, "chunk": 999}, "chunk=999"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_settings_are_one_clear_error(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_config(raw, 30)


def test_settings_mirror_from_model_defaults():
    config = parse_config({"method": "lacache", "budget": 256}, 30)  # LaCache.from_model's: the authors' schedule
    cache_defaults = {"schedule": "reference", "sinks": 4, "window": 30, "span": 15, "overlap": 0}
    assert {k: config.describe()[k] for k in cache_defaults} == cache_defaults
    assert config.chunk == 0 and config.target == 256
    # no method named: the serving default, keydiff in float32 and the capped schedule in half precision (both
    # compact every budget // 16 tokens)
    served = parse_config({"budget": 256}, 30)
    assert served.method == "keydiff" and served.reads_keys and served.chunk == 16
    served = parse_config({"budget": 256}, 30, half_precision=True)
    assert served.method == "lacache-capped" and served.describe()["schedule"] == "capped" and served.chunk == 16
    with pytest.raises(ValueError, match='fixes schedule=.capped.*serve method .lacache. with it'):
        parse_config({"method": "lacache-capped", "budget": 256, "schedule": "reference"}, 30)
    capped = parse_config({"method": "lacache", "budget": 256, "window": 64}, 30)  # a capped-only option: capped
    assert capped.describe()["schedule"] == "capped" and capped.chunk == 16 and capped.target == 240
    assert parse_config({"method": "streaming", "budget": 64, "sinks": 2}, 30).describe()["sinks"] == 2


@pytest.mark.parametrize("raw", [{"method": "knorm", "budget": 256}, {"method": "lacache-salient", "budget": 256},
                                 {"method": "lacache-group", "budget": 256}, {"budget": 256},
                                 {"method": "lacache", "budget": 256, "salient": 0.125}])
def test_key_reading_rules_are_served_with_an_amortised_schedule(raw):
    """Served, every rule frees budget // 16 slots per compaction (key-norm too, as in the transformers cache), so it
    compacts at points a period of 17 tokens apart."""
    config = parse_config(raw, 30)
    assert config.reads_keys and config.chunk == 16 and config.points.period == 17 and config.peak_slots(2048) == 257
    # the serving default reads keys in float32 (keydiff) and slots only in half precision (lacache-capped)
    assert not parse_config({"budget": 256}, 30, half_precision=True).reads_keys
    assert parse_config({**raw, "chunk": 0}, 30).points.period is None


@pytest.mark.parametrize("method,options", [
    ("lacache", {}), ("lacache", {"group": 2}), ("lacache-reference", {}),
    ("lacache-reference", {"span": 1, "overlap": 0}),  # 4 layers: B = 4, A = 1, R = 3: one slot over budget
    ("streaming", {}),
])
def test_slot_replay_keeps_the_tokens_the_transformers_cache_keeps(method, options):
    """Scheduler and workers replay a request through RequestSlots; it must agree with the cache itself."""
    model = tiny_llama("sdpa")
    config = parse_config({"method": method, "budget": 24, "sinks": 2, **options}, 4)
    if method == "lacache-reference":
        options = {**options, "schedule": "reference"}
        assert config.chunk == 0
    cache = (LaCache.from_model(model, budget=24, sinks=2, **options) if method.startswith("lacache") else
             __import__("lacache").StreamingLLMCache.from_model(model, budget=24, sinks=2))
    assert cache.chunk == config.chunk
    ids = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    stream_generate(model, ids, cache, max_new_tokens=50, prefill_chunk=30)
    slots = config.new_slots(track_tokens=True)
    slots.advance(30)
    for _ in range(49):  # the last sampled token is never fed back
        slots.advance(1)
    assert slots.seen == cache.seen and slots.slots == cache.num_slots <= config.capacity
    for layer in range(4):
        assert slots.token_positions(layer) == cache.token_positions(layer).tolist()


@pytest.mark.parametrize("schedule", ["capped", "reference"])
def test_each_request_gets_a_fresh_rule_sharing_plans(schedule):
    config = parse_config({"method": "lacache", "budget": 64, "schedule": schedule}, 30)
    a, b = config.new_policy(), config.new_policy()
    first = a.plan(65, 60)
    a.plan(65, 60)  # a moves on; b must not
    assert b.plan(65, 60).index.tolist() == first.index.tolist() and a is not b and a._plans is b._plans


def test_reference_schedule_sizes_requests_by_its_capacity():
    """The authors' schedule may hold floor(R/2) slots over the budget; the engine must size for it."""
    wide = parse_config({"method": "lacache-reference", "budget": 64, "span": 10, "overlap": 0}, 30)  # B=3, A=1
    assert wide.capacity == 65 and wide.chunk == 0 and wide.describe()["schedule"] == "reference"
    assert parse_config({"method": "lacache-reference", "budget": 64}, 30).capacity == 64  # 15/0: R = 1
    assert parse_config({"budget": 64}, 30).capacity == 64
    capped = parse_config({"method": "lacache-capped", "budget": 64}, 30)
    assert capped.describe()["schedule"] == "capped" and capped.chunk == 4 and capped.capacity == 64


@pytest.mark.parametrize("method, budget, block, want, suggested", [
    ("lacache-capped", 255, 128, "holds 256 slots = 2 block(s) of 128", None),
    ("lacache-capped", 256, 128, "holds 257 slots = 3 block(s) of 128; its last block holds only 1 of them: "
                                 "budget 255 would need 2", (255, 2)),
    ("streaming", 200, 128, "holds 201 slots = 2 block(s) of 128 (budget 255 would cost the same blocks)", (255, 2)),
    ("lacache-capped", 64, 16, "holds 65 slots = 5 block(s) of 16; its last block holds only 1 of them: "
                               "budget 63 would need 4", (63, 4)),
])
def test_the_start_up_note_says_what_a_row_costs_and_the_aligned_budget(method, budget, block, want, suggested):
    note = parse_config({"method": method, "budget": budget}, 30).row_note(block)
    assert note == "each decoding request " + want
    if suggested is not None:  # the budget it suggests really fits the row in that many blocks
        other_budget, blocks = suggested
        assert parse_config({"method": method, "budget": other_budget}, 30).decode_row(block)[1] == blocks


@settings(max_examples=300, deadline=None)
@given(held=st.integers(0, 2000), extra=st.integers(0, 2000), capacity=st.integers(1, 1000),
       block=st.sampled_from([1, 16, 128]))
def test_a_row_keeps_its_decode_blocks_and_never_grows(held, extra, capacity, block):
    from lacache.vllm.slots import kept_blocks

    held = min(held, capacity)
    row = -(-(held + extra) // block)  # what the row had after the pass
    keep = kept_blocks(held, row, capacity + 1, block)
    assert keep <= row  # truncation never asks for blocks
    assert keep * block >= held  # every held slot keeps its block
    assert (keep - 1) * block < max(held, capacity + 1)  # and no block beyond the decode row is kept
    if row * block >= capacity + 1:
        assert keep * block >= capacity + 1  # the next decode step needs no new block


def test_reuse_is_on_by_default_and_checked():
    assert parse_config({"budget": 64}, 30).reuse is True
    assert parse_config({"budget": 64, "reuse": False}, 30).reuse is False
    with pytest.raises(ValueError, match=r'lacache.reuse=1 must be true or false.*"reuse": true'):
        parse_config({"budget": 64, "reuse": 1}, 30)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), max_size=5),
       st.lists(st.integers(0, 3), max_size=10))
def test_a_kept_stream_is_reused_only_when_the_prompt_continues_all_of_it(streams, prompt):
    """The match is the longest kept stream that is a whole prefix of the prompt with a token left to compute."""
    from lacache.vllm.slots import KeptRequest, longest_kept_prefix

    kept = [KeptRequest(list(tokens), [i], None) for i, tokens in enumerate(streams)]
    found = longest_kept_prefix(kept, prompt)
    continuing = [k for k in kept if len(k.tokens) < len(prompt) and prompt[: len(k.tokens)] == k.tokens]
    if not continuing:
        assert found is None
    else:
        assert found in continuing and len(found.tokens) == max(len(k.tokens) for k in continuing)


def test_a_kept_stream_is_never_continued_from_another_context():
    """A LoRA adapter or a cache salt changes the keys: only a request of the same context may continue."""
    from lacache.vllm.slots import KeptRequest, longest_kept_prefix

    kept = [KeptRequest([1, 2, 3], [0], None, context=(None, "alice"))]
    assert longest_kept_prefix(kept, [1, 2, 3, 4], (None, "alice")) is kept[0]
    assert longest_kept_prefix(kept, [1, 2, 3, 4], (None, "bob")) is None
    assert longest_kept_prefix(kept, [1, 2, 3, 4], (7, "alice")) is None


def test_the_chat_benchmark_summary_compares_first_and_last_turns():
    from lacache.cli.bench_vllm import chat_summary
    from lacache.lab.bench.vllm_chat import user_messages

    assert user_messages("a b c d e f", 3, 2) == ["a b", "c d", "e f"]
    with pytest.raises(ValueError, match="need more"):
        user_messages("a b c", 2, 2)
    rows = [{"server": "s", "turn": t, "prompt_tokens": 10 * t, "cached_tokens": 0 if t == 1 else 5,
             "computed_tokens": t, "ttft_s": 0.1 * t, "kv_usage": 0.01} for t in range(1, 21)]
    (summary,) = chat_summary(rows)
    assert summary["computed_first"] == 1.5 and summary["computed_last"] == 19.5
    assert summary["last_prompt_tokens"] == 200 and summary["reused_turns"] == 19
