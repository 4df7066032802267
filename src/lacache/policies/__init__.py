"""Which slots survive: one small module per retention rule, all answering ``RetentionPolicy.retain``."""

from .authors_ladder import ReferenceLadderPolicy
from .base import IndexPolicy, LayerView, RetentionPolicy
from .ladder import LadderPolicy, ladder_plan
from .plan import CompactionPlan, RowPlan, identity_plan
from .salient import SalientLadderPolicy
from .scores import H2OPolicy, KNormPolicy, ScorePolicy, TOVAPolicy, keep_top
from .streaming import StreamingPolicy, window_plan

__all__ = [
    "RetentionPolicy",
    "IndexPolicy",
    "LayerView",
    "CompactionPlan",
    "RowPlan",
    "identity_plan",
    "LadderPolicy",
    "ladder_plan",
    "ReferenceLadderPolicy",
    "StreamingPolicy",
    "window_plan",
    "SalientLadderPolicy",
    "ScorePolicy",
    "TOVAPolicy",
    "H2OPolicy",
    "KNormPolicy",
    "keep_top",
]
