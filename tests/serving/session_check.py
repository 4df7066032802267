"""Run by test_vllm_sessions.py in a child process (vLLM's AsyncLLM runs its engine in another process).

One resumable streaming session (``AsyncLLM.generate`` fed an async generator of ``StreamingInput``)
with the plugin on, then a session aborted while it waits for its next input, then a one-token
request. Prints one JSON line: the session's output tokens, the pool's usage after every output
(with the stream position it was read at), and the usage of the lone request before and after.
"""

import asyncio
import json
import os
import sys


async def main(settings: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    usage: list[float] = []

    class Usage(StatLoggerBase):
        def __init__(self, vllm_config, engine_index=0):
            pass

        def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
            if scheduler_stats is not None:
                usage.append(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self):
            pass

    chunks, new = settings["chunks"], settings["new"]
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=settings["model"], dtype=settings.get("dtype") or "auto", enforce_eager=True, max_model_len=settings["max_model_len"],
        gpu_memory_utilization=0.3, block_size=settings["block_size"], num_gpu_blocks_override=settings["blocks"], max_num_batched_tokens=128,
        # the worker inside the engine core's process ("uni"), not a third process: one start-up of torch and vLLM
        # fewer (about 17 s on 2 cores); the split scheduler/worker path is test_vllm_multiprocess.py's
        distributed_executor_backend="uni",
        additional_config={"lacache": settings["lacache"]}), stat_loggers=[Usage])
    greedy = dict(temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def lone(request_id: str) -> float:
        async for _ in engine.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, **greedy),
                                       request_id=request_id):
            pass
        return usage[-1]

    result = {"lone_before": await lone("lone-1")}

    async def inputs():
        for ids in chunks:
            yield StreamingInput(prompt={"prompt_token_ids": list(ids)})  # vLLM extends the list it is given

    tokens, logprobs, samples, position = [], [], [], 0
    # min_tokens masks the tokenizer's end of sequence; a model that declares none may pick it ("min_tokens": false)
    params = SamplingParams(max_tokens=new, min_tokens=new if settings.get("min_tokens", True) else 0, logprobs=0 if settings.get("logprobs") else None, **greedy)
    async for out in engine.generate(inputs(), params, request_id="session"):
        for k, token in enumerate(out.outputs[0].token_ids):
            if settings.get("logprobs"):
                logprobs.append(out.outputs[0].logprobs[k][token].logprob)
            turn, step = divmod(len(tokens), new)
            position = sum(len(c) for c in chunks[: turn + 1]) + turn * (new - 1) + step
            tokens.append(token)
        samples.append((position, usage[-1] if usage else None))
    result.update(tokens=tokens, logprobs=logprobs, samples=samples,
                  dtype=str(engine.vllm_config.model_config.dtype).replace("torch.", ""))

    # a second session, aborted while it waits for an input that never comes
    waiting = asyncio.Event()

    async def stalled():
        for ids in chunks[:3]:
            yield StreamingInput(prompt={"prompt_token_ids": list(ids)})
        await waiting.wait()

    seen = 0
    async for out in engine.generate(stalled(), params, request_id="stalled"):
        seen += len(out.outputs[0].token_ids)
        if seen == 3 * new:
            break  # leaving the stream aborts the session
    await engine.abort("stalled")
    await asyncio.sleep(1)
    result["lone_after"] = await lone("lone-2")
    engine.shutdown()
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    settings = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(asyncio.run(main(settings))), flush=True)
