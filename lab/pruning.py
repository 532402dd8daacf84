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

Registered by conf/callbacks/optuna_pruning.yaml, which conf/sweep/lr.yaml selects.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import lightning as L
import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lab import LabError
from lab.tracking import describe_changes

log = logging.getLogger(__name__)
# Pruners a config may name (Hydra 1.4 asks call sites for an execution whitelist).
_PRUNER_TARGETS = ["optuna.pruners.*"]


def find_trial(study: optuna.Study, overrides: Sequence[str]) -> optuna.trial.FrozenTrial | None:
    """The newest RUNNING trial whose params all appear among `overrides` as `name=value`."""
    given = set(overrides)
    matches = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.params and all(f"{name}={value}" in given for name, value in t.params.items())]
    return max(matches, key=lambda t: t.number, default=None)


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
    """

    def __init__(self, storage: str | None, study_name: str | None, monitor: str = "val/loss",
                 pruner: Mapping[str, Any] | DictConfig | optuna.pruners.BasePruner | None = None,
                 min_progress: float = 0.25, overrides: Sequence[str] | None = None,
                 settings: Mapping[str, Any] | DictConfig | None = None):
        if not 0.0 <= min_progress <= 1.0:
            raise LabError(f"callbacks.optuna_pruning.min_progress={min_progress} must be in [0, 1]")
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
            self.trial = self._attach()
            if self.trial is not None:
                self._link_run(trainer)
        # only rank 0 talks to the storage; the others follow its decisions
        self.active = bool(trainer.strategy.broadcast(self.trial is not None, src=0))

    def _attach(self) -> optuna.Trial | None:
        if not self.storage or not self.study_name:
            log.info("optuna pruning: no study storage configured (not an Optuna sweep); pruning is off")
            return None
        try:
            study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=self.pruner)
        except KeyError:
            log.warning("optuna pruning: no study %r in %s; pruning is off", self.study_name, self.storage)
            return None
        overrides = job_overrides() if self.overrides is None else list(self.overrides)
        frozen = find_trial(study, overrides)
        if frozen is None:
            log.warning("optuna pruning: no running trial of study %r has params matching this job's overrides "
                        "%s; pruning is off", self.study_name, overrides)
            return None
        self._check_settings(study)
        log.info("optuna pruning: job is trial %d of study %r (%s)", frozen.number, self.study_name, frozen.params)
        return optuna.Trial(study, frozen._trial_id)

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
