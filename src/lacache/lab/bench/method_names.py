"""The cache benchmark's method names: the registry's and its own mechanisms (no torch).

The command line lists them in ``lacache bench cache --help``, which must not wait for torch.
"""

from __future__ import annotations

from ... import registry
from ...registry import baseline_method, default_method, method_spec

__all__ = ["LADDER_STEP", "PSEUDO_METHODS", "REFERENCE", "cache_methods", "default_cache_methods",
           "registry_cache_methods"]

#: the authors' per-step mechanics re-implemented (no registry method: it takes no positions and
#: always rotates to slots ``0..n-1``)
REFERENCE = "reference"
#: the default method's capped ladder with ``chunk=0``: compacting at every step, like the authors' storage
LADDER_STEP = "ladder-step"
_LADDER_STEP_OPTIONS = {"schedule": "capped", "chunk": 0}
#: the benchmark's own mechanisms, timed beside the registry's methods
PSEUDO_METHODS = (LADDER_STEP, REFERENCE)
#: the positions a row of the reference strategy has (it takes none)
_REFERENCE_POSITIONS = "slots 0..n-1"


def registry_cache_methods() -> tuple[str, ...]:
    """The registry methods this benchmark times: bounded, and driven by ``cache.update`` alone (no attention)."""
    return tuple(name for name in registry.METHODS
                 if method_spec(name).bounded and not method_spec(name).needs_attention)


def cache_methods() -> tuple[str, ...]:
    """Every method ``bench_cache_update`` takes: the registry's (see :func:`registry_cache_methods`), then
    the benchmark's own mechanisms."""
    return (*registry_cache_methods(), *PSEUDO_METHODS)


def default_cache_methods() -> tuple[str, ...]:
    """What the benchmark compares when no methods are named: the default method, the reference strategy it
    re-implements, and the bounded baseline (``lacache``, ``reference``, ``streaming``)."""
    return (default_method(), REFERENCE, baseline_method())


