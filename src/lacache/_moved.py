"""Import paths from before the package was laid out as rule / backends / lab, kept working.

``lacache.models``, ``lacache.generation``, ``lacache.evaluation.perplexity`` and the other modules
listed in ``MOVED`` now live under ``lacache.cache`` (the transformers backend), ``lacache.policies``
(the rule) or ``lacache.lab`` (models, texts, evaluations, benchmarks, reports). Importing an old
name gives the *same* module object as the new one (not a copy), so state such as the method registry
and ``unittest.mock.patch("lacache.models.load_model")`` behave exactly as with the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

__all__ = ["MOVED", "install"]

#: old module path -> new module path (a package's submodules follow it)
MOVED = {
    "lacache.ladder": "lacache.policies.ladder_geometry",
    "lacache.ladder_reference": "lacache.policies.authors_schedule",
    "lacache.policies.reference": "lacache.policies.authors_ladder",
    "lacache.cache.methods": "lacache.cache.classes",
    "lacache.observe": "lacache.cache.observe",
    "lacache.generation": "lacache.cache.generation",
    "lacache.hub_generate": "lacache.cache.hub_generate",
    "lacache.compat": "lacache.cache.compat",
    "lacache.models": "lacache.lab.models",
    "lacache.texts": "lacache.lab.texts",
    "lacache.runinfo": "lacache.lab.runinfo",
    "lacache.progress": "lacache.lab.progress",
    "lacache.memory": "lacache.cache.memory",
    "lacache.inspect": "lacache.lab.inspect",
    "lacache.chat": "lacache.lab.chat",
    "lacache.demo": "lacache.lab.demo",
    "lacache.evaluation": "lacache.lab.evaluation",
    "lacache.bench": "lacache.lab.bench",
    "lacache.report": "lacache.lab.report",
    "lacache.lab.bench.reference": "lacache.lab.bench.authors_mechanics",
}


def new_name(name: str) -> str | None:
    """Where module ``name`` lives now, or None when it did not move."""
    for old in sorted(MOVED, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return MOVED[old] + name[len(old):]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as the module it became."""

    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=target_name)

    def create_module(self, spec):
        return importlib.import_module(spec.origin)

    def exec_module(self, module):
        """Nothing to run: the module was executed under its new name."""


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
