"""Measurement primitives: live tracking (`track`), reports (`MemoryReport`), process RSS, rendering.

Measured workloads are `memfit.profile`; prediction is `memfit.estimate`, which runs the same
workload code on fake tensors under the same tracker.
"""

from memfit.memory.report import CATEGORIES, MemoryReport, weight_bytes, weight_report
from memfit.memory.tracker import Tracker, track

__all__ = ["CATEGORIES", "MemoryReport", "Tracker", "track", "weight_bytes", "weight_report"]
