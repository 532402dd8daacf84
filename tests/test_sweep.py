"""Sweep and bake-off configs compose; an Optuna study resumes; the pruning callback stops bad trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lightning as L
import optuna
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from optuna.distributions import FloatDistribution

from lab import CONF_DIR, PROJECT_ROOT, TRUSTED_TARGETS, LabError
from lab.cluster.pruning import OptunaPruning, find_trial
from tests.conftest import ARCHS, compose_config

LR = FloatDistribution(1e-4, 1e-2, log=True)


# -- configs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_lr_sweep_config_composes(arch):
    cfg = compose_config("train", ["sweep=lr", f"arch={arch}"])
    sweeper = HydraConfig.get().sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "minimize" and sweeper.n_trials >= 3
    assert sweeper.sampler._target_ == "optuna.samplers.QMCSampler" and sweeper.sampler.seed is not None
    assert sweeper.params["optim.lr"].replace(" ", "") == "tag(log,interval(1e-4,1e-2))"
    assert sweeper.storage == f"sqlite:///{PROJECT_ROOT}/multirun/optuna.db"
    assert sweeper.study_name == f"lr-{arch}-full" == cfg.tags.sweep
    assert cfg.objective == "val/loss" and cfg.experiment_name == "lr_sweep"
    pruning = cfg.callbacks.optuna_pruning  # the job reopens the sweeper's own study
    assert (pruning.storage, pruning.study_name) == (sweeper.storage, sweeper.study_name)
    assert pruning.monitor == cfg.objective
    assert cfg.callbacks.checkpoint.every_n_steps > 0  # the default callbacks are still there


def test_pruning_callback_instantiates_from_config(tmp_path):
    cfg = compose_config("train", ["sweep=lr", "arch=mamba2", f"hydra.sweeper.storage=sqlite:///{tmp_path}/s.db"])
    callback = instantiate(cfg.callbacks.optuna_pruning, _execution_whitelist_=TRUSTED_TARGETS)
    assert isinstance(callback, OptunaPruning)
    assert isinstance(callback.pruner, optuna.pruners.MedianPruner)
    assert callback.storage == f"sqlite:///{tmp_path}/s.db"
    with pytest.raises(LabError, match="pruner"):
        OptunaPruning("sqlite://", "s", pruner={"_target_": "os.system", "command": "true"})


@pytest.mark.parametrize("experiment", ["arch_bakeoff", "arch_bakeoff_tiny"])
def test_bakeoff_configs_compose(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    params = HydraConfig.get().sweeper.params
    assert params.arch.split(",") == ARCHS and params.seed == "1,2"
    assert cfg.experiment_name == experiment
    assert cfg.tags.bakeoff
    assert cfg.data.shuffle_seed == 1234  # one data order for every job, whatever its seed
    first_line = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines()[1]
    assert first_line.startswith(f"# python -m lab.train -m experiment={experiment}")
    if experiment.endswith("tiny"):
        assert cfg.size.name == "tiny" and cfg.tokenizer.name == "bpe2k" and cfg.data.seq_len == 64
        assert cfg.trainer.accelerator == "cpu"


# -- the study resumes --------------------------------------------------------------------------------------------------

TOY_TASK = textwrap.dedent('''
    """lab.train's config and sweep, with a toy objective in place of training."""
    import json, math, os, warnings
    warnings.filterwarnings("ignore")
    import hydra
    from hydra.utils import instantiate
    from lab import CONF_DIR, TRUSTED_TARGETS

    @hydra.main(config_path=str(CONF_DIR), config_name="train")
    def main(cfg):
        pruning = instantiate(cfg.callbacks.optuna_pruning, _execution_whitelist_=TRUSTED_TARGETS)
        trial = pruning._attach()  # the job finds its own trial in the sweeper's storage
        with open(os.environ["TOY_LOG"], "a") as handle:
            handle.write(json.dumps({"lr": cfg.optim.lr, "trial": trial and trial.number}) + "\\n")
        return (math.log10(cfg.optim.lr) + 2.5) ** 2

    if __name__ == "__main__":
        main()
