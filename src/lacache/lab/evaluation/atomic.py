"""Writing a whole file all or nothing: a temporary file in the same folder, moved into place.

Results (CSV, JSON, the report page) are rewritten as a run ends or goes on; a Ctrl-C or a full disk
half-way through must leave the previous file whole, never half of each. The temporary name lives
in the target's folder so that ``os.replace`` stays on one file system, where it is atomic.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "create_exclusive", "temporary_name"]


def temporary_name(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def create_exclusive(path: Path) -> int:
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
    temporary = temporary_name(path)
    descriptor = create_exclusive(temporary)
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
