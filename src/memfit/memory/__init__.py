"""Memory accounting: live tracking (`track`), measured workloads (`profile`), reports (`MemoryReport`).

Prediction is `memfit.estimate`, which runs the same workload code on fake tensors.
"""

from memfit.memory.report import CATEGORIES, MemoryReport, weight_bytes, weight_report
from memfit.memory.tracker import Tracker, track
from memfit.memory.workload import profile

__all__ = ["CATEGORIES", "MemoryReport", "Tracker", "profile", "track", "weight_bytes", "weight_report"]
