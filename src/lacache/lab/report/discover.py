"""Finding the results in run folders, and telling what each one is.

Every ``lacache eval`` and ``lacache bench`` command leaves ``<out>/<name>.json`` next to its CSV
and PNG (and a ``<name>.progress.jsonl`` journal, which is not a result). The folders given to
``lacache report`` are searched recursively. A result file says what it is: its ``"kind"``
(``"eval.ppl"``, ``"bench.decode"``, ``"inspect"``, ...) and ``"schema"`` (:mod:`lacache.lab.results`);
the report shows it in the section its kind names, once its layout holds what the tables need.

Files written before results carried a kind are still read: for them alone the kind is guessed
from the content and the file name (:func:`_guess_kind`, the fallback). A JSON that carries a
lacache result name (``ppl.json``, ``decode.json``, ...) or a kind but not a layout this version
reads is kept as *not recognised*, with the reason, so a run made by an older (or later) lacache is
shown rather than dropped or misread; any other JSON is listed as a foreign file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..evaluation.journal import is_progress_file
from ..results import BENCHMARKS, EVALUATIONS, INSPECT, declared_kind, section

__all__ = ["BENCHMARKS", "EVALUATIONS", "Discovery", "Result", "classify", "discover"]

#: the report's sections, one per kind of result (``"ppl"`` holds the ``eval.ppl`` files), in page order
_NAMES = (*EVALUATIONS, *BENCHMARKS, INSPECT)
_EXAMPLE = "lacache report runs/ -o report.html"


@dataclass
class Result:
    """One result file and its ``kind``: the report's section (``"ppl"``, ``"decode"``, ``"inspect"``, ...:
    the file's own ``"kind"`` without its family, ``"eval.ppl"`` -> ``"ppl"``); ``None``: not recognised."""

    path: Path
    label: str  # where it is, as the report names it (the folder relative to the folder given)
    kind: str | None
    payload: Any = None
    problem: str | None = None  # why it is not recognised

    @property
    def run(self) -> Mapping | None:
        """The run record (command, versions, machine), or ``None`` for a run made before it existed."""
        record = self.payload.get("run") if isinstance(self.payload, dict) else None
        return record if isinstance(record, dict) else None


@dataclass
class Discovery:
    """What the folders hold: recognised results, lacache-named files not recognised, and other JSON."""

    results: list[Result] = field(default_factory=list)
    unrecognised: list[Result] = field(default_factory=list)
    foreign: list[Result] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)

    def of(self, kind: str) -> list[Result]:
        """The recognised results of ``kind``, in folder order."""
        return [r for r in self.results if r.kind == kind]


def _rows_of_dicts(value: Any, *keys: str) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) and all(k in v for k in keys) for v in value)


def _layout_problem(kind: str, payload: Any) -> str | None:
    """Why ``payload`` is not the ``kind`` result this version writes (``None``: it is)."""
    if not isinstance(payload, dict):
        return f"holds a JSON {type(payload).__name__}, not an object"
    needs: dict[str, tuple[str, tuple[str, ...]]] = {
        "ppl": ("results", ("method", "budget", "ppl")),
        "passkey": ("trials", ("method", "length", "depth", "correct")),
        "ruler": ("trials", ("method", "task", "length", "score")),
        "longbench": ("samples", ("method", "dataset", "score")),
        "decode": ("summary", ("method",)),
        "memory": ("rows", ("method",)),
        "stream": ("samples", ("tokens",)),
        "cache": ("summary", ("layers", "budget", "positions")),
        "prefill": ("rows", ()),
    }
    if kind == "inspect":
        return None if isinstance(payload.get("figures", []), list) else "its 'figures' is not a list of file names"
    if kind == "vllm":
        return None if ("stream" in payload or "capacity" in payload) else "has neither 'stream' nor 'capacity'"
    key, fields = needs[kind]
    if key not in payload:
        return f"has no {key!r} (keys: {', '.join(sorted(payload)) or 'none'})"
    if not _rows_of_dicts(payload[key], *fields):
        return f"its {key!r} entries lack some of {', '.join(fields)}"
    if kind == "longbench" and not isinstance(payload.get("summary"), dict):
        return "has no 'summary' of scores"
    if kind == "prefill" and not isinstance(payload.get("summary"), dict):
        return "has no 'summary'"
    return None


