"""The finished work of one run, kept as it finishes so an interrupted run can be resumed.

:class:`RunProgress` is what every ``lacache eval`` and ``lacache bench`` command holds while it
runs: :meth:`RunProgress.open` decides whether an earlier run in ``--out`` is refused (unfinished,
without ``--resume``), reused (``--resume`` with the same settings) or started over; :meth:`add`
keeps each finished item (one line appended to the run's journal, :mod:`.journal`), and
:meth:`finish` marks the run complete once its results are written.

A run split across processes (:mod:`.distributed`) keeps one journal per process, so no two
processes ever write the same file. Opening a run reads them all (an interrupted distributed run
is resumed by any number of processes, one included), and the main process folds the others'
journals into its own when the run is finished.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from . import journal
from .journal import Journal

__all__ = ["RunProgress"]


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


def _union(records: list[Journal | dict[tuple, dict]]) -> dict[tuple, dict]:
    """The finished entries of several records, one per key (the first record that has a key wins)."""
    entries: dict[tuple, dict] = {}
    for record in records:
        for key, entry in (record.entries if isinstance(record, Journal) else record).items():
            entries.setdefault(key, entry)
    return entries


def _unfinished_error(folder: str | os.PathLike, main: Path, count: int, noun: str, parts: int = 0) -> ValueError:
    suffix = journal.LEGACY_SUFFIX if main.name.endswith(journal.LEGACY_SUFFIX) else journal.SUFFIX
    where = f"{str(main)!r}" + (f" and {parts} per-process record(s) beside it" if parts else "")
    delete = main.name + (f" and {main.name.removesuffix(suffix)}.rank*{suffix}" if parts else "")
    return ValueError(f"--out {str(folder)!r} holds an unfinished run ({_counted(count, noun)}, recorded in "
                      f"{where}); add --resume to finish it, or delete {delete} to start over")


class RunProgress:
    """The finished trials (or benchmark configurations) of one run, kept in ``<out>/<name>.progress.jsonl``.

    Each finished item is stored under a key (a tuple of plain values naming it, e.g. ``(length,
    depth, seed, method)``) with its row, one journal line as it finishes, so an interrupted run
    keeps everything it finished. The journal's header holds ``settings`` (what gives every row its
    meaning, e.g. the model and the budget: all must match to resume) and ``method_settings`` (per
    method, e.g. its options: must match for the methods both runs have; a method new to the
    command just runs). Use :meth:`open`, then :attr:`finished` to skip work, :meth:`add` as each
    item finishes, :meth:`finish` once the results are written.

    In a distributed run every process but the main one writes its own journal (``part``, its
    rank; see the module's docstring) while :attr:`finished` holds what all the journals hold.
    """

    def __init__(self, path: Path, command: str, settings: Mapping, method_settings: Mapping[str, Any],
                 encode: Callable[[Any], Any], decode: Callable[[Any], Any], entries: Mapping[tuple, dict] | None = None,
                 noun: str = "trials", part: int | None = None, known: Mapping[tuple, dict] | None = None):
        #: the journal this process writes
        self.path = path
        #: the rank whose own journal this is; None for the run's main journal
        self.part = part
        self._name = path.name.removesuffix(journal.SUFFIX).removesuffix("" if part is None else f".rank{part}")
        self.command = command
        #: what one finished item is called in messages ("trials", "configurations")
        self.noun = noun
        self.settings = _plain(dict(settings))
        self.method_settings = _plain(dict(method_settings))
        self._encode = encode
        self._entries: dict[tuple, dict] = dict(entries or {})
        # the journal is written afresh (header and entries) by this run's first write, then appended to
        self._started = False
        try:
            #: key (a tuple) -> the decoded row of every finished item, recorded runs included
            self.finished: dict[Hashable, Any] = {key: decode(e["row"])
                                                  for key, e in _union([self._entries, dict(known or {})]).items()}
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
        match (an earlier lacache's ``<name>.progress.json`` included); a ``ValueError`` lists the
        settings that differ. ``encode``/``decode`` turn a row into JSON-ready values and back;
        ``noun`` names an item in messages. The per-process journals of a distributed run count as
        part of the run; ``part`` (a rank other than 0) makes this process write its own journal
        instead of the main one.
        """
        path = journal.progress_path(folder, name)
        own = path if part is None else journal.part_path(folder, name, part)
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
        for record in records.values():
            problems = _differences(record.settings, fresh.settings)
            recorded_methods = record.method_settings
            for method in recorded_methods.keys() & fresh.method_settings.keys():
                if recorded_methods[method] != fresh.method_settings[method]:
                    problems.append(f"{method}: recorded {recorded_methods[method]!r}, now {fresh.method_settings[method]!r}")
            if record.command != command:
                problems.insert(0, f"command: recorded {record.command!r}, now {command!r}")
            if problems:
                raise ValueError(
                    f"--resume: the run recorded in {str(record.path)!r} used other settings ({'; '.join(problems)}); "
                    f"resume with the recorded settings, or give another --out (or delete {record.path.name}) to "
                    f"start over"
                )
        merged = {}
        for record in records.values():
            merged.update(record.method_settings)
        merged.update(fresh.method_settings)
        everything = _union(list(records.values()))
        # the main journal takes in what the other processes recorded; a process's own journal keeps its own
        entries = everything if part is None else (records[own].entries if own in records else {})
        progress = cls(own, command, settings, merged, encode, decode, entries, noun=noun, part=part, known=everything)
        if part is None:
            shown = records[path].path if path in records else path
            print(f"[lacache] --resume: {_counted(len(everything), noun)} recorded in {str(shown)!r}"
                  f"{' and the per-process records beside it' if len(records) > (path in records) else ''} reused",
                  file=sys.stderr)
        return progress

    @staticmethod
    def _records(folder: str | os.PathLike, name: str) -> dict[Path, Journal]:
        """The run's main journal (if any) and its per-process journals, read, by the journal path they stand for
        (an earlier lacache's record stands for the journal that replaces it)."""
        found = {}
        for path in (journal.progress_path(folder, name), *journal.part_paths(folder, name)):
            where = journal.existing(path)
            if where is not None:
                found[path] = journal.read(where)
        return found

    @staticmethod
    def _refuse(folder: str | os.PathLike, name: str, records: Mapping[Path, Journal], noun: str) -> None:
        """Refuse to start over where records hold finished work of a run that did not complete."""
        unfinished = [r for r in records.values() if not r.complete and r.entries]
        if unfinished:
            path = journal.progress_path(folder, name)
            main = records[path].path if path in records else path
            raise _unfinished_error(folder, main, len(_union(unfinished)), noun, parts=sum(p != path for p in records))

    @classmethod
    def refuse_unfinished(cls, folder: str | os.PathLike, name: str, noun: str = "trials") -> None:
        """The ``ValueError`` :meth:`open` without ``resume`` would raise for run ``name`` in ``folder``,
        raised now: for a command that runs several benchmarks, before the first one starts."""
        cls._refuse(folder, name, cls._records(folder, name), noun)

    @property
    def count(self) -> int:
        """How many items this process's journal holds as finished."""
        return len(self._entries)

    def _start(self) -> None:
        """At this run's first write: the journal afresh, its header and what it keeps so far (once)."""
        if not self._started:
            journal.start(self.path, self.command, self.settings, self.method_settings, self._entries.values())
            self._started = True

    def add(self, key: tuple, row: Any) -> None:
        """Record one finished item under ``key``: one line appended to the journal, on disk when this returns.

        The row is stored as it is now (a JSON copy): later changes to the object do not leak into it.
        """
        key = tuple(key)
        entry = {"key": list(key), "row": _plain(self._encode(row))}
        self._start()
        journal.append(self.path, [entry])  # first on disk, then counted: messages never claim more than is kept
        self._entries.pop(key, None)
        self._entries[key] = entry
        self.finished[key] = row

    def finish(self) -> None:
        """Mark the run complete (its results are written): a later run without ``--resume`` starts over.

        The main journal first takes in the per-process journals of a distributed run (whoever ran
        it, or resumed it) and they are removed; a per-process journal is left for the main process.
        """
        if self.part is not None:
            return
        self._start()
        parts = [(path, journal.existing(path)) for path in journal.part_paths(self.path.parent, self._name)]
        others = _union([journal.read(where) for _, where in parts if where is not None])
        new = {key: entry for key, entry in others.items() if key not in self._entries}
        journal.append(self.path, new.values())  # kept in the main journal before they go: an interruption loses nothing
        self._entries.update(new)
        for path, _ in parts:
            path.unlink(missing_ok=True)
            journal.legacy_path(path).unlink(missing_ok=True)
        journal.append(self.path, [{"complete": True}])

    def save(self) -> None:
        """Write the journal now if this run has not yet (a distributed run's main process does so before any
        work starts, so that its journal and the other processes' describe the same run)."""
        self._start()

    def _everything(self) -> int:
        """How many items this journal and the run's per-process journals hold (best effort: for messages)."""
        records: list[Journal | dict] = [self._entries]
        for path in journal.part_paths(self.path.parent, self._name):
            where = journal.existing(path)
            if where is not None:
                with suppress(ValueError, OSError):
                    records.append(journal.read(where))
        return len(_union(records))

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
