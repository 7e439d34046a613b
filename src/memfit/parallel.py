"""Wrapping a model for its processes: DDP, or FSDP2 sharding per decoder layer.

Below the estimator and the training loop alike: `memfit.estimate` runs `wrap` on fake tensors
over a fake process group to predict an ``fsdp`` run, `memfit.train` runs it for real.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from memfit.models.arch import decoder_parts
from memfit.settings import Parallelism


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: rank, how many ranks, and its device."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def wrap(model: nn.Module, kind: Parallelism | None, world: World, mesh=None) -> nn.Module:
    """The model to train: DDP-wrapped, FSDP2-sharded in place (each decoder layer, then the
    root) over ``mesh`` (default: all ranks), or itself for a single process."""
    if world.size == 1 or kind is None:
        return model
    if kind is Parallelism.DDP:
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = mesh or init_device_mesh(world.device.type, (world.size,))
    for layer in decoder_parts(model).layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
