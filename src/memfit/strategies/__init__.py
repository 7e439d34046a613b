"""Memory-saving strategies. Every strategy module is imported here, so registration is explicit."""

from memfit.strategies import precision, training
from memfit.strategies.base import Phase, Strategy
from memfit.strategies.lowrank import LowRank
from memfit.strategies.precision import Cast, Precision
from memfit.strategies.prune import sparse
from memfit.strategies.prune.sparse import Prune, PruneMethod
from memfit.strategies.prune.structured import DropLayers, PruneHeads, PruneMlp
from memfit.strategies.quantize import mixed, rtn, w8a8
from memfit.strategies.quantize.mixed import MixedBits
from memfit.strategies.quantize.rtn import Int4WeightOnly, Int8WeightOnly
from memfit.strategies.quantize.w8a8 import W8A8, Fp8Weights
from memfit.strategies.registry import known_tokens, parse_token, strategy_classes
from memfit.strategies.targets import Targets
from memfit.strategies.training import Checkpointing, LoRA, MasterWeights

__all__ = [
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
    "Phase",
    "Precision",
    "Prune",
    "PruneHeads",
    "PruneMethod",
    "PruneMlp",
    "Strategy",
    "Targets",
    "known_tokens",
    "mixed",
    "parse_token",
    "precision",
    "rtn",
    "sparse",
    "strategy_classes",
    "training",
    "W8A8",
    "w8a8",
]
