"""Memory accounting: live tracking (`track`), reports (`MemoryReport`) and prediction (`estimate`)."""

from memfit.memory.report import CATEGORIES, MemoryReport, weight_bytes, weight_report
from memfit.memory.tracker import Tracker, track

__all__ = ["CATEGORIES", "MemoryReport", "Tracker", "track", "weight_bytes", "weight_report"]
