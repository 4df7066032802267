"""``lacache report``: one HTML page for many run folders, and the generated tables of a markdown document.

``lacache report RUN_DIR [RUN_DIR ...] -o report.html`` collects every evaluation and benchmark
result below the folders into one self-contained page (:mod:`lacache.lab.report`).
``lacache report --markdown docs/results.md`` rebuilds the tables marked as generated in that
document from the CSV files beside it (``--check``: only say whether any would change, for CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..lab.evaluation.checkpoint import atomic_write, check_output_file

__all__ = ["add_parser", "run_cli"]

DEFAULT_OUT = "report.html"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``report`` on the top-level sub-parsers; return its parser."""
    parser = subparsers.add_parser(
        "report", help="one self-contained HTML page of every result in run folders; or regenerate markdown tables",
        description="Collect the results below RUN_DIR folders into one HTML page (no network needed to view it), "
                    "and/or rebuild the generated tables of a markdown document from its data files.",
    )
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="folders written by lacache eval/bench (searched "
                                                                   "recursively)")
    parser.add_argument("-o", "--out", default=DEFAULT_OUT, help=f"the HTML file to write (default {DEFAULT_OUT})")
    parser.add_argument("--title", default="lacache report", help="the page's title")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="rebuild the <!-- lacache-table: ... --> regions of FILE from the CSV files beside it")
    parser.add_argument("--check", action="store_true",
                        help="with --markdown: change nothing, fail if a region differs from its data")
    return parser


def _markdown(path: str, check: bool) -> None:
    from ..lab.report.markdown import changed_regions, regenerate_markdown

    target = Path(path)
    if not target.is_file():
        raise ValueError(f"--markdown {path!r} is not a file; give a markdown document, e.g. --markdown docs/results.md")
    before = target.read_text(encoding="utf-8")
    after, count = regenerate_markdown(before, target.parent)
    if count == 0:
        raise ValueError(f"--markdown {path!r} has no <!-- lacache-table: ... --> region; mark a table as generated "
                         f"first (docs/benchmarks.md, 'One page for many runs'), e.g. --markdown docs/results.md")
    changed = changed_regions(before, after)
    if check:
        if changed:
            lines = ", ".join(map(str, changed))
            raise ValueError(f"--markdown {path!r}: {len(changed)} of {count} generated tables differ from their data "
                             f"(regions at lines {lines}); rebuild them with: lacache report --markdown {path}")
        print(f"{path}: {count} generated tables match their data")
        return
    if after != before:
        atomic_write(target, lambda fh: fh.write(after), encoding="utf-8")
    print(f"{path}: {count} generated tables, {len(changed)} rewritten")


def run_cli(args: argparse.Namespace) -> None:
    """Write the page and/or rebuild the markdown tables; a ``ValueError`` for anything unusable."""
    if not args.runs and args.markdown is None:
        raise ValueError("give run folders (e.g. lacache report runs/ -o report.html) or --markdown FILE "
                         "(e.g. lacache report --markdown docs/results.md)")
    if args.check and args.markdown is None:
        raise ValueError("--check applies to --markdown; e.g. lacache report --markdown docs/results.md --check")
    if args.runs:
        out = check_output_file(args.out, "-o", example=DEFAULT_OUT)
        from ..lab.report import write_report

        found = write_report(args.runs, out, title=args.title)
        skipped = len(found.unrecognised) + len(found.foreign)
        note = f" ({skipped} file(s) not recognised, listed in the page)" if skipped else ""
        print(f"[lacache] wrote {out}: {len(found.results)} result(s){note}", file=sys.stderr)
    if args.markdown is not None:
        _markdown(args.markdown, args.check)
