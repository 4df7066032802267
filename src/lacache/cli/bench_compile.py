"""``lacache bench compile``: decode ms/token eager vs ``torch.compile``, full / StaticCache / bounded caches.

The measuring is in ``lacache.lab.bench.compiled``; this module loads the model, runs it and writes
``compile.json`` (every round), ``compile.csv`` and ``compile.md`` (the summary) and ``compile.png``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

__all__ = ["run_compile", "summary_table"]

HEADERS = ("setup", "compiled", "slots", "ms_per_token", "vs_compiled_static_cache", "vs_eager_host_path", "warmup_s")


def summary_table(summary: list[dict]) -> str:
    """The summary as a markdown table (ratios: below 1 is faster)."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "yes" if value else "no"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    names = ("setup", "compiled", "slots", "ms/token", "÷ compiled StaticCache", "÷ eager host path", "warm-up s")
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(cell(row[h]) for h in HEADERS) + " |" for row in summary]
    return "\n".join(lines)


def _plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(summary) + 1.2))
    names = [row["setup"] for row in summary][::-1]
    values = [row["ms_per_token"] for row in summary][::-1]
    colors = ["#2b7bba" if row["compiled"] else "#9bbbd4" for row in summary][::-1]
    ax.barh(names, values, color=colors)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.1f}", va="center", fontsize=8)
    ax.set_xlabel("ms per decoded token (median over rounds; dark: torch.compile)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compile(args: argparse.Namespace, load: Callable, log: Callable[[str], None]) -> dict:
    """Run the benchmark for parsed ``args``; ``load(args)`` gives (model, tokenizer, description)."""
    import torch

    from ..lab.bench.compiled import bench_compile, compile_summary
    from ..lab.bench.prompts import prompt_ids
    from ..lab.evaluation.report import write_csv, write_json
    from ..registry import check_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    model, tokenizer, desc = load(args)
    prompt = prompt_ids(model, tokenizer, 2 * args.budget, args.seed)
    log(f"[bench compile] {desc}: {', '.join(methods)}, budget {args.budget}, {args.rounds} rounds x {args.window} "
        f"steps, backend {args.backend}, mode {args.mode or 'default'}, {torch.get_num_threads()} threads")
    rows = bench_compile(model, prompt, methods, budget=args.budget, window=args.window, rounds=args.rounds,
                         backend=args.backend, mode=args.mode, log=log)
    summary = compile_summary(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": desc, "dtype": args.dtype, "device": str(next(model.parameters()).device),
                "budget": args.budget, "window": args.window, "rounds": args.rounds, "backend": args.backend,
                "mode": args.mode, "threads": torch.get_num_threads(), "torch": torch.__version__}
    payload = {"benchmark": "compile", "settings": settings, "rows": rows, "summary": summary}
    write_json(out / "compile.json", payload)
    write_csv(out / "compile.csv", HEADERS, [[row[h] for h in HEADERS] for row in summary])
    table = summary_table(summary)
    (out / "compile.md").write_text(f"{desc}, {args.dtype}, budget {args.budget}, backend {args.backend}\n\n{table}\n")
    _plot(summary, out / "compile.png", f"{desc}, {args.dtype}, budget {args.budget} ({summary[0]['slots']} slots)")
    print(table)
    log(f"[bench compile] wrote {out / 'compile.json'}, compile.csv, compile.md, compile.png")
    return payload
