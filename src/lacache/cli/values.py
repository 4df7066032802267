"""Checks on the values of parsed command-line options, run by every command before any model loads.

argparse checks that a number parses; whether it makes sense (finite, in range, a device this
machine has, a model path that exists) is checked here, once for all commands, so ``--temperature
nan`` fails the same way in ``generate``, ``chat`` and ``bench``: a ``ValueError`` naming the flag
and a value that works, which the CLI prints as one ``lacache: error:`` line. A rule applies to an
option of its name wherever a command has one; options a command lacks, or left unset, are skipped.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from numbers import Real
from pathlib import Path

__all__ = ["check_model", "check_text_file", "check_values", "device"]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _number(low: float, high: float, low_open: bool, example: str, meaning: str = "") -> Callable[[str, object], None]:
    """A rule: a finite number in [low, high] (or (low, high] when ``low_open``)."""

    def rule(dest: str, value: object) -> None:
        ok = isinstance(value, Real) and math.isfinite(value) and (value > low if low_open else value >= low)
        if not ok or value > high:
            bounds = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else (
                f"in {'(' if low_open else '['}{low:g}, {high:g}]")
            raise ValueError(f"{_flag(dest)} {value} must be a finite number {bounds}{meaning}, e.g. "
                             f"{_flag(dest)} {example}")

    return rule


def _integer(low: int, high: float, example: str) -> Callable[[str, object], None]:
    def rule(dest: str, value: object) -> None:
        if not low <= value <= high:
            bounds = f">= {low}" if high == math.inf else f"from {low} to {high}"
            raise ValueError(f"{_flag(dest)} {value} must be an integer {bounds}, e.g. {_flag(dest)} {example}")

    return rule


def _multiple_of(step: int, why: str, example: str) -> Callable[[str, object], None]:
    def rule(dest: str, value: object) -> None:
        if value % step:
            raise ValueError(f"{_flag(dest)} {value} must be a multiple of {step} ({why}), e.g. {_flag(dest)} {example}")

    return rule


def _budget(dest: str, value: object) -> None:
    """The evaluations' float ``--budget`` (a fraction below 1, slots from 1); int budgets are checked by argparse."""
    if isinstance(value, float) and not (math.isfinite(value) and value > 0):
        raise ValueError(f"--budget {value} must be a finite number > 0: a fraction of each prompt below 1 "
                         "(e.g. --budget 0.5) or slots per layer from 1 (e.g. --budget 512)")


def check_model(value: str | None) -> None:
    """``--model`` must be an existing local file/folder, a bundled model's name or a well-formed hub id.

    Checked before loading, so a mistyped path is one line naming it rather than a traceback from the
    hub client about an invalid repository id. (Whether a hub id exists is only known when loading.)
    """
    if not value:
        return
    from ..lab.bundled import BUNDLED_MODELS, DEFAULT_MODEL_NAME, resembling_bundled

    if Path(value).expanduser().exists() or value in BUNDLED_MODELS:
        return
    meant = resembling_bundled(value)
    if meant is not None:
        raise ValueError(f"--model {value}: not a local file or folder, and not a bundled model; did you mean "
                         f"--model {meant}? The bundled models (offline): {', '.join(BUNDLED_MODELS)}")
    advice = (f"give a local model folder, a .gguf file or a hub id (e.g. HuggingFaceTB/{DEFAULT_MODEL_NAME}), "
              f"or leave --model out for the bundled {DEFAULT_MODEL_NAME}")
    if value.lower().endswith(".gguf"):
        raise ValueError(f"--model {value}: no such GGUF file; {advice}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"--model {value}: no such file or folder, and not a hub id; {advice}") from None


def check_text_file(value: str, flag: str = "--text-file") -> None:
    """``flag`` (the option the user typed) must name a readable file, checked before any model loads;
    empty means the default."""
    if not value:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"{flag} {value} {what}; give a UTF-8 text file, or leave {flag} out for the "
                         "bundled essays")


def device(name: str):
    """The ``torch.device`` for ``--device`` (``auto``: CUDA when available), or a ``ValueError`` for a
    device this machine does not have."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cpu":
        return chosen
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "use --device cuda:0")
        return chosen
    if chosen.type == "mps" and torch.backends.mps.is_available():
        return chosen
    raise ValueError(f"--device {name}: lacache runs on cpu or cuda (mps where available); use --device cpu")


#: option name -> its rule; applied wherever a command has an option of that name
_RULES: dict[str, Callable[[str, object], None]] = {
    "temperature": _number(0, math.inf, False, "0.7", " (0 = greedy)"),
    "top_p": _number(0, 1, True, "0.9"),
    "tolerance": _number(0, math.inf, False, "0.01", " (a relative change)"),
    "budget": _budget,
    "seed": _integer(-(2**63), 2**64 - 1, "0"),
    "sinks": _integer(0, math.inf, "4"),
    "span": _integer(1, math.inf, "3"),
    "overlap": _integer(0, math.inf, "1"),
    "warmup": _integer(0, math.inf, "32"),
    "max_length": _integer(2, math.inf, "3500"),  # middle truncation keeps max_length // 2 tokens at each end
    "head_dim": _multiple_of(2, "rotary embeddings rotate pairs of dimensions", "64"),
    "tiny_hidden": _multiple_of(8, "4 heads of an even size", "64"),
    "model": lambda dest, value: check_model(value),
    "text_file": lambda dest, value: check_text_file(value),
    "device": lambda dest, value: device(value),
}


def _check_text(args: argparse.Namespace) -> None:
    """Bytes on the command line that are not UTF-8 arrive as lone surrogates (``os.fsdecode``); they
    would fail deep in a tokenizer or when echoed, so each is refused here without echoing it."""
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{_flag(dest)}: the value is not valid UTF-8 text (undecodable bytes on "
                                     "the command line); pass it in UTF-8") from None


def check_values(args: argparse.Namespace) -> None:
    """Apply every rule whose option ``args`` has (and is set); the first failure raises ``ValueError``."""
    _check_text(args)
    for dest, rule in _RULES.items():
        value = getattr(args, dest, None)
        if value is not None:
            rule(dest, value)
