"""Tables, CSV/JSON files and plots for evaluation results."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ...registry import baseline_method, unbounded_method
from ..results import eval_kind, write_result
from .atomic import atomic_write

__all__ = ["format_table", "write_csv", "write_json", "write_run", "plot_ppl_by_position", "ppl_table_rows"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in text)])


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    """``headers`` then ``rows`` as CSV, written atomically (an interruption leaves the old file whole)."""

    def write(fh) -> None:
        writer = csv.writer(fh)
        writer.writerow(headers)
        writer.writerows(rows)

    atomic_write(path, write, newline="")


def write_json(path: Path, payload) -> None:
    """``payload`` as indented JSON, written atomically (an interruption leaves the old file whole).

    A result file goes through :func:`lacache.lab.results.write_result` instead, which adds its
    ``kind``, ``schema`` and run record; this writes any other JSON as it is."""
    atomic_write(path, lambda fh: json.dump(payload, fh, indent=2))


def write_run(
    out_dir: str | Path,
    name: str,
    *,
    csv_headers: Sequence[str],
    csv_rows: Sequence[Sequence],
    payload: Mapping[str, object],
    plot: Callable[[Path], None] | None = None,
    table: tuple[str, Sequence[str], Sequence[Sequence]] | None = None,
) -> list[Path]:
    """Everything an evaluation run leaves behind, the same way for every evaluation.

    Prints ``table`` (title, headers, rows) on stdout, then writes ``<out_dir>/<name>.csv`` (one
    row per trial), ``<name>.json`` (``payload``, a dict, of kind ``eval.<name>``: see
    :mod:`lacache.lab.results`) and, when ``plot`` is given, ``<name>.png`` (``plot(path)`` draws
    it); the folder is created if needed. The JSON gains ``kind``, ``schema`` and a ``"run"`` record
    (:func:`lacache.lab.runinfo.run_record`: command, versions, machine) for ``lacache report``.
    Returns the written paths, which it also names on stderr so a run's log says where its results went.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if table is not None:
        title, headers, rows = table
        print(title)
        print(format_table(headers, rows))
    paths = [out / f"{name}.csv", out / f"{name}.json"]
    write_csv(paths[0], csv_headers, csv_rows)
    write_result(paths[1], eval_kind(name), payload)  # plus kind, schema and "run": the command, versions, machine
    if plot is not None:
        paths.append(out / f"{name}.png")
        plot(paths[-1])
    print(f"[lacache] wrote {', '.join(map(str, paths))}", file=sys.stderr)
    return paths


def _texts(results) -> list[str]:
    return list(dict.fromkeys(getattr(r, "text", "") for r in results))


def ppl_table_rows(results) -> tuple[list[str], list[list]]:
    """Overall PPL: one row per method (per text and method for several texts), one column per budget."""
    budgets = sorted({r.budget for r in results if r.budget is not None})
    methods = list(dict.fromkeys(r.method for r in results))
    texts = _texts(results)
    named = texts != [""]
    headers = (["text"] if named else []) + ["method", *[f"budget {b}" for b in budgets]]
    rows = []
    for text in texts:
        for method in methods:
            mine = {r.budget: r.ppl for r in results if r.method == method and getattr(r, "text", "") == text}
            if not mine:
                continue
            label = [text] if named else []
            if None in mine:  # full cache: same value under every budget
                rows.append([*label, method, *[mine[None]] * len(budgets)] if budgets else [*label, method])
            else:
                rows.append([*label, method, *[mine.get(b) for b in budgets]])
    return headers, rows


def gap_table_rows(results) -> tuple[list[str], list[list]] | None:
    """Share of the gap between the registry's bounded baseline (StreamingLLM) and its unbounded reference
    (the full cache) each method closes, per text and budget (needs both runs)."""
    from .perplexity import gap_closed

    unbounded, baseline = unbounded_method(), baseline_method()
    budgets = sorted({r.budget for r in results if r.budget is not None})
    by_key = {(getattr(r, "text", ""), r.method, r.budget): r.ppl for r in results}
    texts = _texts(results)
    methods = [m for m in dict.fromkeys(r.method for r in results) if m not in (unbounded, baseline)]
    if not methods or not all((t, unbounded, None) in by_key for t in texts):
        return None
    headers = ["text", "method", *[f"budget {b}" for b in budgets]]
    rows = []
    for text in texts:
        for method in methods:
            cells = []
            for b in budgets:
                mine, stream = by_key.get((text, method, b)), by_key.get((text, baseline, b))
                share = None if mine is None or stream is None else gap_closed(mine, stream, by_key[(text, unbounded, None)])
                cells.append(None if share is None else f"{100 * share:.0f}%")
            rows.append([text or "-", method, *cells])
    return headers, rows


def plot_ppl_by_position(results, path: Path, title: str = "Streaming perplexity") -> None:
    """One panel per budget; one line per method (the full cache is drawn in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r.budget for r in results if r.budget is not None}) or [None]
    texts = _texts(results)
    fig, axes = plt.subplots(len(texts), len(budgets), figsize=(5 * len(budgets), 4 * len(texts)), sharey="row",
                             squeeze=False)
    for (row, text), (col, budget) in ((t, b) for t in enumerate(texts) for b in enumerate(budgets)):
        ax = axes[row][col]
        for r in results:
            if r.budget not in (budget, None) or getattr(r, "text", "") != text:
                continue
            xs = [(a + b) / 2 for a, b, _ in r.windows]
            ys = [p for _, _, p in r.windows]
            style = "--" if r.budget is None else "-"
            ax.plot(xs, ys, style, marker="o", markersize=3, label=f"{r.method} ({r.ppl:.2f})")
        ax.set_title(" ".join(x for x in (text, f"budget {budget}" if budget is not None else "") if x))
        ax.set_xlabel("token position")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if col == 0:
            ax.set_ylabel(f"PPL per {results[0].window}-token window")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
