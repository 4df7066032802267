"""Refusing a results destination that cannot be written, before any model is loaded.

An ``--out`` that could not be written used to be discovered only after the whole run, as a
traceback. These checks run first and really create (and remove) a probe file where the results
will go: the only sure test, as permissions, read-only mounts and ``/proc`` all refuse differently.
Nothing is left behind (a run that fails later for another reason leaves no empty folder).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from .atomic import create_exclusive, temporary_name

__all__ = ["check_output_file", "check_output_folder"]


def _probe_writable(folder: Path, option: str, shown: str, example: str) -> None:
    """Create and remove a file in ``folder``: the only sure test that a run can write its results there."""
    probe = temporary_name(folder / "write-probe")
    try:
        os.close(create_exclusive(probe))
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
    stands where one of its folders should be) or cannot be written to. Nothing is created here;
    the run creates the folder when it writes its first result.
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
