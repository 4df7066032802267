"""A method added in one file (tests/methods/every_kth.py: a policy plus one ``register``) is served by
vLLM with no change to the plugin, because it reads slot counts only: token for token what the
transformers cache gives, and every layer of every request holding the same tokens (run by
`make test-vllm`)."""

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process sees the registration
os.environ["LACACHE_VLLM_RECORD"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "methods"))

BUDGET, NEW = 64, 200
PROMPTS = ["Once upon a time", "Write a long story about a dragon. " * 9]


def test_a_method_added_in_one_file_is_served_token_for_token():
    import every_kth  # noqa: F401  (registers "every-kth")
    from vllm import LLM, SamplingParams

    from lacache import load_model, make_cache
    from lacache.lab.models import default_model_dir
    from lacache.vllm.worker import states

    model, tokenizer = load_model(None)
    llm = LLM(model=str(default_model_dir()), dtype="float32", enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=False, gpu_memory_utilization=0.3, num_gpu_blocks_override=4,
              max_num_batched_tokens=128,
              additional_config={"lacache": {"method": "every-kth", "budget": BUDGET, "k": 3}})
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, ignore_eos=True))
    state = states()[-1]
    for ids, out in zip(prompts, outs):
        cache = make_cache("every-kth", model, BUDGET, k=3)
        # chunks of one period end at the compaction points, as vLLM's scheduler cuts its passes
        want = model.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, prefill_chunk_size=cache.points.period)[0, len(ids):].tolist()
        assert list(out.outputs[0].token_ids) == want
        slots = next(s for key, s in {**state.requests, **state.finished}.items()
                     if key == out.request_id or key.startswith(out.request_id + "-"))
        assert slots.seen == cache.seen and cache.seen - BUDGET >= 100
        for layer in range(model.config.num_hidden_layers):
            assert slots.token_positions(layer) == cache.token_positions(layer).tolist(), layer
