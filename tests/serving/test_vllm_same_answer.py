"""Same tokens, same answer: what a request's bounded cache holds depends on its token stream alone.

A rule that amortises its compactions (the serving defaults, ``keydiff`` in float32 and ``lacache-capped`` in half
precision, and every other served rule but the authors' schedule: budget 127 frees 7 slots at a time) compacts
only at fixed stream positions, multiples of the period ``P = chunk + 1 = 8`` (``policies.points``), and
lacache's scheduler ends every pass at or before the next one. So however a busy engine cuts a request
into passes (the prompt chunked by what other requests leave of ``max_num_batched_tokens``, a chat turn
computing only its new tokens on a kept cache or recomputing the whole conversation, a preempted request
recomputing its prompt and answer, a session fed inputs longer than the period), greedy decoding gives
the same tokens, and the tokens of lacache's transformers cache fed the same stream (split at the same
points, ``generation.prefill_passes``). Without the clip (``_SchedulerHooks._mamba_block_aligned_split``), a
pass that crosses points compacts once at its end and keeps other tokens than the same stream fed in other
passes: every test here then fails on its tokens.

One in-process engine (float32, greedy, 16 blocks of 32: four decode rows of 128 slots) serves the first
four scenarios; a second one with ``reuse`` off (room for ten rows) serves the chat's other side; a
streaming session runs in a child process (``session_check.py``). The key-norm rules' counterpart is
tests/serving/test_vllm_key_rules.py. All on the tiny random Llama (``streams.save_tiny_llama``): what is
tested is how passes are cut, which no trained weight changes, and its tokens still move with every kept slot.
"""

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: introspection

from streams import greedy_turn, run_session, spy_preemptions, tiny  # noqa: E402  (tiny: fixture)

from lacache.registry import served_default_method  # noqa: E402

BUDGET, STEP, BLOCK, BLOCKS = 127, 128, 32, 17  # 16 usable blocks + vLLM's null block
METHOD = served_default_method()  # the rule a user gets naming none, in float32: keydiff
PERIOD = BUDGET // 16 + 1  # every served rule's default chunk, plus one
NEW = 100  # new tokens of the long answers: all of them past the first compaction (their prompts exceed the budget)
_ENGINES = []  # kept alive: tearing an engine down in-process breaks the next one's process groups


def _engine(model_dir, reuse: bool = True, blocks: int = BLOCKS):
    from vllm import LLM

    lacache = {"method": METHOD, "budget": BUDGET} if reuse else {"method": METHOD, "budget": BUDGET, "reuse": False}
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=4096,
              gpu_memory_utilization=0.3, block_size=BLOCK, num_gpu_blocks_override=blocks,
              max_num_batched_tokens=STEP, additional_config={"lacache": lacache})
    _ENGINES.append(llm)
    return llm


@pytest.fixture(scope="module")
def setup(tiny):
    """The transformers model, its tokenizer and the essays' words."""
    from lacache.lab.texts import load_essays

    model, tokenizer, _ = tiny
    return model, tokenizer, load_essays(200_000).split()


@pytest.fixture(scope="module")
def served(tiny):
    """The engine of the first four scenarios: ``reuse`` on (the default)."""
    return _engine(tiny[2])


@pytest.fixture(scope="module")
def unreused(tiny):
    """An engine with ``reuse`` off (every turn of a chat recomputes the whole conversation), with room for
    ten decode rows at once."""
    return _engine(tiny[2], reuse=False, blocks=41)


def _ids(tokenizer, words: list[str], start: int, count: int) -> list[int]:
    return tokenizer(" " + " ".join(words[start:start + count]))["input_ids"]


