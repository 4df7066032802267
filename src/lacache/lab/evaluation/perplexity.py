"""Streaming perplexity: teacher-forced language modelling under a bounded cache.

The text is fed ``step`` tokens per forward (1 = strictly one token per step, as in the paper);
after every forward the cache is compacted back under its budget, so every prediction is made
from a cache that never held more than ``budget + step`` slots. Bounded caches get slot-based
positions (lacache's own loop), the full cache absolute ones: beyond the model's trained context
the full cache degrades, and that is reported as measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ...cache.compat import cache_argument
from ...cache.generation import next_positions
from ..progress import Progress, as_progress
from .common import fresh_cache
from .distributed import SINGLE, Shard, gather
from .harness import method_budgets, method_options_for

__all__ = ["PPLResult", "FULL_CACHE_STEP", "streaming_nll", "evaluate_ppl_grid", "window_ppl", "gap_closed"]


@dataclass
class PPLResult:
    method: str
    budget: int | None
    tokens: int
    step: int
    ppl: float
    window: int
    #: (first position, last position + 1, perplexity) for consecutive windows of predicted tokens
    windows: list[tuple[int, int, float]]
    seconds: float
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    #: which text (``lacache.lab.texts.TEXTS`` name, or "" for a single unnamed text)
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def window_ppl(nll: np.ndarray, window: int) -> list[tuple[int, int, float]]:
    """Perplexity of consecutive windows of predictions (prediction ``i`` is of token ``i + 1``)."""
    out = []
    for start in range(0, len(nll), window):
        chunk = nll[start : start + window]
        out.append((start + 1, start + 1 + len(chunk), float(math.exp(chunk.mean()))))
    return out


@torch.no_grad()
def streaming_nll(
    model,
    input_ids: torch.Tensor,
    cache,
    step: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Negative log-likelihood of every token after the first, predicted under ``cache``.

    ``input_ids`` is one text ``[T]`` (returns ``[T - 1]``) or several of the same length ``[B, T]``
    streamed as one batch (returns ``[B, T - 1]``): every row gets its own cache rows and the same
    budget, so a batch costs little more than one text on a weight-bound CPU.
    """
    single = input_ids.dim() == 1
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(input_ids.shape)}")
    length = ids.shape[1]
    if length < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll = torch.empty(ids.shape[0], length - 1, dtype=torch.float64)
    cache_kwarg = cache_argument(model, cache)  # resolved once, not per token
    for start in range(0, length - 1, step):
        end = min(start + step, length - 1)
        logits = model(
            input_ids=ids[:, start:end], position_ids=next_positions(cache, end - start, device),
            **cache_kwarg,
        ).logits
        targets = ids[:, start + 1 : end + 1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll[:, start:end] = -logp.gather(2, targets[..., None])[..., 0].double().cpu()
        if on_progress is not None:
            on_progress(end - start)
    return nll[0].numpy() if single else nll.numpy()


#: the full cache is exact whatever the step, so it is teacher-forced in forwards of this many tokens
FULL_CACHE_STEP = 256


def evaluate_ppl_grid(
    model,
    input_ids: torch.Tensor,
    methods: Sequence[str],
    budgets: Sequence[int],
    step: int = 1,
    window: int = 500,
    method_options: dict[str, dict] | None = None,
    progress: bool | Progress = True,
    texts: Sequence[str] | None = None,
    finished: Mapping[tuple, list[PPLResult]] | None = None,
    on_run: Callable[[tuple, list[PPLResult]], None] | None = None,
    shard: Shard = SINGLE,
) -> list[PPLResult]:
    """Streaming perplexity for every method x budget (``full`` once, it has no budget).

    ``input_ids`` is one text ``[T]`` or several ``[B, T]`` (named by ``texts``), streamed together
    as one batch: one result per text, method and budget. The full cache, which predicts the same
    whatever the step, is fed ``FULL_CACHE_STEP`` tokens per forward. Runs are keyed ``(method,
    budget)``: one in ``finished`` (its results, one per text) is reused, not streamed again, and
    ``on_run(key, results)`` records each new one as it finishes (see :mod:`.checkpoint`).

    ``progress`` counts predicted tokens, one group per run. With a ``shard`` of a distributed
    launch this process streams only the runs it owns (run ``i`` of the grid's order: see
    :meth:`Shard.owns`) and every process gets all the results back, in the grid's order.
    """
    runs = method_budgets(methods, budgets)
    finished = finished or {}
    rows = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    names = list(texts) if texts is not None else [""] * rows.shape[0]
    if len(names) != rows.shape[0]:
        raise ValueError(f"texts names {len(names)} texts for {rows.shape[0]} rows of input_ids")
    tokens = int(rows.shape[1])
    mine: list[tuple[tuple[int], list[PPLResult]]] = []
    owned = [(index, run) for index, run in enumerate(runs) if shard.owns(index)]
    meter = as_progress(progress, "ppl", unit="tok", units="tok")
    if meter is not None:
        meter.start(sum(run not in finished for _, run in owned) * (tokens - 1))
    try:
        for index, (method, budget) in owned:
            if (method, budget) in finished:
                mine.append(((index,), finished[method, budget]))
                continue
            run_results = _stream_run(model, rows, names, method, budget, step, window, method_options, meter)
            mine.append(((index,), run_results))
            if on_run is not None:
                on_run((method, budget), run_results)
            if meter is not None:
                meter.group_done(_run_label(method, budget))
    finally:
        if meter is not None:
            meter.close()
    return [result for run_results in gather(shard, mine) for result in run_results]


def _run_label(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method} budget={budget}"


def _stream_run(model, rows: torch.Tensor, names: list[str], method: str, budget: int | None, step: int,
                window: int, method_options: dict[str, dict] | None, meter: Progress | None) -> list[PPLResult]:
    """One run of the grid: every text streamed together under a fresh cache of ``method`` and ``budget``."""
    tokens = int(rows.shape[1])
    options = method_options_for(method_options, method)
    run_step = max(step, FULL_CACHE_STEP) if budget is None else step
    with fresh_cache(method, model, budget, options) as cache:
        if meter is not None:
            meter.working_on(_run_label(method, budget))
        started = time.perf_counter()
        nll = streaming_nll(model, rows, cache, step=run_step, on_progress=meter.advance if meter else None)
        seconds = time.perf_counter() - started
        describe = cache.describe() if hasattr(cache, "describe") else {"cache": type(cache).__name__}
    return [
        PPLResult(method=method, budget=budget, tokens=tokens, step=run_step, ppl=float(math.exp(text_nll.mean())),
                  window=window, windows=window_ppl(text_nll, window), seconds=round(seconds, 2), options=options,
                  cache=describe, text=name)
        for name, text_nll in zip(names, nll)
    ]


def gap_closed(method_ppl: float, streaming_ppl: float, full_ppl: float) -> float | None:
    """The share of the StreamingLLM -> full-cache perplexity gap a method closes (1 = as good as full,
    0 = no better than StreamingLLM, negative = worse); ``None`` when there is no gap to close."""
    gap = streaming_ppl - full_ppl
    if gap <= 0:
        return None
    return (streaming_ppl - method_ppl) / gap
