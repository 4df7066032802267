"""What every ``lacache`` sub-command shares: argument types, method lists and per-method options.

Only the command-line layer imports this module; evaluations and benchmarks take plain Python
values, so they can be used (and tested) without the CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from ..registry import check_methods, default_methods
from .resume import add_resume_argument

__all__ = [
    "DTYPES",
    "positive_int",
    "positive_ints",
    "fractions",
    "split_list",
    "names",
    "method_list",
    "parse_method_options",
    "register_variants",
    "run_methods",
    "add_model_argument",
    "add_dtype_argument",
    "add_option_argument",
    "add_methods_argument",
    "progress_for",
    "torch_dtype",
]

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer, e.g. 256") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def split_list(text: str, cast: Callable = str) -> list:
    """``"1,2,3"`` -> ``[cast("1"), ...]``; blanks are skipped; a ``ValueError`` for an entry ``cast`` refuses."""
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r} must be a comma-separated list of numbers") from None


def positive_ints(text: str, what: str) -> list[int]:
    """``--what 128,256``: at least one integer, each >= 1 (an empty list would run nothing and fail later)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} {text!r} must be a comma-separated list of integers, e.g. --{what} 256,1024") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{what} {text!r} must list positive integers, e.g. --{what} 256,1024")
    return values


def fractions(text: str, what: str) -> list[float]:
    """``--what 0,0.5,1``: at least one number, each in [0, 1] (NaN and infinity refused)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0 <= v <= 1 for v in values):
        raise ValueError(f"--{what} {text!r} must list numbers from 0 to 1, e.g. --{what} 0,0.5,1")
    return values


def names(text: str, known: Sequence[str], what: str) -> list[str]:
    """Comma-separated names that must all be in ``known`` (one ``ValueError`` naming ``--what`` otherwise)."""
    found = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in found if x not in known]
    if unknown or not found:
        raise ValueError(f"--{what} {','.join(unknown) or '(empty)'} not known; choose from {','.join(known)}")
    return found


def method_list(text: str, what: str = "methods") -> list[str]:
    """Comma-separated method names checked against the registry."""
    return check_methods((x.strip() for x in text.split(",") if x.strip()), what)


def _option_value(value: str) -> object:
    """An option's text as the int, float, None or string it stands for."""
    if value in ("none", "None"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def _refused_options(method: str, keys: Sequence[str]) -> str | None:
    """Why ``method`` cannot take ``keys`` (naming what it takes), or None when it takes them all."""
    from ..registry import option_names

    accepted = option_names(method)
    unknown = [key for key in keys if accepted is not None and key not in accepted]
    if not unknown:
        return None
    takes = f"it takes {', '.join(sorted(accepted))}" if accepted else "it takes no options"
    return f"{method} does not take {', '.join(map(repr, unknown))}; {takes}"


def parse_method_options(items: list[str], methods: Sequence[str] | None = None) -> dict[str, dict]:
    """``["lacache.span=9", "h2o.window=64"]`` -> ``{"lacache": {"span": 9}, "h2o": {"window": 64}}``.

    With ``methods`` (those being run), each METHOD must be one of them and each KEY an option its
    builder takes: an option that would be silently ignored, or reach the builder as a ``TypeError``,
    is refused before any model loads.
    """
    out: dict[str, dict] = {}
    for item in items:
        try:
            target, value = item.split("=", 1)
            method, key = target.split(".", 1)
        except ValueError:
            raise ValueError(f"--option {item!r} must look like METHOD.KEY=VALUE, e.g. lacache.span=9") from None
        if methods is not None:
            if method not in methods:
                raise ValueError(f"--option {item}: {method!r} is not being run here (methods: {', '.join(methods)}); "
                                 "name one of those, or add the method to the run")
            refused = _refused_options(method, [key])
            if refused:
                raise ValueError(f"--option {item}: {refused}")
        out.setdefault(method, {})[key] = _option_value(value)
    return out


def register_variants(items: list[str]) -> list[str]:
    """``["g8=lacache,group=8"]``: register each as a named method (``registry.variant``); returns the names."""
    from ..registry import method_spec, variant

    made = []
    for item in items:
        name, _, rest = item.partition("=")
        base, *pairs = rest.split(",")
        if not name or not base or any("=" not in pair for pair in pairs):
            raise ValueError(f"--variant {item!r} must look like NAME=METHOD,KEY=VALUE,..., e.g. g8=lacache,group=8")
        options = {key: _option_value(value) for key, value in (pair.split("=", 1) for pair in pairs)}
        refused = _refused_options(method_spec(base.strip()).name, list(options))
        if refused:  # checked before registering, so a bad definition leaves no broken method behind
            raise ValueError(f"--variant {item}: {refused}")
        made.append(variant(name.strip(), base.strip(), **options).name)
    return made


def run_methods(args: argparse.Namespace) -> list[str]:
    """The methods an evaluation compares: ``--variant`` definitions registered, then ``--methods``
    checked (a variant named in ``--variant`` but not in ``--methods`` is added at the end)."""
    made = register_variants(getattr(args, "variant", []) or [])
    methods = method_list(args.methods)
    return methods + [name for name in made if name not in methods]


def torch_dtype(name: str):
    """The torch dtype for a ``--dtype`` choice."""
    import torch

    return getattr(torch, DTYPES[name])


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or local path; default: bundled SmolLM2-135M-Instruct")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def add_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="method option, repeatable, e.g. lacache.span=9 lacache.overlap=7 h2o.window=64",
    )


