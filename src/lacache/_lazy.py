"""``torch``, imported on first use.

Modules that every command imports (the method registry's policies) use torch only inside their
methods; importing it when the module loads would make ``lacache --help`` and every argument error
wait seconds (a minute on a busy machine) for torch and transformers. ``from .._lazy import torch``
gives a stand-in that imports torch at its first attribute access and then behaves as the module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["torch"]


class _LazyModule(ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self._real: ModuleType | None = None

    def __getattr__(self, attribute: str):
        if self._real is None:
            self._real = importlib.import_module(self.__name__)
        return getattr(self._real, attribute)


torch = _LazyModule("torch")
