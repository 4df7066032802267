"""Keeping a run's finished work on disk: output checks up front, atomic writes, a resumable record.

Evaluations and benchmarks run for minutes to hours, and used to write everything only at the end:
a Ctrl-C lost every finished trial, and an ``--out`` that could not be written was discovered
only after the whole run, as a traceback. Three pieces fix that, shared by every ``lacache eval``
and ``lacache bench`` command (and ``lacache generate --json``):

* :func:`check_output_folder` / :func:`check_output_file` refuse a destination that cannot be
  written *before* any model is loaded, by really creating (and removing) a probe file there;
* :func:`atomic_write` writes a file through a temporary file in the same folder moved into place
  with ``os.replace``, so an interruption leaves the old file or the new one, never half of one;
* :class:`RunProgress` keeps ``<out>/<name>.progress.json``: the settings that give the run's rows
  their meaning and every finished trial (or benchmark configuration), rewritten atomically as each
  one completes. ``--resume`` reads it back so only what is missing runs again.

A run split across processes (:mod:`.distributed`) keeps one record per process, so no two
processes ever write the same file: the main process writes ``<name>.progress.json``, every other
one ``<name>.rank<N>.progress.json``. Opening a run reads them all (an interrupted distributed run
is resumed by any number of processes, one included), and the main process folds the others'
records into its own when the run is finished.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

__all__ = [
    "PROGRESS_SUFFIX",
    "RunProgress",
    "atomic_write",
    "check_output_file",
    "check_output_folder",
    "part_path",
    "progress_path",
]

#: the record of a run sits next to its results: ``<out>/<name>.progress.json``
PROGRESS_SUFFIX = ".progress.json"
#: version of the record's layout; a record of another version is refused, not misread
_FORMAT = 1


def _temporary_name(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _create_exclusive(path: Path) -> int:
    """Create ``path`` (it must not exist) for writing, with the permissions ``open(path, "w")`` gives."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[str]], None], *, newline: str | None = None,
                 encoding: str | None = None) -> None:
    """Write ``path`` as ``write(fh)`` writes it, all or nothing.

    The text goes to a temporary file in the same folder, which then replaces ``path`` in one
    ``os.replace``. If ``write`` raises (or the run is interrupted) the temporary file is removed
    and whatever ``path`` held before is left as it was. ``newline`` and ``encoding`` are passed to
    ``open`` (``newline=""`` for the csv module).
    """
    path = Path(path)
    temporary = _temporary_name(path)
    descriptor = _create_exclusive(temporary)
    try:
        with open(descriptor, "w", newline=newline, encoding=encoding) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def _probe_writable(folder: Path, option: str, shown: str, example: str) -> None:
    """Create and remove a file in ``folder``: the only sure test that a run can write its results there."""
    probe = _temporary_name(folder / "write-probe")
    try:
        os.close(_create_exclusive(probe))
    except OSError as err:
        raise ValueError(f"{option} {shown}: cannot write in {str(folder)!r} ({err.strerror or err}); "
                         f"give a place you can write to, e.g. {option} {example}") from None
    with suppress(OSError):
        os.unlink(probe)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists: where the folders still missing would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(folder: Path, option: str, shown: str, example: str) -> None:
    """``folder`` exists or can be created, and files can be written where it is (or will be)."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"{option} {shown}: cannot create {str(folder)!r}, {str(existing)!r} is a file; give a "
                         f"path in a folder that exists or can be created, e.g. {option} {example}")
    _probe_writable(existing, option, shown, example)


def check_output_folder(path: str | os.PathLike, option: str = "--out", example: str = "runs/results") -> Path:
    """The results folder ``path``, once it is known that it exists or can be created and can be written.

    Called before a model is loaded, so a bad destination costs nothing: a ``ValueError`` naming
    ``option``, the path and a value that works when ``path`` is a file, cannot be created (a file
    stands where one of its folders should be) or cannot be written to. Nothing is created here
    (a run that fails later for another reason leaves no empty folder behind); the run creates the
    folder when it writes its first result.
    """
    folder = Path(path)
    shown = repr(str(path))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {shown} is a file, not a folder; the results are several files, so give a "
                         f"folder, e.g. {option} {example}")
    _check_creatable(folder, option, shown, example)
    return folder


def check_output_file(path: str | os.PathLike, option: str, example: str = "run.json") -> Path:
    """The file ``path``, once it is known that it can be written (its folder exists or can be created).

    Nothing is created or touched here (an earlier file stays until the run replaces it); a
    ``ValueError`` naming ``option`` and the path when ``path`` is a folder, or its folder cannot
    be created or written to.
    """
    target = Path(path)
    shown = repr(str(path))
    if target.is_dir():
        raise ValueError(f"{option} {shown} is a folder; give a file name, e.g. {option} {example}")
    _check_creatable(target.parent, option, shown, example)
    return target


def progress_path(folder: str | os.PathLike, name: str) -> Path:
    """Where the record of run ``name`` in ``folder`` lives."""
    return Path(folder) / f"{name}{PROGRESS_SUFFIX}"


def part_path(folder: str | os.PathLike, name: str, rank: int) -> Path:
    """Where process ``rank`` (not the main one) of a distributed run ``name`` keeps its own record."""
    return Path(folder) / f"{name}.rank{rank}{PROGRESS_SUFFIX}"


def _part_paths(folder: str | os.PathLike, name: str) -> list[Path]:
    """The per-process records of run ``name`` in ``folder``, by rank."""
    found = Path(folder).glob(f"{name}.rank*{PROGRESS_SUFFIX}")
    ranks = {path: path.name[len(name) + 5 : -len(PROGRESS_SUFFIX)] for path in found}
    return sorted((path for path, rank in ranks.items() if rank.isdigit()), key=lambda path: int(ranks[path]))


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings), so settings compare."""
    return json.loads(json.dumps(value))


