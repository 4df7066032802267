"""Run by test_vllm_multiprocess.py in a child process: vLLM's default engine (scheduler in one
process, worker in another) with the plugin on, on the tiny random Llama (``streams.save_tiny_llama``); prints
one line per prompt, "equal" or "differ"."""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from streams import greedy_params, save_tiny_llama  # noqa: E402


def main(folder: str) -> None:
    from vllm import LLM

    from lacache import make_cache
    from lacache.registry import served_default_method

    new = int(sys.argv[1])
    model, tokenizer = save_tiny_llama(folder)
    prompts = [tokenizer(p)["input_ids"] for p in ("Once upon a time", "Write a long story about a dragon. " * 9)]
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=2048,
              gpu_memory_utilization=0.3, num_gpu_blocks_override=4, max_num_batched_tokens=128,
              additional_config={"lacache": {"budget": 64}})  # prefix caching left on: the plugin turns it off
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy_params(model, new))
    for ids, out in zip(prompts, outs):
        cache = make_cache(served_default_method(), model, 64)
        # chunks of one period end at the compaction points, as vLLM's scheduler cuts its passes
        want = model.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, prefill_chunk_size=cache.points.period)[0, len(ids):].tolist()
        print("RESULT", len(ids), "equal" if list(out.outputs[0].token_ids) == want else "differ", flush=True)


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    with tempfile.TemporaryDirectory(prefix="lacache-mp-") as model_folder:
        main(model_folder)
