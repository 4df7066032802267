"""The rules that rank slots by a key statistic (``knorm``, ``keydiff``, ``lacache-salient``, ``lacache-group``)
inside vLLM.

Run by ``make test-vllm`` in a pytest process of its own: each test keeps its in-process engine alive
(tearing one down in-process breaks the next one's process groups), and the main serving suite holds
as many engines as the machine's memory allows.

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

from test_vllm_plugin import bundled  # noqa: E402,F401  (the fixture)
from test_vllm_plugin import test_outputs_and_kept_tokens_equal_the_transformers_cache as _plugin_check  # noqa: E402

BUDGET, NEW, STEP, BLOCK, BLOCKS = 127, 100, 128, 32, 17
_ENGINES = []  # kept alive: tearing an engine down in-process breaks the next one's process groups


@pytest.mark.parametrize("method", ["knorm", "keydiff", "lacache-salient", "lacache-group"])
def test_key_norm_rules_keep_the_transformers_caches_tokens(bundled, method):  # noqa: F811
    """The plugin test, for the rules whose workers choose survivors by a key statistic read from the paged
    keys."""
    _plugin_check(bundled, method)


def _params(new: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=new, min_tokens=new, temperature=0, ignore_eos=True)


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("method", ["lacache-salient", "keydiff"])
def test_a_key_norm_rule_keeps_the_same_slots_alone_and_beside_long_prefills(bundled, method):  # noqa: F811
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

    model, tokenizer, model_dir = bundled
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

    out = llm.generate([{"prompt_token_ids": chat}], _params(NEW), use_tqdm=False)[0]
    alone, alone_kept = list(out.outputs[0].token_ids), kept(out.request_id)
    outs = llm.generate([{"prompt_token_ids": p} for p in longs[:2] + [chat] + longs[2:]],
                        [_params(4), _params(4), _params(NEW), _params(4)], use_tqdm=False)
    beside = list(outs[2].outputs[0].token_ids)
    assert beside == alone, ("beside long prefills", _first_difference(beside, alone))
    assert kept(outs[2].request_id) == alone_kept
    cache = make_cache(method, model, BUDGET)
    want, _ = stream_generate(model, torch.tensor([chat]), cache, NEW, prefill_chunk=300)
    assert alone == want, ("the transformers cache", _first_difference(alone, want))
