"""The rule: which slots survive. One small module per retention rule, all answering ``RetentionPolicy.retain``.

* ``base``, ``plan`` — the contract (``LayerView``, ``RetentionPolicy``, ``IndexPolicy``) and what a
  rule answers (``CompactionPlan`` for index-only rules, ``RowPlan`` per sequence);
* ``ladder_geometry``, ``authors_schedule`` — LaCache's pure slot arithmetic (no torch): the ladder's
  shape and one compaction's indices, and the authors' schedule of compactions;
* one file per method, each ending with its ``register(Method(...))``: ``streaming``, ``lacache``
  (the ladder factory over ``ladder``, ``authors_ladder`` and ``salient``), ``tova``, ``h2o``,
  ``knorm`` and ``keydiff`` (over the shared ``scores``).

Importing this package registers every built-in method, in the order commands list them; any other
module of the package is imported too, so a new method file needs no line here.
"""

# ruff: noqa: I001  (the method files are imported in registration order, which is the order commands list them)
import importlib
import pkgutil

from .base import IndexPolicy, LayerView, RetentionPolicy, resolve_chunk
from .plan import CompactionPlan, RowPlan, identity_plan
from . import streaming, lacache, tova, h2o, knorm  # noqa: F401  (each registers its method)
from .authors_ladder import ReferenceLadderPolicy
from .h2o import H2OPolicy
from .keydiff import KeyDiffPolicy
from .knorm import KNormPolicy
from .ladder import LadderPolicy, ladder_plan
from .lacache import ladder_policy
from .salient import SalientLadderPolicy
from .scores import ScorePolicy, keep_top
from .streaming import StreamingPolicy, streaming_policy, window_plan
from .tova import TOVAPolicy

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "RetentionPolicy",
    "IndexPolicy",
    "LayerView",
    "resolve_chunk",
    "CompactionPlan",
    "RowPlan",
    "identity_plan",
    "LadderPolicy",
    "ladder_plan",
    "ladder_policy",
    "ReferenceLadderPolicy",
    "StreamingPolicy",
    "streaming_policy",
    "window_plan",
    "SalientLadderPolicy",
    "ScorePolicy",
    "TOVAPolicy",
    "H2OPolicy",
    "KNormPolicy",
    "KeyDiffPolicy",
    "keep_top",
]
