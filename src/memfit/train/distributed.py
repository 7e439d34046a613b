"""Processes for data-parallel (DDP) and sharded (FSDP2) training, started by torchrun.

``memfit train --nproc N`` runs ``python -m torch.distributed.run --standalone --nproc-per-node N``
with the same arguments; each process reads its rank from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``), joins the process group (gloo on CPU, nccl on CUDA) and wraps the
model. Multi-node runs start the same command on every node with torchrun's own flags, for example
on each of 2 nodes::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m memfit.cli.main train --model ./llama --recipe fsdp,bf16-master ...
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from memfit.errors import RecipeError
from memfit.parallel import World, wrap

__all__ = ["World", "device_type", "gather_int", "join", "launch", "leave", "mean", "planned_ranks", "wrap"]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def planned_ranks() -> int:
    """How many processes torchrun started (1 outside torchrun), known before joining."""
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1


def device_type(device: str | None) -> str:
    """``device`` (``"cpu"``/``"cuda"``), or CUDA when available if None.

    Raises:
        RecipeError: CUDA was asked for and there is none.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise RecipeError("--device cuda, but this PyTorch sees no CUDA device", "use --device cpu or omit it")
    return kind


def join(device: str | None = None) -> World:
    """Join the process group torchrun set up (a single-process `World` when not under torchrun).

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Each rank takes GPU ``LOCAL_RANK``.
    """
    use_cuda = device_type(device) == "cuda"
    if not under_torchrun():
        return World(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank=rank, size=size, device=target)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean(value: float, world: World) -> float:
    """The mean of ``value`` over the ranks (each rank's loss is the mean over the same token count)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def gather_int(value: int, world: World) -> list[int]:
    """``value`` from every rank, in rank order."""
    if world.size == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.int64, device=world.device)
    out = [torch.zeros_like(t) for _ in range(world.size)]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``memfit train argv`` in ``nproc`` processes on this machine through torchrun."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "memfit.cli.main", "train", *argv,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode
