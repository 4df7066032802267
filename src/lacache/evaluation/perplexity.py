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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..compat import cache_argument
from ..generation import next_positions
from .common import fresh_cache
from .harness import method_budgets, method_options_for

__all__ = ["PPLResult", "streaming_nll", "evaluate_ppl_grid", "window_ppl"]


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
    """Negative log-likelihood of every token after the first, predicted under ``cache``."""
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    if step < 1:
        raise ValueError(f"step={step} must be >= 1")
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll = torch.empty(ids.numel() - 1, dtype=torch.float64)
    cache_kwarg = cache_argument(model, cache)  # resolved once, not per token
    for start in range(0, ids.numel() - 1, step):
        piece = ids[start : min(start + step, ids.numel() - 1)]
        logits = model(
            input_ids=piece[None], position_ids=next_positions(cache, piece.numel(), device),
            **cache_kwarg,
        ).logits[0]
        targets = ids[start + 1 : start + 1 + piece.numel()]
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll[start : start + piece.numel()] = -logp.gather(1, targets[:, None])[:, 0].double().cpu()
        if on_progress is not None:
            on_progress(piece.numel())
    return nll.numpy()


def evaluate_ppl_grid(
    model,
    input_ids: torch.Tensor,
    methods: Sequence[str],
    budgets: Sequence[int],
    step: int = 1,
    window: int = 500,
    method_options: dict[str, dict] | None = None,
    progress: bool = True,
) -> list[PPLResult]:
    """Streaming perplexity for every method x budget (``full`` once, it has no budget)."""
    runs = method_budgets(methods, budgets)
    tokens = int(input_ids.numel())
    results = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs) * (tokens - 1), unit="tok", desc="ppl")
    for method, budget in runs:
        options = method_options_for(method_options, method)
        with fresh_cache(method, model, budget, options) as cache:
            if bar is not None:
                bar.set_postfix_str(f"{method} budget={budget}")
            started = time.perf_counter()
            nll = streaming_nll(model, input_ids, cache, step=step, on_progress=bar.update if bar else None)
            seconds = time.perf_counter() - started
            describe = cache.describe() if hasattr(cache, "describe") else {"cache": type(cache).__name__}
        results.append(
            PPLResult(
                method=method,
                budget=budget,
                tokens=tokens,
                step=step,
                ppl=float(math.exp(nll.mean())),
                window=window,
                windows=window_ppl(nll, window),
                seconds=round(seconds, 2),
                options=options,
                cache=describe,
            )
        )
    if bar is not None:
        bar.close()
    return results
