"""Trials shared by worker processes: the plans the planner evaluates, as trials of one Optuna study.

The planner predicts every plan's bytes and quality in one process and chooses which plans to
evaluate for real; those evaluations (apply, calibrate, score) are the expensive part, and they are
independent. With workers, each chosen plan becomes a queued trial of an Optuna study in shared
storage (a journal file, or a database URL that many machines reach), and worker processes take
them one at a time: Optuna's storage hands a queued trial to exactly one worker. A worker keeps a
heartbeat on its trial; a trial whose worker died (its process is gone on this host, or its
heartbeat is older than `LOST_AFTER_S` on any host) is marked failed and queued again, once. A
killed search is resumed by running the same command: its study already holds the completed
trials, and only the plans without one are queued.

The study is self-contained: it holds the model reference, the evaluation and calibration token
settings and the calibration windows themselves, so ``memfit worker --storage S --study NAME`` on
another machine (with the same model at the same reference) evaluates exactly what a local worker
would. Nothing in it is pickled: plans, settings and results are JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from memfit.errors import MemfitError, OutputError

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
"""How often a worker marks its trial alive."""
LOST_AFTER_S = 60.0
"""A running trial whose last heartbeat is older than this is lost, whatever host ran it."""

PLAN, CONFIG, OWNER, BEAT, RESULT, ERROR, LOST = (
    "memfit_plan", "memfit_config", "memfit_owner", "memfit_heartbeat", "memfit_result", "memfit_error", "memfit_lost")


class StudyError(MemfitError):
    """The shared study cannot be opened or does not hold what the command needs."""


def default_storage() -> str:
    """The journal file studies go to without ``--storage``: ``<memfit cache>/studies.journal``."""
    from memfit.models.demo import cache_dir

    return str(cache_dir() / "studies.journal")


def open_storage(spec: str, *, create: bool = True):
    """An Optuna storage: a database URL (``sqlite:///x.db``, ``postgresql://...``) or a journal file
    path (created if ``create``).

    Raises:
        OutputError: the journal file cannot be created or written, or the database cannot be reached.
        StudyError: without ``create``, the journal file does not exist.
    """
    import optuna

    if "://" in spec:
        try:
            return optuna.storages.RDBStorage(spec)
        except Exception as exc:  # sqlalchemy's errors: a bad URL, a missing driver, an unreachable server
            raise OutputError(f"cannot open the study database {spec!r}: {_first_line(exc)}",
                              "pass a reachable database URL, or a journal file path, to --storage") from None
    path = Path(spec).expanduser()
    if not create and not path.is_file():
        raise StudyError(f"no study journal at {str(path)!r}",
                         "pass the --storage the search uses (memfit optimize --workers N prints it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write the study journal {str(path)!r}: {exc.strerror or exc}",
                          "pass a writable file path (or a database URL) to --storage") from None
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


class SharedTrials:
    """The queued plan evaluations of one study.

    Args:
        storage: a journal file path or a database URL (`open_storage`).
        name: the study's name.
        create: create the study if it does not exist (the searching process); a worker only joins.
    """

    def __init__(self, storage: str, name: str, *, create: bool = False) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec, self.name = storage, name
        self.storage = open_storage(storage, create=create)
        if create:
            self.study = optuna.create_study(storage=self.storage, study_name=name, load_if_exists=True)
        else:
            try:
                self.study = optuna.load_study(study_name=name, storage=self.storage)
            except KeyError:
                raise StudyError(f"no study {name!r} in {storage!r}",
                                 "start the search first: memfit optimize --workers N prints its study") from None
        self.study_id = self.storage.get_study_id_from_name(name)

    # -- the search's side ------------------------------------------------------------------------

    def configure(self, config: dict) -> None:
        """Record what workers need to evaluate a plan (model reference, evaluation settings,
        calibration windows). A study resumed with other settings is refused."""
        recorded = self.study.user_attrs.get(CONFIG)
        if recorded is None:
            self.study.set_user_attr(CONFIG, config)
        elif recorded != config:
            changed = sorted(k for k in {*config, *recorded} if config.get(k) != recorded.get(k))
            raise StudyError(f"study {self.name!r} was started with other settings ({', '.join(changed)})",
                             "name a new study with --study, or repeat the original command")

    def enqueue(self, plans: list[str]) -> None:
        """Queue a trial for each plan (JSON) that has no completed, queued or running trial."""
        present = {t.user_attrs.get(PLAN) for t in self._trials() if t.state.name in ("COMPLETE", "WAITING", "RUNNING")}
        for plan in plans:
            if plan not in present:
                self.study.enqueue_trial({}, user_attrs={PLAN: plan})
                present.add(plan)

    def reclaim(self) -> list[int]:
        """Fail the running trials whose worker is gone and queue their plans again; the numbers
        of the trials failed."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        lost = []
        for trial in self._trials(TrialState.RUNNING):
            why = _lost(trial)
            if why is None:
                continue
            trial_id = self._id(trial)
            try:
                self.storage.set_trial_user_attr(trial_id, LOST, why)
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue  # another process reclaimed it first, or it just finished
            log.warning("trial %d (%s) lost: %s; queued again", trial.number, _recipe(trial), why)
            self.study.enqueue_trial({}, user_attrs={PLAN: trial.user_attrs[PLAN], "memfit_retry_of": trial.number})
            lost.append(trial.number)
        return lost

    def outcomes(self, plans: list[str]) -> list[dict | str | None]:
        """Each plan's result (a completed trial's), its error (a trial that raised), or None while
        pending; the study is read once."""
        found: dict[str, dict | str] = {}
        for trial in self._trials():
            plan = trial.user_attrs.get(PLAN)
            if trial.state.name == "COMPLETE":
                found[plan] = trial.user_attrs[RESULT]
            elif trial.state.name == "FAIL" and ERROR in trial.user_attrs:
                found.setdefault(plan, trial.user_attrs[ERROR])
        return [found.get(plan) for plan in plans]

    def waiting(self) -> int:
        from optuna.trial import TrialState

        return len(self._trials(TrialState.WAITING))

    # -- the worker's side ------------------------------------------------------------------------

    def config(self) -> dict:
        config = self.study.user_attrs.get(CONFIG)
        if config is None:
            raise StudyError(f"study {self.name!r} holds no memfit search", "join a study memfit optimize started")
        return config

    def pop(self):
        """The next queued trial, now running and owned by this process; None if none is queued."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for trial in self._trials(TrialState.WAITING):
            trial_id = self._id(trial)
            try:
                if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                    continue  # another worker took it
            except UpdateFinishedTrialError:
                continue
            self.storage.set_trial_user_attr(trial_id, OWNER, _owner())
            return trial
        return None

    @contextlib.contextmanager
    def heartbeat(self, trial) -> Iterator[None]:
        """Mark ``trial`` alive every `HEARTBEAT_S` while the block runs."""
        trial_id, stop = self._id(trial), threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(Exception):  # a finished trial takes no attributes: the beat ends
                    self.storage.set_trial_user_attr(trial_id, BEAT, time.time())

        thread = threading.Thread(target=beat, name=f"memfit-heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def complete(self, trial, value: float, result: dict) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        trial_id = self._id(trial)
        try:
            self.storage.set_trial_user_attr(trial_id, RESULT, result)
            self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])
        except UpdateFinishedTrialError:  # declared lost meanwhile: its retry stands
            log.warning("trial %d finished after it was declared lost; its retry's result is used", trial.number)

    def fail(self, trial, error: str) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        trial_id = self._id(trial)
        with contextlib.suppress(UpdateFinishedTrialError):
            self.storage.set_trial_user_attr(trial_id, ERROR, error)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)

    # -- helpers ------------------------------------------------------------------------------------

    def _trials(self, *states) -> list:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states or None)

    def _id(self, trial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)


def plan_key(plan) -> str:
    """A plan as a trial records it: canonical JSON of `Plan.to_dict`."""
    return json.dumps(plan.to_dict(), sort_keys=True)


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _lost(trial) -> str | None:
    """Why a running trial's worker is gone, or None while it may be alive."""
    owner, now = trial.user_attrs.get(OWNER), time.time()
    if owner is None:  # taken from the queue but not yet claimed: lost if that was long ago
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return f"no worker claimed it within {LOST_AFTER_S:g} s" if now - started > LOST_AFTER_S else None
    if owner["host"] == socket.gethostname():
        alive = _process_start(owner["pid"]) == owner["started"]
        return None if alive else f"worker process {owner['pid']} on this host exited"
    last = trial.user_attrs.get(BEAT) or (trial.datetime_start.timestamp() if trial.datetime_start else now)
    silent = now - last
    return f"no heartbeat from {owner['host']} for {silent:.0f} s" if silent > LOST_AFTER_S else None


def _process_start(pid: int) -> str | None:
    """The process's start time (Linux: field 22 of /proc/PID/stat), so that a reused pid is not
    taken for the dead worker; None if it is gone (or a zombie). Without /proc: "alive" if the pid exists."""
    if os.path.exists("/proc/self/stat"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return None if fields[0] == "Z" else fields[19]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "alive"


def _recipe(trial) -> str:
    from memfit.plan import Plan

    return Plan.from_dict(json.loads(trial.user_attrs[PLAN])).recipe


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
