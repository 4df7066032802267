"""The command-line side of keeping finished work: ``--resume``, and opening a run's record from its arguments.

Every ``lacache eval`` and ``lacache bench`` command checks its ``--out`` folder and opens its record
(:class:`lacache.lab.evaluation.checkpoint.RunProgress`) the same way, before any model is loaded, so a
bad destination or a mismatched ``--resume`` costs nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..lab.evaluation.checkpoint import RunProgress, check_output_folder
from ..lab.evaluation.distributed import SINGLE, Shard, barrier

__all__ = ["add_resume_argument", "method_settings", "open_run"]


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """``--resume``: reuse what an earlier run in ``--out`` finished, run only what is missing."""
    parser.add_argument(
        "--resume", action="store_true",
        help="reuse the finished trials recorded in --out (<name>.progress.jsonl, or an earlier lacache's "
             "<name>.progress.json) and run only the missing ones; the settings that give them their meaning must match",
    )


def method_settings(args: argparse.Namespace, methods: Sequence[str], options: Mapping[str, Mapping]) -> dict:
    """Per method, what changes the meaning of its rows: its ``--option`` values and its ``--variant`` text."""
    variants = {}
    for item in getattr(args, "variant", None) or []:
        name, _, definition = item.partition("=")
        variants[name.strip()] = definition.strip()
    return {m: {"options": dict(options.get(m, {})), "variant": variants.get(m)} for m in methods}


def open_run(
    args: argparse.Namespace,
    name: str,
    command: str,
    settings: Mapping[str, Any],
    *,
    per_method: Mapping[str, Any] | None = None,
    encode: Callable[[Any], Any] = lambda row: row,
    decode: Callable[[Any], Any] = lambda row: row,
    noun: str = "trials",
    shard: Shard = SINGLE,
) -> RunProgress:
    """``args.out`` checked (a writable folder, created if needed), then the record of run ``name`` in it.

    ``--resume`` (``args.resume``) reuses a recorded run with the same ``settings`` (and the same
    ``per_method`` settings for the methods both have); without it an unfinished run there is
    refused rather than overwritten. See :meth:`RunProgress.open`.

    In a distributed launch (``shard``) every process reads the records, and only once all have
    (no record changes under a process still checking it) does each start writing its own: the
    main process the run's record, at once, so that it describes this run from the start.
    """
    folder = check_output_folder(args.out, "--out", example=f"runs/{name}")
    record = RunProgress.open(folder, name, command, settings, resume=bool(getattr(args, "resume", False)),
                              method_settings=per_method, encode=encode, decode=decode, noun=noun,
                              part=shard.rank if shard.distributed and not shard.main else None)
    if shard.distributed:
        barrier(shard)
        if shard.main:
            record.save()
    return record
