"""One cell of the support matrix: an option in a scope, exact or refused (see ``lacache.support``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cell", "EXACT", "REFUSED", "STATES", "WHERE"]

EXACT, REFUSED = "exact", "refused"
STATES = (EXACT, REFUSED)
#: where a refusal happens, earliest first
WHERE = ("engine start", "request (HTTP 400)", "cache build", "generate() call", "cache call")


@dataclass(frozen=True)
class Cell:
    """One option in one scope, and what lacache does with it."""

    backend: str  # "transformers", "vLLM engine", "vLLM request"
    option: str  # what the user sets: a generate mode, an engine argument, a request parameter
    scope: str  # which methods or paths the cell covers ("every method", "static=True", ...)
    state: str  # EXACT or REFUSED
    #: for an exact cell: what it is compared with; for a refused one: why, and what to do instead
    note: str
    #: named tests (``tests/path.py::test_name``) that compare it, or that check the refusal
    tests: tuple[str, ...]
    #: for a refused cell: where it is refused (one of ``WHERE``)
    where: str = ""

    def __post_init__(self):
        if self.state not in STATES:
            raise ValueError(f"Cell {self.option!r}: state={self.state!r} must be one of {STATES}")
        if self.state == REFUSED and self.where not in WHERE:
            raise ValueError(f"Cell {self.option!r}: a refused cell says where, one of {WHERE}")
        if not self.tests:
            raise ValueError(f"Cell {self.option!r}: names no test")