def _params(new: int):
    """Greedy, ``new`` tokens; no ``min_tokens``: it masks the tokenizer's end of sequence, which the tiny model
    does not declare, so its transformers run may pick it (``streams.save_tiny_llama``)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)


def _answers(llm, prompts: list[list[int]], new) -> list[list[int]]:
    """Greedy answers of ``prompts`` submitted together (``new``: one count, or one per prompt)."""
    news = new if isinstance(new, list) else [new] * len(prompts)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], [_params(n) for n in news], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _manager(llm):
    return _scheduler(llm).kv_cache_manager.coordinator.single_type_managers[0]


def _spy_passes(scheduler) -> list[dict[tuple, int]]:
    """Every step the scheduler plans from now on: {prompt of each scheduled request: tokens in its pass}."""
    steps, prompts = [], {}
    original = scheduler.schedule

    def spy(*args, **kwargs):
        output = original(*args, **kwargs)
        for new in output.scheduled_new_reqs:
            prompts[new.req_id] = tuple(new.prompt_token_ids or ())
        steps.append({prompts.get(rid, rid): n for rid, n in output.num_scheduled_tokens.items()})
        return output

    scheduler.schedule = spy
    return steps


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _chat_prompt(setup) -> list[int]:
    """A chat-sized prompt (about 200 tokens: past the budget, so it compacts during prefill)."""
    _, tokenizer, words = setup
    return _ids(tokenizer, words, 0, 160)


@pytest.fixture(scope="module")
def alone(setup, served) -> list[int]:
    """The chat-sized prompt's answer with the engine to itself."""
    served.reset_prefix_cache()  # no kept cache from another test to continue
    steps = _spy_passes(_scheduler(served))
    try:
        answer = _answers(served, [_chat_prompt(setup)], NEW)[0]
    finally:
        _scheduler(served).__dict__.pop("schedule")  # the spy off again
    assert all(len(step) <= 1 for step in steps)  # alone indeed
    return answer


# ------------------------------------------------------------------ 1. alone or beside long prefills
def test_a_request_beside_long_prefills_gets_the_answer_it_gets_alone(setup, served, alone):
    import torch

    from lacache import make_cache
    from lacache.cache.generation import stream_generate

    model, tokenizer, words = setup
    chat = _chat_prompt(setup)
    longs = [_ids(tokenizer, words, 2000 + 600 * k, 500) for k in range(3)]
    assert min(map(len, longs)) > 4 * STEP and len(chat) > BUDGET + 4 * PERIOD
    served.reset_prefix_cache()
    scheduler = _scheduler(served)
    steps = _spy_passes(scheduler)
    try:
        # the chat request last: without lacache's clip it would get what the long prefills leave of each step
        answers = _answers(served, longs[:2] + [chat] + longs[2:], [4, 4, NEW, 4])
    finally:
        scheduler.__dict__.pop("schedule")
    key = tuple(chat)
    beside = sum(1 for step in steps if step.get(key, 0) > 1 and sum(n > 1 for n in step.values()) > 1)
    assert answers[2] == alone, ("beside long prefills", _first_difference(answers[2], alone))
    assert beside >= 10, "the chat request's prefill never ran beside the long ones"

    cache = make_cache(METHOD, model, BUDGET)
    want, _ = stream_generate(model, torch.tensor([chat]), cache, NEW, prefill_chunk=300)
    assert alone == want, ("the transformers cache, prefill_chunk=300", _first_difference(alone, want))


# ------------------------------------------------------------------ 2. a 10-turn chat, with and without reuse
def test_a_ten_turn_chat_gets_the_same_answers_with_and_without_reuse(setup, served, unreused):
    from lacache import make_cache

    model, tokenizer, words = setup
    messages = [_ids(tokenizer, words, 8000 + 10 * i, 10) for i in range(10)]
    assert min(map(len, messages)) > PERIOD  # each turn's new tokens cross compaction points
    new = 16
    served.reset_prefix_cache()
    reused_before = _manager(served).reused_requests
    cache = make_cache(METHOD, model, BUDGET)
    prompts, answers, wants = [], [], []
    prompt, pending = [], []  # pending: tokens of the conversation the transformers stream has not been fed yet
    for message in messages:  # reuse on: each turn continues the last one's kept cache
        prompt = prompt + message
        pending = pending + message
        prompts.append(prompt)
        answers.append(_answers(served, [prompt], new)[0])
        wants.append(greedy_turn(model, cache, pending, new))
        prompt = prompt + answers[-1]
        pending = [answers[-1][-1]]  # the last answer token was sampled, never fed
    # reuse off: each turn recomputes its whole conversation; all ten at once, so they share every step
    without = _answers(unreused, prompts, new)
    for turn in range(len(messages)):
        assert answers[turn] == without[turn], ("turn", turn, "reuse on vs off",
                                                _first_difference(answers[turn], without[turn]))
        assert answers[turn] == wants[turn], ("turn", turn, "vs the transformers cache",
                                              _first_difference(answers[turn], wants[turn]))
    assert _manager(served).reused_requests - reused_before == len(messages) - 1  # every turn after the first
    assert _manager(unreused).reused_requests == 0 and not _manager(unreused).kept
    assert cache.seen == len(prompt) - 1 > 2 * BUDGET


