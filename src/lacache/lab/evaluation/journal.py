"""A run's journal on disk: one JSON line appended per finished item, read back by ``--resume``.

The record of a run used to be one JSON document rewritten whole after every finished item, so a
run of N items wrote O(N²) bytes (hours of small trials, or thousands of benchmark configurations,
spent more time saving than working). A journal is appended to instead: keeping an item costs the
bytes of its own line, flushed and ``fsync``-ed before the item counts as kept.

``<out>/<name>.progress.jsonl``, one JSON object per line:

* line 1, the header, written whole (atomically) when the journal starts:
  ``{"format": 2, "command": "eval passkey", "settings": {...}, "method_settings": {...}}`` —
  what ``--resume`` compares with the command being resumed;
* then one line per finished item, ``{"key": [100, 0.5, 0, "full"], "row": {...}}`` (a later line
  with the same key replaces an earlier one);
* ``{"complete": true}`` once the run's results are written (an item after it reopens the run).

An interruption can only cut the line being written: a last line without its newline, or one that
does not parse, is ignored on reading (that item runs again). Any other damage is refused with the
advice to delete the file. A journal is started afresh (header and every item it keeps, in one
atomic write) by each run that writes to it, so appends always follow whole lines.

A distributed run keeps one journal per process: ``<name>.progress.jsonl`` for the main one,
``<name>.rank<N>.progress.jsonl`` for the others. Records of an earlier lacache, one JSON document
``<name>.progress.json`` (format 1) and ``<name>.rank<N>.progress.json``, are still read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write

__all__ = [
    "FORMAT",
    "LEGACY_SUFFIX",
    "SUFFIX",
    "Journal",
    "append",
    "existing",
    "is_progress_file",
    "legacy_path",
    "part_path",
    "part_paths",
    "progress_path",
    "read",
    "read_record",
    "start",
]

#: a run's journal sits next to its results: ``<out>/<name>.progress.jsonl``
SUFFIX = ".progress.jsonl"
#: the one-document record an earlier lacache kept instead (read, never written)
LEGACY_SUFFIX = ".progress.json"
#: version of the journal's layout; a journal of another version is refused, not misread
FORMAT = 2
_LEGACY_FORMAT = 1


@dataclass
class Journal:
    """What a run's journal (or an earlier lacache's record) holds."""

    #: the file it was read from
    path: Path
    command: str | None
    settings: dict
    method_settings: dict
    #: key (a tuple) -> ``{"key": [...], "row": ...}``, in the order the items finished
    entries: dict[tuple, dict] = field(default_factory=dict)
    complete: bool = False

    @property
    def finished(self) -> list[dict]:
        """The finished entries, as a list (the layout records had before journals)."""
        return list(self.entries.values())

    def as_record(self) -> dict:
        """Everything as one dict (``format``, ``command``, ``complete``, ``settings``,
        ``method_settings``, ``finished``): what tests and tools compare, whatever the file's layout."""
        return {"format": FORMAT, "command": self.command, "complete": self.complete, "settings": self.settings,
                "method_settings": self.method_settings, "finished": self.finished}


# --------------------------------------------------------------------------- where journals are
def progress_path(folder: str | os.PathLike, name: str) -> Path:
    """Where the journal of run ``name`` in ``folder`` lives (the main process's)."""
    return Path(folder) / f"{name}{SUFFIX}"


def part_path(folder: str | os.PathLike, name: str, rank: int) -> Path:
    """Where process ``rank`` (not the main one) of a distributed run ``name`` keeps its own journal."""
    return Path(folder) / f"{name}.rank{rank}{SUFFIX}"


def legacy_path(path: Path) -> Path:
    """The record an earlier lacache kept where ``path`` (a journal's path) is now."""
    return path.with_name(path.name.removesuffix(SUFFIX) + LEGACY_SUFFIX)


def is_progress_file(name: str) -> bool:
    """Whether a file called ``name`` is a run's journal or an earlier record (not a result)."""
    return name.endswith(SUFFIX) or name.endswith(LEGACY_SUFFIX)


