"""A chat's next turn continues the previous turn's compacted cache instead of recomputing it.

One in-process engine (float32, greedy, budget 64, blocks of 32): each turn's prompt is the previous
turn's prompt, its answer and a new message, as chat clients re-send them. With ``reuse`` on (the
default) every turn after the first takes over the finished turn's blocks and computes only its new
tokens, and its answer equals lacache's transformers cache fed the whole conversation as one stream
in the same passes. A prompt that differs anywhere gets a full prefill and the answer of a fresh
cache; kept caches give their blocks back when a request needs them, without preempting anyone.
"""

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: introspection

from streams import greedy_turn, spy_preemptions  # noqa: E402

from lacache.registry import served_default_method  # noqa: E402

BUDGET, NEW, BLOCK, BLOCKS = 64, 12, 32, 12
METHOD = served_default_method()  # the rule a user gets naming none, in float32 (keydiff)
_ENGINES = []


@pytest.fixture(scope="module")
def setup():
    from vllm import LLM

    from lacache import load_model
    from lacache.lab.models import default_model_dir
    from lacache.lab.texts import load_essays

    model, tokenizer = load_model(None)
    llm = LLM(model=str(default_model_dir()), dtype="float32", enforce_eager=True, max_model_len=4096,
              gpu_memory_utilization=0.3, block_size=BLOCK, num_gpu_blocks_override=BLOCKS,
              max_num_batched_tokens=256, additional_config={"lacache": {"method": METHOD, "budget": BUDGET}})
    _ENGINES.append(llm)  # kept alive: tearing an engine down in-process breaks the next one's process groups
    words = load_essays(40_000).split()
    messages = [tokenizer(" " + " ".join(words[11 * i: 11 * i + 11]))["input_ids"] for i in range(40)]
    return model, llm, messages


def _manager(llm):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return scheduler, scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def _answer(llm, prompt: list[int], new: int = NEW) -> list[int]:
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": list(prompt)}],
                       SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def test_each_turn_continues_the_last_ones_cache_and_equals_one_stream(setup):
    from lacache import make_cache

    model, llm, messages = setup
    _, manager = _manager(llm)
    cache = make_cache(METHOD, model, BUDGET)
    reused_before = manager.reused_requests
    prompt, pending = [], []  # pending: tokens of the conversation the stream has not been fed yet
    turns = 16
    for turn in range(turns):
        prompt = prompt + messages[turn]
        pending = pending + messages[turn]
        got = _answer(llm, prompt)
        want = greedy_turn(model, cache, pending, NEW)
        assert got == want, turn
        prompt = prompt + got
        pending = [got[-1]]  # the last answer token was sampled, never fed
    assert manager.reused_requests - reused_before == turns - 1
    assert cache.seen == len(prompt) - 1 > 5 * BUDGET  # far past the budget: turns compacted many times
    assert manager.reused_tokens >= cache.seen - len(messages[turns - 1]) - NEW


def test_a_prompt_that_differs_gets_a_full_prefill(setup):
    from lacache import make_cache

    model, llm, messages = setup
    _, manager = _manager(llm)
    first = messages[20] + messages[21]
    answer = _answer(llm, first)
    edited = list(first)
    edited[3] = (edited[3] + 1) % 1000  # the same length and the same answer appended, one token changed
    follow = edited + answer + messages[22]
    reused = manager.reused_requests
    got = _answer(llm, follow)
    assert manager.reused_requests == reused
    assert got == greedy_turn(model, make_cache(METHOD, model, BUDGET), follow, NEW)


def test_kept_caches_give_their_blocks_to_a_request_that_needs_them(setup):
    model, llm, messages = setup
    scheduler, manager = _manager(llm)
    for i in range(25, 31):  # six finished requests, each keeping its blocks
        _answer(llm, messages[i] + messages[i + 1] + messages[i + 2] + messages[i + 3])
    assert len(manager.kept) >= 3
    preempted = spy_preemptions(scheduler)
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [m for i in range(k, k + 6) for m in messages[i]]} for k in (0, 6, 12)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [40, 40, 40]
    assert preempted == []
    free = manager.block_pool.get_num_free_blocks()
    held = sum(len(entry.blocks) for entry in manager.kept.values())
    assert free + held == BLOCKS - 1  # every block is free or kept: none leaked