def _guess_kind(stem: str, payload: Any) -> str | None:
    """FALLBACK for files that declare no ``kind`` (written before results carried one): the section
    their content suggests (the benchmarks' ``"benchmark"`` key), else their file name's."""
    if isinstance(payload, dict):
        if payload.get("kind") == INSPECT:
            return INSPECT
        bench = payload.get("benchmark")
        if bench == "decode" and stem == "memory":  # memory.json repeats the decode run's payload
            return "memory"
        if bench in BENCHMARKS:
            return bench
    return stem if stem in _NAMES else None


def classify(path: Path, label: str) -> Result | None:
    """The result in ``path`` (recognised or not), or ``None`` when it is not a lacache result at all."""
    stem = path.name[: -len(".json")]
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        if stem not in _NAMES:
            return None
        return Result(path, label, None, problem=f"could not be read as JSON ({err})")
    declared, problem = declared_kind(payload)
    if problem is not None:
        return Result(path, label, None, payload, problem=problem)
    kind = section(declared) if declared is not None else _guess_kind(stem, payload)
    if kind is None:
        return None
    problem = _layout_problem(kind, payload)
    if problem is not None:
        return Result(path, label, None, payload, problem=problem)
    return Result(path, label, kind, payload)


def _label(path: Path, root: Path) -> str:
    """The result's folder as the report names it: the folder given, then the path inside it."""
    inside = path.parent.relative_to(root).as_posix()
    return root.name if inside == "." else f"{root.name}/{inside}"


def _json_files(folder: Path) -> Iterable[Path]:
    """Every JSON below ``folder`` except run records (an earlier lacache's ``.progress.json``) and hidden
    (e.g. half-written) files."""
    for path in sorted(folder.rglob("*.json")):
        if is_progress_file(path.name) or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        if path.is_file():
            yield path


def _found(folders: Sequence[Path]) -> str:
    """A short account of what the folders hold, for the error that says nothing usable is there."""
    files = [p for f in folders for p in sorted(f.rglob("*")) if p.is_file()]
    if not files:
        return "they are empty"
    shown = ", ".join(str(p) for p in files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    return f"found {len(files)} file(s): {shown}"


def discover(folders: Sequence[str | Path]) -> Discovery:
    """The results in ``folders`` (searched recursively).

    Raises ``ValueError`` when a folder does not exist, or when none of them holds anything a
    lacache command wrote (naming what was found instead).
    """
    if not folders:
        raise ValueError(f"give at least one run folder, e.g. {_EXAMPLE}")
    found = Discovery(folders=[Path(f) for f in folders])
    for folder in found.folders:
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise ValueError(f"run folder {str(folder)!r} {what}; give folders that `lacache eval` or "
                             f"`lacache bench` wrote with --out, e.g. {_EXAMPLE}")
        root = folder.resolve()
        for path in _json_files(root):
            result = classify(path, _label(path, root))
            if result is None:
                found.foreign.append(Result(path, _label(path, root), None, problem="not a lacache result"))
            elif result.kind is None:
                found.unrecognised.append(result)
            else:
                found.results.append(result)
    if not found.results and not found.unrecognised:
        names = ", ".join(repr(str(f)) for f in folders)
        raise ValueError(f"no lacache results in {names}: {_found(found.folders)}; a run folder holds the "
                         f"<name>.json (ppl.json, passkey.json, decode.json, ...) that `lacache eval` or "
                         f"`lacache bench` writes with --out, e.g. {_EXAMPLE}")
    return found
