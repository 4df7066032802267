"""RULER-style synthetic retrieval tasks, generated locally: multi-key and multi-value needles,
variable tracking and common-word extraction.

A single pass key (see :mod:`.passkey`) only asks whether one span survives eviction. These tasks
stress a bounded cache differently: several similar needles where only one matters (multi-key),
several needles that must all survive (multi-value), chains whose every hop must survive
(variable tracking), and a statistic over the whole prompt that no single span holds (common
words). Every prompt is built in token space, like the pass key, so its length is exact and the
token spans of its needles are known for later analysis (e.g. which spans a method evicted).

The ideas follow RULER (Hsieh et al., 2024); the wording, vocabulary and generators are our own,
and sized for a small model: the defaults were calibrated so the bundled SmolLM2-135M-Instruct with
a full cache scores clearly above chance at the default lengths on the needle tasks; common words
stays near chance for a model this small (numbers at ``DEFAULT_LENGTHS``).

The prompt generators live in :mod:`.ruler_prompts` (re-exported here); this module answers, scores
and summarizes them through the shared loop of :mod:`.harness`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from ..progress import Progress, as_progress
from .common import greedy_answer
from .distributed import SINGLE, Shard
from .harness import Answer, check_prefill, run_trials
from .ruler_prompts import (  # noqa: F401 (WORDS, _prune_words, _render_list: re-exported for tests)
    TASKS,
    WORDS,
    RulerPrompt,
    _prune_words,
    _render_list,
    build_common_words,
    build_niah_multikey,
    build_niah_multivalue,
    build_ruler_prompt,
    build_variable_tracking,
)

__all__ = [
    "DEFAULT_LENGTHS",
    "TASKS",
    "TASK_NEW_TOKENS",
    "RulerPrompt",
    "RulerTrial",
    "build_common_words",
    "build_niah_multikey",
    "build_niah_multivalue",
    "build_ruler_prompt",
    "build_variable_tracking",
    "mean_scores",
    "plot_scores",
    "run_ruler",
    "stop_ids_for",
    "string_match_all",
    "summary_table",
    "trial_dicts",
]

#: Calibrated on SmolLM2-135M-Instruct, fp32, full cache, grass filler, seeds 0-2 (mean score at 500 / 1000
#: tokens): niah_multikey 0.67 / 0.67 (chance ~0.25: one of 4 numbers), niah_multivalue 0.83 / 0.25,
#: variable_tracking 0.67 / 0.44, common_words 0.30 / 0.03 (about chance: the model cannot count).
#: Past ~1,000 tokens the full cache itself fails most tasks, leaving nothing for a budget to lose.
DEFAULT_LENGTHS = (500,)
#: Greedy tokens per answer: enough for the expected answer plus a little slack, no more (decoding
#: dominates the cost of a trial on CPU).
TASK_NEW_TOKENS = {"niah_multikey": 12, "niah_multivalue": 40, "variable_tracking": 30, "common_words": 60}
#: Tasks whose answer is one line; stopping at a newline keeps later rambling from being scored.
STOP_AT_NEWLINE = frozenset({"niah_multikey"})


def string_match_all(answer: str, references: Sequence[str]) -> float:
    """Fraction of references found in the answer, ignoring case (RULER's lenient recall metric)."""
    if not references:
        raise ValueError("references must not be empty")
    text = answer.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


@functools.lru_cache(maxsize=4)
def _newline_ids(tokenizer) -> frozenset[int]:
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, p in enumerate(pieces) if "\n" in p)


