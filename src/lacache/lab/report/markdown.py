"""Generated regions of a markdown document: tables rebuilt from the data files beside it.

A region is written as

    <!-- lacache-table: {"table": "ppl", "data": ["ppl_3texts_a.csv"], "methods": ["full", "lacache"]} -->

    | method | budget 128 | ...

    <!-- /lacache-table -->

and :func:`regenerate_markdown` replaces what lies between the two markers with the table the spec
(JSON) describes, drawn by the same functions as ``lacache report``'s page. Prose around the
regions is left alone, so a document stays hand-written while its numbers come from its data: a
table edited by hand, or data changed without the table, shows up as a difference.

Spec keys: ``table`` (``ppl``, ``ppl-gap``, ``passkey-depth``, ``passkey-summary``, ``ruler``);
``data``, the CSV files (relative to the document; an entry may be ``{"file": ..., "rename":
{...}}`` to relabel that file's methods; the first file giving a cell wins); ``rename`` (for all
files); ``methods`` (the rows, in order); ``labels`` (method -> text shown); ``row_header`` (the
method column's header); for ``ruler``, ``tasks`` (task -> header) and ``mean``; for
``passkey-summary``, ``columns`` (``{"header": ..., "data": [...]}`` each); ``bold_best`` with
``exclude_best`` (methods not ranked, e.g. the full cache).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .records import passkey_from_csv, ppl_from_csv, renamed, ruler_from_csv
from .tables import (
    Table,
    gap_table,
    passkey_depth_table,
    passkey_summary_table,
    ppl_table,
    relabel,
    ruler_table,
)

__all__ = ["REGION", "changed_regions", "markdown_table", "regenerate_markdown", "table_from_spec"]

#: a generated region: the opening marker with its JSON spec, the table, the closing marker (markers
#: start their line, so a marker quoted in the prose is not one)
REGION = re.compile(r"(^<!-- lacache-table:(?P<spec>\s*\{.*?\}\s*)-->\n)(?P<body>.*?)(^<!-- /lacache-table -->)",
                    re.S | re.M)

_EXAMPLE = '<!-- lacache-table: {"table": "ppl", "data": ["ppl.csv"]} -->'


def markdown_table(table: Table, bold_best: bool = False, exclude_best: Sequence[str] = ()) -> str:
    """``table`` as a markdown table (one line per row, ending in a newline); best values bold if asked."""
    best = table.best(exclude_best) if bold_best else set()
    lines = ["| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    for i, row in enumerate(table.rows):
        cells = [f"**{c.text}**" if (i, j) in best else c.text for j, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _records(entries: Sequence, folder: Path, rename: Mapping[str, str], read: Callable) -> list:
    """The records of every data file of a spec, each file's methods relabelled, in order."""
    records = []
    for entry in entries:
        name, own = (entry, {}) if isinstance(entry, str) else (entry["file"], entry.get("rename", {}))
        path = folder / name
        if not path.is_file():
            raise ValueError(f"data file {name!r} not found next to the document (looked for {str(path)!r})")
        records.extend(renamed(renamed(read(path), own), rename))
    return records


def _first_file_per_method(entries: Sequence, folder: Path, rename: Mapping[str, str], read: Callable) -> list:
    """Like :func:`_records`, but a method's records all come from the first file that has it."""
    kept: list = []
    for entry in entries:
        mine = _records([entry], folder, rename, read)
        known = {r.method for r in kept}
        kept.extend(r for r in mine if r.method not in known)
    return kept


def table_from_spec(spec: Mapping, folder: str | Path) -> Table:
    """The table a region's ``spec`` describes, from data files in ``folder``."""
    folder = Path(folder)
    kind, rename, methods = spec.get("table"), spec.get("rename", {}), spec.get("methods")
    if kind in ("ppl", "ppl-gap"):
        records = _records(spec["data"], folder, rename, ppl_from_csv)
        table = (ppl_table if kind == "ppl" else gap_table)(records, methods)
    elif kind == "passkey-depth":
        table = passkey_depth_table(_first_file_per_method(spec["data"], folder, rename, passkey_from_csv), methods)
    elif kind == "passkey-summary":
        columns = [(c["header"], _first_file_per_method(c["data"], folder, rename, passkey_from_csv))
                   for c in spec["columns"]]
        table = passkey_summary_table(columns, methods)
    elif kind == "ruler":
        records = _first_file_per_method(spec["data"], folder, rename, ruler_from_csv)
        table = ruler_table(records, methods, spec.get("tasks"), mean=bool(spec.get("mean")))
    else:
        raise ValueError(f"unknown table {kind!r}; use one of ppl, ppl-gap, passkey-depth, passkey-summary, ruler")
    table = relabel(table, spec.get("labels", {}))
    if "row_header" in spec:  # e.g. "variant" for a table of a method's variants
        table.headers[table.labels - 1] = str(spec["row_header"])
    return table


def _render(spec_text: str, folder: Path) -> str:
    try:
        spec = json.loads(spec_text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the spec {spec_text.strip()!r} is not JSON ({err}); write it as e.g. {_EXAMPLE}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"the spec {spec_text.strip()!r} is not a JSON object; write it as e.g. {_EXAMPLE}")
    try:
        table = table_from_spec(spec, folder)
    except KeyError as err:
        raise ValueError(f"the spec {spec_text.strip()!r} lacks {err}, or its data files do") from None
    return markdown_table(table, bold_best=bool(spec.get("bold_best")), exclude_best=spec.get("exclude_best", ()))


def regenerate_markdown(text: str, folder: str | Path) -> tuple[str, int]:
    """``text`` with every generated region rebuilt from the data in ``folder``, and how many regions there were.

    Raises ``ValueError`` naming the region's spec when a spec is malformed or its data is missing.
    """
    folder = Path(folder)
    found = 0

    def rebuild(match: re.Match) -> str:
        nonlocal found
        found += 1
        # blank lines around the table: a marker right next to it could be read as one of its rows
        return match.group(1) + "\n" + _render(match.group("spec"), folder) + "\n" + match.group(4)

    return REGION.sub(rebuild, text), found


def changed_regions(before: str, after: str) -> list[int]:
    """Line numbers (1-based, in ``before``) of the regions whose table differs between the two texts."""
    old, new = list(REGION.finditer(before)), list(REGION.finditer(after))
    return [before.count("\n", 0, a.start()) + 1 for a, b in zip(old, new) if a.group("body") != b.group("body")]
