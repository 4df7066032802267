"""``lacache inspect``: draw which original tokens every layer of a cache holds.

For a prompt (``--prompt``, ``--prompt-file`` or the bundled essays), one method (``--method``) or
several side by side (``--compare lacache,streaming,knorm``) at one ``--budget``, a layers x
token-position map per method and decode step (``--at 0,500,2000``), written as ``inspect.png``
and ``inspect.svg`` with the data in ``inspect.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys

from ..registry import default_method
from . import common, values

__all__ = ["add_parser", "run_cli"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``inspect``; returns its parser."""
    parser = subparsers.add_parser(
        "inspect", help="draw which tokens every layer holds (layers x positions map per method and step)"
    )
    common.add_model_argument(parser)
    parser.add_argument("--method", default=default_method(), help="the cache method to draw (default: %(default)s)")
    parser.add_argument("--compare", default=None, metavar="METHODS",
                        help="comma-separated methods drawn side by side at the same budget, e.g. lacache,streaming,knorm")
    parser.add_argument("--budget", type=common.positive_int, default=128, help="cache slots per layer")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help="prompt text (default: the bundled Paul Graham essays)")
    source.add_argument("--prompt-file", default=None, help="a UTF-8 text file to use as the prompt")
    parser.add_argument("--tokens", type=common.positive_int, default=600,
                        help="prompt tokens taken from the text (default: %(default)s)")
    parser.add_argument("--at", default="0", metavar="STEPS",
                        help="decode steps at which to draw, comma-separated, 0 = right after the prompt, e.g. 0,500,2000")
    common.add_option_argument(parser)
    common.add_dtype_argument(parser)
    parser.add_argument("--out", default="runs/inspect", help="folder for inspect.png, inspect.svg, inspect.json")
    parser.add_argument("--quiet", action="store_true", help="print only where the figures went")
    return parser


def _steps(text: str) -> list[int]:
    try:
        steps = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--at {text!r} must be comma-separated decode steps >= 0, e.g. --at 0,500,2000") from None
    if not steps or steps[0] < 0:
        raise ValueError(f"--at {text!r} must be comma-separated decode steps >= 0, e.g. --at 0,500,2000")
    if steps[-1] > 1_000_000:
        raise ValueError(f"--at {steps[-1]} is more decode steps than a drawing needs; e.g. --at 0,500,2000")
    return steps


def _prompt_text(args) -> str:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give some text, or leave it out for the bundled essays")
        return args.prompt
    if args.prompt_file is not None:
        values.check_text_file(args.prompt_file, "--prompt-file")
        with open(args.prompt_file, encoding="utf-8") as fh:
            return fh.read()
    from ..lab.texts import load_essays

    return load_essays()


def run_cli(args: argparse.Namespace) -> dict:
    """Run the prompt through each method, draw the maps, write inspect.{png,svg,json}; returns the JSON payload."""
    from .. import models
    from ..lab.evaluation.checkpoint import check_output_folder
    from ..lab.inspect import ROLES, draw, watch
    from ..lab.results import INSPECT, write_result
    from ..registry import method_spec

    values.check_values(args)
    methods = common.method_list(args.compare if args.compare is not None else args.method,
                                 "compare" if args.compare is not None else "method")
    steps = _steps(args.at)
    options = common.parse_method_options(args.option, methods)
    out = check_output_folder(args.out)
    text = _prompt_text(args)
    model, tokenizer = common.load_model_for(args)
    ids = tokenizer(text[: args.tokens * 12], return_tensors="pt")["input_ids"][:, : args.tokens]
    if ids.shape[1] < 1:
        raise ValueError("the prompt has no tokens; give some text")
    common.note_if_nothing_evicted(args.budget, int(ids.shape[1]), "of this prompt (--tokens)", args.quiet)
    device = next(model.parameters()).device
    maps = []
    for method in methods:
        budget = args.budget if method_spec(method).bounded else None
        taken = watch(model, ids.to(device), method, budget, steps, options.get(method))
        maps.extend(taken)
        if not args.quiet:
            for m in taken:
                print(f"[inspect] {method} step {m.step}: {m.label()}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    figures = ["inspect.png", "inspect.svg"]
    title = f"Tokens each layer holds: budget {args.budget}, prompt of {ids.shape[1]} tokens"
    draw(maps, [out / name for name in figures], title=title)
    payload = write_result(out / "inspect.json", INSPECT, {  # plus kind, schema, "run": command, versions, machine
        "environment": {"dtype": args.dtype, "device": str(device)},
        "model": models.model_label(args.model),
        "budget": args.budget,
        "prompt_tokens": int(ids.shape[1]),
        "methods": methods,
        "steps": steps,
        "roles": list(ROLES),
        "figures": figures,
        "maps": [m.to_dict() for m in maps],
    })
    print(f"[lacache] wrote {', '.join(str(out / name) for name in [*figures, 'inspect.json'])}", file=sys.stderr)
    return payload
