"""The Lightning Trainer of lab.train: conf/trainer, the run's callbacks, and the curriculum's step budget.

The budget (total steps, stage ends, validation points) depends on the world size, which only the built Trainer
knows; so the Trainer is built first and then fitted to the run's StepSchedule by `fit_to_schedule`, the one
place that sets Lightning's internals.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lab import TRUSTED_TARGETS, LabError
from lab.training.callbacks import Energy, SourceTokens, StageEnd, StepLog, Throughput, TrainClock
from lab.data.datamodule import CurriculumDataModule
from lab.data.step_budget import StepSchedule
from lab.training.settings import Checkpointing, TrainSettings
from lab.models.build import build_config
from lab.models.arch import build_model
from lab.models.flops import PEAK_ENV, flops_per_token, measured_matmul_flops, peak_flops


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def check_accelerator(accelerator: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LabError(f"trainer.accelerator={accelerator} asks for a GPU, but no CUDA device is visible here; "
                       "use trainer=cpu (or trainer=default, which picks what there is)")


def fsdp_strategy(cfg: DictConfig) -> Any:
    """FSDP with one unit per decoder block: the classes the model itself names in _no_split_modules."""
    from lightning.pytorch.strategies import FSDPStrategy


    with torch.device("meta"):
        model = build_model(build_config(cfg.arch, cfg.size))
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not blocks:
        raise LabError(f"{type(model).__name__} names no _no_split_modules to shard by; use trainer=ddp")
    return FSDPStrategy(auto_wrap_policy=blocks, activation_checkpointing_policy=blocks
                        if cfg.train.activation_checkpointing else None, state_dict_type="full")


def instantiate_trainer(cfg: DictConfig, trainer_cfg: dict[str, Any], **objects: Any) -> L.Trainer:
    """The Trainer of conf/trainer (`trainer_cfg`: its resolved node without the keys lab.train sets itself)."""
    # (.get: the node goes to Lightning as is, and a key left out takes Lightning's own default)
    if trainer_cfg.get("strategy") == "fsdp":
        # a strategy object cannot sit inside a config node (OmegaConf refuses it): it goes beside it
        trainer_cfg = {k: v for k, v in trainer_cfg.items() if k != "strategy"}
        objects["strategy"] = fsdp_strategy(cfg)
    return instantiate(trainer_cfg, **objects, _convert_="all", _execution_whitelist_=TRUSTED_TARGETS)


class StepCheckpoint(ModelCheckpoint):
    """Lightning's step checkpoint, with its save-on-exception (`save_on_exception=True`) kept to preemption.

    SIGTERM (what SLURM and most schedulers send before a kill; SIGUSR1 outside SLURM, see Preemption) makes
    Lightning raise SIGTERMException between two optimizer steps, where the state is whole: last.ckpt is then
    written before the process exits, and ckpt_path=last continues exactly. Any other exception (Ctrl-C, an
    error) can land in the middle of a step, whose half-updated state must not be saved as if it were whole."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not self._should_save_on_exception(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class Preemption(L.Callback):
    """SIGUSR1 (Lightning's requeue signal, `sbatch --signal=USR1@<s>`) where Lightning does not handle it itself.

    Under SLURM Lightning's SLURMEnvironment takes SIGUSR1 (auto-requeue: an hpc_ckpt_<n>.ckpt, `scontrol requeue`;
    SLURM's SIGTERM then stops the job, checkpointed). Anywhere else SIGUSR1 would kill the process on the spot
    (no checkpoint, its MLflow run left RUNNING): there it gets the handler Lightning installed for SIGTERM, so the
    run stops at the next step boundary exactly as for SIGTERM. Lightning restores the old handlers after fit."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if os.name != "nt" and signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, signal.getsignal(signal.SIGTERM))


def checkpoint_callbacks(checkpoints: Path, checkpointing: Checkpointing) -> list[ModelCheckpoint]:
    """Step checkpoints (the newest `keep_last`; last.ckpt also when preempted) and one per stage end (all kept),
    both refreshing last.ckpt."""
    return [
        StepCheckpoint(dirpath=checkpoints, filename="step{step:07d}", auto_insert_metric_name=False,
                       every_n_train_steps=checkpointing.every_n_steps, save_top_k=checkpointing.keep_last,
                       monitor="step", mode="max", save_last=True, enable_version_counter=False,
                       save_on_exception=True),
        # stage ends are epoch ends: one checkpoint per stage, kept. It refreshes last.ckpt too, so
        # last.ckpt is the final state even when the run does not end on a multiple of every_n_steps
        # (both callbacks write the same last.ckpt: no version counter, or the second writes last-v1).
        ModelCheckpoint(dirpath=checkpoints, filename="stage{epoch}", auto_insert_metric_name=False,
                        save_on_train_epoch_end=True, every_n_epochs=1, save_top_k=-1, save_last=True,
                        enable_version_counter=False),
    ]


def build_trainer(cfg: DictConfig, settings: TrainSettings, run_dir: Path, logger: Any, num_stages: int,
                  precision: str) -> L.Trainer:
    """conf/trainer with the checkpoints and the step log; one Lightning epoch per curriculum stage. The step
    budget is set afterwards by fit_to_schedule (it needs the world size this Trainer decides)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in ("max_steps", "precision"):  # set here and in fit_to_schedule
        trainer_cfg.pop(key)
    callbacks: list[L.Callback] = [*checkpoint_callbacks(run_dir / "checkpoints", settings.checkpoint),
                                   StepLog(run_dir / "steps.jsonl"), Preemption()]
    if cfg.callbacks.get("optuna_pruning"):  # only selected by conf/sweep/lr.yaml: stop hopeless trials early
        callbacks.append(instantiate(cfg.callbacks.optuna_pruning, _execution_whitelist_=TRUSTED_TARGETS))
    return instantiate_trainer(cfg, trainer_cfg, precision=precision, logger=logger or False, callbacks=callbacks,
                               max_epochs=num_stages, reload_dataloaders_every_n_epochs=1,
                               num_sanity_val_steps=0, check_val_every_n_epoch=1, default_root_dir=str(run_dir))