def _differences(recorded: Mapping, now: Mapping) -> list[str]:
    """``"name: recorded X, now Y"`` for every setting that differs."""
    return [f"{key}: recorded {recorded.get(key)!r}, now {now.get(key)!r}"
            for key in dict.fromkeys([*recorded, *now]) if recorded.get(key) != now.get(key)]


def _counted(count: int, noun: str) -> str:
    """``"3 finished trials"``, ``"1 finished trial"``: ``noun`` is plural (its main word ends in s)."""
    if count == 1:
        word, paren, rest = noun.partition(" (")
        noun = word.removesuffix("s") + paren + rest
    return f"{count} finished {noun}"


def _unfinished_error(folder: str | os.PathLike, path: Path, count: int, noun: str, parts: int = 0) -> ValueError:
    where = f"{str(path)!r}" + (f" and {parts} per-process record(s) beside it" if parts else "")
    delete = path.name + (f" and {path.name.removesuffix(PROGRESS_SUFFIX)}.rank*{PROGRESS_SUFFIX}" if parts else "")
    return ValueError(f"--out {str(folder)!r} holds an unfinished run ({_counted(count, noun)}, recorded in "
                      f"{where}); add --resume to finish it, or delete {delete} to start over")


def _union(records: list[dict]) -> list[dict]:
    """The finished entries of several records, one per key (the first record that has a key wins)."""
    entries: dict[tuple, dict] = {}
    for record in records:
        for entry in record.get("finished", []):
            entries.setdefault(tuple(entry["key"]), entry)
    return list(entries.values())


