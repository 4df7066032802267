"""Progress of a long run: a bar on a terminal, one line per finished group in a log, nothing when quiet.

Evaluations and benchmarks run for minutes to hours, and every one of them shows how far it got
through this one class, so they all look and behave alike:

* on a terminal (the stream is a TTY), a tqdm bar: items done, rate and time left;
* anywhere else (the log of a batch job, a pipe), a bar's carriage returns would pile up into one
  unreadable line, so instead one plain line is printed per finished group of work (a method and
  budget, a prompt's cell, a benchmark configuration), e.g.
  ``[lacache] passkey 600 tokens, depth 0.5: 12/40 trials, 3.1 s/trial, ETA 1m27s``;
* ``quiet`` (``--quiet``) prints neither.

Items reused from an earlier run (``--resume``) are not counted: the total, the rate and the time
left are those of the work this run really does.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

__all__ = ["MODES", "Progress", "as_progress", "progress_mode"]

#: how progress is shown: a tqdm bar, one line per finished group, or not at all
MODES = ("bar", "lines", "off")


def progress_mode(quiet: bool = False, stream: IO[str] | None = None) -> str:
    """``"off"`` when ``quiet``, ``"bar"`` when ``stream`` (default: stderr) is a terminal, else ``"lines"``."""
    if quiet:
        return "off"
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def _shape(stream: IO[str]) -> dict:
    """tqdm's size arguments for a bar on ``stream``: follow the terminal, or a fixed 80 x 24 where the
    terminal says 0 x 0 (a pseudo-terminal nobody sized, where tqdm would draw nothing)."""
    try:
        sized = os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # not a file, or not a terminal after all
        sized = True
    return {"dynamic_ncols": True} if sized else {"ncols": 80, "nrows": 24}


def _duration(seconds: float) -> str:
    """``45s``, ``3m07s``, ``2h05m``: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(seconds: float, count: int, unit: str) -> str | None:
    """``3.1 s/trial`` for slow items, ``412.0 tok/s`` for fast ones (as tqdm shows them); None before any."""
    if count <= 0 or seconds <= 0:
        return None
    each = seconds / count
    return f"{each:.1f} s/{unit}" if each >= 1 else f"{count / seconds:.1f} {unit}/s"


class Progress:
    """How far a run got, shown as :func:`progress_mode` decides (see the module's docstring).

    ``desc`` names the run (``"passkey"``), ``unit`` one item (``"trial"``, ``"tok"``), ``units``
    several (default ``unit + "s"``). ``mode`` overrides the choice (one of :data:`MODES`);
    ``stream`` defaults to stderr. The loop that does the work calls :meth:`start` with how many
    items it will do, :meth:`advance` as they finish, :meth:`skip` for items reused from an earlier
    run, :meth:`group_done` when a group of items is complete, and :meth:`close` at the end.
    """

    def __init__(self, desc: str, unit: str = "trial", *, units: str | None = None, quiet: bool = False,
                 mode: str | None = None, stream: IO[str] | None = None):
        self.mode = mode if mode is not None else progress_mode(quiet, stream)
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        self.desc, self.unit = desc, unit
        self.units = units if units is not None else f"{unit}s"
        self.stream = stream
        #: items this run will do (None: not known), and how many of them are done
        self.total: int | None = None
        self.done = 0
        self._bar: Any = None
        self._began = time.perf_counter()
        self._group_start = 0

    def _out(self) -> IO[str]:
        return sys.stderr if self.stream is None else self.stream

    def start(self, total: int | None) -> Progress:
        """Begin counting: ``total`` items to do (None when not known in advance)."""
        self.total, self.done, self._group_start = total, 0, 0
        self._began = time.perf_counter()
        if self.mode == "bar" and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=self._out(), **_shape(self._out()))
        return self

    def advance(self, count: int = 1) -> None:
        """``count`` more items are done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(count)

    def skip(self, count: int = 1) -> None:
        """``count`` items need no work (recorded by an earlier run): they leave the total."""
        if self.total is not None:
            self.total = max(self.done, self.total - count)
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.refresh()

    def working_on(self, label: str) -> None:
        """Name the group now running (shown beside the bar)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label)

    def group_done(self, label: str, note: str | None = None) -> None:
        """A group of items is complete: in ``lines`` mode one line with the counts, rate and time left.

        ``note`` (a result worth seeing, e.g. a benchmark's ms/token) is added to that line; on a
        bar it is printed above the bar. A group in which nothing ran (all reused) prints nothing.
        """
        if self.done == self._group_start and note is None:
            return
        self._group_start = self.done
        head = f"[lacache] {self.desc} {label}".rstrip()
        if self.mode == "lines":
            self._print(f"{head}: {self.summary()}" + (f"; {note}" if note else ""))
        elif self.mode == "bar" and note:
            self.note(f"{head}: {note}")

    def summary(self) -> str:
        """``12/40 trials, 3.1 s/trial, ETA 1m27s`` (``, took 2m04s`` once all are done)."""
        elapsed = time.perf_counter() - self._began
        counted = f"{self.done}/{self.total} {self.units}" if self.total is not None else f"{self.done} {self.units}"
        parts = [counted]
        rate = _rate(elapsed, self.done, self.unit)
        if rate:
            parts.append(rate)
        if self.total is not None and self.done >= self.total:
            parts.append(f"took {_duration(elapsed)}")
        elif self.total is not None and self.done:
            parts.append(f"ETA {_duration(elapsed / self.done * (self.total - self.done))}")
        return ", ".join(parts)

    def note(self, text: str) -> None:
        """A message for the run's log that leaves a bar intact (nothing when quiet)."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.write(text, file=self._out())
        else:
            self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self._out(), flush=True)

    def close(self) -> None:
        """End the bar (the results print below it); counting can :meth:`start` again."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_progress(progress: bool | Progress | None, desc: str, unit: str = "trial", units: str | None = None
                ) -> Progress | None:
    """What a library function's ``progress`` argument means: a :class:`Progress` as given, ``True`` a new
    one shown as :func:`progress_mode` decides, ``False``/``None`` none."""
    if isinstance(progress, Progress):
        return progress
    return Progress(desc, unit, units=units) if progress else None
