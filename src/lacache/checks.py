"""Type checks for the numbers users pass to a cache's builder, done once, at build time.

A setting of the wrong type must fail where it is given, with one ``ValueError`` that names the
parameter and a value that works, not deep inside a forward pass with an internal ``TypeError``.
The rules: an integer setting takes any integer, Python's or numpy's (``np.int64(512)`` is an
integer), and nothing else: not a bool (``sinks=True`` is a mistake, not 1), not a float
(``overlap=1.5`` has no meaning; ``span=3.0`` is refused rather than guessed), not a string. A
"size or fraction" setting also takes a real number strictly between 0 and 1 (a fraction of the
budget), numpy's included. Torch-free, so the vLLM plugin's configuration shares it.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["is_integer", "integer", "optional_integer", "size_or_fraction", "choice"]


def is_integer(value: object) -> bool:
    """True for Python and numpy integers; False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: object, *, minimum: int = 0, maximum: int | None = None, example: object = None) -> int:
    """``value`` as a Python int within ``[minimum, maximum]``, or one ``ValueError`` naming ``name``."""
    hint = f", e.g. {name}={example!r}" if example is not None else ""
    bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
    if not is_integer(value):
        raise ValueError(f"{name}={value!r} must be an integer {bound}{hint}")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name}={number} must be an integer {bound}{hint}")
    return number


def optional_integer(name: str, value: object, **kwargs) -> int | None:
    """``None`` stays ``None`` (meaning "the default"); anything else as ``integer``."""
    return None if value is None else integer(name, value, **kwargs)


def size_or_fraction(name: str, value: object, *, example: object, minimum: int = 1) -> int | float | None:
    """``None``, an integer ``>= minimum``, or a real number strictly between 0 and 1 (a fraction)."""
    if value is None or is_integer(value):
        return None if value is None else integer(name, value, minimum=minimum, example=example)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and 0 < number < 1:
            return number
    raise ValueError(
        f"{name}={value!r} must be a number of slots (an integer >= {minimum}) or a fraction of the budget "
        f"(a number between 0 and 1), e.g. {name}={example!r}"
    )


def choice(name: str, value: object, choices: tuple) -> str:
    """``value`` if it is one of the strings ``choices``, else one ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}; e.g. {name}={choices[0]!r}")
    return value
