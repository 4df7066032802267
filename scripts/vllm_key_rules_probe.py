"""How many kept slots of the key-norm rules differ between vLLM and the transformers cache.

The setting of ``tests/serving/test_vllm_plugin.py::test_outputs_and_kept_tokens_equal_the_transformers_cache``
(the bundled model, three prompts of 4, 31 and 73 tokens in one ``generate`` call, 300 greedy tokens, budget 64,
128-token steps, a 4-block pool): for each method named, whether the greedy tokens equal the transformers
cache's, and how many of the slots every layer holds at the end differ from the transformers cache's. The test
allows 1 in 200; this prints the count (docs/serving.md, "Rules that read keys").

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python scripts/vllm_key_rules_probe.py knorm lacache-salient lacache-group
    DTYPE=bfloat16 ... (the same in another dtype)
"""

import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: read its workers
os.environ["LACACHE_VLLM_RECORD"] = "1"  # the workers keep finished requests' slots
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "serving"))

import torch  # noqa: E402
from streams import PROMPTS  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from lacache import load_model, make_cache  # noqa: E402
from lacache.lab.models import default_model_dir  # noqa: E402
from lacache.vllm.worker import states  # noqa: E402

BUDGET, NEW = 64, 300
DTYPE = os.environ.get("DTYPE", "float32")


def main(methods: list[str]) -> None:
    model, tokenizer = load_model(None, dtype=getattr(torch, DTYPE))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    engines = []  # kept alive: tearing an engine down in-process breaks the next one's process groups
    for method in methods:
        llm = LLM(model=str(default_model_dir()), dtype=DTYPE, enforce_eager=True, max_model_len=2048,
                  enable_prefix_caching=False, gpu_memory_utilization=0.3, num_gpu_blocks_override=4,
                  max_num_batched_tokens=128, additional_config={"lacache": {"method": method, "budget": BUDGET}})
        engines.append(llm)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                            SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0, ignore_eos=True),
                            use_tqdm=False)
        worker = states()[-1]
        held = {**worker.requests, **worker.finished}
        differ = total = same = 0
        for ids, out in zip(prompts, outs):
            slots = next(v for k, v in held.items() if k == out.request_id or k.startswith(out.request_id + "-"))
            cache = make_cache(method, model, BUDGET)
            want = model.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=NEW,
                                  min_new_tokens=NEW, do_sample=False,
                                  prefill_chunk_size=cache.points.period)[0, len(ids):].tolist()
            same += want == list(out.outputs[0].token_ids)
            for layer in range(model.config.num_hidden_layers):
                a, b = slots.token_positions(layer), cache.token_positions(layer).tolist()
                differ += len(set(a) ^ set(b)) // 2
                total += len(a)
        print(f"RESULT {method} ({DTYPE}): same tokens {same}/{len(prompts)} prompts; kept slots that differ "
              f"{differ} of {total}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["knorm", "lacache-salient", "lacache-group"])
