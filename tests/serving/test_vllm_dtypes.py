"""lacache inside vLLM in the dtype vLLM picks by default (bfloat16 on x86 CPUs) and in float16.

The float32 tests (test_vllm_plugin.py, test_vllm_reuse.py, test_vllm_sessions.py) ask for the
transformers cache's tokens bitwise. In half precision the two backends' forwards differ by a few
spacings of the logits before any compaction (see ``streams.SPACINGS``), so here every vLLM token is
replayed through the transformers cache in the same dtype and must be, within ``SPACINGS`` spacings of
the largest logit (in magnitude), a greedy pick of it, with its logprob as close; which tokens each layer keeps must be
equal exactly (the rules are index-only). The engines are started without ``dtype`` where the test
is about the default, so whatever the CPU makes vLLM pick (and whatever page layout its backend
writes: measured at start, see lacache.vllm.paged) is what runs.
"""

import copy
import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: introspection
os.environ["LACACHE_VLLM_RECORD"] = "1"

import torch  # noqa: E402
from streams import PROMPTS, assert_close, bundled, forced_turn, run_session, session_chunks  # noqa: E402  (bundled: fixture)

BUDGET, NEW = 64, 150
_ENGINES = []


def _eos(model) -> list[int]:
    ids = model.generation_config.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])


def _state_of(request_id):
    from lacache.vllm.worker import states

    for state in states()[-1:]:
        for key, slots in {**state.requests, **state.finished}.items():
            if key == request_id or key.startswith(request_id + "-"):
                return slots
    raise KeyError(request_id)


# streaming, index-only as these two, is exact in float32 (test_vllm_plugin.py); each case here costs 1-2 minutes
@pytest.mark.parametrize("dtype, method", [(None, "lacache"), ("float16", "lacache-capped")],
                         ids=["default-lacache", "float16-lacache-capped"])
def test_half_precision_tokens_and_kept_tokens_match_the_transformers_cache(bundled, dtype, method):
    from vllm import LLM, SamplingParams

    from lacache import make_cache

    model, tokenizer, model_dir = bundled
    kwargs = {"dtype": dtype} if dtype else {}
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=2048, enable_prefix_caching=False,
              gpu_memory_utilization=0.3, num_gpu_blocks_override=4, max_num_batched_tokens=128,
              additional_config={"lacache": {"method": method, "budget": BUDGET}}, **kwargs)
    _ENGINES.append(llm)  # kept alive: tearing an engine down in-process breaks the next one's process groups
    served = llm.llm_engine.vllm_config.model_config.dtype
    assert served != torch.float32  # the default on a CPU is bfloat16 (float16 where it has no bfloat16)
    half = copy.deepcopy(model).to(served)  # the float32 weights rounded as vLLM rounds them
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, ignore_eos=True, logprobs=0))
    for ids, out in zip(prompts, outs):
        got = list(out.outputs[0].token_ids)
        logprobs = [entry[token].logprob for entry, token in zip(out.outputs[0].logprobs, got)]
        cache = make_cache(method, half, BUDGET)
        rows = forced_turn(half, cache, ids, got)
        worst = assert_close(rows, got, logprobs, served, where=len(ids), suppressed=_eos(model))
        print(f"{served} {method} prompt of {len(ids)}: largest difference {worst:.2f} spacings")
        slots = _state_of(out.request_id)
        assert slots.seen == cache.seen == len(ids) + NEW - 1
        assert cache.seen - BUDGET >= 85  # far past the first compaction
        for layer in range(model.config.num_hidden_layers):
            assert slots.token_positions(layer) == cache.token_positions(layer).tolist(), layer


def test_a_chat_continues_its_cache_in_the_default_dtype(bundled):
    """test_vllm_reuse.py's chat, in the dtype vLLM picks and with no method named (the serving default,
    lacache-capped): every turn after the first takes over the last turn's compacted cache, and each answer matches
    the transformers cache fed the conversation as one stream."""
    from vllm import LLM, SamplingParams

    from lacache import make_cache
    from lacache.lab.texts import load_essays

    model, tokenizer, model_dir = bundled
    budget, new, turns = 64, 12, 16
    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=4096, gpu_memory_utilization=0.3,
              block_size=32, num_gpu_blocks_override=12, max_num_batched_tokens=256,
              additional_config={"lacache": {"budget": budget}})  # no method: the half-precision default
    _ENGINES.append(llm)
    served = llm.llm_engine.vllm_config.model_config.dtype
    assert served != torch.float32
    from lacache.vllm.config import serving_config

    assert serving_config(llm.llm_engine.vllm_config).method == "lacache-capped"  # index-only: served in half precision
    half = copy.deepcopy(model).to(served)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    words = load_essays(40_000).split()
    messages = [tokenizer(" " + " ".join(words[11 * i: 11 * i + 11]))["input_ids"] for i in range(turns)]
    cache = make_cache("lacache-capped", half, budget)
    prompt, pending, worst = [], [], 0.0
    for turn in range(turns):
        prompt = prompt + messages[turn]
        pending = pending + messages[turn]
        out = llm.generate([{"prompt_token_ids": list(prompt)}],
                           SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True, logprobs=0),
                           use_tqdm=False)[0].outputs[0]
        got = list(out.token_ids)
        logprobs = [entry[token].logprob for entry, token in zip(out.logprobs, got)]
        rows = forced_turn(half, cache, pending, got)
        worst = max(worst, assert_close(rows, got, logprobs, served, where=turn, suppressed=_eos(model)))
        prompt = prompt + got
        pending = [got[-1]]  # the last answer token was sampled, never fed
    print(f"{served} chat of {turns} turns: largest difference {worst:.2f} spacings")
    assert manager.reused_requests == turns - 1
    assert cache.seen == len(prompt) - 1 > 5 * budget


def test_a_streaming_session_in_the_default_dtype(bundled):
    """test_vllm_sessions.py's endless session, in the dtype vLLM picks, on the bundled model: 12 of its inputs
    (over 4x the budget, about 50 compactions; the float32 sessions there run 30 on the tiny model)."""

    from lacache import make_cache

    model, tokenizer, model_dir = bundled
    budget, new, inputs = 64, 16, 12
    chunks = session_chunks(tokenizer, inputs)
    settings = {"model": str(model_dir), "chunks": chunks, "new": new, "block_size": 32, "blocks": 8,
                "max_model_len": 4096, "logprobs": True, "lacache": {"method": "lacache", "budget": budget, "reuse": False}}
    got = run_session(settings)
    served = getattr(torch, got["dtype"])
    assert served != torch.float32
    half = copy.deepcopy(model).to(served)
    cache = make_cache("lacache", half, budget)
    worst = 0.0
    for turn, ids in enumerate(chunks):
        tokens = got["tokens"][turn * new:(turn + 1) * new]
        rows = forced_turn(half, cache, ids, tokens)
        worst = max(worst, assert_close(rows, tokens, got["logprobs"][turn * new:(turn + 1) * new], served,
                                        where=turn, suppressed=_eos(model)))
    print(f"{served} session of {cache.seen} tokens: largest difference {worst:.2f} spacings")
    assert cache.seen >= 4 * budget
