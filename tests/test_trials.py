"""The planner's shared trials: worker processes on one Optuna study (memfit optimize --workers)."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

import memfit
from memfit.cli.main import main
from memfit.data import calibration_windows
from memfit.planner.trials import LOST, OWNER, PLAN, SharedTrials, StudyError
from memfit.planner.workers import Workers

TOKENS = 1024


def _search(tokenizer, model, **kwargs):
    calibration = calibration_windows(tokenizer, windows=4, window=256)
    return memfit.optimize(model, tokenizer, "30%", num_tokens=TOKENS, calibration=calibration, measure_speed=False,
                           evaluations=4, **kwargs)


def _evaluated(result) -> dict[str, float]:
    return {c.plan.recipe: c.metrics.perplexity for c in result.candidates if c.metrics is not None}


def _trials(storage: str) -> list:
    (study,) = optuna.get_all_study_summaries(_journal(storage))
    return optuna.load_study(study_name=study.study_name, storage=_journal(storage)).trials


def _journal(path: str):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))


def _recipe(trial) -> str:
    return memfit.Plan.from_dict(json.loads(trial.user_attrs[PLAN])).recipe


def test_two_workers_evaluate_what_one_process_does_each_plan_once(make_tiny, tmp_path):
    model, tokenizer = make_tiny("tiny-llama")
    alone = _search(tokenizer, model)
    storage = str(tmp_path / "study.journal")
    shared = _search(tokenizer, model, workers=Workers("tiny-llama", 2, storage=storage))
    assert shared.study["storage"] == storage
    assert _evaluated(shared) == _evaluated(alone) and len(_evaluated(alone)) == 4
    assert shared.best.plan == alone.best.plan
    trials = _trials(storage)
    assert sorted(_recipe(t) for t in trials) == sorted(r for r in _evaluated(alone) if r != "none")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.user_attrs[OWNER]["pid"] for t in trials} != {os.getpid()}  # evaluated in other processes
    # the same search again reads every result from the study and starts no worker
    again = _search(tokenizer, model, workers=Workers("tiny-llama", 2, storage=storage, threads=1))
    assert _evaluated(again) == _evaluated(alone) and len(_trials(storage)) == len(trials)


def _optimize_command(storage: str, out) -> list[str]:
    return [sys.executable, "-m", "memfit.cli.main", "optimize", "--model", "tiny-llama", "--budget", "30%",
            "--workers", "1", "--storage", storage, "--out", str(out), "--tokens", "2048", "--calibration-windows", "4",
            "--evaluate", "4", "--json"]


def _running_owner(storage: str, deadline: float) -> int:
    """The pid of the worker running a trial, stopped (SIGSTOP) while the trial is still running, so
    the kill that follows lands mid-trial."""
    journal = _journal(storage)
    running = (optuna.trial.TrialState.RUNNING,)
    while time.monotonic() < deadline:
        studies = journal.get_all_studies()
        if studies:
            for trial in journal.get_all_trials(studies[0]._study_id, states=running):
                if OWNER in trial.user_attrs:
                    pid = trial.user_attrs[OWNER]["pid"]
                    os.kill(pid, signal.SIGSTOP)
                    if journal.get_trial(trial._trial_id).state in running:
                        return pid
                    os.kill(pid, signal.SIGCONT)  # it finished meanwhile: wait for the next one
        time.sleep(0.02)
    raise AssertionError("no trial ran")


def test_a_dead_worker_trial_is_run_again_and_a_killed_search_resumes(tmp_path):
    # a worker killed mid-trial: the search sees its process gone, queues the trial again, starts another worker
    storage, out = str(tmp_path / "a.journal"), tmp_path / "a"
    search = subprocess.Popen(_optimize_command(storage, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.kill(_running_owner(storage, time.monotonic() + 120), signal.SIGKILL)
    stdout, stderr = search.communicate(timeout=300)
    assert search.returncode == 0, stderr.decode()[-2000:]
    first = json.loads(stdout.decode().strip().splitlines()[-1])
    trials = _trials(storage)
    lost = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(lost) == 1 and "exited" in lost[0].user_attrs[LOST]
    complete = sorted(_recipe(t) for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert len(complete) == len(set(complete)) == len(trials) - 1 and _recipe(lost[0]) in complete

    # the whole search killed mid-trial: the same command resumes it, and ends as the first did
    storage, out = str(tmp_path / "b.journal"), tmp_path / "b"
    search = subprocess.Popen(_optimize_command(storage, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    _running_owner(storage, time.monotonic() + 120)
    os.killpg(search.pid, signal.SIGKILL)
    search.wait()
    done = subprocess.run(_optimize_command(storage, out), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed = json.loads(done.stdout.decode().strip().splitlines()[-1])
    metrics = lambda result: {c["plan"]: c["metrics"]["perplexity"] for c in result["candidates"] if c["metrics"]}
    # the trial killed mid-run is evaluated again by another process, and CI once saw that differ from the
    # first search's figure in the 7th digit (232.39134 vs 232.39143), so perplexities match to 1e-6
    assert metrics(resumed) == pytest.approx(metrics(first), rel=1e-6) and resumed["plan"] == first["plan"]
    trials = _trials(storage)
    complete = sorted(_recipe(t) for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert complete == sorted(r for r in metrics(first) if r != "none")  # each plan completed once
    assert [t.state for t in trials].count(optuna.trial.TrialState.FAIL) == 1


def test_an_unwritable_storage_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["optimize", "--model", "tiny-llama", "--budget", "30%", "--workers", "1",
                 "--storage", str(blocker / "study.journal"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "cannot write the study journal" in err and "writable file path" in err
    code = main(["worker", "--storage", str(tmp_path / "j.journal"), "--study", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "no study journal at" in err and err.count("\n") == 1
    assert not (tmp_path / "j.journal").exists()  # nothing left behind
    SharedTrials(str(tmp_path / "j.journal"), "other", create=True)
    code = main(["worker", "--storage", str(tmp_path / "j.journal"), "--study", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "no study 'nope'" in err and err.count("\n") == 1


def test_a_study_resumed_with_other_settings_is_refused(tmp_path):
    storage = str(tmp_path / "s.journal")
    SharedTrials(storage, "s", create=True).configure({"model": "tiny-llama", "num_tokens": 1024})
    with pytest.raises(StudyError, match=r"started with other settings \(num_tokens\)"):
        SharedTrials(storage, "s", create=True).configure({"model": "tiny-llama", "num_tokens": 2048})