class RunProgress:
    """The finished trials (or benchmark configurations) of one run, kept in ``<out>/<name>.progress.json``.

    Each finished item is stored under a key (a tuple of plain values naming it, e.g. ``(length,
    depth, seed, method)``) with its row, and the whole record is rewritten atomically after each
    one, so an interrupted run keeps everything it finished. The record also holds ``settings``
    (what gives every row its meaning, e.g. the model and the budget: all must match to resume)
    and ``method_settings`` (per method, e.g. its options: must match for the methods both runs
    have; a method new to the command just runs). Use :meth:`open`, then :attr:`finished` to skip
    work, :meth:`add` as each item finishes, :meth:`finish` once the results are written.

    In a distributed run every process but the main one writes its own record (``part``, its
    rank; see the module's docstring) while :attr:`finished` holds what all the records hold.
    """

    def __init__(self, path: Path, command: str, settings: Mapping, method_settings: Mapping[str, Any],
                 encode: Callable[[Any], Any], decode: Callable[[Any], Any], entries: list[dict] | None = None,
                 noun: str = "trials", part: int | None = None, known: list[dict] | None = None):
        self.path = path
        #: the rank whose own record this is; None for the run's main record
        self.part = part
        self._name = path.name.removesuffix(PROGRESS_SUFFIX).removesuffix("" if part is None else f".rank{part}")
        self.command = command
        #: what one finished item is called in messages ("trials", "configurations")
        self.noun = noun
        self.settings = _plain(dict(settings))
        self.method_settings = _plain(dict(method_settings))
        self._encode = encode
        self._entries: list[dict] = list(entries or [])
        try:
            #: key (a tuple) -> the decoded row of every finished item, recorded runs included
            self.finished: dict[Hashable, Any] = {tuple(e["key"]): decode(e["row"])
                                                  for e in _union([{"finished": self._entries + list(known or [])}])}
        except (KeyError, TypeError, ValueError) as err:  # written by a lacache whose rows had other fields
            raise ValueError(f"cannot read the rows recorded in {str(path)!r} ({err}); delete it to start over") from None

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        name: str,
        command: str,
        settings: Mapping,
        *,
        resume: bool = False,
        method_settings: Mapping[str, Any] | None = None,
        encode: Callable[[Any], Any] = lambda row: row,
        decode: Callable[[Any], Any] = lambda row: row,
        noun: str = "trials",
        part: int | None = None,
    ) -> RunProgress:
        """The record of run ``name`` in ``folder`` (checked with :func:`check_output_folder` first).

        Without ``resume`` an unfinished earlier run there is refused (its finished work would be
        overwritten: add ``--resume`` or delete its record), and a finished one is started over as
        before. With ``resume`` the earlier record's finished items are reused when its settings
        match; a ``ValueError`` lists the settings that differ. ``encode``/``decode`` turn a row
        into JSON-ready values and back; ``noun`` names an item in messages. The per-process records
        of a distributed run count as part of the run; ``part`` (a rank other than 0) makes this
        process write its own record instead of the main one.
        """
        path = progress_path(folder, name)
        own = path if part is None else part_path(folder, name, part)
        method_settings = dict(method_settings or {})
        fresh = cls(own, command, settings, method_settings, encode, decode, noun=noun, part=part)
        records = cls._records(folder, name)
        if not records:
            if resume and part is None:
                print(f"[lacache] --resume: no earlier run in {str(folder)!r} ({path.name}); starting from the beginning",
                      file=sys.stderr)
            return fresh
        if not resume:
            cls._refuse(folder, name, records, noun)
            return fresh
        for recorded_path, record in records.items():
            problems = _differences(record.get("settings", {}), fresh.settings)
            recorded_methods = record.get("method_settings", {})
            for method in recorded_methods.keys() & fresh.method_settings.keys():
                if recorded_methods[method] != fresh.method_settings[method]:
                    problems.append(f"{method}: recorded {recorded_methods[method]!r}, now {fresh.method_settings[method]!r}")
            if record.get("command") != command:
                problems.insert(0, f"command: recorded {record.get('command')!r}, now {command!r}")
            if problems:
                raise ValueError(
                    f"--resume: the run recorded in {str(recorded_path)!r} used other settings ({'; '.join(problems)}); "
                    f"resume with the recorded settings, or give another --out (or delete {recorded_path.name}) to "
                    f"start over"
                )
        merged = {}
        for record in records.values():
            merged.update(record.get("method_settings", {}))
        merged.update(fresh.method_settings)
        everything = _union(list(records.values()))
        # the main record takes in what the other processes recorded; a process's own record keeps its own
        entries = everything if part is None else records.get(own, {}).get("finished", [])
        progress = cls(own, command, settings, merged, encode, decode, entries, noun=noun, part=part, known=everything)
        if part is None:
            print(f"[lacache] --resume: {_counted(len(everything), noun)} recorded in {str(path)!r}"
                  f"{' and the per-process records beside it' if len(records) > (path in records) else ''} reused",
                  file=sys.stderr)
        return progress

    @classmethod
    def _records(cls, folder: str | os.PathLike, name: str) -> dict[Path, dict]:
        """The run's main record (if any) and its per-process records, read, by path."""
        paths = [progress_path(folder, name), *_part_paths(folder, name)]
        return {path: cls._read(path) for path in paths if path.exists()}

    @staticmethod
    def _refuse(folder: str | os.PathLike, name: str, records: Mapping[Path, dict], noun: str) -> None:
        """Refuse to start over where records hold finished work of a run that did not complete."""
        unfinished = [r for r in records.values() if not r.get("complete") and r.get("finished")]
        if unfinished:
            path = progress_path(folder, name)
            raise _unfinished_error(folder, path, len(_union(unfinished)), noun,
                                    parts=sum(p != path for p in records))

    @classmethod
    def refuse_unfinished(cls, folder: str | os.PathLike, name: str, noun: str = "trials") -> None:
        """The ``ValueError`` :meth:`open` without ``resume`` would raise for run ``name`` in ``folder``,
        raised now: for a command that runs several benchmarks, before the first one starts."""
        cls._refuse(folder, name, cls._records(folder, name), noun)

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            with open(path, encoding="utf-8") as fh:
                record = json.load(fh)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the run record {str(path)!r} ({err}); delete it to start over") from None
        if not isinstance(record, dict) or record.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a run record this lacache writes (format {_FORMAT}); "
                             f"delete it to start over")
        return record

    @property
    def count(self) -> int:
        """How many items are recorded as finished."""
        return len(self._entries)

    def add(self, key: tuple, row: Any) -> None:
        """Record one finished item under ``key`` and rewrite the record at once (atomically).

        The row is stored as it is now (a JSON copy): later changes to the object do not leak into it.
        """
        entry = {"key": list(key), "row": _plain(self._encode(row))}
        entries = [e for e in self._entries if tuple(e["key"]) != tuple(key)] + [entry]
        self._save(entries, complete=False)  # first on disk, then counted: messages never claim more than is kept
        self._entries = entries
        self.finished[tuple(key)] = row

    def finish(self) -> None:
        """Mark the run complete (its results are written): a later run without ``--resume`` starts over.

        The main record first takes in the per-process records of a distributed run (whoever ran
        it, or resumed it) and they are removed; a per-process record is left for the main process.
        """
        if self.part is not None:
            return
        parts = _part_paths(self.path.parent, self._name)
        if parts:  # kept in the main record before they go: an interruption here loses nothing
            self._entries = _union([{"finished": self._entries}, *(self._read(path) for path in parts)])
            self._save(self._entries, complete=False)
            for path in parts:
                path.unlink(missing_ok=True)
        self._save(self._entries, complete=True)

    def save(self) -> None:
        """Write the record as it stands (a distributed run's main process does so before any work starts,
        so that its record and the other processes' describe the same run)."""
        self._save(self._entries, complete=False)

    def _everything(self) -> int:
        """How many items this record and the run's per-process records hold (best effort: for messages)."""
        records = [{"finished": self._entries}]
        for path in _part_paths(self.path.parent, self._name):
            with suppress(ValueError, OSError):
                records.append(self._read(path))
        return len(_union(records))

    def _save(self, entries: list[dict], complete: bool) -> None:
        record = {"format": _FORMAT, "command": self.command, "complete": complete, "settings": self.settings,
                  "method_settings": self.method_settings, "finished": entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda fh: json.dump(record, fh, indent=1), encoding="utf-8")

    @contextmanager
    def keep_on_interrupt(self) -> Iterator[RunProgress]:
        """On Ctrl-C: say on stderr what was kept and how to go on, then let the interrupt end the command."""
        try:
            yield self
        except KeyboardInterrupt:
            if self.part is not None:  # the main process says it for the whole run
                raise
            folder = self.path.parent
            count = self._everything()
            if count:
                print(f"\n[lacache] interrupted: {_counted(count, self.noun)} kept in {str(folder)!r} "
                      f"({self.path.name}); run the same command with --resume to finish the rest",
                      file=sys.stderr)
            else:
                print(f"\n[lacache] interrupted before any of its {self.noun} finished; nothing to resume in "
                      f"{str(folder)!r}", file=sys.stderr)
            raise
