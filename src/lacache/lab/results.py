"""What a result file says about itself: its ``kind`` and the ``schema`` version of its layout.

Every JSON a command leaves (``lacache eval``, ``lacache bench``, ``lacache inspect``) starts with
``"kind"`` (``"eval.ppl"``, ``"bench.decode"``, ``"inspect"``, ...) and ``"schema"``, so a reader
such as ``lacache report`` knows what it holds without guessing from its keys or its file name,
and can tell a file a later lacache wrote (a higher schema) from a damaged one. They are written
here, in one place: every writer calls :func:`write_result` (or :func:`stamped` when it writes the
file itself), which also adds the run record (:mod:`.runinfo`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from .evaluation.atomic import atomic_write
from .runinfo import with_run_record

__all__ = [
    "BENCHMARKS",
    "EVALUATIONS",
    "INSPECT",
    "KINDS",
    "SCHEMA",
    "bench_kind",
    "declared_kind",
    "eval_kind",
    "section",
    "stamped",
    "write_result",
]

#: version of the layout of every result file; raised when a kind's keys change meaning
SCHEMA = 1
#: evaluation result names (``lacache eval <name>`` writes ``<name>.json`` of kind ``eval.<name>``)
EVALUATIONS = ("ppl", "passkey", "ruler", "longbench")
#: benchmark result names (``lacache bench`` writes ``<name>.json`` of kind ``bench.<name>``)
BENCHMARKS = ("decode", "memory", "stream", "cache", "prefill", "vllm")
#: the retention maps ``lacache inspect`` writes
INSPECT = "inspect"
#: every kind of result file, in the order a report shows them
KINDS = (*(f"eval.{name}" for name in EVALUATIONS), *(f"bench.{name}" for name in BENCHMARKS), INSPECT)


def eval_kind(name: str) -> str:
    """The kind of ``lacache eval <name>``'s result, e.g. ``"eval.ppl"``."""
    return _known(f"eval.{name}")


def bench_kind(name: str) -> str:
    """The kind of the result ``lacache bench`` writes as ``<name>.json``, e.g. ``"bench.decode"``."""
    return _known(f"bench.{name}")


def _known(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}; e.g. kind='eval.ppl'")
    return kind


def section(kind: str) -> str:
    """The result's name without its family (``"eval.ppl"`` -> ``"ppl"``): the report's section."""
    return kind.rpartition(".")[2]


def stamped(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` as its file holds it: ``kind`` and ``schema`` first, its own keys, the run record.

    A new dict (the caller's is left alone); a ``kind``/``schema`` already in ``payload`` (a result
    read back and written again under another name) is replaced, a run record kept.
    """
    body = {k: v for k, v in payload.items() if k not in ("kind", "schema")}
    return with_run_record({"kind": _known(kind), "schema": SCHEMA, **body})


def write_result(path: str | os.PathLike, kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``payload`` to ``path`` as a result of ``kind`` (indented JSON, atomically); returns what was written."""
    data = stamped(kind, payload)
    atomic_write(path, lambda fh: json.dump(data, fh, indent=2))
    return data


def declared_kind(payload: Any) -> tuple[str | None, str | None]:
    """``(kind, problem)`` as a result file declares it.

    ``(kind, None)``: a kind this version reads; ``(None, problem)``: the file declares a kind or
    schema this version cannot read (written by a later lacache); ``(None, None)``: it declares no
    kind (a file written before results carried one, or no lacache result at all).
    """
    if not isinstance(payload, dict):
        return None, None
    kind, schema = payload.get("kind"), payload.get("schema")
    if kind in KINDS:
        if schema is not None and (not isinstance(schema, int) or isinstance(schema, bool) or schema > SCHEMA):
            return None, (f"its schema {schema!r} is newer than this lacache reads (schema {SCHEMA}); "
                          f"read it with the lacache that wrote it")
        return kind, None
    if schema is not None and isinstance(kind, str):
        return None, f"its kind {kind!r} is not one this lacache reads ({', '.join(KINDS)})"
    return None, None
