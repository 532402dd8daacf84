"""Stop hopeless Optuna trials early, from inside the training job.

Hydra's Optuna sweeper asks the study for a trial, launches `lab.train` with the trial's params as
overrides (`optim.lr=0.00123...`) and tells the study the float the job returns; it gives the job no
handle on the trial. So the job reopens the sweeper's study from the same storage and finds its own
trial: the RUNNING trial whose every param appears verbatim among the job's overrides (the sweeper
writes them as `f"{name}={value}"`, and storage round-trips the value exactly). `OptunaPruning` then
reports the monitored metric at each validation (step = optimizer step) and, when the study's pruner
says so, stops the trainer the way early stopping does. lab.train returns the objective at that point
and the sweeper records it as the trial's value: a pessimistic one, since the loss was still falling,
so a pruned trial can never look like the best. Pruned trials carry the user attr `pruned_at_step`
(and the MLflow tag `optuna_pruned_at_step`); every trial gets `mlflow_run_id`, every run
`optuna_study` / `optuna_trial`, so the two records join both ways.

A job killed mid-trial (SIGKILL, OOM, a lost node) leaves its trial RUNNING, and the sweeper never tells
it. So every job records `host` / `pid` / `pid_started` on its trial and beats Optuna's heartbeat for it
(RDBStorage `heartbeat_interval`; the sweeper itself cannot pass one, it only asks and tells), and each new
job first fails the stale trials of its study: a RUNNING trial whose process on this host is gone, or
whose heartbeat is older than `stale_after` seconds (any host: Optuna's `fail_stale_trials`). Their MLflow
runs end FAILED too. A trial of another host is never judged by its pid, only by its heartbeat.

Registered by conf/callbacks/optuna_pruning.yaml, which conf/sweep/lr.yaml selects.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lab import LabError
from lab.runs.tracking import describe_changes

log = logging.getLogger(__name__)
# Pruners a config may name (Hydra 1.4 asks call sites for an execution whitelist).
_PRUNER_TARGETS = ["optuna.pruners.*"]


def find_trial(study: optuna.Study, overrides: Sequence[str]) -> optuna.trial.FrozenTrial | None:
    """The newest RUNNING trial whose params all appear among `overrides` as `name=value`."""
    given = set(overrides)
    matches = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.params and all(f"{name}={value}" in given for name, value in t.params.items())]
    return max(matches, key=lambda t: t.number, default=None)


def process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, /proc), to tell a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_is_gone(pid: Any, started: Any) -> bool:
    """True only when this host surely no longer runs the process (a pid we cannot judge counts as alive)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    now = process_start(pid)
    return started is not None and now is not None and now != started  # the pid was reused


def fail_stale_trials(study: optuna.Study, mlflow_client: Any = None) -> list[int]:
    """Fail the study's RUNNING trials whose job is dead; returns their numbers. Their MLflow runs (user attr
    mlflow_run_id) still RUNNING end FAILED through `mlflow_client`."""
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
    if not running:
        return []
    host = socket.gethostname()
    for trial in running.values():
        attrs = trial.user_attrs
        # a job that ended waits for its sweeper's tell (another process with a parallel launcher): not stale
        if attrs.get("host") == host and not attrs.get("job_ended") and \
                process_is_gone(attrs.get("pid"), attrs.get("pid_started")):
            try:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, ValueError):  # finished meanwhile by its sweeper or another job
                continue
    with warnings.catch_warnings():  # Optuna calls its heartbeat experimental: noise in every sweep job
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat older than stale_after, any host (no-op without one)
    failed = [number for number, t in running.items()
              if study._storage.get_trial(t._trial_id).state == optuna.trial.TrialState.FAIL]
    for number in failed:
        run_id = running[number].user_attrs.get("mlflow_run_id")
        log.warning("optuna: trial %d of study %r was left RUNNING by a job that is gone; marked FAIL%s",
                    number, study.study_name, f" (MLflow run {run_id} FAILED)" if run_id else "")
        if run_id and mlflow_client is not None:
            try:
                if mlflow_client.get_run(run_id).info.status == "RUNNING":
                    mlflow_client.set_terminated(run_id, "FAILED")
            except Exception as err:  # noqa: BLE001 - the run may live in another tracking store
                log.warning("optuna: could not mark MLflow run %s FAILED: %s", run_id, err)
    return failed


