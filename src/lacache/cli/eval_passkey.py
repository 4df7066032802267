"""``lacache eval passkey``: pass-key retrieval, depth x length heatmaps under a budget."""

from __future__ import annotations

import argparse

from ..lab.evaluation.passkey import FILLERS
from . import common, values
from .resume import method_settings, open_run

__all__ = ["CSV_FIELDS", "add_parser", "run_cli"]

#: one CSV row per trial, these fields in this order
CSV_FIELDS = ("method", "length", "depth", "seed", "budget", "key", "answer", "correct", "seconds")


def add_parser(tasks_subparsers) -> argparse.ArgumentParser:
    """Register ``passkey`` under ``lacache eval``; returns its parser."""
    pk = tasks_subparsers.add_parser("passkey", help="pass-key retrieval: depth x length heatmaps under a budget")
    pk.add_argument("--lengths", default="600,1100", help="prompt lengths in tokens")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    pk.add_argument("--seeds", type=common.positive_int, default=2, help="trials per cell (different keys and filler)")
    pk.add_argument("--filler", choices=list(FILLERS), default="grass")
    common.add_prefill_arguments(pk, budget=0.5, prefill="full", chunk=128)
    common.add_backend_argument(pk)
    common.add_run_arguments(pk, "passkey", "runs/passkey")
    return pk


def _accuracy_rows(trials, methods, lengths) -> tuple[list[str], list[list]]:
    """One row per method: accuracy per prompt length, then over everything."""
    headers = ["method", *[f"{n} tokens" for n in lengths], "all"]
    rows = []
    for method in methods:
        mine = [t for t in trials if t.method == method]
        cells = [sum(t.correct for t in mine if t.length == n) / max(1, sum(t.length == n for t in mine))
                 for n in lengths]
        rows.append([method, *cells, sum(t.correct for t in mine) / max(1, len(mine))])
    return headers, rows


def run_cli(args) -> list:
    """``lacache eval passkey``: run, print accuracy per length, write passkey.csv/json/png into ``--out``."""
    from dataclasses import asdict

    from .. import models
    from ..lab.evaluation.distributed import join
    from ..lab.evaluation.passkey import PasskeyTrial, plot_heatmaps, run_passkey, trial_dicts
    from ..lab.evaluation.report import write_run

    values.check_values(args)
    methods = common.run_methods(args)
    lengths, depths = common.positive_ints(args.lengths, "lengths"), common.fractions(args.depths, "depths")
    options = common.parse_method_options(args.option, methods)
    common.note_if_nothing_evicted(args.budget, max(lengths), "of the longest prompt (--lengths)",
                                   getattr(args, "quiet", False))
    settings = {"model": models.model_label(args.model), "dtype": args.dtype, "budget": args.budget,
                "prefill": args.prefill, "prefill_chunk": args.prefill_chunk, "filler": args.filler}
    vllm = None
    if args.backend == "vllm":
        vllm = common.vllm_runner(args, methods, max(lengths))
        settings["backend"] = "vllm"
    shard = join()  # one process, or one of a torchrun / accelerate launch (then rank 0 reports)
    progress = open_run(args, "passkey", "eval passkey", settings,
                        per_method=method_settings(args, methods, options), encode=asdict,
                        decode=lambda row: PasskeyTrial(**row), shard=shard)
    model, tokenizer = common.load_model_for(args, shard=shard)
    with progress.keep_on_interrupt():
        trials = run_passkey(
            model, tokenizer, methods, lengths, depths, list(range(args.seeds)), args.budget, filler=args.filler,
            prefill=args.prefill, prefill_chunk=args.prefill_chunk, method_options=options,
            finished=progress.finished, on_trial=progress.add, shard=shard,
            progress=common.progress_for(args, f"passkey (budget {args.budget:g})", shard=shard)
            if vllm is None else not getattr(args, "quiet", False), vllm=vllm,
        )
        if not shard.main:
            return trials
        title = (f"Pass-key accuracy{' through vLLM' if vllm else ''}, budget {args.budget}, {args.prefill} prefill, "
                 f"{args.filler} filler, "
                 f"{len(depths)} depths x {args.seeds} seeds per length")
        write_run(
            args.out, "passkey",
            csv_headers=CSV_FIELDS, csv_rows=[[getattr(t, f) for f in CSV_FIELDS] for t in trials],
            payload={"budget": args.budget, "prefill": args.prefill, "filler": args.filler,
                     "model": models.model_label(args.model), "trials": trial_dicts(trials)},
            plot=lambda path: plot_heatmaps(trials, path, f"Pass key, budget {args.budget}, {args.prefill} prefill"),
            table=(title, *_accuracy_rows(trials, methods, lengths)),
        )
    progress.finish()
    return trials
