"""Evaluating candidate plans: in this process, or in worker processes that share one study.

`evaluate_plan` applies a plan to a copy of the model and measures it; the search calls it for
each plan it chose, or hands the plans to workers (`Workers`): it queues them as trials of a study
(`memfit.planner.trials.SharedTrials`), starts ``count`` local ``memfit worker`` processes, waits
for every plan's result (reclaiming the trials of workers that died and starting workers again
while trials are queued), and reads the results back. A worker (`work`) loads the model and the
settings the study records and evaluates queued trials until none is left.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from memfit.estimate import estimate
from memfit.evaluate import evaluate
from memfit.plan import Plan, apply
from memfit.planner.trials import PLAN, SharedTrials, StudyError, default_storage, plan_key
from memfit.workload import Context, ProgressFn, Workload

log = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the search looks at the study while workers run."""
STARTS_PER_WORKER = 3
"""Local worker processes started per ``count`` before the search gives up on them."""


@dataclasses.dataclass(frozen=True)
class Workers:
    """Evaluate the plans the search chooses in worker processes sharing one Optuna study.

    Args:
        model: the reference the workers load the model by (a directory, a .gguf file, ``"demo"``):
            the model given to `optimize`.
        count: local worker processes (each runs one evaluation at a time).
        storage: a journal file path or a database URL (default: `default_storage`); workers on
            other machines join with ``memfit worker --storage S --study NAME``.
        study: the study's name (default: from the model and the evaluation settings, so the same
            search, killed, resumes, and one at another budget reuses the evaluations it shares).
        threads: torch threads per local worker (default: the CPU count shared out).
    """

    model: str
    count: int = 2
    storage: str | None = None
    study: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")


def evaluate_plan(model: nn.Module, tokenizer, plan: Plan, workload: Workload | None, calibration, memo: dict,
                  evaluate_kw: dict, progress: ProgressFn | None) -> tuple[dict, nn.Module]:
    """Apply ``plan`` to a copy of ``model`` and evaluate it.

    Returns:
        ``{"plan": the applied plan (choices made on data filled in) as a dict, "metrics":
        `Metrics.to_dict`, "notes": what the strategies reported, "predicted_peak_bytes": the
        workload's peak predicted on the applied model, or None without a workload}`` (JSON, as a
        trial records it), and the applied copy.
    """
    work, ctx = applied_copy(model, plan, progress, calibration, memo)
    applied = dataclasses.replace(plan, strategies=work.memfit_plan.strategies)
    metrics = evaluate(work, tokenizer, **evaluate_kw, kv_cache=plan.settings.kv_cache,
                       progress=stage(progress, applied.recipe))
    peak = None if workload is None else estimate(work, Plan(settings=plan.settings), workload).peak_bytes
    return {"plan": applied.to_dict(), "metrics": metrics.to_dict(), "notes": list(ctx.notes),
            "predicted_peak_bytes": peak}, work


def applied_copy(model: nn.Module, plan: Plan, progress: ProgressFn | None, calibration: torch.Tensor | None,
                 memo: dict) -> tuple[nn.Module, Context]:
    work = copy.deepcopy(model)
    ctx = Context(progress=progress, calibration=calibration, memo=memo)
    apply(work, plan, ctx)
    return work, ctx


def study_config(workers: Workers, text: str | None, evaluate_kw: dict, calibration: torch.Tensor,
                 workload: Workload | None) -> dict:
    """What a worker needs to evaluate a plan as this process would, as JSON."""
    from importlib.metadata import version

    return {
        "model": workers.model,
        "text": text,
        "num_tokens": evaluate_kw["num_tokens"],
        "measure_speed": evaluate_kw["measure_speed"],
        "calibration": calibration.tolist(),
        "workload": None if workload is None else workload.to_dict(),
        "memfit": version("memfit"),
    }


