"""Keeping a run's finished work on disk: output checks up front, atomic writes, a resumable journal.

Evaluations and benchmarks run for minutes to hours, and used to write everything only at the end:
a Ctrl-C lost every finished trial, and an ``--out`` that could not be written was discovered
only after the whole run, as a traceback. Every ``lacache eval`` and ``lacache bench`` command
(and ``lacache generate --json``) shares the pieces gathered here, each in a module of its own:

* :func:`check_output_folder` / :func:`check_output_file` (:mod:`.destinations`) refuse a
  destination that cannot be written *before* any model is loaded;
* :func:`atomic_write` (:mod:`.atomic`) writes a file through a temporary file moved into place,
  so an interruption leaves the old file or the new one, never half of one;
* :class:`RunProgress` (:mod:`.runprogress`) keeps the finished trials (or benchmark
  configurations) of a run in ``<out>/<name>.progress.jsonl``, one line appended per finished
  item (the format is in :mod:`.journal`); ``--resume`` reads it back so only what is missing
  runs again.
"""

from __future__ import annotations

from .atomic import atomic_write
from .destinations import check_output_file, check_output_folder
from .journal import LEGACY_SUFFIX, is_progress_file, part_path, progress_path, read_record
from .journal import SUFFIX as PROGRESS_SUFFIX
from .runprogress import RunProgress

__all__ = [
    "LEGACY_SUFFIX",
    "PROGRESS_SUFFIX",
    "RunProgress",
    "atomic_write",
    "check_output_file",
    "check_output_folder",
    "is_progress_file",
    "part_path",
    "progress_path",
    "read_record",
]
