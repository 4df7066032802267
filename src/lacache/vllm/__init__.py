"""LaCache inside vLLM: a plugin that keeps every request within its ladder budget in the paged KV cache.

Installed with the package and found by vLLM through the ``vllm.general_plugins`` entry point
(``lacache.vllm:register``). It acts only for engines started with
``additional_config={"lacache": {...}}`` (see ``lacache.vllm.config``); how it attaches to vLLM,
and everything it hooks, is in ``lacache.vllm.plugin``. Importing this package imports no vLLM.
"""

from __future__ import annotations

from .config import KEY, ServingConfig, parse_config, serving_config
from .plugin import SUPPORTED_VLLM, register

__all__ = ["register", "KEY", "SERVED_METHODS", "SUPPORTED_VLLM", "ServingConfig", "parse_config", "serving_config"]


def __getattr__(name: str):
    if name == "SERVED_METHODS":  # read live from the method registry (methods can be added after import)
        from . import config

        return config.SERVED_METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
