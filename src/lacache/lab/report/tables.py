"""The report's tables, built once from records and drawn as HTML or markdown.

A :class:`Table` holds cells that carry both the text shown and the number it stands for (as
shown, so "best" and sorting agree with what a reader sees), and knows which direction is better
in each column. The functions here are the only place a result becomes a table: the HTML page and
the generated regions of docs/results.md both call them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ...registry import baseline_method, unbounded_method
from .records import PasskeyRecord, PplRecord, RulerRecord

__all__ = [
    "MISSING",
    "Cell",
    "Table",
    "bench_cache_table",
    "bench_decode_table",
    "bench_prefill_table",
    "bench_stream_table",
    "bench_vllm_tables",
    "gap_table",
    "longbench_table",
    "passkey_depth_table",
    "passkey_summary_table",
    "ppl_table",
    "relabel",
    "ruler_table",
]

LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class Cell:
    """What a table cell shows, and the number it stands for (``None``: a label, or nothing to rank)."""

    text: str
    value: float | None = None


#: an empty cell (a method not run at that budget, ...)
MISSING = Cell("—")


@dataclass
class Table:
    """Rows of cells under ``headers``; the first ``labels`` columns name the row.

    ``better[j]`` says whether a lower or higher value is better in data column ``j`` (``None``:
    not ranked). ``keys`` holds the method of each row (so a reference row such as the full cache
    can be left out of "best"), ``groups`` the group a row is ranked within (e.g. its text: the
    perplexities of two texts do not compete).
    """

    headers: list[str]
    rows: list[list[Cell]]
    labels: int = 1
    better: list[str | None] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    title: str = ""

    def __post_init__(self) -> None:
        data = len(self.headers) - self.labels
        self.better = list(self.better) + [None] * (data - len(self.better))
        self.keys = list(self.keys) or [row[self.labels - 1].text if self.labels else "" for row in self.rows]
        self.groups = list(self.groups) or [""] * len(self.rows)

    def best(self, exclude: Collection[str] = ()) -> set[tuple[int, int]]:
        """(row, column) of the best value in every ranked column, within each group; ties all count.

        Rows whose key is in ``exclude`` are neither ranked nor marked; a group whose values are all
        equal has no best.
        """
        marked: set[tuple[int, int]] = set()
        for j in range(self.labels, len(self.headers)):
            direction = self.better[j - self.labels]
            if direction is None:
                continue
            groups: dict[str, list[tuple[int, float]]] = {}
            for i, row in enumerate(self.rows):
                value = row[j].value
                if self.keys[i] in exclude or value is None or math.isnan(value):
                    continue
                groups.setdefault(self.groups[i], []).append((i, value))
            for members in groups.values():
                if len({v for _, v in members}) < 2:  # one row, or all equal: nothing stands out
                    continue
                target = (min if direction == LOWER else max)(v for _, v in members)
                marked.update((i, j) for i, v in members if v == target)
        return marked


def number(value, digits: int = 2, scale: float = 1.0) -> Cell:
    """``value * scale`` shown with ``digits`` decimals (thousands separated); empty for None or NaN."""
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return MISSING
    shown = round(value * scale, digits)
    return Cell(f"{shown:,.{digits}f}", shown)


def count(hits: int, total: int) -> Cell:
    """``"hits/total"``, ranked by the share."""
    return Cell(f"{hits}/{total}", hits / total if total else None)


def relabel(table: Table, labels: Mapping[str, str]) -> Table:
    """``table`` with the method column's text replaced by ``labels[method]`` where given (keys stay)."""
    column = table.labels - 1
    rows = [[replace(c, text=labels.get(key, c.text)) if j == column else c for j, c in enumerate(row)]
            for key, row in zip(table.keys, table.rows)]
    return replace(table, rows=rows)


def _order(found: Sequence[str], methods: Sequence[str] | None) -> list[str]:
    """``methods`` when given (rows in that order, others dropped), else every method as first found."""
    return list(methods) if methods is not None else list(dict.fromkeys(found))


def _sources(records) -> list[str]:
    return list(dict.fromkeys(r.source for r in records))


# --------------------------------------------------------------------------- evaluations
def ppl_table(records: Sequence[PplRecord], methods: Sequence[str] | None = None, title: str = "") -> Table:
    """Perplexity: one row per (run,) (text,) method; one column per budget; lower is better, per text.

    The first record of each (run, text, method, budget) counts; the full cache (budget None)
    shows its one value under every budget.
    """
    values: dict[tuple[str, str, str, int | None], float] = {}
    for r in records:
        values.setdefault((r.source, r.text, r.method, r.budget), r.ppl)
    sources, texts = _sources(records), list(dict.fromkeys(r.text for r in records))
    order = _order([r.method for r in records], methods)
    budgets = sorted({r.budget for r in records if r.budget is not None})
    show_source, show_text = len(sources) > 1, texts != [""]
    labels = (["run"] if show_source else []) + (["text"] if show_text else []) + ["method"]
    headers = labels + ([f"budget {b}" for b in budgets] or ["PPL"])
    rows, keys, groups = [], [], []
    for source in sources:
        for text in texts:
            for method in order:
                mine = {b: p for (s, t, m, b), p in values.items() if (s, t, m) == (source, text, method)}
                if not mine:
                    continue
                if not budgets:
                    cells = [number(mine.get(None))]
                elif set(mine) == {None}:
                    cells = [number(mine[None])] * len(budgets)
                else:
                    cells = [number(mine.get(b)) for b in budgets]
                label = ([Cell(source)] if show_source else []) + ([Cell(text)] if show_text else [])
                rows.append([*label, Cell(method), *cells])
                keys.append(method)
                groups.append(text)
    return Table(headers, rows, labels=len(labels), better=[LOWER] * (len(headers) - len(labels)), keys=keys,
                 groups=groups, title=title)


def gap_table(records: Sequence[PplRecord], methods: Sequence[str] | None = None, title: str = "") -> Table:
    """Share of the perplexity gap between the bounded baseline and the unbounded cache each method closes,
    per text and budget.

    The two ends are the registry's (``baseline_method()``, StreamingLLM; ``unbounded_method()``, the
    full cache); their results of each text are needed; higher is better.
    """
    from ..evaluation.perplexity import gap_closed

    unbounded, baseline = unbounded_method(), baseline_method()

    base = ppl_table(records, methods)
    values: dict[tuple[str, str, str, int | None], float] = {}
    for r in records:
        values.setdefault((r.source, r.text, r.method, r.budget), r.ppl)
    budgets = sorted({r.budget for r in records if r.budget is not None})
    rows, keys, groups = [], [], []
    for row, method, group in zip(base.rows, base.keys, base.groups):
        if method in (unbounded, baseline):
            continue
        source = row[0].text if base.headers[0] == "run" else ""
        full = values.get((source, group, unbounded, None))
        cells = []
        for b in budgets:
            mine, stream = values.get((source, group, method, b)), values.get((source, group, baseline, b))
            share = None if None in (mine, stream, full) else gap_closed(mine, stream, full)
            cells.append(MISSING if share is None else Cell(f"{100 * share:+.0f}%", round(100 * share)))
        rows.append([*row[: base.labels], *cells])
        keys.append(method)
        groups.append(group)
    return Table(base.headers, rows, labels=base.labels, better=[HIGHER] * len(budgets), keys=keys, groups=groups,
                 title=title)


def passkey_depth_table(records: Sequence[PasskeyRecord], methods: Sequence[str] | None = None,
                        title: str = "") -> Table:
    """Pass key: correct answers per method and needle depth, then over all depths; higher is better."""
    order = _order([r.method for r in records], methods)
    depths = sorted({r.depth for r in records})
    headers = ["method", *[f"depth {round(d * 100)}%" for d in depths], "all"]
    rows = []
    for method in order:
        mine = [r for r in records if r.method == method]
        cells = [count(sum(r.correct for r in hit), len(hit)) if (hit := [r for r in mine if r.depth == d])
                 else MISSING for d in depths]
        rows.append([Cell(method), *cells, count(sum(r.correct for r in mine), len(mine))])
    return Table(headers, rows, better=[HIGHER] * (len(headers) - 1), title=title)