def flops_and_peak(config: Any, seq_len: int, precision: str) -> tuple[float | None, float | None, str]:
    """FLOPs per trained token, the device's peak FLOP/s and where that peak came from."""

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    peak = peak_flops(device, dtype)
    source = "env" if os.environ.get(PEAK_ENV) else "table"
    if peak is None and device.type == "cpu":
        peak, source = measured_matmul_flops(device, dtype), "measured_matmul"  # no published CPU peak
    return flops_per_token(config, seq_len), peak, source if peak else "unknown"


def progress_callbacks(cfg: DictConfig, run_dir: Path, datamodule: CurriculumDataModule, schedule: StepSchedule,
                       flops_per_token: float | None, peak: float | None) -> list[L.Callback]:
    """Throughput/MFU, the train clock, stage-end exports and generations, tokens per source, energy."""
    seq_len = datamodule.seq_len
    callbacks: list[L.Callback] = [
        Throughput(flops_per_token, peak, window=max(1, min(10, schedule.total_steps // 4))),
        TrainClock(),
        StageEnd(run_dir, schedule.stage_names, schedule.stage_bounds, datamodule.manifest.tokenizer_dir,
                 cfg.train.export_hf, generations=cfg.callbacks.generations, seq_len=seq_len,
                 source_tokens=datamodule.source_tokens),
        SourceTokens(datamodule.source_tokens),  # tokens/<stage>/<source>
    ]
    if cfg.callbacks.energy in (True, "auto"):
        try:
            callbacks.append(Energy(run_dir))
        except ImportError:
            if cfg.callbacks.energy is True:
                raise LabError("callbacks.energy=true needs codecarbon: pip install codecarbon") from None
    return callbacks


def fit_to_schedule(trainer: L.Trainer, schedule: StepSchedule, eval_every_steps: int, accumulate: int,
                    callbacks: list[L.Callback]) -> None:
    """Every change lab.train makes to a built Trainer, all here: each needs the step budget, which depends on
    the world size, which only the built Trainer knows.

    - the step budget: `fit_loop.epoch_loop.max_steps` (what Trainer(max_steps=...) would have set);
    - logging: a run shorter than log_every_n_steps would record no training metric at all;
    - validation every eval_every_steps optimizer steps (Lightning counts micro-batches, per epoch);
    - validation at every stage end: Lightning validates at the last batch of an epoch only when the stage
      length is a multiple of val_check_interval; the stage-end numbers (and `forgetting`, measured from them)
      must not depend on that, so the private `_should_check_val_fx` of the epoch loop also says yes at the
      last batch of a stage. The stage checkpoint is written after this validation;
    - the callbacks that need the budget or the built model (throughput window, stage ends).
    """
    trainer.fit_loop.epoch_loop.max_steps = schedule.total_steps
    trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, schedule.total_steps))
    bounds = schedule.stage_bounds
    shortest_stage = min(b - a for a, b in zip(bounds, bounds[1:]))
    trainer.val_check_interval = max(1, min(eval_every_steps, shortest_stage)) * accumulate

    epoch_loop = trainer.fit_loop.epoch_loop
    lightning_says = epoch_loop._should_check_val_fx

    def should_check_val(data_fetcher: Any) -> bool:
        at_stage_end = epoch_loop.batch_progress.is_last_batch and epoch_loop._should_check_val_epoch()
        return lightning_says(data_fetcher) or at_stage_end

    epoch_loop._should_check_val_fx = should_check_val
    trainer.callbacks.extend(callbacks)
