"""Low-rank factorization: each targeted Linear becomes two thinner ones, W ~ up @ down.

A Linear with N outputs and K inputs holds N*K weights; as an N x r factor times an r x K factor it
holds r*(N+K), fewer whenever r < NK/(N+K). The truncated SVD gives the rank-r factors closest to
the weight (Eckart-Young); SVD-LLM's whitening (Wang et al. 2024, https://arxiv.org/abs/2403.07378)
gives the rank-r factors with the least error on the layer's *outputs* for calibration inputs.

The factors are plain ``nn.Linear`` modules inside a `LowRankLinear`, so a quantization recipe
after the factorization (``lowrank-mlp-50,int8``) rounds them like any other Linear.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from memfit.errors import RecipeError
from memfit.memory.fake import is_fake, value_or
from memfit.models.arch import LLAMA, decoder_parts
from memfit.strategies.base import Phase, Strategy, register_field_type
from memfit.strategies.layerwise import InputStatistics, LayerInputs, calibrate_layers, run_layer
from memfit.strategies.quantize.calibrated import has_values
from memfit.strategies.quantize.walk import set_submodule
from memfit.strategies.registry import register
from memfit.strategies.targets import Targets

if TYPE_CHECKING:
    from memfit.workload import Context, Workload

_TOKEN = re.compile(r"lowrank-(mlp|attn|all)-(?:(\d+)|e(\d+(?:\.\d+)?))(-act)?")
_TOKEN_HELP = (
    "write lowrank-{mlp|attn|all}-P (keep P% of the parameters, 1-99) or lowrank-{mlp|attn|all}-eE "
    "(keep E% of the spectral energy, 0-100 exclusive), optionally ending in -act"
)
_DAMP = 1e-2  # whitening damping, relative to the mean diagonal of X^T X (as GPTQ's)
_DAMP_TRIES = 8  # each failed Cholesky multiplies the damping by 10


class LowRankLinear(nn.Module):
    """A Linear layer held as two factors: ``up(down(x))``, a rank-``r`` approximation of W.

    Args:
        down_weight: [r, K], the first factor (no bias).
        up_weight: [N, r], the second factor.
        bias: [N] or None, the original layer's bias (kept as it was).

    Example:
        >>> layer = lowrank_linear_from(nn.Linear(256, 256), rank=32)  # 16k weights instead of 65k
        >>> layer(torch.randn(2, 256)).shape
        torch.Size([2, 256])
    """

    def __init__(self, down_weight: torch.Tensor, up_weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.down = _linear(down_weight, None)
        self.up = _linear(up_weight, bias)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # x: [..., K] -> [..., r] -> [..., N]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (and ``bias``) itself: built on meta, so nothing is
    allocated or initialized, then given the tensors."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return linear


# -- the arithmetic -----------------------------------------------------------------------------
def budget_rank(out_features: int, in_features: int, keep: float) -> int:
    """The rank whose two factors hold ``keep`` percent of an N x K weight's parameters:
    floor(keep/100 * NK / (N+K)), at least 1."""
    n, k = out_features, in_features
    if isinstance(keep, int):  # exact integer arithmetic for the percentages tokens carry
        return max(1, keep * n * k // (100 * (n + k)))
    return max(1, math.floor(keep * n * k / (100 * (n + k))))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r whose top r singular values hold ``energy`` percent of the sum of squares."""
    power = singular_values.double().pow(2)
    kept = power.cumsum(0) / power.sum().clamp(min=1e-300)
    return min(int((kept < energy / 100).sum()) + 1, singular_values.numel())


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """True if factors of ``rank`` hold fewer weights than the N x K matrix."""
    return rank * (out_features + in_features) < out_features * in_features


def whitening(hessian: torch.Tensor) -> torch.Tensor:
    """L, the lower Cholesky factor of X^T X + damp I, with damp = 1e-2 x the mean diagonal,
    raised tenfold while the factorization fails. ``hessian`` may be any positive multiple of
    X^T X (`InputStatistics.hessian` gives 2 X^T X / rows); the damping scales with it.

    Raises:
        RecipeError: no damping makes the matrix positive definite (NaN or inf inputs).
    """
    h = hessian.float()
    mean = value_or(h.diagonal().mean(), 1.0)  # a prediction has no values: any positive mean
    damp = _DAMP * mean if mean > 0 else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(_DAMP_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if value_or(info, 0) == 0:  # a prediction assumes the factorization succeeds
            return lower
        damp *= 10
    raise RecipeError(
        "low-rank whitening failed: X^T X of the calibration inputs is not finite",
        "check the model and the calibration text for NaN or inf activations",
    )


@dataclasses.dataclass(frozen=True)
class Factors:
    """The fp32 SVD of W (plain) or of W L (whitened): ``u @ diag(s) @ vh``.

    Attributes:
        u: [N, m] left singular vectors (m = min(N, K)).
        s: [m] singular values, descending.
        vh: [m, K] right singular vectors.
        lower: L [K, K] when whitened, else None.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    lower: torch.Tensor | None = None


def svd_factors(weight: torch.Tensor, hessian: torch.Tensor | None = None) -> Factors:
    """The SVD of ``weight`` [N, K] in fp32, or with ``hessian`` (X^T X of its inputs, [K, K]) of
    W L, whose truncation minimizes the output error ||X (W - W')^T|| instead of ||W - W'||."""
    w = weight.detach().float()
    lower = None if hessian is None else whitening(hessian.to(w.device))
    u, s, vh = torch.linalg.svd(w if lower is None else w @ lower, full_matrices=False)
    return Factors(u, s, vh, lower)


def lowrank_linear_from(
    linear: nn.Linear, rank: int, hessian: torch.Tensor | None = None, factors: Factors | None = None
) -> LowRankLinear:
    """``linear`` as a rank-``rank`` `LowRankLinear` in the weight's dtype: up = U_r S_r^1/2,
    down = S_r^1/2 V_r^T (times L^-1 when whitened by ``hessian``). On meta tensors, the shapes.

    Args:
        factors: `svd_factors` of the layer, if already computed (energy mode needs them first).
    """
    weight = linear.weight
    n, k = weight.shape
    bias = linear.bias
    if weight.is_meta:
        empty = lambda *shape: torch.empty(shape, dtype=weight.dtype, device="meta", requires_grad=weight.requires_grad)
        return LowRankLinear(empty(rank, k), empty(n, rank), bias)
    f = factors if factors is not None else svd_factors(weight, hessian)
    root = f.s[:rank].sqrt()
    up = f.u[:, :rank] * root  # [N, r]
    down = root[:, None] * f.vh[:rank]  # [r, K]
    if f.lower is not None:  # down L = S^1/2 V^T, so up @ down @ L = the truncated W L
        down = torch.linalg.solve_triangular(f.lower, down, upper=False, left=False)
    cast = lambda t: t.to(weight.dtype).contiguous().requires_grad_(weight.requires_grad)
    return LowRankLinear(cast(down), cast(up), bias)


# -- the strategy -------------------------------------------------------------------------------
@register_field_type
class Scope(enum.Enum):
    """Which decoder-layer Linears are factored (never the embedding or the output head)."""

    MLP = "mlp"
    ATTN = "attn"
    ALL = "all"


_SCOPE_CHILDREN = {Scope.MLP: (LLAMA.mlp,), Scope.ATTN: (LLAMA.attention,), Scope.ALL: (LLAMA.attention, LLAMA.mlp)}


@register
@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRank(Strategy):
    """Low-rank factorization of decoder Linears by truncated SVD, plain or activation-aware.

    Memory: a factored N x K Linear holds r(N+K) weights; ``keep=50`` halves the targeted
    parameters. Speed: two thinner matmuls, r(N+K) multiply-adds per token instead of NK (small
    layers may not run faster). Quality: lossy; trained LLM weights are far from low rank, so
    expect more loss per byte saved than quantization. The activation-aware variant (SVD-LLM
    whitening, token suffix ``-act``) minimizes the output error on calibration text instead of
    the weight error, at the same bytes. Factoring first and quantizing the factors
    (``lowrank-mlp-50,int8``) stacks the savings.

    Args:
        scope: ``MLP`` (gate/up/down), ``ATTN`` (q/k/v/o) or ``ALL`` decoder-layer Linears.
        keep: percent (1-99) of each targeted Linear's parameters the factors hold: rank
            floor(keep/100 x NK/(N+K)). Depends on shapes only, so bytes are predicted exactly.
        energy: instead of ``keep``, percent (0-100, exclusive) of spectral energy kept: each
            Linear's rank is the smallest r whose top singular values hold ``energy`` percent of the
            sum of their squares (of W L with ``activation_aware``). A Linear whose rank would not
            save parameters stays whole. The ranks depend on the weights: applying records them
            in ``ranks``. A prediction before any data (meta tensors, no ``ranks``) uses the
            ``keep`` rank for ``keep = energy``: an approximation, as mixed-bits' dry run is.
        activation_aware: whiten by the Cholesky factor of each Linear's input X^T X on
            calibration text, layer by layer (each layer sees the already factored ones' outputs).
        ranks: ``((fqn, rank), ...)``: the Linears to factor and their ranks, overriding the
            rules above; filled in by energy mode and recorded in the saved recipe.

    Example:
        >>> memfit.apply(model, "lowrank-mlp-50-act,int8", memfit.Context(calibration=windows))
    """

    name = "lowrank"
    forms = "lowrank-S-P[-act]|lowrank-S-eE[-act]"
    summary = (
        "low-rank factors (truncated SVD) of the decoder Linears of scope S (mlp, attn, all), P% of the "
        "parameters or E% of the energy; -act whitens by calibration inputs"
    )
    exportable = False
    phase = Phase.STRUCTURE
    order = 3
    in_config = False
    sqnr_floor_db = 12.0
    saves = frozenset({"parameters"})

    scope: Scope = Scope.MLP
    keep: int | None = None
    energy: float | None = None
    activation_aware: bool = False
    ranks: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple((str(fqn), int(rank)) for fqn, rank in self.ranks))
        if (self.keep is None) == (self.energy is None):
            raise ValueError(f"set exactly one of keep and energy, got keep={self.keep}, energy={self.energy}")
        if self.keep is not None and not (isinstance(self.keep, int) and 1 <= self.keep <= 99):
            raise ValueError(f"keep must be a whole percent from 1 to 99, got {self.keep!r}")
        if self.energy is not None:
            object.__setattr__(self, "energy", float(self.energy))
            if not 0 < self.energy < 100:
                raise ValueError(f"energy must be a percent between 0 and 100 (exclusive), got {self.energy}")
        if any(rank < 1 for _, rank in self.ranks):
            raise ValueError(f"ranks must be at least 1, got {self.ranks}")

    @property
    def token(self) -> str:
        amount = str(self.keep) if self.keep is not None else f"e{self.energy:g}"
        return f"lowrank-{self.scope.value}-{amount}{'-act' if self.activation_aware else ''}"

    @property
    def needs_calibration(self) -> bool:
        return self.activation_aware

    @property
    def resolves(self) -> bool:
        return self.energy is not None and not self.ranks

    @classmethod
    def from_token(cls, token: str) -> LowRank | None:
        if not token.startswith("lowrank"):
            return None
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise RecipeError(f"recipe token {token!r} is not a low-rank token", _TOKEN_HELP)
        scope, keep, energy, act = match.groups()
        if keep is not None and not 1 <= int(keep) <= 99:
            raise RecipeError(
                f"recipe token {token!r} keeps {keep}% of the parameters", "use 1 to 99, as in lowrank-mlp-50"
            )
        if energy is not None and not 0 < float(energy) < 100:
            raise RecipeError(
                f"recipe token {token!r} keeps {energy}% of the spectral energy",
                "use more than 0 and less than 100, as in lowrank-mlp-e90",
            )
        return cls(
            scope=Scope(scope),
            keep=None if keep is None else int(keep),
            energy=None if energy is None else float(energy),
            activation_aware=bool(act),
        )

    @classmethod
    def examples(cls) -> list[Strategy]:
        # MLP only: on the tiny random models factoring attention costs logits 6-9 dB of SQNR at any
        # setting that saves bytes (flat spectra, and rank-limited q/k change every attention score)
        return [
            cls(keep=50),
            cls(energy=50.0),
            cls(keep=50, activation_aware=True),
            cls(energy=50.0, activation_aware=True),
        ]

    @classmethod
    def space(cls, workload: Workload) -> list[Strategy]:
        # one option, since the planner multiplies its candidates by each phase's option count; the
        # activation-aware variant holds the same bytes as the plain one and loses less
        return [cls(keep=50, activation_aware=True)]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        fqns = self._targeted(model)
        if self.ranks:
            missing = sorted({fqn for fqn, _ in self.ranks} - set(fqns))
            if missing:
                raise RecipeError(
                    f"{self.token}: the recipe has ranks for {missing[:3]}, which this model lacks "
                    "among its targeted Linears",
                    "apply the strategy without ranks to this model (energy mode chooses them)",
                )
        chosen: dict[str, int] = {}
        real = has_values(model) or ctx.source is not None  # a streamed model is read as it goes
        if self.activation_aware and real:
            self._apply_calibrated(model, ctx, fqns, chosen)
        else:
            for done, fqn in enumerate(fqns):
                if ctx.source is not None:
                    ctx.source.materialize(model, fqn)
                self._factor(model, fqn, fqn, None, chosen)
                ctx.report(f"{self.token}: layers", done + 1, len(fqns))
        if self.energy is not None and not self.ranks and real:
            ranks = tuple((fqn, chosen[fqn]) for fqn in fqns if fqn in chosen)
            ctx.resolve(self, dataclasses.replace(self, ranks=ranks))
        whole = len(fqns) - len(chosen)
        ctx.note(
            f"{self.token}: factored {len(chosen)} Linears"
            + (f" at ranks {min(chosen.values())}-{max(chosen.values())}" if chosen else "")
            + (f"; {whole} left whole (factors would not be smaller)" if whole else "")
        )
        return model

    def _targeted(self, model: nn.Module) -> list[str]:
        layers_fqn = decoder_parts(model).layers_fqn
        targets = Targets(include=tuple(f"{layers_fqn}.*.{child}.*" for child in _SCOPE_CHILDREN[self.scope]))
        return [fqn for fqn, m in model.named_modules() if type(m) is nn.Linear and targets.matches(fqn)]

    def _rank(self, fqn: str, linear: nn.Linear, singular_values: torch.Tensor | None) -> int | None:
        """The rank ``linear`` is factored at, or None to leave it whole."""
        if self.ranks:
            return dict(self.ranks).get(fqn)
        n, k = linear.out_features, linear.in_features
        if self.keep is not None:
            rank = budget_rank(n, k, self.keep)
        elif singular_values is None or is_fake(singular_values):  # a prediction: the parameter-budget rank
            rank = budget_rank(n, k, self.energy)
        else:
            rank = energy_rank(singular_values, self.energy)
        return rank if saves_parameters(n, k, rank) else None

    def _factor(self, root: nn.Module, name: str, fqn: str, hessian: torch.Tensor | None, chosen: dict) -> None:
        """Replace ``root``'s Linear ``name`` (model fqn ``fqn``) by its factors, if they save."""
        linear = root.get_submodule(name)
        factors = None if linear.weight.is_meta else svd_factors(linear.weight, hessian)
        rank = self._rank(fqn, linear, None if factors is None else factors.s)
        if rank is None:
            return
        set_submodule(root, name, lowrank_linear_from(linear, rank, factors=factors))
        chosen[fqn] = rank

    def _apply_calibrated(self, model: nn.Module, ctx: Context, fqns: list[str], chosen: dict) -> None:
        calibration = ctx.calibration_for(self.token)
        layers_fqn = decoder_parts(model).layers_fqn
        targeted = set(fqns)

        def process(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            prefix = f"{layers_fqn}.{index}"
            linears = {name: m for name, m in layer.named_modules() if f"{prefix}.{name}" in targeted}
            with InputStatistics(linears) as stats:
                run_layer(layer, inputs)
            for name in linears:
                self._factor(layer, name, f"{prefix}.{name}", stats.hessian(name), chosen)

        calibrate_layers(model, calibration, process, ctx, f"{self.token}: calibrating layers")
