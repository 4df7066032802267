"""Result records in one shape, whether read from a run's JSON or from a CSV kept with the docs.

The tables of the report and of docs/results.md are built from the same records, so a table in the
docs shows what its CSV holds and a run folder shows the same table. The JSON side reads what
the evaluations write (``ppl.json`` results, ``passkey.json`` / ``ruler.json`` trials); the CSV side
reads the files ``--out`` also gets (``ppl.csv`` holds per-window rows followed by one row per
result covering the whole text). Readers are lenient about extra keys, strict about the ones a
table needs: a missing one raises ``KeyError``/``ValueError``, which the report shows as a run it
does not recognise.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "PasskeyRecord",
    "PplRecord",
    "RulerRecord",
    "passkey_from_csv",
    "passkey_from_payload",
    "ppl_from_csv",
    "ppl_from_payload",
    "read_csv",
    "renamed",
    "ruler_from_csv",
    "ruler_from_payload",
]


@dataclass(frozen=True)
class PplRecord:
    """One streaming-perplexity result: a method at a budget on one text (``budget`` None: full cache)."""

    method: str
    budget: int | None
    ppl: float
    text: str = ""
    windows: tuple[tuple[int, int, float], ...] = ()
    source: str = ""  # the run it came from, when a table shows several runs side by side


@dataclass(frozen=True)
class PasskeyRecord:
    """One pass-key trial."""

    method: str
    length: int
    depth: float
    seed: int
    correct: bool
    source: str = ""


@dataclass(frozen=True)
class RulerRecord:
    """One RULER-style trial (``score`` is the string-match score in [0, 1])."""

    method: str
    task: str
    length: int
    seed: int
    score: float
    source: str = ""


def _budget(value) -> int | None:
    """A CSV/JSON budget cell: empty or None for the full cache."""
    if value is None or value == "":
        return None
    return int(float(value))


def _bool(value) -> bool:
    """``True``/``False`` as the CSV writer spells them, or a JSON boolean."""
    if isinstance(value, bool):
        return value
    if str(value) in ("True", "true", "1"):
        return True
    if str(value) in ("False", "false", "0"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header line, as dicts."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def renamed(records: Iterable, rename: Mapping[str, str]):
    """``records`` with their methods relabelled (``{old: new}``), e.g. a method's name at the time of a run."""
    return [replace(r, method=rename.get(r.method, r.method)) for r in records]


def ppl_from_payload(payload: Mapping, source: str = "") -> list[PplRecord]:
    """The results of a ``ppl.json`` written by ``lacache eval ppl``."""
    return [
        PplRecord(method=str(r["method"]), budget=_budget(r.get("budget")), ppl=float(r["ppl"]),
                  text=str(r.get("text") or ""), windows=tuple((int(a), int(b), float(p)) for a, b, p in
                                                               r.get("windows") or ()), source=source)
        for r in payload["results"]
    ]


def _overall(rows: list[dict[str, str]]) -> tuple[float, list[dict[str, str]]]:
    """(PPL over the whole text, window rows) of one result's CSV rows.

    The writer appends, after every window row, one row per result spanning the whole text; when a
    file has no such row (an older layout) the windows are combined, each weighted by its tokens.
    """
    spans = [(int(r["first"]), int(r["last"])) for r in rows]
    last = max(b for _, b in spans)
    if len(rows) > 1 and spans[-1] == (1, last):
        return float(rows[-1]["ppl"]), rows[:-1]
    weights = [b - a for a, b in spans]
    total = sum(weights)
    if total <= 0:
        raise ValueError("perplexity windows cover no tokens")
    nll = sum(w * math.log(float(r["ppl"])) for w, r in zip(weights, rows)) / total
    return math.exp(nll), rows


def ppl_from_csv(path: str | Path, source: str = "") -> list[PplRecord]:
    """The results of a ``ppl.csv`` (one per text, method and budget, in the order the file has them)."""
    groups: dict[tuple[str, str, int | None], list[dict[str, str]]] = {}
    for row in read_csv(path):
        groups.setdefault((row.get("text") or "", row["method"], _budget(row["budget"])), []).append(row)
    records = []
    for (text, method, budget), rows in groups.items():
        ppl, windows = _overall(rows)
        records.append(PplRecord(method=method, budget=budget, ppl=ppl, text=text, source=source,
                                 windows=tuple((int(r["first"]), int(r["last"]), float(r["ppl"])) for r in windows)))
    return records


def passkey_from_payload(payload: Mapping, source: str = "") -> list[PasskeyRecord]:
    """The trials of a ``passkey.json`` written by ``lacache eval passkey``."""
    return [PasskeyRecord(str(t["method"]), int(t["length"]), float(t["depth"]), int(t.get("seed", 0)),
                          _bool(t["correct"]), source) for t in payload["trials"]]


def passkey_from_csv(path: str | Path, source: str = "") -> list[PasskeyRecord]:
    """The trials of a ``passkey.csv``."""
    return [PasskeyRecord(r["method"], int(r["length"]), float(r["depth"]), int(r.get("seed") or 0),
                          _bool(r["correct"]), source) for r in read_csv(path)]


def ruler_from_payload(payload: Mapping, source: str = "") -> list[RulerRecord]:
    """The trials of a ``ruler.json`` written by ``lacache eval ruler``."""
    return [RulerRecord(str(t["method"]), str(t["task"]), int(t["length"]), int(t.get("seed", 0)),
                        float(t["score"]), source) for t in payload["trials"]]


def ruler_from_csv(path: str | Path, source: str = "") -> list[RulerRecord]:
    """The trials of a ``ruler.csv``."""
    return [RulerRecord(r["method"], r["task"], int(r["length"]), int(r.get("seed") or 0), float(r["score"]), source)
            for r in read_csv(path)]
