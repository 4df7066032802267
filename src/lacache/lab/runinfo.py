"""The record of how a result was made: stored under ``"run"`` in every evaluation and benchmark JSON.

A table of numbers is only worth comparing with another when both say what produced them: the exact
command, the versions of lacache, torch and transformers, and the machine. Each writer used to
record a different subset (the benchmarks an ``environment`` block, the evaluations nothing), so
``lacache report`` could not show where a number came from. :func:`run_record` builds one record
the same way for every writer (every result goes through :func:`lacache.lab.results.write_result`,
which calls :func:`with_run_record`), and :func:`command_context` lets the command line say which
command is running, since the library cannot know how it was called. :func:`environment` is the
benchmarks' own block (threads and the device they timed on), built here beside the record so the
machine is described in one place.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

__all__ = ["RUN_KEY", "command_context", "environment", "run_record", "with_run_record"]

#: the key of the record in a result's JSON (every other key of the payload is left as it was)
RUN_KEY = "run"
#: layout version of the record, so a reader can tell a later layout from a damaged one
RECORD_VERSION = 1

_current: dict[str, Any] | None = None


def _plain(value: Any) -> bool:
    """Whether ``value`` can go into JSON as it is (the parsed options worth recording)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


@contextmanager
def command_context(argv: Sequence[str], options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """While the block runs, results record ``lacache <argv>`` and the parsed ``options`` as their command.

    Called by the command line around each command; ``options`` (the parsed arguments, defaults
    included) keep what the command line leaves implicit, such as the dtype a run used by default.
    Outside the block a result records no command (a library call has none worth naming).
    """
    global _current
    previous = _current
    parsed = {k: list(v) if isinstance(v, tuple) else v for k, v in (options or {}).items() if _plain(v)}
    _current = {"argv": ["lacache", *argv], "options": parsed}
    try:
        yield
    finally:
        _current = previous


def _version(package: str) -> str | None:
    """The installed version of ``package`` (read from its metadata, so nothing heavy is imported)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str | None:
    """The processor's model name: ``/proc/cpuinfo`` on Linux, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_names() -> list[str]:
    """Names of the CUDA devices this process used (none when CUDA was never initialised)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def run_record() -> dict[str, Any]:
    """Command, versions, machine and time of the run now writing its results (plain JSON values)."""
    torch = sys.modules.get("torch")
    return {
        "version": RECORD_VERSION,
        "command": None if _current is None else list(_current["argv"]),
        "options": None if _current is None else dict(_current["options"]),
        "lacache": _version("lacache"),
        "torch": getattr(torch, "__version__", None) or _version("torch"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpus": _gpu_names(),
        "world_size": os.environ.get("WORLD_SIZE"),  # set by torchrun / accelerate for distributed runs
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def environment(device) -> dict[str, Any]:
    """Where a benchmark measured: torch and its thread count, ``device`` (a ``torch.device``) and its
    CUDA name, cores, platform and Python — stored under ``"environment"`` in every benchmark's JSON."""
    import torch

    device = torch.device(device)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def with_run_record(payload: Any) -> Any:
    """``payload`` with a ``"run"`` record added, when it is a dict that does not hold one yet.

    A new dict is returned (the caller's is not changed); any other payload comes back as it is,
    so writers can pass everything through this.
    """
    if not isinstance(payload, dict) or RUN_KEY in payload:
        return payload
    return {**payload, RUN_KEY: run_record()}
