"""memfit: fit large models into the memory you have.

The verbs: `load` a model, `estimate` what a plan would hold, `apply` a plan, `evaluate` the
result, `optimize` (search for the best plan under a budget), `train` (fine-tune under a budget)
and `save`.

Example:
    >>> import memfit
    >>> model, tokenizer = memfit.load("demo")
    >>> memfit.estimate(model, "int4-g128").weight_bytes
    >>> memfit.apply(model, "int8")
    >>> memfit.evaluate(model, tokenizer).perplexity
    >>> memfit.save(model, tokenizer, "smollm2-int8")
"""

from memfit import strategies  # noqa: F401  (registers every strategy)
from memfit.errors import (
    BudgetError,
    CheckpointError,
    DataError,
    MemfitError,
    ModelNotFoundError,
    OutputError,
    RecipeError,
)
from memfit.evaluate import Metrics, evaluate
from memfit.io import save
from memfit.memory.estimate import estimate
from memfit.memory.report import MemoryReport, weight_bytes
from memfit.models.load import load
from memfit.plan import Context, Mode, Plan, Workload, apply
from memfit.planner.search import Candidate, OptimizeResult, optimize
from memfit.strategies import (
    W8A8,
    Cast,
    Fp8Weights,
    Int4WeightOnly,
    Int8WeightOnly,
    MixedBits,
    Precision,
    Strategy,
    Targets,
)

# `memfit.train` is the function; its subpackage stays importable as `memfit.train.loop` etc.
from memfit.train.loop import StepInfo, TrainResult, train  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "Candidate",
    "Cast",
    "CheckpointError",
    "Context",
    "DataError",
    "Fp8Weights",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "MemfitError",
    "MixedBits",
    "MemoryReport",
    "Metrics",
    "Mode",
    "ModelNotFoundError",
    "OptimizeResult",
    "OutputError",
    "Plan",
    "Precision",
    "RecipeError",
    "Strategy",
    "Targets",
    "W8A8",
    "Workload",
    "apply",
    "estimate",
    "evaluate",
    "load",
    "optimize",
    "save",
    "StepInfo",
    "TrainResult",
    "train",
    "weight_bytes",
]