def passkey_summary_table(columns: Sequence[tuple[str, Sequence[PasskeyRecord]]],
                          methods: Sequence[str] | None = None, title: str = "") -> Table:
    """Pass key, one column per run (``(header, trials)``): correct answers of all trials per method."""
    order = _order([r.method for _, trials in columns for r in trials], methods)
    rows = []
    for method in order:
        cells = []
        for _, trials in columns:
            mine = [r for r in trials if r.method == method]
            cells.append(count(sum(r.correct for r in mine), len(mine)) if mine else MISSING)
        rows.append([Cell(method), *cells])
    return Table(["method", *[h for h, _ in columns]], rows, better=[HIGHER] * len(columns), title=title)


def ruler_table(records: Sequence[RulerRecord], methods: Sequence[str] | None = None,
                tasks: Mapping[str, str] | Sequence[str] | None = None, mean: bool = False, title: str = "") -> Table:
    """RULER-style tasks: mean score per (run,) method and task (``tasks`` maps a task to its header).

    ``mean`` adds the mean over the tasks; higher is better.
    """
    order = _order([r.method for r in records], methods)
    tasks = dict(tasks) if isinstance(tasks, Mapping) else {t: t for t in (tasks or dict.fromkeys(r.task for r in records))}
    sources = _sources(records)
    show_source = len(sources) > 1
    rows, keys = [], []
    for source in sources:
        for method in order:
            mine = [r for r in records if r.method == method and r.source == source]
            if not mine:
                continue
            scores = []
            for task in tasks:
                hit = [r.score for r in mine if r.task == task]
                scores.append(sum(hit) / len(hit) if hit else None)
            cells = [number(s) for s in scores]
            if mean:
                present = [s for s in scores if s is not None]
                cells.append(number(sum(present) / len(present) if present else None))
            rows.append([*([Cell(source)] if show_source else []), Cell(method), *cells])
            keys.append(method)
    labels = (["run"] if show_source else []) + ["method"]
    headers = [*labels, *tasks.values(), *(["mean"] if mean else [])]
    return Table(headers, rows, labels=len(labels), better=[HIGHER] * (len(headers) - len(labels)), keys=keys,
                 title=title)


def longbench_table(items: Sequence[tuple[str, Mapping]], title: str = "") -> Table:
    """LongBench scores (0-100) per (run,) method and dataset, from each run's ``summary``; higher is better."""
    datasets = list(dict.fromkeys(d for _, p in items for scores in p["summary"].values() for d in scores
                                  if d != "average"))
    show_source = len(items) > 1
    rows, keys = [], []
    for source, payload in items:
        for method, scores in payload["summary"].items():
            rows.append([*([Cell(source)] if show_source else []), Cell(method),
                         *[number(scores.get(d)) for d in datasets], number(scores.get("average"))])
            keys.append(method)
    labels = (["run"] if show_source else []) + ["method"]
    return Table([*labels, *datasets, "average"], rows, labels=len(labels), better=[HIGHER] * (len(datasets) + 1),
                 keys=keys, title=title)


# --------------------------------------------------------------------------- benchmarks
MB = 2**20


def _runs_table(items: Sequence[tuple[str, Sequence[Mapping]]],
                columns: Sequence[tuple[str, str, int, float, str | None]], label: str = "method",
                title: str = "") -> Table:
    """One row per dict of each run (``(source, rows)``); ``columns``: (header, key, digits, scale, better)."""
    show_source = len(items) > 1
    rows, keys = [], []
    for source, entries in items:
        for entry in entries:
            rows.append([*([Cell(source)] if show_source else []), Cell(str(entry.get(label, "-"))),
                         *[number(entry.get(key), digits, scale) for _, key, digits, scale, _ in columns]])
            keys.append(str(entry.get(label, "")))
    labels = (["run"] if show_source else []) + [label]
    return Table([*labels, *[c[0] for c in columns]], rows, labels=len(labels), better=[c[4] for c in columns],
                 keys=keys, title=title)


def bench_decode_table(items: Sequence[tuple[str, Mapping]], title: str = "") -> Table:
    """``bench decode``: speed and memory per method (from each run's ``summary``)."""
    return _runs_table([(s, p["summary"]) for s, p in items], [
        ("budget", "budget", 0, 1, None), ("tokens", "tokens", 0, 1, None),
        ("ms/token mean", "ms_per_token_mean", 2, 1, LOWER), ("ms/token last", "ms_per_token_last", 2, 1, LOWER),
        ("tokens/s", "tokens_per_s", 2, 1, HIGHER), ("cache MB", "cache_mb_last", 2, 1, LOWER),
        ("peak RSS MB", "peak_rss_mb", 1, 1, LOWER),
    ], title=title)


