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
import time
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
    """Leave the process group once no gloo worker thread still has a collective to release.

    A gloo worker thread drops a finished collective's tensors after `wait()` has returned, and
    dropping a tensor Python has seen takes the GIL. If that thread has not run by the time the
    interpreter finalizes, it dies taking the GIL and the process aborts after its work is done
    ("terminate called without an active exception"; seen under CPU contention after FSDP's
    state-dict gather). Destroying the group does not join those threads (FSDP's mesh keeps the
    group alive), so after a barrier this waits until every worker thread is asleep again.
    """
    if not dist.is_initialized():
        return
    gloo = dist.get_backend() == "gloo"
    dist.barrier()
    dist.destroy_process_group()
    if gloo:
        _wait_for_gloo_threads()


def _wait_for_gloo_threads(limit_s: float = 2.0) -> None:
    """Sleep (releasing the GIL) until no ``pt_gloo_runloop`` thread is runnable in three polls in a row."""
    deadline, quiet = time.monotonic() + limit_s, 0
    while quiet < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
        states = _thread_states("pt_gloo_runloop")
        if states is None:  # no /proc: give the threads a fixed moment instead
            time.sleep(0.05)
            return
        quiet = quiet + 1 if "R" not in states else 0


def _thread_states(name: str) -> list[str] | None:
    """The scheduler states ("R", "S", ...) of this process's threads called ``name``; None without /proc."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    states = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")] == name:
            states.append(stat[stat.rindex(")") + 2])
    return states


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


def launch(argv: Sequence[str], nproc: int, verb: str = "train") -> int:
    """Run ``memfit <verb> argv`` (train, distill) in ``nproc`` processes on this machine through torchrun."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "memfit.cli.main", verb, *argv,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode
