"""What a bounded cache keeps: each policy turns (slots now, slots allowed) into a compaction plan."""

from .base import SlotPolicy
from .ladder import LadderPolicy
from .streaming import StreamingPolicy

__all__ = ["SlotPolicy", "LadderPolicy", "StreamingPolicy"]
