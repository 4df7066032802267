"""Retrieval prompts answered *through the vLLM engine* with the lacache plugin (``--backend vllm``).

The transformers evaluations answer one prompt at a time under a fresh cache; a serving engine is
measured as users run it: one engine per method and budget, every prompt of that budget submitted
at once (vLLM batches and chunks them as its scheduler likes: the compaction points keep each
answer independent of that, docs/method.md), greedy, with the plugin's settings
``{"method": ..., "budget": slots, **options}``, the full cache without the plugin. The prompts,
the budget a fraction resolves to and the scoring are the transformers run's
(``harness.run_trials``'s), so the two tables compare row by row.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

from ...registry import method_spec
from .common import resolve_budget

__all__ = ["VllmAnswers", "stderr_line", "vllm_answers"]


class VllmAnswers:
    """Greedy answers of many prompts by one engine per (method, slots, options), started when first needed."""

    def __init__(self, model_dir: str, dtype: str = "float32", prefill_chunk: int = 128, max_model_len: int = 8192):
        self.model_dir = model_dir
        self.dtype = dtype
        self.prefill_chunk = prefill_chunk
        self.max_model_len = max_model_len

    def engine(self, method: str, slots: int | None, options: dict):
        from vllm import LLM

        settings = dict(model=self.model_dir, dtype=self.dtype, enforce_eager=True, max_model_len=self.max_model_len,
                        max_num_batched_tokens=self.prefill_chunk, max_num_seqs=min(self.prefill_chunk, 32),
                        enable_prefix_caching=False)
        if method_spec(method).bounded:
            settings["additional_config"] = {"lacache": {"method": method, "budget": int(slots), **options}}
        return LLM(**settings)

    def answer(self, method: str, slots: int | None, options: dict, prompts: Sequence[list[int]],
               new_tokens: Sequence[int], stop_ids: Sequence[set[int] | None]) -> list[list[int]]:
        """Greedy answers of ``prompts`` (token ids), submitted together to a fresh engine: up to ``new_tokens[i]``
        tokens, ended before any of ``stop_ids[i]``; the end-of-text token stops nothing by itself (the
        transformers answers stop only at the stop ids either)."""
        from vllm import SamplingParams

        llm = self.engine(method, slots, options)
        try:
            params = [SamplingParams(max_tokens=int(n), temperature=0, ignore_eos=True,
                                     stop_token_ids=sorted(stops) if stops else None)
                      for n, stops in zip(new_tokens, stop_ids)]
            outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]
        finally:
            del llm
            gc.collect()


def stderr_line(line: str) -> None:
    """One progress line on stderr (an engine's prompts answered), for runs without a progress bar."""
    import sys

    print(line, file=sys.stderr, flush=True)


def _per_prompt(value, prompt):
    return value(prompt) if callable(value) else value


def vllm_answers(runner: VllmAnswers, tokenizer, prompts: Sequence, methods: Sequence[str], budget: float, *,
                 input_ids: Callable, score: Callable, make_trial: Callable, new_tokens, stop_ids=None,
                 method_options: dict | None = None, trial_key: Callable | None = None, finished=None,
                 on_trial: Callable | None = None, log: Callable[[str], None] = lambda line: None) -> list:
    """Every method x prompt, as ``harness.run_trials`` orders and scores them, answered by ``runner``.

    Prompts of one budget in slots share an engine (a fractional ``budget`` of prompts of several lengths
    gives one engine per length). ``new_tokens`` and ``stop_ids`` are fixed or per prompt (callables), as
    ``harness.run_trials`` takes them. ``seconds`` of a trial is its engine's wall time over its prompts."""
    from .harness import Answer

    prompts = list(prompts)
    ids = [[int(t) for t in input_ids(p).reshape(-1).tolist()] for p in prompts]
    slots = [resolve_budget(budget, len(x)) for x in ids]
    trials: dict[tuple[int, int], object] = {}
    for number, method in enumerate(methods):
        options = dict((method_options or {}).get(method, {}))
        bounded = method_spec(method).bounded
        groups: dict[int | None, list[int]] = {}
        for index, prompt in enumerate(prompts):
            key = trial_key(prompt, method) if trial_key is not None else None
            if finished and key in finished:
                trials[(index, number)] = finished[key]
                continue
            groups.setdefault(slots[index] if bounded else None, []).append(index)
        for size, members in groups.items():
            started = time.perf_counter()
            answers = runner.answer(method, size, options, [ids[i] for i in members],
                                    [_per_prompt(new_tokens, prompts[i]) for i in members],
                                    [_per_prompt(stop_ids, prompts[i]) for i in members])
            seconds = round((time.perf_counter() - started) / len(members), 2)
            for index, generated in zip(members, answers):
                text = tokenizer.decode(generated, skip_special_tokens=True)
                trial = make_trial(prompts[index], Answer(method, size, dict(options), len(ids[index]), text,
                                                          score(prompts[index], text), seconds))
                trials[(index, number)] = trial
                if on_trial is not None:
                    on_trial(trial_key(prompts[index], method), trial)
            log(f"{method} (budget {size}): {len(members)} prompts in {seconds * len(members):.0f} s")
    return [trials[(i, n)] for i in range(len(prompts)) for n in range(len(methods)) if (i, n) in trials]
