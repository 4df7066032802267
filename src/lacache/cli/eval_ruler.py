"""``lacache eval ruler``: RULER-style synthetic tasks (multi-key/value needles, variable tracking, common words)."""

from __future__ import annotations

import argparse

from ..lab.evaluation.passkey import FILLERS
from ..lab.evaluation.ruler import DEFAULT_LENGTHS, TASKS, plot_scores, run_ruler, summary_table, trial_dicts
from . import common, values
from .resume import method_settings, open_run

__all__ = ["CSV_FIELDS", "add_parser", "run_cli"]

#: one CSV row per trial: these fields, then the references (space-separated) and the answer
CSV_FIELDS = ("method", "task", "length", "seed", "budget", "score", "correct", "seconds")


def add_parser(tasks_subparsers) -> argparse.ArgumentParser:
    """Register ``ruler`` under ``lacache eval``; returns its parser."""
    parser = tasks_subparsers.add_parser(
        "ruler", help="RULER-style synthetic tasks (multi-key/value needles, variable tracking, common words)"
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="prompt lengths in tokens")
    parser.add_argument("--seeds", type=common.positive_int, default=3, help="prompts per task and length")
    parser.add_argument("--filler", choices=list(FILLERS), default="grass")
    common.add_prefill_arguments(parser, budget=0.5, prefill="full", chunk=128)
    common.add_backend_argument(parser)
    common.add_run_arguments(parser, "ruler", "runs/ruler", "folder for ruler.csv, ruler.json, ruler.png")
    return parser


def run_cli(args, model=None, tokenizer=None) -> list:
    """``lacache eval ruler``: run, print a table, write ruler.csv/json/png into ``--out``.

    ``model`` and ``tokenizer`` may be passed in (tests, notebooks) instead of loading ``--model``.
    """
    from dataclasses import asdict

    from .. import models
    from ..lab.evaluation.distributed import join
    from ..lab.evaluation.report import write_run
    from ..lab.evaluation.ruler import RulerTrial

    values.check_values(args)
    methods = common.run_methods(args)
    tasks = common.names(args.tasks, TASKS, "tasks")
    lengths = common.positive_ints(args.lengths, "lengths")
    options = common.parse_method_options(args.option, methods)
    common.note_if_nothing_evicted(args.budget, max(lengths), "of the longest prompt (--lengths)",
                                   getattr(args, "quiet", False))
    settings = {"model": models.model_label(args.model), "dtype": args.dtype, "budget": args.budget,
                "prefill": args.prefill, "prefill_chunk": args.prefill_chunk, "filler": args.filler}
    vllm = None
    if getattr(args, "backend", "transformers") == "vllm":
        vllm = common.vllm_runner(args, methods, max(lengths))
        settings["backend"] = "vllm"
    shard = join()  # one process, or one of a torchrun / accelerate launch (then rank 0 reports)
    progress = open_run(args, "ruler", "eval ruler", settings, per_method=method_settings(args, methods, options),
                        encode=asdict, decode=lambda row: RulerTrial(**row), shard=shard)
    if model is None or tokenizer is None:
        model, tokenizer = common.load_model_for(args, shard=shard)
    with progress.keep_on_interrupt():
        trials = run_ruler(model, tokenizer, methods, tasks, lengths, list(range(args.seeds)), args.budget,
                           filler=args.filler, prefill=args.prefill, prefill_chunk=args.prefill_chunk,
                           method_options=options, finished=progress.finished, on_trial=progress.add,
                           progress=common.progress_for(args, f"ruler (budget {args.budget:g})", shard=shard)
                           if vllm is None else not getattr(args, "quiet", False), shard=shard, vllm=vllm)
        if not shard.main:
            return trials
        title = (f"RULER-style tasks{' through vLLM' if vllm else ''}, budget {args.budget}, {args.prefill} prefill, {args.filler} filler, "
                 f"{args.seeds} seeds per task and length (mean string-match score)")
        write_run(
            args.out, "ruler",
            csv_headers=[*CSV_FIELDS, "references", "answer"],
            csv_rows=[[*(getattr(t, f) for f in CSV_FIELDS), " ".join(t.references), t.answer] for t in trials],
            payload={"budget": args.budget, "prefill": args.prefill, "filler": args.filler,
                     "model": models.model_label(args.model), "trials": trial_dicts(trials)},
            plot=lambda path: plot_scores(trials, path,
                                          f"RULER-style tasks, budget {args.budget}, {args.prefill} prefill"),
            table=(title, *summary_table(trials)),
        )
    progress.finish()
    return trials
