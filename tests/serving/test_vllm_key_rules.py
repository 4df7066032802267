"""The rules that rank slots by a key statistic (``knorm``, ``keydiff``, ``lacache-salient``, ``lacache-group``)
inside vLLM.

On the tiny random Llama (``streams.save_tiny_llama``; the bundled model runs the served default in
test_vllm_plugin.py): trained weights are not what these checks need, and the bundled model would take 15
minutes here.

* The plugin test's setting (``test_vllm_plugin.py``: float32, greedy, prompts of 4, 31 and 73 tokens in
  one ``generate`` call, 300 new tokens, budget 64, 128-token steps, a pool of 4 blocks): the same tokens
  as ``model.generate`` with the transformers cache, and the same kept tokens in every layer but where a
  statistic rounds apart in the two backends (at most 1 slot in 200; docs/serving.md, "Rules that read keys").
* Same tokens, same answer: a ``lacache-salient`` request (each slot's norm read once) and a ``keydiff``
  request (every held key read again at each compaction) beside three long prefills keep the same slots
  in every layer and get the same tokens as alone, and the transformers cache's.
"""

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: introspection
os.environ["LACACHE_VLLM_RECORD"] = "1"  # the workers keep what each request held

from streams import greedy_params, tiny  # noqa: E402  (tiny: the fixture)
from test_vllm_plugin import NEW as PLUGIN_NEW  # noqa: E402
from test_vllm_plugin import check_outputs_and_kept_tokens  # noqa: E402

BUDGET, NEW, STEP, BLOCK, BLOCKS = 127, 100, 128, 32, 17
_ENGINES = []  # kept alive: tearing an engine down in-process breaks the next one's process groups


@pytest.mark.parametrize("method", ["knorm", "keydiff", "lacache-salient", "lacache-group"])
def test_key_norm_rules_keep_the_transformers_caches_tokens(tiny, method):
    """The plugin test, for the rules whose workers choose survivors by a key statistic read from the paged
    keys."""
    check_outputs_and_kept_tokens(tiny, method, PLUGIN_NEW)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("method", ["lacache-salient", "keydiff"])
def test_a_key_norm_rule_keeps_the_same_slots_alone_and_beside_long_prefills(tiny, method):
    """``lacache-salient`` (the ladder plus a pool of the smallest-norm keys): the worker reads each slot's norm
    once, from the key vLLM wrote; ``keydiff``: it reads every held key again at each compaction, at its slot's
    position. Either way a request cut into other passes beside long prefills keeps the same slots in every
    layer and gets the same tokens as alone, and the transformers cache's."""
    import torch
    from vllm import LLM

    from lacache import make_cache
    from lacache.cache.generation import stream_generate
    from lacache.lab.texts import load_essays
    from lacache.vllm.worker import states

    model, tokenizer, model_dir = tiny
    words = load_essays(200_000).split()
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=4096,
              gpu_memory_utilization=0.3, block_size=BLOCK, num_gpu_blocks_override=BLOCKS,
              max_num_batched_tokens=STEP,
              additional_config={"lacache": {"method": method, "budget": BUDGET, "reuse": False}})
    _ENGINES.append(llm)
    worker = states()[-1]
    chat = tokenizer(" " + " ".join(words[:160]))["input_ids"]
    longs = [tokenizer(" " + " ".join(words[30000 + 600 * k: 30500 + 600 * k]))["input_ids"] for k in range(3)]
    assert len(chat) > BUDGET + 4 * (BUDGET // 16 + 1) and min(map(len, longs)) > 4 * STEP

    def kept(request_id):
        held = {**worker.requests, **worker.finished}  # a finished request is forgotten at the next step
        slots = next(s for k, s in held.items() if k == request_id or k.startswith(request_id + "-"))
        return [slots.token_positions(layer) for layer in range(model.config.num_hidden_layers)]

    out = llm.generate([{"prompt_token_ids": chat}], greedy_params(model, NEW), use_tqdm=False)[0]
    alone, alone_kept = list(out.outputs[0].token_ids), kept(out.request_id)
    outs = llm.generate([{"prompt_token_ids": p} for p in longs[:2] + [chat] + longs[2:]],
                        [greedy_params(model, n) for n in (4, 4, NEW, 4)], use_tqdm=False)
    beside = list(outs[2].outputs[0].token_ids)
    assert beside == alone, ("beside long prefills", _first_difference(beside, alone))
    assert kept(outs[2].request_id) == alone_kept
    cache = make_cache(method, model, BUDGET)
    want, _ = stream_generate(model, torch.tensor([chat]), cache, NEW, prefill_chunk=300)
    assert alone == want, ("the transformers cache", _first_difference(alone, want))