def part_paths(folder: str | os.PathLike, name: str) -> list[Path]:
    """The journal paths of the other processes of run ``name`` that left one (or an earlier record), by rank."""
    ranks: dict[int, Path] = {}
    for suffix in (SUFFIX, LEGACY_SUFFIX):
        for path in Path(folder).glob(f"{name}.rank*{suffix}"):
            rank = path.name[len(name) + 5 : -len(suffix)]
            if rank.isdigit():
                ranks.setdefault(int(rank), part_path(folder, name, int(rank)))
    return [ranks[rank] for rank in sorted(ranks)]


def existing(path: Path) -> Path | None:
    """The file that holds the journal ``path`` names: the journal, else an earlier record, else None."""
    for candidate in (path, legacy_path(path)):
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- writing
def _line(value: Any) -> str:
    """``value`` as one journal line (compact JSON, ASCII only, so a line's bytes are its characters)."""
    return json.dumps(value, separators=(",", ":")) + "\n"


def start(path: Path, command: str, settings: Mapping, method_settings: Mapping, entries: Iterable[dict]) -> None:
    """Write the journal ``path`` afresh: the header and ``entries``, all or nothing.

    Replaces what ``path`` held and removes an earlier lacache's record beside it (the journal now
    holds what it kept), so only one file describes the run.
    """
    header = {"format": FORMAT, "command": command, "settings": dict(settings),
              "method_settings": dict(method_settings)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.writelines([_line(header), *(_line(e) for e in entries)]), encoding="utf-8")
    legacy_path(path).unlink(missing_ok=True)


def append(path: Path, lines: Iterable[Mapping]) -> None:
    """Append ``lines`` to the journal ``path`` and make them durable (flush and ``fsync``) before returning."""
    text = "".join(_line(dict(line)) for line in lines)
    if not text:
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------- reading
def _damaged(path: Path, why: str) -> ValueError:
    return ValueError(f"cannot read the run record {str(path)!r} ({why}); delete it to start over")


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _read_journal(path: Path) -> Journal:
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    lines.pop()  # "" after the last newline, or a line cut short by an interruption: ignored either way
    header = _parse(lines[0]) if lines else None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a run record this lacache writes (a journal of format {FORMAT} "
                         f"starts with its header line); delete it to start over")
    journal = Journal(path, header.get("command"), dict(header.get("settings") or {}),
                      dict(header.get("method_settings") or {}))
    for number, line in enumerate(lines[1:], start=2):
        value = _parse(line)
        if not isinstance(value, dict):
            if number == len(lines):  # the last line, cut or garbled by an interruption: that item runs again
                break
            raise _damaged(path, f"line {number} is not a JSON object")
        if value.get("complete") is True:
            journal.complete = True
        elif "key" in value and "row" in value and isinstance(value["key"], list):
            key = tuple(value["key"])
            journal.entries.pop(key, None)  # a later line for the same item replaces the earlier one
            journal.entries[key] = value
            journal.complete = False
        else:
            raise _damaged(path, f"line {number} is neither a finished item nor the end of the run")
    return journal


def _read_legacy(path: Path) -> Journal:
    """A record an earlier lacache wrote: one JSON document of format 1."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except ValueError as err:
        raise _damaged(path, str(err)) from None
    if not isinstance(record, dict) or record.get("format") != _LEGACY_FORMAT:
        raise ValueError(f"{str(path)!r} is not a run record this lacache reads (format {_LEGACY_FORMAT} or a "
                         f"{SUFFIX} journal); delete it to start over")
    entries = {}
    for entry in record.get("finished", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), list) or "row" not in entry:
            raise _damaged(path, f"a finished entry is not {{'key': [...], 'row': ...}}: {entry!r:.80}")
        entries[tuple(entry["key"])] = entry
    return Journal(path, record.get("command"), dict(record.get("settings") or {}),
                   dict(record.get("method_settings") or {}), entries, bool(record.get("complete")))


def read(path: Path) -> Journal:
    """The journal (``.progress.jsonl``) or earlier record (``.progress.json``) in ``path``.

    A ``ValueError`` saying to delete the file when it cannot be read or is no run record.
    """
    try:
        return _read_legacy(path) if path.name.endswith(LEGACY_SUFFIX) else _read_journal(path)
    except OSError as err:
        raise _damaged(path, err.strerror or str(err)) from None


def read_record(path: str | os.PathLike) -> dict:
    """What the journal ``path`` (or the earlier record in its place) holds, as one dict: see
    :meth:`Journal.as_record`."""
    path = Path(path)
    return read(existing(path) or path).as_record()
