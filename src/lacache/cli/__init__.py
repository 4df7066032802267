"""The ``lacache`` command line: ``generate``, ``eval``, ``bench`` and ``chat``.

Only this package parses arguments; it turns them into plain values for the library
(:mod:`lacache.lab.evaluation`, :mod:`lacache.lab.bench`, :mod:`lacache.lab.chat`), which never imports it.
"""

from .common import parse_method_options
from .main import build_parser, main

__all__ = ["build_parser", "main", "parse_method_options"]
