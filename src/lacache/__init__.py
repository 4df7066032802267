"""lacache: fixed-memory, ladder-shaped KV caches for Hugging Face transformers causal LMs.

The package reads in three parts, with the command line on top:

* the rule — ``lacache.policies`` (which slots survive; pure slot arithmetic) and ``lacache.registry``
  (every method: its policy, what it reads, its options, whether vLLM serves it);
* the two backends — ``lacache.cache`` (a transformers ``Cache`` and its generation loops) and
  ``lacache.vllm`` (a plugin for vLLM's paged KV cache), both applying the same rule;
* the lab — ``lacache.lab`` (bundled models and texts, evaluations, benchmarks, reports, inspector,
  chat), and ``lacache.cli`` over all of it.
"""

from . import _moved, policies  # noqa: F401  (the built-in methods register; no torch)
from .policies.ladder_geometry import default_span_overlap, ladder_geometry
from .registry import make_cache

__all__ = [
    "BoundedCache",
    "LaCache",
    "StreamingLLMCache",
    "TOVACache",
    "H2OCache",
    "KNormCache",
    "KeyDiffCache",
    "METHODS",
    "make_cache",
    "default_span_overlap",
    "ladder_geometry",
    "load_model",
    "stream_generate",
    "generate",
]

__version__ = "0.1.0"

_moved.install()  # old module paths (lacache.models, lacache.evaluation, ...) keep working


#: names that import torch and transformers: loaded on first use, so `import lacache` (and the
#: command line's --help and argument errors) stay instant
_LAZY = {
    "BoundedCache": "lacache.cache", "LaCache": "lacache.cache", "StreamingLLMCache": "lacache.cache",
    "TOVACache": "lacache.cache", "H2OCache": "lacache.cache", "KNormCache": "lacache.cache", "KeyDiffCache": "lacache.cache",
    "generate": "lacache.cache.hub_generate",
}


def __getattr__(name):
    # Heavy or optional pieces load on first use, so `import lacache` stays quick.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "METHODS":  # read live: methods can be registered after import
        from . import registry

        return registry.METHODS
    if name == "load_model":
        from .lab.models import load_model

        return load_model
    if name == "stream_generate":
        from .cache.generation import stream_generate

        return stream_generate
    raise AttributeError(f"module 'lacache' has no attribute {name!r}")