# ------------------------------------------------------------------ 3. preempted mid-decode
def test_a_request_preempted_mid_decode_continues_as_if_undisturbed(setup, served, alone):
    served.reset_prefix_cache()
    scheduler = _scheduler(served)
    preempted = spy_preemptions(scheduler)
    engine = served.llm_engine
    engine.add_request("preempted", {"prompt_token_ids": _chat_prompt(setup)}, _params(NEW))
    tokens: list[int] = []
    forced = False
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = list(out.outputs[0].token_ids)
            if not forced and len(tokens) >= 45:
                # mid-decode, off the compaction points: vLLM's own preemption path, as when a pool runs dry (pool
                # pressure alone never preempts here: admission reserves each request's decode row, see
                # test_vllm_engine.py); the request recomputes its prompt and answer so far from token 0
                engine.reset_prefix_cache(reset_running_requests=True)
                forced = True
    finally:
        scheduler.__dict__.pop("_preempt_request")
    assert forced and len(preempted) == 1, preempted
    assert tokens == alone, ("preempted after 45 tokens", _first_difference(tokens, alone))


# ------------------------------------------------------------------ 4. a kept cache evicted under pool pressure
def test_a_turn_whose_kept_cache_was_evicted_gets_the_answer_of_one_that_reused_it(setup, served):
    from lacache import make_cache

    model, tokenizer, words = setup
    manager = _manager(served)
    first = _ids(tokenizer, words, 12000, 160)
    message = _ids(tokenizer, words, 12500, 20)
    fillers = [_ids(tokenizer, words, 13000 + 100 * k, 80) for k in range(4)]
    assert len(first) > BUDGET and len(message) > PERIOD

    def turn_one() -> list[int]:
        served.reset_prefix_cache()  # no kept cache but the one turn 1 leaves
        answer = _answers(served, [first], 8)[0]
        assert [len(entry.tokens) for entry in manager.kept.values()] == [len(first) + 7]
        return answer

    # (a) other requests need the pool first: turn 1's kept cache gives its blocks back, turn 2 recomputes it all
    answer = turn_one()
    second = first + answer + message
    evicted = []
    original = manager.evict_oldest

    def spy():
        evicted.append(len(next(iter(manager.kept.values())).tokens))
        original()

    manager.evict_oldest = spy
    try:
        _answers(served, fillers, 4)  # each reserves a row of 4 blocks; four of them fill the pool's 16
    finally:
        del manager.evict_oldest
    assert len(first) + 7 in evicted, "turn 1's kept cache was never evicted"
    reused = manager.reused_requests
    recomputed = _answers(served, [second], NEW)[0]
    assert manager.reused_requests == reused, "turn 2 continued a cache that should have been evicted"

    # (b) turn 2 continues turn 1's kept cache
    assert turn_one() == answer, "turn 1 asked again"
    reused = manager.reused_requests
    continued = _answers(served, [second], NEW)[0]
    assert manager.reused_requests == reused + 1, "turn 2 did not continue turn 1's cache"
    assert recomputed == continued, ("turn 2 recomputed vs continued", _first_difference(recomputed, continued))

    cache = make_cache(METHOD, model, BUDGET)
    assert greedy_turn(model, cache, first, 8) == answer, "turn 1 vs the transformers cache"
    want = greedy_turn(model, cache, [answer[-1]] + message, NEW)
    assert continued == want, ("turn 2 vs the transformers cache", _first_difference(continued, want))


# ------------------------------------------------------------------ 5. a session fed inputs longer than the period
def test_a_session_with_inputs_longer_than_the_period_matches_the_transformers_cache(setup, tiny):
    from lacache import make_cache

    model, tokenizer, words = setup
    budget, new, inputs, size = 96, 12, 8, 40  # period 7: every input crosses five or six compaction points
    stream = _ids(tokenizer, words, 20000, 400)
    chunks = [stream[size * i: size * (i + 1)] for i in range(inputs)]
    assert all(len(c) == size for c in chunks) and budget // 16 + 1 == 7
    settings = {"model": str(tiny[2]), "chunks": chunks, "new": new, "block_size": BLOCK, "blocks": 8,
                "max_model_len": 4096, "dtype": "float32", "min_tokens": False,
                "lacache": {"method": METHOD, "budget": budget, "reuse": False}}
    got = run_session(settings)

    cache = make_cache(METHOD, model, budget)
    want = [token for ids in chunks for token in greedy_turn(model, cache, ids, new)]
    assert cache.seen == inputs * (size + new - 1) > 4 * budget
    for turn in range(inputs):
        a, b = got["tokens"][turn * new:(turn + 1) * new], want[turn * new:(turn + 1) * new]
        assert a == b, ("input", turn, _first_difference(a, b))