class Heartbeat:
    """Optuna's heartbeat for one trial, in a daemon thread (Optuna's own thread is not a daemon: a job that
    fails would never exit)."""

    def __init__(self, storage: Any, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:  # noqa: BLE001 - a missed beat must not end the training
                log.warning("optuna: heartbeat not recorded: %s", err)
            if self.stop_event.wait(self.storage.get_heartbeat_interval()):
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


def open_storage(storage: Any, heartbeat_interval: int | None, stale_after: float | None) -> Any:
    """The study storage, with Optuna's heartbeat when it is a database URL and a heartbeat is asked for."""
    if heartbeat_interval and isinstance(storage, str) and storage.startswith(("sqlite:", "postgresql", "mysql")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(storage, heartbeat_interval=int(heartbeat_interval),
                                              grace_period=int(math.ceil(stale_after)) if stale_after else None)
    return storage


def build_pruner(spec: Mapping[str, Any] | optuna.pruners.BasePruner | None) -> optuna.pruners.BasePruner:
    if isinstance(spec, optuna.pruners.BasePruner):
        return spec
    if not spec:
        return optuna.pruners.MedianPruner()
    try:
        pruner = instantiate(spec, _execution_whitelist_=_PRUNER_TARGETS)
    except Exception as err:  # a bad _target_ or argument: say which config node holds it
        raise LabError(f"callbacks.optuna_pruning.pruner cannot be built: {err}") from None
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise LabError(f"callbacks.optuna_pruning.pruner built a {type(pruner).__name__}, not an Optuna pruner")
    return pruner


def job_overrides() -> list[str]:
    """The overrides Hydra launched this job with (empty outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def mlflow_client(trainer: L.Trainer) -> Any:
    """The MLflow client of the trainer's MLflow logger (None without one)."""
    for logger in trainer.loggers:
        client = getattr(logger, "experiment", None)
        if getattr(logger, "run_id", None) and hasattr(client, "set_terminated"):
            return client
    return None


class OptunaPruning(L.Callback):
    """Report `monitor` to this job's Optuna trial after each validation; stop when the pruner says so.

    storage / study_name: the sweeper's (conf/callbacks/optuna_pruning.yaml reads them from
        hydra.sweeper). Outside a sweep, or when no trial matches, the callback stays inactive.
    min_progress: no pruning before this fraction of the run's optimizer steps (values are still
        reported), so an LR whose warmup starts slowly is not judged on its first evaluations.
    overrides: the job's overrides; default: Hydra's for this job (tests pass them explicitly).
    settings: what every trial of one study must share (data, budget, batch): the first trial records
        it in the study; a job with other settings is refused, since a study's best value and its
        pruning medians would otherwise compare trials trained on different budgets.
    heartbeat_interval / stale_after: seconds between the trial's heartbeats, and the heartbeat age after
        which another job treats a RUNNING trial as dead (generous: other hosts may share the study).
        No heartbeat_interval: no heartbeat, dead trials are then found by their pid on this host only.
    """

    def __init__(self, storage: str | None, study_name: str | None, monitor: str = "val/loss",
                 pruner: Mapping[str, Any] | DictConfig | optuna.pruners.BasePruner | None = None,
                 min_progress: float = 0.25, overrides: Sequence[str] | None = None,
                 settings: Mapping[str, Any] | DictConfig | None = None,
                 heartbeat_interval: int | None = None, stale_after: float | None = None):
        if not 0.0 <= min_progress <= 1.0:
            raise LabError(f"callbacks.optuna_pruning.min_progress={min_progress} must be in [0, 1]")
        if heartbeat_interval is not None and (isinstance(heartbeat_interval, bool)
                                               or not isinstance(heartbeat_interval, int) or heartbeat_interval < 1):
            raise LabError(f"callbacks.optuna_pruning.heartbeat_interval={heartbeat_interval!r} is not allowed: "
                           "expected a whole number of seconds >= 1, or null")
        if stale_after is not None and (isinstance(stale_after, bool) or not isinstance(stale_after, (int, float))
                                        or not stale_after > 2 * (heartbeat_interval or 0)):
            raise LabError(f"callbacks.optuna_pruning.stale_after={stale_after!r} is not allowed: expected seconds "
                           "above twice heartbeat_interval, or null")
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.heartbeat: Heartbeat | None = None
        self.storage = storage
        self.study_name = study_name
        self.monitor = monitor
        self.pruner = build_pruner(pruner)
        self.min_progress = min_progress
        self.overrides = overrides
        self.settings = (OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig)
                         else dict(settings or {}))
        self.trial: optuna.Trial | None = None
        self.active = False
        self.pruned_at_step: int | None = None
        self._last_step = -1

    # -- attach to the trial ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.is_global_zero:
            self.trial = self._attach(mlflow_client(trainer))
            if self.trial is not None:
                self._link_run(trainer)
        # only rank 0 talks to the storage; the others follow its decisions
        self.active = bool(trainer.strategy.broadcast(self.trial is not None, src=0))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.trial is not None and stage == "fit":
            try:
                self.trial.set_user_attr("job_ended", True)
            except Exception as err:  # noqa: BLE001 - the sweeper may already have told the trial
                log.debug("optuna: job_ended not recorded: %s", err)

    def _attach(self, client: Any = None) -> optuna.Trial | None:
        if not self.storage or not self.study_name:
            log.info("optuna pruning: no study storage configured (not an Optuna sweep); pruning is off")
            return None
        storage = open_storage(self.storage, self.heartbeat_interval, self.stale_after)
        try:
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner)
        except KeyError:
            log.warning("optuna pruning: no study %r in %s; pruning is off", self.study_name, self.storage)
            return None
        fail_stale_trials(study, client)  # trials of jobs killed earlier (this job's own trial has a live pid)
        overrides = job_overrides() if self.overrides is None else list(self.overrides)
        frozen = find_trial(study, overrides)
        if frozen is None:
            log.warning("optuna pruning: no running trial of study %r has params matching this job's overrides "
                        "%s; pruning is off", self.study_name, overrides)
            return None
        self._check_settings(study)
        log.info("optuna pruning: job is trial %d of study %r (%s)", frozen.number, self.study_name, frozen.params)
        trial = optuna.Trial(study, frozen._trial_id)
        # what a later job needs to tell whether this one died (fail_stale_trials)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("pid_started", process_start(os.getpid()))
        if getattr(study._storage, "get_heartbeat_interval", lambda: None)():
            self.heartbeat = Heartbeat(study._storage, frozen._trial_id)
        return trial

    def _check_settings(self, study: optuna.Study) -> None:
        if not self.settings:
            return
        recorded = study.user_attrs.get("settings")
        if recorded is None:
            study.set_user_attr("settings", self.settings)
            return
        changed = [key for key, value in self.settings.items() if recorded.get(key) != value]
        if changed:
            raise LabError(f"study {self.study_name!r} holds trials trained with other settings "
                           f"({describe_changes(recorded, self.settings, changed)}); its best "
                           f"value would mix them. Give this sweep its own study: "
                           f"hydra.sweeper.study_name={self.study_name}-2 (or another name)")

    def _link_run(self, trainer: L.Trainer) -> None:
        assert self.trial is not None
        for logger in trainer.loggers:
            run_id, client = getattr(logger, "run_id", None), getattr(logger, "experiment", None)
            if run_id and hasattr(client, "set_tag"):  # MLflow
                client.set_tag(run_id, "optuna_study", self.study_name)
                client.set_tag(run_id, "optuna_trial", str(self.trial.number))
                self.trial.set_user_attr("mlflow_run_id", run_id)

    # -- report and decide ---------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            stop = self._report(trainer)
        if trainer.strategy.broadcast(stop, src=0):
            trainer.should_stop = True  # ends fit after this batch, like EarlyStopping

    def _report(self, trainer: L.Trainer) -> bool:
        assert self.trial is not None
        value = trainer.callback_metrics.get(self.monitor)
        step = trainer.global_step
        if value is None:
            log.warning("optuna pruning: %r was not logged by this validation; nothing reported", self.monitor)
            return False
        if step == self._last_step:
            return False  # a second validation at the same step (stage end on an eval step)
        self._last_step = step
        value = float(value)
        if not math.isfinite(value):
            return self._prune(trainer, step, f"{self.monitor} is {value}")
        self.trial.report(value, step)
        progress = step / max(1, trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 1.0
        if progress >= self.min_progress and self.trial.should_prune():
            return self._prune(trainer, step, f"{self.monitor}={value:.4f} at step {step}")
        return False

    def _prune(self, trainer: L.Trainer, step: int, why: str) -> bool:
        assert self.trial is not None
        self.pruned_at_step = step
        self.trial.set_user_attr("pruned_at_step", step)
        for logger in trainer.loggers:
            run_id, client = getattr(logger, "run_id", None), getattr(logger, "experiment", None)
            if run_id and hasattr(client, "set_tag"):
                client.set_tag(run_id, "optuna_pruned_at_step", str(step))
        log.info("optuna pruning: trial %d stopped early (%s)", self.trial.number, why)
        return True
