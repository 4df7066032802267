"""lacache inside vLLM (run by `make test-vllm`, in the environment that target builds).

One in-process engine, float32, greedy: several prompts of different lengths in one `generate` call
must equal `model.generate(ids, past_key_values=make_cache(...))` token for token, far past each first
compaction, and every layer of every request must hold exactly the tokens the transformers cache holds.
The KV pool is 4 blocks of 128 tokens while max_model_len is 2048: stock vLLM refuses to start with it.
Each index-only rule runs on the tiny random Llama (``streams.save_tiny_llama``: 300 new tokens in
seconds); the serving default runs on the bundled model as well, 120 new tokens.
"""

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: introspection
os.environ["LACACHE_VLLM_RECORD"] = "1"

import torch  # noqa: E402
from streams import PROMPTS, bundled, greedy_params, tiny  # noqa: E402  (bundled, tiny: fixtures)

BUDGET, NEW = 64, 300


_ENGINES = []


def _engine(model_dir, **lacache):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048,
               enable_prefix_caching=False, gpu_memory_utilization=0.3, num_gpu_blocks_override=4,
               max_num_batched_tokens=128, additional_config={"lacache": lacache})


def _state_of(request_id):
    from lacache.vllm.worker import states

    for state in states()[-1:]:  # the newest engine's worker: earlier engines reuse request ids
        for key, slots in {**state.requests, **state.finished}.items():
            if key == request_id or key.startswith(request_id + "-"):
                return slots
    raise KeyError(request_id)


@pytest.mark.parametrize("method", ["lacache", "lacache-capped", "streaming"])
def test_outputs_and_kept_tokens_equal_the_transformers_cache(tiny, method):
    """The index-only rules (the key-norm rules: tests/serving/test_vllm_key_rules.py)."""
    check_outputs_and_kept_tokens(tiny, method, NEW)


def test_the_served_default_on_the_bundled_model_equals_the_transformers_cache(bundled):
    """What a user who names no method gets in float32, on the model they get."""
    from lacache.registry import served_default_method

    check_outputs_and_kept_tokens(bundled, served_default_method(), 120)


def check_outputs_and_kept_tokens(loaded, method: str, new: int) -> None:
    """The engine's tokens and kept tokens for ``PROMPTS`` against the transformers cache's (``loaded``: model,
    tokenizer, folder)."""
    from lacache import make_cache
    from lacache.vllm.config import parse_config

    model, tokenizer, model_dir = loaded
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    llm = _engine(model_dir, method=method, budget=BUDGET)
    _ENGINES.append(llm)  # kept alive: tearing an engine down in-process breaks the next one's process groups
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy_params(model, new), use_tqdm=False)
    for ids, out in zip(prompts, outs):
        cache = make_cache(method, model, BUDGET)
        assert cache.points == parse_config({"method": method, "budget": BUDGET}, model.config.num_hidden_layers).points
        # chunks of one period end at the compaction points, as vLLM's scheduler cuts its passes (the authors'
        # schedule has none: one pass, as vLLM runs these short prompts)
        want = model.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, prefill_chunk_size=cache.points.period)[0, len(ids):].tolist()
        got = list(out.outputs[0].token_ids)
        assert got == want, (len(ids), next(j for j, (a, b) in enumerate(zip(got, want)) if a != b))
        slots = _state_of(out.request_id)
        assert slots.seen == cache.seen == len(ids) + new - 1
        assert cache.seen - BUDGET >= 50  # the comparison runs far past the first compaction
        layers = range(model.config.num_hidden_layers)
        if not slots.reads_keys:
            for layer in layers:
                assert slots.token_positions(layer) == cache.token_positions(layer).tolist(), layer
            continue
        # key-norm ranks: the two backends' keys differ in their last bits (other kernels), so a norm lying within
        # that noise of a boundary between two 8-bit values rounds apart (policies.base.key_norms) and one slot
        # of that layer may differ from then on; everything else must agree
        differ = sum(len(set(slots.token_positions(layer)) ^ set(cache.token_positions(layer).tolist())) // 2
                     for layer in layers)
        held = sum(len(slots.token_positions(layer)) for layer in layers)
        assert differ <= held // 200, (differ, held)


@pytest.mark.parametrize("settings, match", [
    ({"method": "h2o", "budget": 64}, "not served in vLLM"),
    ({"budget": 64, "windows": 8}, r"unknown option\(s\) \['windows'\]"),
    ({"method": "lacache-capped", "budget": 6}, "too small"),
    ({"budget": 4}, "budget=4 is smaller than sinks=4 \\+ window=1"),
])
def test_bad_settings_fail_at_engine_start(tiny, settings, match):
    with pytest.raises(Exception, match=match):
        _engine(tiny[2], **settings)
