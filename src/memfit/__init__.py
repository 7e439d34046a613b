"""memfit: fit large models into the memory you have.

The verbs: `load` a model, `estimate` what a plan would hold, `profile` what a workload holds,
`apply` a plan, `evaluate` the result, `compress` (apply, measure, save in one streamed run),
`optimize` (search for the best plan under a budget), `train` (fine-tune under a budget), `distill`
(train a smaller or quantized student to match a frozen teacher), `save`, and
`generate` (text through memfit's runtime: static KV cache, compiled decode step).

Example:
    >>> import memfit
    >>> model, tokenizer = memfit.load("demo")
    >>> memfit.estimate(model, "int4-g128").weight_bytes
    >>> memfit.apply(model, "int8")
    >>> memfit.evaluate(model, tokenizer).perplexity
    >>> memfit.save(model, tokenizer, "smollm2-int8")
"""

from memfit import strategies  # noqa: F401  (registers every strategy)
from memfit.compress import CompressResult, compress
from memfit.errors import (
    BudgetError,
    CheckpointError,
    DataError,
    MemfitError,
    ModelNotFoundError,
    OutputError,
    RecipeError,
)
from memfit.estimate import estimate
from memfit.evaluate import Metrics, evaluate
from memfit.io import load, save
from memfit.memory.report import MemoryReport, weight_bytes
from memfit.plan import Plan, apply
from memfit.planner.search import Candidate, OptimizeResult, optimize
from memfit.profile import profile
from memfit.runtime import Generation, Sampling, generate
from memfit.settings import OptimizerKind, Parallelism, RunSettings
from memfit.strategies import (
    W8A8,
    Cast,
    Checkpointing,
    DropLayers,
    Fp8Weights,
    Int4WeightOnly,
    Int8WeightOnly,
    LoRA,
    LowRank,
    MasterWeights,
    MixedBits,
    Precision,
    Prune,
    PruneHeads,
    PruneMlp,
    Strategy,
    Targets,
)

# `memfit.train` is the function; its subpackage stays importable as `memfit.train.loop` etc.
from memfit.train.distill import DistillResult, distill
from memfit.train.loop import StepInfo, TrainResult, train
from memfit.workload import Context, Mode, Workload

__version__ = "0.1.0"

__all__ = [
    # verbs
    "apply",
    "compress",
    "distill",
    "estimate",
    "evaluate",
    "generate",
    "load",
    "optimize",
    "profile",
    "save",
    "train",
    # plans, workloads, results
    "Candidate",
    "CompressResult",
    "Context",
    "DistillResult",
    "Generation",
    "MemoryReport",
    "Metrics",
    "Mode",
    "OptimizeResult",
    "OptimizerKind",
    "Parallelism",
    "Plan",
    "RunSettings",
    "Sampling",
    "StepInfo",
    "TrainResult",
    "Workload",
    "weight_bytes",
    # strategies (every registered class; tests/test_strategies.py holds it)
    "Cast",
    "Checkpointing",
    "DropLayers",
    "Fp8Weights",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "LoRA",
    "LowRank",
    "MasterWeights",
    "MixedBits",
    "Precision",
    "Prune",
    "PruneHeads",
    "PruneMlp",
    "Strategy",
    "Targets",
    "W8A8",
    # errors
    "BudgetError",
    "CheckpointError",
    "DataError",
    "MemfitError",
    "ModelNotFoundError",
    "OutputError",
    "RecipeError",
]