def add_methods_argument(parser: argparse.ArgumentParser, suite: str) -> None:
    """``--methods`` defaulting to the registry's list for ``suite``."""
    parser.add_argument("--methods", default=",".join(default_methods(suite)),
                        help="comma-separated cache methods (default: %(default)s)")


def add_run_arguments(parser: argparse.ArgumentParser, suite: str, out: str, out_help: str | None = None) -> None:
    """What every evaluation takes: ``--model``, ``--methods`` (the registry's list for ``suite``),
    ``--option``, ``--dtype``, ``--out``, ``--resume`` and ``--quiet``."""
    add_model_argument(parser)
    add_methods_argument(parser, suite)
    add_option_argument(parser)
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=METHOD,KEY=VALUE,...",
        help="a named variant of a method, repeatable, run after --methods, e.g. g8=lacache,group=8",
    )
    add_dtype_argument(parser)
    parser.add_argument("--out", default=out, help=out_help)
    add_resume_argument(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (by default a bar on a terminal, else one line per finished group)")


def add_prefill_arguments(parser: argparse.ArgumentParser, budget: float, prefill: str, chunk: int) -> None:
    """``--budget`` (a fraction of each prompt or slots), ``--prefill`` and ``--prefill-chunk``."""
    from ..lab.evaluation.common import PREFILLS

    parser.add_argument("--budget", type=float, default=budget, help="< 1: fraction of the prompt; >= 1: slots per layer")
    parser.add_argument("--prefill", choices=list(PREFILLS), default=prefill)
    parser.add_argument("--prefill-chunk", type=positive_int, default=chunk)


def note_if_nothing_evicted(budget, holds: int, what: str, quiet: bool = False) -> bool:
    """Say, in one line on stderr, that a ``--budget`` (slots, not a fraction) at or above the ``holds``
    tokens a run keeps at most makes every bounded method a full cache: a run that compares nothing
    should not look like one that does. True when it said so."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 1 or budget < holds:
        return False  # below 1: a fraction of each prompt, which always evicts
    if not quiet:
        import sys

        fraction = " (or a fraction such as 0.5)" if isinstance(budget, float) else ""  # eval's --budget
        print(f"[lacache] note: --budget {budget:g} >= the {holds} tokens {what}: nothing is evicted, so a "
              f"bounded cache works as the full one; use a --budget below {holds}{fraction} to see it compact",
              file=sys.stderr)
    return True


def load_model_for(args: argparse.Namespace, device=None, shard=None):
    """``(model, tokenizer)`` for ``--model`` in ``--dtype`` (on ``device`` if given).

    A model that cannot be found or read (a hub id that does not resolve, a folder without a
    config, the bundled model's package missing, a cache folder lacache will not replace) is an
    ``OSError`` from deep inside the loaders; it becomes one ``ValueError`` line naming ``--model``.
    In a process of a distributed launch (``shard``) the model goes to that process's GPU (if
    there are GPUs), and the main process loads first, so the bundled model is converted once.
    """
    from transformers.utils import logging

    from ..lab.evaluation.distributed import SINGLE, device_for, main_first
    from ..lab.models import load_model, model_label

    shard = shard or SINGLE
    if not shard.main:  # the main process speaks for the run; the others stay quiet
        logging.set_verbosity_error()
    quiet = bool(getattr(args, "quiet", False)) or not shard.main
    bars_were_off = not logging.is_progress_bar_enabled()
    try:
        if quiet:  # --quiet silences the loaders' bars too
            logging.disable_progress_bar()
        with main_first(shard):
            return load_model(args.model, dtype=torch_dtype(args.dtype), device=device or device_for(shard))
    except OSError as err:
        reason = " ".join(str(err).split())  # loaders' messages span lines; the CLI prints one
        from ..lab.bundled import BUNDLED_MODELS

        raise ValueError(f"--model {model_label(args.model)} could not be loaded: {reason} (the bundled models, "
                         f"offline: {', '.join(BUNDLED_MODELS)})") from err
    finally:
        if quiet and not bars_were_off:
            logging.enable_progress_bar()


def progress_for(args: argparse.Namespace, desc: str, unit: str = "trial", units: str | None = None, shard=None):
    """How a command shows its progress (:class:`lacache.lab.progress.Progress`): nothing under ``--quiet``
    (or ``--no-progress``), nor in the processes of a distributed launch but the main one, whose
    counts are of its own share."""
    from ..lab.evaluation.distributed import SINGLE
    from ..lab.progress import Progress

    shard = shard or SINGLE
    if shard.distributed:
        desc = f"{desc} [rank 0 of {shard.world}]"
    return Progress(desc, unit, units=units, quiet=bool(getattr(args, "quiet", False)) or not shard.main)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend``: the transformers cache (default) or the vLLM engine with the plugin."""
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                        help="vllm: answer through the vLLM engine with the lacache plugin (needs vllm; one engine per "
                             "method and budget, prompts submitted together, prefilled in chunks of --prefill-chunk "
                             "tokens as vLLM's max_num_batched_tokens; --prefill must be chunked)")


def vllm_runner(args, methods, longest: int):
    """The engines' settings for ``--backend vllm``, refused in one line before any model loads."""
    from ..lab.evaluation.vllm_backend import VllmAnswers
    from ..lab.models import default_model_dir
    from ..registry import method_spec

    if args.prefill != "chunked":
        raise ValueError("--backend vllm prefills in chunks of --prefill-chunk tokens (vLLM's max_num_batched_tokens): "
                         "pass --prefill chunked")
    refused = [m for m in methods if method_spec(m).bounded and not method_spec(m).served]
    if refused:
        raise ValueError(f"--backend vllm: {', '.join(refused)} is not served in vLLM (it reads attention); "
                         "leave it out of --methods")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError("--backend vllm needs vLLM: run it in the environment `make vllm-env` builds "
                         "(.venv-vllm/bin/lacache)") from None
    return VllmAnswers(str(args.model or default_model_dir()), dtype=DTYPES[args.dtype], prefill_chunk=args.prefill_chunk,
                       max_model_len=longest + 64)
