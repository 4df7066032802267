"""lacache: fixed-memory, ladder-shaped KV caches for Hugging Face transformers causal LMs."""

from .cache import BoundedCache, H2OCache, KNormCache, LaCache, StreamingLLMCache, TOVACache
from .hub_generate import generate
from .ladder import default_span_overlap, ladder_geometry
from .registry import make_cache

__all__ = [
    "BoundedCache",
    "LaCache",
    "StreamingLLMCache",
    "TOVACache",
    "H2OCache",
    "KNormCache",
    "METHODS",
    "make_cache",
    "default_span_overlap",
    "ladder_geometry",
    "load_model",
    "stream_generate",
    "generate",
]

__version__ = "0.1.0"


def __getattr__(name):
    # Heavy or optional pieces load on first use, so `import lacache` stays quick.
    if name == "METHODS":  # read live: methods can be registered after import
        from . import registry

        return registry.METHODS
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "stream_generate":
        from .generation import stream_generate

        return stream_generate
    raise AttributeError(f"module 'lacache' has no attribute {name!r}")