''')


def test_interrupted_study_resumes(tmp_path):
    script, log, db = tmp_path / "toy.py", tmp_path / "toy.jsonl", tmp_path / "optuna.db"
    script.write_text(TOY_TASK)
    env = {**os.environ, "TOY_LOG": str(log), "PYTHONPATH": str(PROJECT_ROOT), "PYTHONWARNINGS": "ignore"}

    def sweep(session: int) -> None:
        result = subprocess.run(
            [sys.executable, str(script), "-m", "sweep=lr", "arch=mamba2", "hydra.sweeper.n_trials=3",
             f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={tmp_path / f'session{session}'}"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]

    sweep(1)
    sweep(2)  # the same command again: the stored study goes on
    study = optuna.load_study(study_name="lr-mamba2-full", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    lrs = [t.params["optim.lr"] for t in trials]
    assert len(set(lrs)) == 6 and all(1e-4 <= lr <= 1e-2 for lr in lrs)  # the QMC sequence continues
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [j["trial"] for j in jobs] == list(range(6))  # every job attached to its own trial
    assert [j["lr"] for j in jobs] == lrs
    assert study.best_trial.value == min(t.value for t in trials)


# -- pruning ------------------------------------------------------------------------------------------------------------


class FixedLoss(L.LightningModule):
    """Trains a scalar; validation reports a fixed `val/loss`, the number a pruner judges."""

    def __init__(self, val_loss: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.val_loss = val_loss

    def training_step(self, batch, batch_idx):
        return ((self.weight - batch) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/loss", self.val_loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callback: OptunaPruning, val_loss: float, max_steps: int = 20) -> L.Trainer:
    data = torch.utils.data.DataLoader(torch.randn(64, 1), batch_size=1)
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=5, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], accelerator="cpu")
    trainer.fit(FixedLoss(val_loss), train_dataloaders=data, val_dataloaders=data)
    return trainer


@pytest.fixture
def study(tmp_path):
    """Two finished trials whose loss fell 3.0 -> 2.0: the median any new trial is held to."""
    storage = f"sqlite:///{tmp_path}/prune.db"
    study = optuna.create_study(study_name="lr-test", storage=storage, direction="minimize")
    for lr in (1e-3, 2e-3):
        trial = study.ask({"optim.lr": LR})
        for step, value in ((5, 3.0), (10, 2.5), (15, 2.2), (20, 2.0)):
            trial.report(value, step)
        study.tell(trial, 2.0)
    return storage, study


def test_hopeless_trial_stops_early(study):
    storage, study_obj = study
    trial = study_obj.ask({"optim.lr": LR})
    overrides = [f"optim.lr={trial.params['optim.lr']}", "arch=mamba2"]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2)
    callback = OptunaPruning(storage, "lr-test", pruner=pruner, min_progress=0.5, overrides=overrides)
    trainer = fit(callback, val_loss=5.0)
    # step 5 is before min_progress (0.5 of 20 steps): reported, not judged; step 10 stops the run
    assert trainer.global_step == 10
    frozen = study_obj.trials[trial.number]
    assert frozen.intermediate_values == {5: 5.0, 10: 5.0}
    assert frozen.user_attrs["pruned_at_step"] == 10 == callback.pruned_at_step
    study_obj.tell(trial, 5.0)  # what the sweeper does with the value lab.train returns
    assert study_obj.best_value == 2.0


def test_good_trial_runs_to_the_end(study):
    storage, study_obj = study
    trial = study_obj.ask({"optim.lr": LR})
    callback = OptunaPruning(storage, "lr-test", pruner={"_target_": "optuna.pruners.MedianPruner",
                                                         "n_startup_trials": 2},
                             min_progress=0.0, overrides=[f"optim.lr={trial.params['optim.lr']}"])
    trainer = fit(callback, val_loss=1.0)
    assert trainer.global_step == 20 and callback.pruned_at_step is None
    assert set(study_obj.trials[trial.number].intermediate_values) == {5, 10, 15, 20}


def test_no_matching_trial_leaves_training_alone(study, caplog):
    storage, study_obj = study
    study_obj.ask({"optim.lr": LR})
    callback = OptunaPruning(storage, "lr-test", min_progress=0.0, overrides=["optim.lr=0.5"])
    trainer = fit(callback, val_loss=99.0)
    assert trainer.global_step == 20 and not callback.active
    assert "no running trial" in caplog.text
    outside = OptunaPruning(None, None, overrides=[])  # a plain run: no sweep at all
    assert fit(outside, val_loss=99.0).global_step == 20


def test_find_trial_matches_params_exactly(study):
    _, study_obj = study
    first, second = study_obj.ask({"optim.lr": LR}), study_obj.ask({"optim.lr": LR})
    override = f"optim.lr={second.params['optim.lr']}"
    assert find_trial(study_obj, [override, "sweep=lr"]).number == second.number
    assert find_trial(study_obj, [f"optim.lr={first.params['optim.lr']}"]).number == first.number
    finished = study_obj.trials[0]  # same kind of params, but no longer running
    assert find_trial(study_obj, [f"optim.lr={finished.params['optim.lr']}"]) is None


def test_a_study_refuses_trials_trained_with_other_settings(study):
    storage, study_obj = study
    first = study_obj.ask({"optim.lr": LR})
    callback = OptunaPruning(storage, "lr-test", min_progress=0.0, overrides=[f"optim.lr={first.params['optim.lr']}"],
                             settings={"stages": [{"name": "web", "tokens": 20000}], "batch_size": 4})
    fit(callback, val_loss=1.0)
    study_obj.tell(first, 1.0)
    assert optuna.load_study(study_name="lr-test", storage=storage).user_attrs["settings"]["batch_size"] == 4
    second = study_obj.ask({"optim.lr": LR})
    other = OptunaPruning(storage, "lr-test", min_progress=0.0, overrides=[f"optim.lr={second.params['optim.lr']}"],
                          settings={"stages": [{"name": "web", "tokens": 5000}], "batch_size": 4})
    with pytest.raises(LabError, match=r"other settings \(stages: .*20000.* -> .*5000.*\).*study_name=lr-test-2"):
        fit(other, val_loss=1.0)