def stop_ids_for(tokenizer, task: str) -> set[int]:
    """End of sequence always; newlines too for one-line answers."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return stops | _newline_ids(tokenizer) if task in STOP_AT_NEWLINE else stops


@dataclass
class RulerTrial:
    method: str
    task: str
    length: int
    seed: int
    budget: int | None  # slots per layer; None for the full cache
    references: list[str]
    answer: str
    score: float
    correct: bool
    seconds: float
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    options: dict = field(default_factory=dict)


def run_ruler(
    model,
    tokenizer,
    methods: Sequence[str],
    tasks: Sequence[str],
    lengths: Sequence[int],
    seeds: Sequence[int],
    budget: float,
    filler: str = "grass",
    prefill: str = "full",
    prefill_chunk: int = 128,
    method_options: dict[str, dict] | None = None,
    task_options: dict[str, dict] | None = None,
    new_tokens: dict[str, int] | None = None,
    finished: Mapping[tuple, RulerTrial] | None = None,
    on_trial: Callable[[tuple, RulerTrial], None] | None = None,
    progress: bool | Progress = False,
    shard: Shard = SINGLE,
    vllm=None,
) -> list[RulerTrial]:
    """Every length x task x seed x method, one greedy answer each, scored by ``string_match_all``.

    ``budget`` below 1 is a fraction of each prompt's length; 1 or more is a number of slots. All
    methods see the same prompt for a given (task, length, seed), so their scores pair up. Trials
    are keyed ``(task, length, seed, method)``: those in ``finished`` are reused, not run, and
    ``on_trial(key, trial)`` records each new one as it finishes (see ``harness.run_trials``).
    ``progress`` counts trials, one group per task and length; ``shard`` splits the trials across
    the processes of a distributed launch (see ``harness.run_trials``). With ``vllm`` (a
    ``vllm_backend.VllmAnswers``) the same prompts are answered through the vLLM engine with the plugin.
    """
    check_prefill(prefill)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks {unknown} not known; choose from {TASKS}")
    task_options = task_options or {}
    tokens = {**TASK_NEW_TOKENS, **(new_tokens or {})}

    def prompts() -> Iterator[tuple[int, int, RulerPrompt]]:
        for length in lengths:
            for task in tasks:
                for seed in seeds:
                    yield length, seed, build_ruler_prompt(tokenizer, task, length, seed, filler,
                                                           **task_options.get(task, {}))

    def trial(item: tuple[int, int, RulerPrompt], run: Answer) -> RulerTrial:
        length, seed, prompt = item
        return RulerTrial(run.method, prompt.task, length, seed, run.slots, prompt.references, run.text, run.score,
                          run.score == 1.0, run.seconds, prompt.needle_spans, run.options)

    if vllm is not None:
        from .vllm_backend import stderr_line, vllm_answers

        return vllm_answers(vllm, tokenizer, prompts(), methods, budget, input_ids=lambda item: item[2].input_ids,
                            score=lambda item, answer: string_match_all(answer, item[2].references),
                            make_trial=trial, new_tokens=lambda item: tokens[item[2].task],
                            stop_ids=lambda item: stop_ids_for(tokenizer, item[2].task),
                            method_options=method_options,
                            trial_key=lambda item, method: (item[2].task, item[0], item[1], method),
                            finished=finished, on_trial=on_trial,
                            log=(lambda line: None) if progress is False else stderr_line)
    return run_trials(
        model, tokenizer, prompts(), methods, budget, input_ids=lambda item: item[2].input_ids,
        score=lambda item, answer: string_match_all(answer, item[2].references), make_trial=trial,
        new_tokens=lambda item: tokens[item[2].task], stop_ids=lambda item: stop_ids_for(tokenizer, item[2].task),
        prefill=prefill, prefill_chunk=prefill_chunk, method_options=method_options, answer=greedy_answer,
        trial_key=lambda item, method: (item[2].task, item[0], item[1], method), finished=finished,
        on_trial=on_trial, progress=as_progress(progress, "ruler"),
        group=lambda item: f"{item[2].task}, {item[0]} tokens",
        prompt_count=len(lengths) * len(tasks) * len(seeds), shard=shard,
    )


def mean_scores(trials: Sequence[RulerTrial]) -> dict[tuple[str, str, int], float]:
    """Mean score per (method, task, length)."""
    cells: dict[tuple[str, str, int], list[float]] = {}
    for t in trials:
        cells.setdefault((t.method, t.task, t.length), []).append(t.score)
    return {k: sum(v) / len(v) for k, v in cells.items()}


def summary_table(trials: Sequence[RulerTrial]) -> tuple[list[str], list[list]]:
    """One row per method x task, one column per length, plus the mean over lengths."""
    means = mean_scores(trials)
    methods = list(dict.fromkeys(t.method for t in trials))
    tasks = list(dict.fromkeys(t.task for t in trials))
    lengths = sorted({t.length for t in trials})
    rows = []
    for method in methods:
        for task in tasks:
            cells = [means.get((method, task, n)) for n in lengths]
            present = [c for c in cells if c is not None]
            rows.append([method, task, *cells, sum(present) / len(present) if present else None])
    return ["method", "task", *[f"{n} tokens" for n in lengths], "mean"], rows


def plot_scores(trials: Sequence[RulerTrial], path, title: str) -> None:
    """Grouped bars, one panel per length: tasks on the x axis, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_scores(trials)
    methods = list(dict.fromkeys(t.method for t in trials))
    tasks = list(dict.fromkeys(t.task for t in trials))
    lengths = sorted({t.length for t in trials})
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, len(lengths), figsize=(1.3 * len(tasks) * len(lengths) + 2.5, 3.8),
                             sharey=True, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for m, method in enumerate(methods):
            heights = [means.get((method, task, length), 0.0) for task in tasks]
            xs = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, heights, width, label=method)
        ax.set_xticks(range(len(tasks)), [t.replace("_", "\n") for t in tasks], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{length} tokens")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean score (string match, all)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trial_dicts(trials: Sequence[RulerTrial]) -> list[dict]:
    return [asdict(t) for t in trials]

