"""``lacache eval longbench``: LongBench (English) from official-layout JSONL files, scores per method x dataset."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..lab.evaluation.longbench import (
    PROMPTS,
    LongBenchRecord,
    LongBenchTrial,
    load_folder,
    load_hub,
    run_longbench,
    summarize,
    summary_table,
    trial_dicts,
)
from . import common, values
from .resume import method_settings, open_run

__all__ = ["SAMPLE_FIELDS", "add_parser", "run_cli"]

#: one CSV row per sample, these fields in this order (``answers`` as a JSON list)
SAMPLE_FIELDS = ("method", "dataset", "id", "length", "slots", "score", "seconds", "prediction", "answers")


def add_parser(tasks_subparsers) -> argparse.ArgumentParser:
    """Register ``longbench`` under ``lacache eval``; returns its parser."""
    lb = tasks_subparsers.add_parser(
        "longbench", help="LongBench (English) from official-layout JSONL files: scores per method x dataset")
    source = lb.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", default=None, metavar="DIR",
                        help="folder of official <dataset>.jsonl files (the unpacked data.zip)")
    source.add_argument("--dataset", default=None, metavar="HUB_ID",
                        help="hub dataset through `datasets` (needs internet), e.g. THUDM/LongBench")
    lb.add_argument("--datasets", default=None,
                    help=f"comma-separated names (default: every file in --data, or all of: {','.join(PROMPTS)})")
    lb.add_argument("--limit", type=common.positive_int, default=None, help="samples per dataset (default: all)")
    common.add_prefill_arguments(lb, budget=1024, prefill="chunked", chunk=512)
    lb.add_argument("--max-length", type=common.positive_int, default=None,
                    help="middle-truncate prompts to N tokens like the official code (default: read everything)")
    lb.add_argument("--no-chat-template", action="store_true", help="feed every prompt as raw text")
    common.add_run_arguments(lb, "longbench", "runs/longbench", "folder for longbench.csv and longbench.json")
    return lb


def _records(args) -> list[LongBenchRecord]:
    chosen = common.split_list(args.datasets, str) if args.datasets else None
    if args.data:
        return load_folder(args.data, chosen, args.limit)
    return load_hub(args.dataset, chosen, args.limit)


def _truncation_note(max_length: int | None) -> str:
    if max_length is None:
        return "whole contexts (no truncation)"
    return f"prompts middle-truncated to {max_length} tokens"


def _csv_rows(trials: Sequence[LongBenchTrial]) -> list[list]:
    return [[json.dumps(t.answers, ensure_ascii=False) if f == "answers" else getattr(t, f) for f in SAMPLE_FIELDS]
            for t in trials]


def run_cli(args) -> list[LongBenchTrial]:
    """``lacache eval longbench``: load, run, print the score table, write CSV and JSON."""
    from dataclasses import asdict

    from .. import models
    from ..lab.evaluation.distributed import join
    from ..lab.evaluation.report import write_run

    values.check_values(args)
    methods = common.run_methods(args)
    options = common.parse_method_options(args.option, methods)
    recorded = {"model": models.model_label(args.model), "dtype": args.dtype, "source": args.data or args.dataset,
                "budget": args.budget, "prefill": args.prefill, "prefill_chunk": args.prefill_chunk,
                "max_length": args.max_length, "chat_template": not args.no_chat_template}
    shard = join()  # one process, or one of a torchrun / accelerate launch (then rank 0 reports)
    progress = open_run(args, "longbench", "eval longbench", recorded,
                        per_method=method_settings(args, methods, options), encode=asdict,
                        decode=lambda row: LongBenchTrial(**row), shard=shard)
    records = _records(args)
    if not records:
        raise ValueError("no LongBench records to evaluate")
    model, tokenizer = common.load_model_for(args, shard=shard)
    with progress.keep_on_interrupt():
        trials = run_longbench(model, tokenizer, methods, records, args.budget, prefill=args.prefill,
                               prefill_chunk=args.prefill_chunk, method_options=options,
                               use_chat_template=not args.no_chat_template, max_length=args.max_length,
                               progress=common.progress_for(args, f"longbench (budget {args.budget:g})", shard=shard),
                               finished=progress.finished, on_trial=progress.add, shard=shard)
        if not shard.main:
            return trials
        settings = {
            "model": models.model_label(args.model), "source": args.data or args.dataset,
            "budget": args.budget, "prefill": args.prefill, "prefill_chunk": args.prefill_chunk,
            "max_length": args.max_length, "truncation": _truncation_note(args.max_length),
            "chat_template": not args.no_chat_template, "options": options,
        }
        title = (f"LongBench scores (0-100), budget {args.budget:g}, {args.prefill} prefill, "
                 f"{_truncation_note(args.max_length)}, {len(records)} samples")
        write_run(
            args.out, "longbench", csv_headers=SAMPLE_FIELDS, csv_rows=_csv_rows(trials),
            payload={**settings, "summary": summarize(trials), "samples": trial_dicts(trials)},
            table=(title, *summary_table(trials)),
        )
    progress.finish()
    return trials