def bench_cache_table(items: Sequence[tuple[str, Mapping]], title: str = "") -> Table:
    """``bench cache``: ms per token inside ``cache.update``, one row per method, one column per shape."""
    shapes = list(dict.fromkeys((r["layers"], r["budget"], r["positions"]) for _, p in items for r in p["summary"]))
    several = len({s[2] for s in shapes}) > 1
    show_source = len(items) > 1
    rows, keys = [], []
    for source, payload in items:
        summary = {(r["layers"], r["budget"], r["positions"]): r for r in payload["summary"]}
        methods = dict.fromkeys(k[: -len("_ms")] for r in payload["summary"] for k in r if k.endswith("_ms"))
        for method in methods:
            cells = [number(summary[s].get(f"{method}_ms"), 3) if s in summary else MISSING for s in shapes]
            rows.append([*([Cell(source)] if show_source else []), Cell(method), *cells])
            keys.append(method)
    labels = (["run"] if show_source else []) + ["method"]
    headers = [f"{n} layers, budget {b}" + (f", {p}" if several else "") + " (ms)" for n, b, p in shapes]
    return Table([*labels, *headers], rows, labels=len(labels), better=[LOWER] * len(shapes), keys=keys, title=title)


def bench_prefill_table(items: Sequence[tuple[str, Mapping]], title: str = "") -> Table:
    """``bench prefill``: the run (and its ``--compare-full`` run) per method."""
    entries = [(s, [p["summary"], *([p["full"]["summary"]] if p.get("full") else [])]) for s, p in items]
    return _runs_table(entries, [
        ("budget", "budget", 0, 1, None), ("tokens", "tokens", 0, 1, None), ("seconds", "seconds", 2, 1, LOWER),
        ("tokens/s", "tokens_per_s", 1, 1, HIGHER), ("peak RSS MB", "peak_rss_bytes", 1, 1 / MB, LOWER),
        ("cache MB", "cache_bytes", 2, 1 / MB, LOWER), ("full KV MB (computed)", "full_cache_bytes", 2, 1 / MB, None),
    ], title=title)


def bench_stream_table(items: Sequence[tuple[str, Mapping]], title: str = "") -> Table:
    """``bench stream``: one row per stream, with its flat-memory verdict."""
    rows = []
    for source, p in items:
        final, verdict = p.get("final") or {}, p.get("verdict") or {}
        flat = verdict.get("flat")
        rows.append([Cell(source or "-"), Cell(str(p.get("method", "-"))), number(p.get("budget"), 0),
                     number(final.get("tokens"), 0), number(p.get("tokens_per_s"), 1),
                     number(final.get("cache_bytes"), 3, 1 / MB), number(final.get("rss_bytes"), 1, 1 / MB),
                     Cell("-" if flat is None else ("flat" if flat else "NOT flat"))])
    return Table(["run", "method", "budget", "tokens", "tokens/s", "cache MB", "RSS MB", "memory"], rows, labels=2,
                 keys=[r[1].text for r in rows], title=title)


def bench_vllm_tables(items: Sequence[tuple[str, Mapping]]) -> list[Table]:
    """``bench vllm``: the stream part and the capacity part, when the runs have them."""
    tables = []
    stream = [(s, p["stream"]) for s, p in items if p.get("stream")]
    if stream:
        tables.append(_runs_table(stream, [
            ("budget", "budget", 0, 1, None), ("batch", "batch", 0, 1, None), ("tokens", "tokens", 0, 1, None),
            ("tokens/s", "tokens_per_s", 2, 1, HIGHER), ("KV usage", "kv_usage", 4, 1, LOWER),
        ], title="vLLM stream"))
    capacity = [(s, p["capacity"]) for s, p in items if p.get("capacity")]
    if capacity:
        tables.append(_runs_table(capacity, [
            ("budget", "budget", 0, 1, None), ("requests", "requests", 0, 1, None),
            ("mean running", "mean_running", 2, 1, HIGHER), ("preemptions", "preemptions", 0, 1, LOWER),
            ("tokens/s", "tokens_per_s", 2, 1, HIGHER),
        ], title="vLLM capacity"))
    return tables