def open_study(workers: Workers, config: dict) -> SharedTrials:
    """The study the search queues its plans in (created, or resumed if it exists with ``config``)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    shared = SharedTrials(workers.storage or default_storage(), workers.study or f"memfit-optimize-{digest}",
                          create=True)
    shared.configure(config)
    log.info("trials in study %s (%s); more workers join with: memfit worker --storage %s --study %s",
             shared.name, shared.spec, shared.spec, shared.name)
    return shared


def run_workers(shared: SharedTrials, workers: Workers, plans: list[Plan],
                progress: ProgressFn | None = None) -> list[dict]:
    """Queue ``plans`` (those without a result), run local workers until each has one, and return
    the results in order (`evaluate_plan`'s dicts).

    Raises:
        StudyError: a plan's evaluation raised in a worker, or the local workers keep failing to start.
    """
    keys = [plan_key(p) for p in plans]
    shared.enqueue(keys)
    threads = workers.threads or max(1, (os.cpu_count() or 1) // workers.count)
    running: list[tuple[subprocess.Popen, Path]] = []
    starts, failed = 0, None
    logs = Path(tempfile.mkdtemp(prefix="memfit-workers-"))
    label = f"evaluating on {workers.count} worker{'s' if workers.count > 1 else ''}"
    try:
        while True:
            shared.reclaim()
            outcomes = shared.outcomes(keys)
            if progress:
                progress(label, sum(o is not None for o in outcomes), len(keys))
            if all(o is not None for o in outcomes):
                break
            for proc, err in running:
                if proc.poll() not in (None, 0):
                    failed = _last_line(err) or f"exit code {proc.returncode}"
            running = [(p, e) for p, e in running if p.poll() is None]
            if not running and shared.waiting():
                if starts >= STARTS_PER_WORKER * workers.count:
                    raise StudyError(f"memfit worker processes keep exiting ({failed or 'no error printed'})",
                                     f"run `memfit worker --storage {shared.spec} --study {shared.name}` to see why")
                for _ in range(min(workers.count, shared.waiting())):
                    running.append(_spawn(shared, threads, logs / f"worker-{starts}.log"))
                    starts += 1
            time.sleep(POLL_S)
    finally:
        for proc, _ in running:
            proc.terminate()
        for proc, _ in running:
            proc.wait()
        shutil.rmtree(logs, ignore_errors=True)
    for plan, outcome in zip(plans, outcomes, strict=True):
        if isinstance(outcome, str):
            raise StudyError(f"evaluating {plan.recipe!r} failed in a worker: {outcome}",
                             "fix the cause, then run the same command again (completed plans are kept)")
    return outcomes


def work(shared: SharedTrials, progress: ProgressFn | None = None) -> int:
    """Evaluate the study's queued trials until none is left (this process is one worker).

    Returns:
        How many trials this worker completed.
    """
    from memfit.io import load

    config = shared.config()
    model, tokenizer = load(config["model"])
    calibration = torch.tensor(config["calibration"])
    workload = None if config["workload"] is None else Workload.from_dict(config["workload"])
    evaluate_kw = dict(text=config["text"], num_tokens=config["num_tokens"], measure_speed=config["measure_speed"])
    memo: dict = {}
    done = 0
    while True:
        shared.reclaim()  # a dead worker's trial is queued again before this one looks
        trial = shared.pop()
        if trial is None:
            break
        plan = Plan.from_dict(json.loads(trial.user_attrs[PLAN]))
        with shared.heartbeat(trial):
            try:
                result, _ = evaluate_plan(model, tokenizer, plan, workload, calibration, memo, evaluate_kw, progress)
            except Exception as exc:  # recorded for the search to report; the next trial may still run
                log.exception("trial %d (%s) failed", trial.number, plan.recipe)
                shared.fail(trial, f"{type(exc).__name__}: {exc}")
                continue
        shared.complete(trial, result["metrics"]["perplexity"], result)
        done += 1
    return done


def _spawn(shared: SharedTrials, threads: int, err: Path) -> tuple[subprocess.Popen, Path]:
    command = [sys.executable, "-m", "memfit.cli.main", "worker", "--storage", shared.spec, "--study", shared.name,
               "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    return proc, err


def _last_line(path: Path) -> str | None:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def stage(progress: ProgressFn | None, label: str) -> ProgressFn | None:
    """``progress`` with ``label`` before each description."""
    if progress is None:
        return None
    return lambda description, done, total: progress(f"{label}: {description}", done, total)
