"""Processes that time and run training plans over several ranks, for `memfit.planner.training`.

A plan with ``ddp`` or ``fsdp`` is only measured honestly in as many processes as it runs in: the
gradient all-reduce, FSDP's gathers and reduce-scatters, and on a CPU the cores the ranks share
are all part of its step. `RankPool` starts ``workload.ranks`` processes once (spawned; the model
reaches them through shared memory) and hands every rank the same task: time a micro-batch's
forward and backward of a plan, with or without the gradient synchronization, or run real steps
of `memfit.train`. Each task joins a fresh process group (gloo on the CPU, nccl on CUDA, a file
store in a private directory) and leaves it, as a torchrun-started ``memfit train --nproc N`` run
joins and leaves its own.
"""

from __future__ import annotations

import copy
import os
import queue
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from memfit.errors import RecipeError
from memfit.plan import Plan
from memfit.train import distributed
from memfit.workload import Workload

POLL_S = 5.0
"""How often the parent looks for dead ranks while it waits for an answer."""


class RankPool:
    """``workload.ranks`` processes that time and run plans together (see the module).

    Use as a context manager; `close` stops the processes.

    Raises:
        RecipeError: CUDA is asked for and there are fewer GPUs than ranks.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, workload: Workload) -> None:
        self.size = workload.ranks
        self.device_type = distributed.device_type(workload.device)
        if self.device_type == "cuda" and torch.cuda.device_count() < self.size:
            raise RecipeError(f"{self.size} ranks need {self.size} GPUs; this machine has {torch.cuda.device_count()}",
                              f"use at most {torch.cuda.device_count()} ranks, or a workload on the CPU")
        # The ranks share the cores on a CPU, as torchrun's children do (`distributed.launch`).
        threads = max(1, torch.get_num_threads() // self.size) if self.device_type == "cpu" else 1
        self._folder = tempfile.TemporaryDirectory(prefix="memfit-ranks-")
        context = mp.get_context("spawn")
        shared = copy.deepcopy(model)  # its storages move to shared memory on the way; the caller's stay put
        self._commands = [context.Queue() for _ in range(self.size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_rank_main, daemon=True, args=(
                rank, self.size, self.device_type, threads, shared, tokenizer, self._folder.name,
                self._commands[rank], self._results))
            for rank in range(self.size)
        ]
        for process in self._processes:
            process.start()
        del shared
        self._task = 0

    def micro_batch(self, _model: nn.Module, plan: Plan, micro: int, seq: int, sync: bool = False) -> float:
        """Seconds of one micro-batch's forward and backward on every rank (the slowest rank's);
        ``sync``: with the gradient synchronization of a step's last micro-batch."""
        return max(self._ask("time", plan, micro, seq, sync).values())

    def train(self, plan: Plan, *, data: str | None, steps: int, batch: int, seq: int, seed: int) -> tuple[float, int]:
        """``(tokens/s, the largest rank's tracked peak)`` of a real `memfit.train` run of ``plan``."""
        return self._ask("train", plan, data, steps, batch, seq, seed)[0]

    def _ask(self, kind: str, *payload: Any) -> dict[int, Any]:
        self._task += 1
        for commands in self._commands:
            commands.put((self._task, kind, payload))
        answers: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(answers) + len(errors) < self.size:  # every rank's answer, so none is read as the next task's
            try:
                task, rank, value, error = self._results.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a rank process exited with code {dead[0].exitcode}") from None
                continue
            if task != self._task:  # a late answer to a task that failed elsewhere
                continue
            if error is not None:
                errors[rank] = error
            else:
                answers[rank] = value
        if errors:
            rank = min(errors)
            raise RuntimeError(f"rank {rank}: {errors[rank]}")
        return answers

    def close(self) -> None:
        for commands in self._commands:
            commands.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():  # stuck in a collective a failed rank left
                process.kill()
                process.join()
        self._folder.cleanup()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rank_main(rank: int, size: int, device_type: str, threads: int, model: nn.Module, tokenizer: Any,
               folder: str, commands, results) -> None:
    """One rank: answer tasks until told to stop (None)."""
    from memfit.parallel import World
    from memfit.planner.training import _Timer

    torch.set_num_threads(threads)
    # what torchrun sets: `memfit.train` reads its rank from here and joins the group this joined
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    timer = _Timer(model, device)
    while (command := commands.get()) is not None:
        task, kind, payload = command
        try:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=size,
                                    init_method=f"file://{folder}/task-{task}")
            if kind == "time":
                plan, micro, seq, sync = payload
                value: Any = timer.micro_batch(model, plan, micro, seq, sync=sync, world=World(rank, size, device))
            else:
                value = _train(model, tokenizer, device_type, *payload)
                value = value if rank == 0 else None
            results.put((task, rank, value, None))
        except Exception as exc:  # the parent raises it
            results.put((task, rank, None, f"{type(exc).__name__}: {exc}"))
        finally:
            distributed.leave()


def _train(model: nn.Module, tokenizer: Any, device_type: str, plan: Plan, data: str | None, steps: int, batch: int,
           seq: int, seed: int) -> tuple[float, int]:
    from memfit.train.loop import train

    result = train(copy.deepcopy(model), tokenizer, data=data, steps=steps, batch=batch, seq=seq, recipe=plan,
                   seed=seed, device=device_type)  # it leaves the process group at its end
    return result.tokens_per_s, max(result.peak_bytes)
