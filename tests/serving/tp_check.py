"""Run by test_vllm_tensor_parallel.py in a child process: the plugin under tensor parallel 2 on CPU.

A tiny random Llama (8 attention heads, 4 KV heads, 4 layers, head size 32, seeded weights, the
bundled tokenizer) is saved to a temporary folder. For each method, three prompts (shorter than the
budget, and about 1.1x and 1.7x it) get NEW greedy tokens from

* vLLM with ``tensor_parallel_size=2`` and the plugin (two worker processes, each holding 2 of the
  4 KV heads of every layer),
* vLLM with the same settings at ``tensor_parallel_size=1``,
* ``model.generate`` with lacache's transformers cache (``make_cache``),

and also from the unbounded transformers cache, to show the greedy tokens depend on what is evicted.
The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so its scheduler's block
rows are read after every step; each worker rank reports, through ``collective_rpc``, how often it
compacted and which original tokens every layer of every request holds at the end.

Prints ``RESULT`` lines (one ``key=value`` list per request) for the test to assert on, then ``DONE``;
a mismatch shows in those lines (``differ@<first differing token>``, ``bounded=no``), and anything that
stops the run (an engine that does not start, a missing report) raises: non-zero exit status.

Arguments: the methods to check (default: the default method only; e.g. ``default streaming``); the
first also runs at TP=1. ``LACACHE_TP_CHECK_BREAK_RANK=1``
breaks rank 1's compaction on purpose (see ``break_rank``), to see that the test catches it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from streams import save_tiny_llama  # noqa: E402  (the tiny Llama with the bundled tokenizer)

NEW = 200
#: slots per layer: lacache-group needs 4 sinks + a window of 16 + a pool of budget // 8 + one rung of 16 slots,
#: so at least 41 here
BUDGET = 48
PROMPTS = ["Once upon a time there was",
           "The history of the lighthouse begins with a keeper who kept the lamp lit. " * 3,
           "Write a long story about a dragon who guards a library of old maps. " * 5]
BLOCK_SIZE = 32  # the CPU backend wants multiples of 32; small blocks make the bound visible
POOL_BLOCKS = 12  # 384 slots, shared by the three requests: unbounded they would need 7 + 8 + 9 blocks
STEP_CAP = 256  # max_num_batched_tokens: the three prompts prefill in one step


def transformers_run(model, method: str, budget: int | None, ids: list[int]):
    """Greedy NEW tokens with lacache's transformers cache (``method="full"``: the unbounded one)."""
    import torch

    from lacache import make_cache

    cache = make_cache(method, model, budget) if method != "full" else make_cache("full", model)
    with torch.no_grad():
        # chunks of one period end at the compaction points, as vLLM's scheduler cuts its passes
        period = getattr(getattr(cache, "points", None), "period", None)
        out = model.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, prefill_chunk_size=period)
    return out[0, len(ids):].tolist(), cache


def worker_report(worker) -> dict:
    """Run on every worker rank by ``collective_rpc``: what that rank's lacache state holds."""
    state = worker.model_runner._lacache
    return {
        "rank": int(worker.rank),
        "kv_heads": int(worker.model_runner.model_config.get_num_kv_heads(worker.parallel_config)),
        "compactions": int(state.compactions),
        "requests": {key: {"seen": s.seen, "slots": s.slots,
                           "positions": [s.token_positions(layer) for layer in range(s.num_layers)]}
                     for key, s in {**state.requests, **state.finished}.items()},
    }


def break_rank(worker, rank: int) -> bool:
    """Mutation check only (``LACACHE_TP_CHECK_BREAK_RANK``): rank ``rank`` keeps its slot accounting and
    block rows but no longer moves keys and values when it compacts, as a worker that missed compaction."""
    if worker.rank != rank:
        return False
    state = worker.model_runner.lacache_state()

    def compact_without_moving(req_id, slots, plan):
        state.compactions += 1
        state._truncate(req_id, state.runner.requests[req_id], plan.kept)

    state._compact = compact_without_moving
    return True


def engine_run(model_dir: str, tp: int, lacache: dict, prompts: list[list[int]]) -> dict:
    """Greedy NEW tokens from one engine, the scheduler's peak blocks per request and every rank's report."""
    from vllm import LLM, SamplingParams

    from lacache.vllm.scheduler import LadderManager

    started = time.monotonic()
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024,
              tensor_parallel_size=tp, block_size=BLOCK_SIZE, num_gpu_blocks_override=POOL_BLOCKS,
              max_num_batched_tokens=STEP_CAP, gpu_memory_utilization=0.3, enable_prefix_caching=False,
              seed=0, additional_config={"lacache": lacache})
    try:
        core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
        block_size = core.vllm_config.cache_config.block_size
        managers = core.scheduler.kv_cache_manager.coordinator.single_type_managers
        assert managers and all(isinstance(m, LadderManager) for m in managers), [type(m) for m in managers]
        peak: dict[str, int] = {}  # scheduler request id -> most blocks its row held after any step
        decode_peak: dict[str, int] = {}  # the same, over the steps after its prompt was prefilled
        engine, step = llm.llm_engine, llm.llm_engine.step

        def stepping():
            outputs = step()
            for manager in managers:
                for req_id, blocks in manager.req_to_blocks.items():
                    peak[req_id] = max(peak.get(req_id, 0), len(blocks))
                    request = core.scheduler.requests.get(req_id)
                    if request is not None and request.num_output_tokens > 1:
                        decode_peak[req_id] = max(decode_peak.get(req_id, 0), len(blocks))
            return outputs

        engine.step = stepping
        broken = os.environ.get("LACACHE_TP_CHECK_BREAK_RANK")
        if broken is not None and tp > 1:
            assert any(llm.collective_rpc(break_rank, args=(int(broken),))), broken
            print(f"INFO rank {broken} broken on purpose: its compactions move no keys", flush=True)
        # no min_tokens: vLLM's min_tokens masks the tokenizer's EOS even under ignore_eos, and the transformers
        # run has no EOS (random weights), so a greedy EOS would be picked there and masked here; ignore_eos
        # alone runs every request to NEW tokens
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
        reports = sorted(llm.collective_rpc(worker_report), key=lambda r: r["rank"])
    finally:
        llm.llm_engine.engine_core.shutdown()
    result = {"tokens": [], "peak": [], "decode_peak": [], "ranks": [], "block_size": block_size,
              "seconds": time.monotonic() - started}

    def ours(table, request_id):
        hits = [v for k, v in table.items() if k == request_id or k.startswith(request_id + "-")]
        assert len(hits) == 1, (request_id, sorted(table))
        return hits[0]

    for out in outs:
        result["tokens"].append(list(out.outputs[0].token_ids))
        result["peak"].append(ours(peak, out.request_id))
        result["decode_peak"].append(ours(decode_peak, out.request_id))
        result["ranks"].append([(r["rank"], r["kv_heads"], r["compactions"],
                                 ours(r["requests"], out.request_id)) for r in reports])
    return result


def compare(want: list[int], got: list[int]) -> str:
    """``equal``, or ``differ@i`` with the index of the first token that differs."""
    if want == got:
        return "equal"
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return f"differ@{first}"


def check(method_settings: dict, model, tokenizer, model_dir: str, with_tp1: bool, unbounded: dict) -> None:
    """Run one method's engines and print its RESULT lines; ``unbounded`` memoises the full-cache tokens."""
    from lacache.vllm.config import parse_config

    config = parse_config(method_settings, model.config.num_hidden_layers)
    method, budget = config.method, config.budget
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    tp2 = engine_run(model_dir, 2, method_settings, prompts)
    print(f"INFO {method}: TP=2 engine {tp2['seconds']:.0f}s", flush=True)
    tp1 = engine_run(model_dir, 1, method_settings, prompts) if with_tp1 else None
    if tp1 is not None:
        print(f"INFO {method}: TP=1 engine {tp1['seconds']:.0f}s", flush=True)
    block_size = tp2["block_size"]
    steady = -(-(config.capacity + 1) // block_size)  # a decode step: the held slots plus the new token
    for i, ids in enumerate(prompts):
        want, cache = transformers_run(model, method, budget, ids)
        if i not in unbounded:
            unbounded[i] = transformers_run(model, "full", None, ids)[0]
        full = unbounded[i]
        got = tp2["tokens"][i]
        assert len(got) == NEW, len(got)
        ranks = tp2["ranks"][i]
        # every rank holds half the KV heads, compacts as often, and keeps the transformers cache's tokens
        held = all(r[3]["positions"] == [cache.token_positions(layer).tolist()
                                         for layer in range(model.config.num_hidden_layers)] for r in ranks)
        counts = [r[2] for r in ranks]
        prefill = -(-max(len(ids), config.capacity + 1) // block_size)
        unbounded_blocks = -(-(len(ids) + NEW) // block_size)
        fields = {
            "method": method, "prompt": len(ids), "budget": budget, "capacity": config.capacity,
            "tp1": compare(tp1["tokens"][i], got) if tp1 else "skipped",
            "transformers": compare(want, got),
            "full_cache": "differ" if full != want else "same",  # eviction changes the greedy tokens
            "ranks": len(ranks), "kv_heads_per_rank": ",".join(str(r[1]) for r in ranks),
            "rank_compactions": ",".join(str(c) for c in counts),  # all requests of the engine
            "seen": ",".join(str(r[3]["seen"]) for r in ranks), "expected_seen": cache.seen,
            "slots_per_rank": ",".join(str(r[3]["slots"]) for r in ranks),
            "held_tokens": "equal" if held else "differ",
            "block_size": block_size, "pool_blocks": POOL_BLOCKS,
            "peak_blocks": tp2["peak"][i], "prefill_bound": prefill,
            "decode_peak_blocks": tp2["decode_peak"][i], "decode_bound": steady,
            "unbounded_blocks": unbounded_blocks,
            "bounded": "yes" if tp2["peak"][i] <= prefill and tp2["decode_peak"][i] <= steady
            and all(r[3]["slots"] <= config.capacity for r in ranks) else "no",
        }
        print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def main() -> None:
    methods = sys.argv[1:] or ["default"]
    with tempfile.TemporaryDirectory(prefix="lacache-tp-") as model_dir:
        model, tokenizer = save_tiny_llama(model_dir)
        unbounded: dict[int, list[int]] = {}
        for name in methods:
            settings = {"budget": BUDGET} if name == "default" else {"method": name, "budget": BUDGET}
            check(settings, model, tokenizer, model_dir, with_tp1=name == methods[0], unbounded=unbounded)
    print("DONE", flush=True)


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core here: its scheduler is read per step
    os.environ["LACACHE_VLLM_RECORD"] = "1"  # the workers keep finished requests' slots for the report
    main()
