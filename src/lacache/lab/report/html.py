"""The report page: every result found in the run folders, as one self-contained HTML file.

Per task (perplexity, pass key, RULER, LongBench, each benchmark, the inspector) the page has a
summary table across runs (best value per column marked, sortable by clicking a header) and one
card per run: the exact command, the environment (model, dtype, versions, machine), relative
links to its CSV/JSON files, its own tables and its figures. Nothing is fetched: images are
embedded, style and script are inline (:mod:`.assets`), and links point only at files next to the
results. A result this version cannot read (an older layout, a missing key) is listed under "Older
runs / not recognised" with the reason, never a crash.
"""

from __future__ import annotations

import html
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from ...registry import baseline_method, unbounded_method
from ..evaluation.atomic import atomic_write
from ..evaluation.journal import is_progress_file
from .assets import SCRIPT, STYLE
from .discover import BENCHMARKS, EVALUATIONS, Discovery, Result, discover
from .figures import data_uri, figure_files, group_by_text, passkey_heatmap_svg, ppl_curves_svg
from .records import passkey_from_payload, ppl_from_payload, ruler_from_payload
from .tables import (
    Table,
    bench_cache_table,
    bench_decode_table,
    bench_prefill_table,
    bench_stream_table,
    bench_vllm_tables,
    gap_table,
    longbench_table,
    passkey_depth_table,
    passkey_summary_table,
    ppl_table,
    ruler_table,
)

__all__ = ["TITLES", "build_report", "render_table", "write_report"]

#: section titles, in page order
TITLES = {
    "ppl": "Perplexity", "passkey": "Pass key", "ruler": "RULER-style tasks", "longbench": "LongBench",
    "decode": "Decode speed (bench decode)", "memory": "Memory while decoding (bench memory)",
    "stream": "Constant-memory stream (bench stream)", "cache": "Cache update cost (bench cache)",
    "prefill": "Chunked prefill (bench prefill)", "vllm": "vLLM serving (bench vllm)",
    "inspect": "What each layer keeps (lacache inspect)",
}
#: what "best" means in each section's summary, for the line under its title
_BETTER = {"ppl": "lower perplexity is better", "passkey": "more correct answers is better",
           "ruler": "higher score is better", "longbench": "higher score is better"}
_DATA_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError)


def _reference() -> tuple[str]:
    """Methods shown but not ranked: the registry's unbounded cache, the reference the bounded caches are
    measured against (asked when a page is built, once every method and plugin has registered)."""
    return (unbounded_method(),)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def render_table(table: Table, exclude_best: Sequence[str] = ()) -> str:
    """``table`` as a sortable HTML table, the best value of each ranked column marked."""
    best = table.best(exclude_best)
    head = "".join(f'<th scope="col">{_esc(h)}</th>' for h in table.headers)
    body = []
    for i, row in enumerate(table.rows):
        cells = []
        for j, cell in enumerate(row):
            classes = (["num"] if cell.value is not None else []) + (["best"] if (i, j) in best else [])
            value = "" if cell.value is None else f' data-value="{cell.value!r}"'
            attrs = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attrs}{value}>{_esc(cell.text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{_esc(table.title)}</caption>" if table.title else ""
    return (f'<div class="scroll"><table class="sortable">{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


# --------------------------------------------------------------------------- one run
def _command(result: Result) -> str | None:
    run = result.run or {}
    argv = run.get("command") or (result.payload.get("command") if isinstance(result.payload, dict) else None)
    if isinstance(argv, list) and argv:
        return " ".join(shlex.quote(str(a)) for a in argv)
    return argv if isinstance(argv, str) else None


def _environment(result: Result) -> list[tuple[str, str]]:
    """(name, value) pairs shown under a run: model and dtype, then versions and machine."""
    payload = result.payload if isinstance(result.payload, dict) else {}
    run = result.run or {}
    options = run.get("options") or {}
    env = payload.get("environment") if isinstance(payload.get("environment"), dict) else {}
    gpus = run.get("gpus") or ([env["cuda_device"]] if env.get("cuda_device") else [])
    cpu = run.get("cpu")
    if cpu and run.get("cpu_count"):
        cpu = f"{cpu} ({run['cpu_count']} cores)"
    pairs = [
        ("model", payload.get("model") or options.get("model")),
        ("dtype", payload.get("dtype") or options.get("dtype") or env.get("dtype")),
        ("device", options.get("device") or env.get("device")),
        ("budget", payload.get("budget")),
        ("lacache", run.get("lacache")),  # the package's version, not a method
        ("torch", run.get("torch") or env.get("torch")),
        ("transformers", run.get("transformers")),
        ("python", run.get("python") or env.get("python")),
        ("platform", run.get("platform") or env.get("platform")),
        ("CPU", cpu or (f"{env['cpu_count']} cores" if env.get("cpu_count") else None)),
        ("GPU", ", ".join(gpus) if gpus else ("none" if run else None)),
        ("processes", run.get("world_size")),
        ("finished", run.get("time")),
    ]
    return [(k, str(v)) for k, v in pairs if v not in (None, "", [])]


def _links(result: Result, out_dir: Path) -> str:
    """Relative links to the files the run wrote next to its JSON (same name prefix)."""
    stem = result.path.name[: -len(".json")]
    files = [p for p in sorted(result.path.parent.glob(f"{stem}*"))
             if p.is_file() and not is_progress_file(p.name) and p.suffix.lower() in (".csv", ".json", ".png", ".svg")]
    if result.kind == "inspect":
        files += [p for p in figure_files(result.path.parent, result.payload.get("figures", [])) if p not in files]
    links = []
    for path in files:
        try:
            href = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
        except ValueError:  # another drive: no relative path exists
            href = path.resolve().as_uri()
        links.append(f'<a href="{_esc(href)}">{_esc(path.name)}</a>')
    return f'<p class="files">files: {" ".join(links)}</p>' if links else ""


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{_esc(src)}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'


def _embedded(result: Result, names: Sequence[str]) -> list[str]:
    """The run's own image files among ``names``, embedded."""
    figures, stems = [], set()
    for path in figure_files(result.path.parent, names):
        if path.stem in stems:  # the same figure in another format (inspect.png, inspect.svg): shown once
            continue
        stems.add(path.stem)
        uri = data_uri(path)
        if uri is not None:
            figures.append(_figure(uri, path.name))
    return figures


def _own_figures(result: Result) -> list[str]:
    stem = result.path.name[: -len(".json")]
    names = result.payload.get("figures", []) if result.kind == "inspect" else [f"{stem}.png", f"{stem}_stream.png"]
    return _embedded(result, [n for n in names if isinstance(n, str)])


def _drawn_figures(result: Result) -> list[str]:
    """Figures drawn from the data, for a run that left no image of its own."""
    if result.kind == "passkey":
        records = passkey_from_payload(result.payload)
        return [f"<figure>{passkey_heatmap_svg(records, m)}<figcaption>drawn from the trials</figcaption></figure>"
                for m in dict.fromkeys(r.method for r in records)]
    if result.kind == "ppl":
        records = ppl_from_payload(result.payload)
        figures = []
        for (text, budget), mine in group_by_text(records).items():
            title = " ".join(x for x in (text, f"budget {budget}" if budget is not None else "") if x) or "perplexity"
            svg = ppl_curves_svg(mine, f"PPL per window, {title}")
            if svg:
                figures.append(f"<figure>{svg}<figcaption>drawn from the windows</figcaption></figure>")
        return figures
    return []


def _inspect_fields(payload: Mapping) -> str:
    rows = []
    for key in ("prompt_tokens", "methods", "steps"):  # model and budget are with the environment
        value = payload.get(key)
        if isinstance(value, list):
            value = ", ".join(map(str, value))
        if value is not None:
            rows.append(f"<dt>{_esc(key.replace('_', ' '))}</dt><dd>{_esc(value)}</dd>")
    return f'<dl class="meta">{"".join(rows)}</dl>' if rows else ""


def _details(result: Result) -> str:
    """The tables of one run that its section's summary does not already show."""
    payload, parts = result.payload, []
    if result.kind == "ppl":
        records = ppl_from_payload(payload)
        unbounded, baseline = unbounded_method(), baseline_method()
        if {unbounded, baseline} <= {r.method for r in records}:
            parts.append(render_table(gap_table(records, title=f"Share of the {baseline} → {unbounded} gap closed"),
                                      _reference()))
    elif result.kind == "passkey":
        parts.append(render_table(passkey_depth_table(passkey_from_payload(payload),
                                                      title="Correct answers per needle depth"), _reference()))
    elif result.kind == "inspect":
        parts.append(_inspect_fields(payload))
    return "".join(parts)


def _card(result: Result, out_dir: Path) -> str:
    """One run: title, provenance, links, tables and figures."""
    command = _command(result)
    badge = ('<span class="badge" title="written before runs recorded their command and environment">'
             "older run: no run record</span>" if result.run is None and command is None else "")
    meta = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in _environment(result))
    figures = _own_figures(result) or _drawn_figures(result)
    return (f'<article class="run" id="{_esc(_anchor(result))}"><h3>{_esc(result.label)} '
            f'<code>{_esc(result.path.name)}</code>{badge}</h3>'
            + (f'<pre class="command">{_esc(command)}</pre>' if command else
               '<p class="note">command not recorded</p>')
            + (f'<dl class="meta">{meta}</dl>' if meta else "") + _links(result, out_dir) + _details(result)
            + (f'<div class="figures">{"".join(figures)}</div>' if figures else "") + "</article>")


def _anchor(result: Result) -> str:
    return "run-" + "".join(c if c.isalnum() else "-" for c in f"{result.label}-{result.kind}")


# --------------------------------------------------------------------------- summaries across runs
def _ppl_summary(results: Sequence[Result]) -> list[Table]:
    groups: dict[tuple, list] = {}
    for r in results:
        key = (r.payload.get("model", "?"), r.payload.get("tokens", "?"))
        groups.setdefault(key, []).extend(ppl_from_payload(r.payload, source=r.label))
    return [ppl_table(records, title=f"{model}, {tokens} tokens") for (model, tokens), records in groups.items()]


def _passkey_summary(results: Sequence[Result]) -> list[Table]:
    columns = [(f"{r.label}: budget {r.payload.get('budget', '?')}, {r.payload.get('prefill', '?')} prefill",
                passkey_from_payload(r.payload)) for r in results]
    return [passkey_summary_table(columns, title="Correct answers over all lengths, depths and seeds")]


def _ruler_summary(results: Sequence[Result]) -> list[Table]:
    records = [t for r in results for t in ruler_from_payload(r.payload, source=r.label)]
    return [ruler_table(records, mean=True, title="Mean string-match score per task")]


def _items(results: Sequence[Result]) -> list[tuple[str, Mapping]]:
    return [(r.label, r.payload) for r in results]


_SUMMARIES: dict[str, Callable[[Sequence[Result]], list[Table]]] = {
    "ppl": _ppl_summary,
    "passkey": _passkey_summary,
    "ruler": _ruler_summary,
    "longbench": lambda rs: [longbench_table(_items(rs), title="Scores (0-100)")],
    "decode": lambda rs: [bench_decode_table(_items(rs), title="Decode, per method")],
    "stream": lambda rs: [bench_stream_table(_items(rs), title="Streams and their memory verdict")],
    "cache": lambda rs: [bench_cache_table(_items(rs), title="ms per token inside cache.update, all layers")],
    "prefill": lambda rs: [bench_prefill_table(_items(rs), title="Chunked prefill")],
    "vllm": lambda rs: bench_vllm_tables(_items(rs)),
}


def _checked(found: Discovery) -> tuple[list[Result], list[Result]]:
    """(readable results, unreadable ones): each result's own tables and figures are built once as a test."""
    good, bad = [], list(found.unrecognised)
    for result in found.results:
        try:
            _details(result)
            _drawn_figures(result)
            if result.kind in _SUMMARIES:
                _SUMMARIES[result.kind]([result])
        except _DATA_ERRORS as err:
            bad.append(Result(result.path, result.label, None, result.payload,
                              problem=f"{type(err).__name__}: {err} (a layout this version does not read)"))
        else:
            good.append(result)
    return good, bad


def _section(kind: str, results: Sequence[Result], out_dir: Path) -> str:
    summary = ""
    if kind in _SUMMARIES:
        try:
            summary = "".join(render_table(t, _reference()) for t in _SUMMARIES[kind](results))
        except _DATA_ERRORS as err:  # each run reads alone (checked), but together they may not
            summary = f'<p class="note">these runs could not be combined into one table ({_esc(err)})</p>'
    better = (f'<p class="lead">Best value per column in bold green; {_BETTER[kind]} (the unbounded cache, '
              f'{_esc(", ".join(_reference()))}, is the reference and is not ranked).</p>' if kind in _BETTER else "")
    if kind in BENCHMARKS and kind != "memory":
        better = '<p class="lead">Best value per column in bold green (time and memory: lower; speed: higher).</p>'
    cards = "".join(_card(r, out_dir) for r in results)
    return f'<section id="{kind}"><h2>{_esc(TITLES[kind])}</h2>{better}{summary}{cards}</section>'


def _problems(bad: Sequence[Result], foreign: Sequence[Result]) -> str:
    if not bad and not foreign:
        return ""
    items = []
    for r in bad:
        items.append(f"<li><code>{_esc(r.label)}/{_esc(r.path.name)}</code> "
                     f'<span class="badge">older run / not recognised</span> {_esc(r.problem)}</li>')
    for r in foreign:
        items.append(f"<li><code>{_esc(r.label)}/{_esc(r.path.name)}</code>: {_esc(r.problem)}</li>")
    return ('<section id="unrecognised"><h2>Older runs / not recognised</h2><p class="lead">Files found in the '
            'run folders that this version of lacache does not read; their numbers are not in the tables above.'
            f'</p><ul class="problems">{"".join(items)}</ul></section>')


def build_report(found: Discovery, out: str | Path, title: str = "lacache report") -> str:
    """The HTML page for everything in ``found``; links are relative to where ``out`` will be written."""
    from ... import __version__

    out_dir = Path(out).parent
    good, bad = _checked(found)
    kinds = [k for k in (*EVALUATIONS, *BENCHMARKS, "inspect") if any(r.kind == k for r in good)]
    sections = "".join(_section(k, [r for r in good if r.kind == k], out_dir) for k in kinds)
    problems = _problems(bad, found.foreign)
    nav = "".join(f'<a href="#{k}">{_esc(TITLES[k])}</a>' for k in kinds)
    if problems:
        nav += '<a href="#unrecognised">Older runs / not recognised</a>'
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    folders = ", ".join(f"<code>{_esc(f)}</code>" for f in found.folders)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_esc(title)}</title>'
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>"
            f"<h1>{_esc(title)}</h1><p class=\"lead\">{len(good)} result(s) from {folders}; generated {now} by "
            f"lacache {_esc(__version__)}. Click a column header to sort.</p><nav>{nav}</nav>"
            f"{sections}{problems}</body></html>\n")


def write_report(folders: Sequence[str | Path], out: str | Path, title: str = "lacache report") -> Discovery:
    """Find the results in ``folders`` and write the page to ``out`` (atomically); returns what was found.

    Raises ``ValueError`` (see :func:`lacache.lab.report.discover.discover`) when there is nothing to show.
    """
    found = discover(folders)
    page = build_report(found, out, title)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: fh.write(page), encoding="utf-8")
    return found
