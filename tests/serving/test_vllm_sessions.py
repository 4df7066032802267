"""Endless sessions in vLLM: a resumable streaming session (vLLM's ``StreamingInput``) with the plugin on.

A session of 30 inputs and more than 12x the budget in tokens runs in a pool smaller than the
session: its output equals lacache's transformers cache fed the same stream in the same passes
(each input one pass, then one pass per new token; the last sampled token of each input is never
fed, as vLLM drops it at the frontier rewind), its KV blocks stay flat once the cache is full, and
a session aborted while it waits for input gives every block back (``reuse`` off there: with it on,
finished requests' caches stay in the pool until a request needs their blocks; that is tested in
test_vllm_reuse.py). On the tiny random Llama (``streams.save_tiny_llama``): the bundled model takes 4
minutes a method here; test_vllm_dtypes.py runs a session on it in the dtype vLLM picks.
"""


import pytest

pytest.importorskip("vllm")

from streams import greedy_turn, run_session, session_chunks, tiny  # noqa: E402  (tiny: the fixture)

BUDGET, NEW, INPUTS, BLOCK, BLOCKS = 64, 16, 30, 32, 8


def session_reference(model, cache, chunks: list[list[int]], new: int) -> list[int]:
    """What a session computes: each input in one pass, then ``new`` greedy tokens, the last one not fed."""
    return [token for ids in chunks for token in greedy_turn(model, cache, ids, new)]


# the authors' schedule (no compaction points: each input one pass) and the float32 serving default (points, keys
# read by the workers); lacache-capped and lacache-group take keydiff's path through sessions (points) and are
# exact in a plain request (test_vllm_plugin.py, test_vllm_key_rules.py); each session costs about 1.5 minutes
@pytest.mark.parametrize("method", ["lacache", "keydiff"])
def test_a_streaming_session_is_exact_bounded_and_flat(tiny, method):
    from lacache import make_cache

    model, tokenizer, model_dir = tiny
    chunks = session_chunks(tokenizer, INPUTS)
    total = sum(map(len, chunks)) + INPUTS * (NEW - 1)
    assert total >= 12 * BUDGET and total > (BLOCKS - 1) * BLOCK  # longer than the whole pool
    settings = {"model": str(model_dir), "chunks": chunks, "new": NEW, "block_size": BLOCK, "min_tokens": False,
                "blocks": BLOCKS, "max_model_len": 4096, "dtype": "float32", "lacache": {"method": method, "budget": BUDGET, "reuse": False}}
    got = run_session(settings)

    cache = make_cache(method, model, BUDGET)
    want = session_reference(model, cache, chunks, NEW)
    assert cache.seen == total
    for turn in range(INPUTS):
        a, b = got["tokens"][turn * NEW:(turn + 1) * NEW], want[turn * NEW:(turn + 1) * NEW]
        assert a == b, (turn, next(j for j, (x, y) in enumerate(zip(a, b)) if x != y))

    capacity = make_cache(method, model, BUDGET).policy.capacity(BUDGET)
    during = got["samples"][:-1]  # the last reading comes after the session ended and gave its blocks back
    assert got["samples"][-1][1] == 0.0
    full = [use for position, use in during if position > capacity + 128]
    early = [use for position, use in during if position <= capacity]
    assert len(full) > 300  # 367 readings in all for 30 inputs
    assert len(set(full)) == 1, sorted(set(full))  # flat once the cache is full
    assert max(early) <= full[0] < 1  # never more than the pool; grew to it, then stayed
    # nothing holds a block once the sessions are over (the aborted one included)
    assert got["lone_before"] == got["lone_after"] == 0.0
