"""The ``lacache`` command: the top-level parser and the dispatch to each command's module.

Each command family lives in its own module with ``add_parser(subparsers)`` and ``run_cli(args)``:
:mod:`.generate`, the evaluations (:mod:`.eval_ppl`, :mod:`.eval_passkey`, :mod:`.eval_ruler`,
:mod:`.eval_longbench`, under ``lacache eval``), :mod:`.bench`, :mod:`.chat`, :mod:`.inspect`,
:mod:`.report` and :mod:`.serve`. A ``ValueError`` from any of them is a usage error: one line on
stderr and exit status 2, no traceback. Arguments the parser does not know are refused, except by a
command whose parser has a ``passed_through`` default (``serve``, which hands them to vLLM in order).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

# Absolute imports of the sibling modules: ``from . import bench`` would also import this package's
# ``__init__``, which imports this module (a cycle, if a harmless one at run time).
import lacache.cli.bench as bench
import lacache.cli.chat as chat
import lacache.cli.eval_longbench as eval_longbench
import lacache.cli.eval_passkey as eval_passkey
import lacache.cli.eval_ppl as eval_ppl
import lacache.cli.eval_ruler as eval_ruler
import lacache.cli.generate as generate
import lacache.cli.inspect as inspect_command
import lacache.cli.report as report
import lacache.cli.serve as serve

from .. import registry
from ..lab.runinfo import command_context
from . import values

__all__ = ["EVALUATIONS", "build_parser", "main", "parse_args"]

#: ``lacache eval <task>`` -> the module that parses and runs it (in help order)
EVALUATIONS: dict[str, ModuleType] = {
    "ppl": eval_ppl,
    "passkey": eval_passkey,
    "ruler": eval_ruler,
    "longbench": eval_longbench,
}
#: the other top-level commands -> their modules
_COMMANDS: dict[str, ModuleType] = {"generate": generate, "bench": bench, "chat": chat, "inspect": inspect_command,
                                    "report": report, "serve": serve}


def build_parser() -> argparse.ArgumentParser:
    """The full ``lacache`` parser: generate, eval (ppl, passkey, ruler, longbench), bench, chat, inspect,
    report, serve."""
    parser = argparse.ArgumentParser(
        prog="lacache", description="Fixed-memory ladder-shaped KV caches for transformers causal LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    evaluate = sub.add_parser("eval", help="evaluations (tables, CSV/JSON, plots)")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    for module in EVALUATIONS.values():
        module.add_parser(tasks)
    bench.add_parser(sub)
    chat.add_parser(sub)
    inspect_command.add_parser(sub)
    report.add_parser(sub)
    serve.add_parser(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by :func:`build_parser`; arguments it does not know go, in order, to ``passed_through``
    for a command that has it (``serve``) and are a usage error (exit status 2) for every other."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "passed_through"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.passed_through = unknown
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command; 0 on success, 2 on a usage error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    registry.load_plugins()  # methods of other packages (the lacache.methods entry points) before the choices are listed
    args = parse_args(argv)
    module = EVALUATIONS[args.task] if args.command == "eval" else _COMMANDS[args.command]
    try:
        values.check_values(args)  # every value, before a command imports torch or loads a model
        with command_context(argv, vars(args)):  # the "run" record of every result names this command
            module.run_cli(args)
    except (ValueError, FileNotFoundError) as err:  # FileNotFoundError: a text package not installed, named
        print(f"lacache: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
