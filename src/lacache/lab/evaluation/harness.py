"""The loop every evaluation shares: methods x budgets x prompts -> one result row each.

Each benchmark module supplies only what differs (how its prompts are built, how an answer is
scored, what its row looks like); this module owns what must stay the same across them, so that
their numbers compare: which methods get a budget and how a fractional budget becomes slots, that
every method answers the same prompt with a fresh cache and its own copy of its options, greedy
decoding, and what is timed, how progress is shown, and how the trials are split across the
processes of a distributed launch (:mod:`.distributed`) and merged back into one order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..._lazy import torch
from ...registry import method_spec
from ..progress import Progress
from .common import PREFILLS, greedy_answer, resolve_budget
from .distributed import SINGLE, Shard, gather

__all__ = ["Answer", "check_prefill", "method_budgets", "method_options_for", "run_trials"]

P = TypeVar("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """What the harness measured for one method on one prompt; a benchmark turns it into its row."""

    method: str
    #: cache slots per layer; None for a method without a budget (the full cache)
    slots: int | None
    #: the method's options for this run (a copy: safe to keep in a row)
    options: dict
    #: prompt tokens
    tokens: int
    #: the decoded greedy answer (special tokens skipped)
    text: str
    #: what the benchmark's ``score`` returned for ``text``
    score: Any
    #: seconds spent answering and scoring, rounded to 0.01 s
    seconds: float


def check_prefill(prefill: str) -> None:
    """Refuse an unknown prefill mode before any prompt is built (not after minutes of trials)."""
    if prefill not in PREFILLS:
        raise ValueError(f"prefill={prefill!r} must be one of {PREFILLS}")


def method_options_for(method_options: Mapping[str, Mapping] | None, method: str) -> dict:
    """A fresh copy of ``method``'s options, so one run cannot change what the next one gets."""
    return dict((method_options or {}).get(method, {}))


def method_budgets(methods: Sequence[str], budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    """Every (method, budget) pair in order; a method without a budget (``full``) once, with None."""
    runs: list[tuple[str, int | None]] = []
    for method in methods:
        if method_spec(method).bounded:
            runs.extend((method, b) for b in budgets)
        else:
            runs.append((method, None))
    return runs


def _per_prompt(value: Any, prompt: Any) -> Any:
    return value(prompt) if callable(value) else value


def run_trials(
    model,
    tokenizer,
    prompts: Iterable[P],
    methods: Sequence[str],
    budget: float,
    *,
    score: Callable[[P, str], Any],
    make_trial: Callable[[P, Answer], T],
    input_ids: Callable[[P], torch.Tensor] = lambda prompt: prompt.input_ids,
    new_tokens: int | Callable[[P], int] = 8,
    stop_ids: set[int] | Callable[[P], set[int] | None] | None = None,
    prefill: str = "full",
    prefill_chunk: int = 128,
    method_options: Mapping[str, Mapping] | None = None,
    answer: Callable[..., list[int]] = greedy_answer,
    trial_key: Callable[[P, str], tuple] | None = None,
    finished: Mapping[tuple, T] | None = None,
    on_trial: Callable[[tuple, T], None] | None = None,
    progress: Progress | None = None,
    group: Callable[[P], str] | None = None,
    prompt_count: int | None = None,
    shard: Shard = SINGLE,
) -> list[T]:
    """For each prompt, in order, every method in order: a greedy answer under a fresh cache, scored.

    ``prompts`` may be a generator: each prompt is built just before its methods run. ``budget``
    below 1 is a fraction of each prompt's tokens, 1 or more slots per layer; a method without a
    budget (``full``) ignores it and its ``Answer.slots`` is None. ``new_tokens`` and ``stop_ids``
    are fixed or per prompt. ``answer`` is
    called as ``answer(model, ids, method, slots, options, prefill, prefill_chunk, new_tokens,
    stop_ids)``; a benchmark passes its own module's ``greedy_answer`` so tests can substitute it.
    ``make_trial(prompt, Answer)`` builds the benchmark's row.

    Resuming (see :mod:`.checkpoint`): ``trial_key(prompt, method)`` names a trial by what it asks;
    a trial whose key is in ``finished`` is not run again, its recorded row takes its place (so the
    list is in the same order as an uninterrupted run's), and ``on_trial(key, row)`` is called as
    soon as each new trial finishes, to record it before the next one starts.

    ``progress`` (started here with the number of trials, closed at the end) counts the trials as
    they finish; ``group(prompt)`` names the group a prompt's trials belong to (consecutive prompts
    with one name form a group: one progress line each when there is no bar), and ``prompt_count``
    (default ``len(prompts)`` when it has one) makes the total known in advance. With a ``shard``
    of a distributed launch this process answers only the trials it owns (trial ``(prompt index,
    method index)``, see :meth:`Shard.owns`) and every process gets all the trials back, in the
    order one process would have produced them.
    """
    if (finished or on_trial) and trial_key is None:
        raise ValueError("finished and on_trial need trial_key, the name of each trial they record")
    check_prefill(prefill)
    count = prompt_count if prompt_count is not None else len(prompts) if hasattr(prompts, "__len__") else None
    if progress is not None:
        progress.start(None if count is None else shard.share(count, len(methods)))
    mine: list[tuple[tuple[int, int], T]] = []
    current = None
    try:
        for index, prompt in enumerate(prompts):
            ids = input_ids(prompt)
            tokens = int(ids.shape[-1])
            limit, stops = _per_prompt(new_tokens, prompt), _per_prompt(stop_ids, prompt)
            slots = resolve_budget(budget, tokens)  # refused here if invalid, even when only "full" runs
            label = group(prompt) if group is not None else ""
            if progress is not None and label != current:
                if current is not None:
                    progress.group_done(current)
                progress.working_on(label)
                current = label
            for number, method in enumerate(methods):
                if not shard.owns(index, number):
                    continue
                key = trial_key(prompt, method) if trial_key is not None else None
                if finished and key in finished:
                    mine.append(((index, number), finished[key]))
                    if progress is not None:
                        progress.skip()
                    continue
                options = method_options_for(method_options, method)
                started = time.perf_counter()
                generated = answer(model, ids, method, slots, options, prefill, prefill_chunk, limit, stops)
                text = tokenizer.decode(generated, skip_special_tokens=True)
                result = score(prompt, text)
                seconds = round(time.perf_counter() - started, 2)
                kept = slots if method_spec(method).bounded else None
                trial = make_trial(prompt, Answer(method, kept, options, tokens, text, result, seconds))
                mine.append(((index, number), trial))
                if on_trial is not None:
                    on_trial(key, trial)
                if progress is not None:
                    progress.advance()
        if progress is not None and current is not None:
            progress.group_done(current)
    finally:
        if progress is not None:
            progress.close()
    return gather(shard, mine)

