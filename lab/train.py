"""Train one model: `python -m lab.train arch=<name>`; several: `python -m lab.train -m arch=<name>,<name>`.

<name> is any file of conf/arch; nothing here depends on which.

Returns the configured objective (val/loss by default) so Hydra's Optuna sweeper can minimise it. The pieces:
lab/training/settings.py (the checked config), lab/data/datamodule.py (data and curriculum), lab/training/resume.py (earlier runs),
lab/training/mlflow_run.py (the MLflow run), lab/training/trainer.py (the Trainer and its step budget), lab/training/module.py (the model).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lab import LabError, exit_with, report_job_failure
from lab.training.callbacks import export_from_trainer
from lab.data.datamodule import CurriculumDataModule, check_prepared
from lab.training.mlflow_run import Interrupted, end_run_after_failure, log_run_inputs, open_run, run_tags
from lab.training.module import CausalLMModule
from lab.training.resume import finished_twin, resolve_ckpt_path
from lab.training.settings import TrainSettings
from lab.runs.tracking import tracking_uri
from lab.training.trainer import (build_trainer, check_accelerator, fit_to_schedule, flops_and_peak,
                                  progress_callbacks, resolve_precision)

log = logging.getLogger("lab.train")
# the set-up lines of a run: in the job's log file, not on the console (conf/hydra/default.yaml job_logging)
setup_log = logging.getLogger("lab.train.setup")

# Known notices with nothing for the user to do, silenced by their message only (anything else still shows):
# Lightning's own use of a torch pytree class torch deprecated, Hydra 1.4 asking for a whitelist when it builds
# the lab's own sweep callbacks (trusted code of this package), and Optuna's label on the QMC sampler.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"hydra\.utils\.instantiate\(\) resolved _target_='lab\.cluster\.launchers\.")
warnings.filterwarnings("ignore", message=r"QMCSampler is experimental")


def output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def open_data(cfg: DictConfig, settings: TrainSettings) -> CurriculumDataModule:
    """The prepared data, verified, and the curriculum over it; the tokenizer must fit tokenizer.vocab_size."""
    setup_log.info("prepared data at %s verified (%s)", cfg.data.prepared_dir, check_prepared(cfg))
    train = settings.train
    datamodule = CurriculumDataModule(
        cfg.data.prepared_dir, cfg.curriculum, settings.seq_len, train.batch_size, shuffle_seed=settings.shuffle_seed,
        val_batch_size=train.val_batch_size, val_max_blocks=train.val_max_blocks,
        accumulate_grad_batches=settings.trainer.accumulate_grad_batches, num_workers=train.num_workers)
    prepared, configured = datamodule.manifest.vocab_size, cfg.tokenizer.vocab_size
    if prepared > configured:
        raise LabError(f"the prepared tokenizer has {prepared} tokens, more than tokenizer.vocab_size={configured} "
                       "that sizes the embedding")
    if prepared < 0.95 * configured:
        # A corpus too small for the configured vocabulary: BPE stops early. The embedding keeps
        # tokenizer.vocab_size rows, so parameter counts stay those of the spec across archs.
        log.warning("the prepared tokenizer has %d tokens, fewer than tokenizer.vocab_size=%d (the corpus ran out "
                    "of merges); the embedding keeps %d rows, %d of them never used", prepared, configured,
                    configured, configured - prepared)
    return datamodule


def special_tokens(manifest: Any) -> dict[str, int]:
    """The model's eos/pad/bos ids from the prepared tokenizer (documents are separated, not opened, by EOS)."""
    special = {k: manifest.raw[k] for k in ("eos_token_id", "pad_token_id") if manifest.raw.get(k) is not None}
    if "eos_token_id" in special:
        special["bos_token_id"] = special["eos_token_id"]
    return special


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns final metrics and the MLflow run id."""
    settings = TrainSettings.from_config(cfg)  # every value checked first: one line for the first bad one
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.trainer.enable_progress_bar:  # save_pretrained's "Writing model shards" bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    datamodule = open_data(cfg, settings)
    manifest = datamodule.manifest
    check_accelerator(settings.trainer.accelerator)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    uri = tracking_uri(cfg.logger.tracking_uri)
    if cfg.reuse_finished:
        twin = finished_twin(cfg.logger.experiment_name, cfg.logger.run_name, resolved, manifest.data_sha256, uri)
        if twin is not None:
            return reused_result(twin)
    ckpt_path = resolve_ckpt_path(cfg, uri, resolved)
    logger = open_run(cfg, uri, run_dir, ckpt_path, resolved, run_tags(
        cfg, run_dir, datamodule.curriculum.name, manifest.data_sha256, manifest.tokenizer_sha256))
    try:
        return fit_and_export(cfg, settings, run_dir, datamodule, logger, ckpt_path, resolved)
    except BaseException as err:
        if logger is not None:
            end_run_after_failure(logger, err)
        raise


def fit_and_export(cfg: DictConfig, settings: TrainSettings, run_dir: Path, datamodule: CurriculumDataModule,
                   logger: Any, ckpt_path: str | None, resolved: dict[str, Any]) -> dict[str, Any]:
    """Build the Trainer and the module, record the run's inputs, train, export; the job's result."""
    precision = resolve_precision(settings.trainer.precision)
    trainer = build_trainer(cfg, settings, run_dir, logger, len(datamodule.stages), precision)
    datamodule.set_world(trainer.world_size, trainer.global_rank)
    schedule = datamodule.step_schedule(settings.trainer.max_steps)
    module = CausalLMModule(arch=resolved["arch"], size=resolved["size"], settings=settings, schedule=schedule,
                            data_info=datamodule.data_info(), config_overrides=special_tokens(datamodule.manifest),
                            init_from=cfg.init_from)
    flops_per_token, peak, peak_source = flops_and_peak(module.config, settings.seq_len, precision)
    fit_to_schedule(trainer, schedule, settings.train.eval_every_steps, settings.trainer.accumulate_grad_batches,
                    progress_callbacks(cfg, run_dir, datamodule, schedule, flops_per_token, peak))
    if trainer.is_global_zero:
        total_tokens = schedule.total_steps * schedule.tokens_per_step
        log_run_inputs(logger, resolved, run_dir, datamodule.manifest, module, {
            "model/flops_per_token": str(flops_per_token), "train/total_steps": str(schedule.total_steps),
            "train/tokens_per_step": str(schedule.tokens_per_step), "train/total_tokens": str(total_tokens),
            "throughput/peak_tflops": f"{peak / 1e12:.4g}" if peak else "unknown",
            "throughput/peak_source": peak_source})
    setup_log.info("training %s (%s params) for %d steps over stages %s", cfg.arch_name, f"{module.params.total:,}",
             schedule.total_steps, dict(zip(schedule.stage_names, datamodule.stage_steps())))

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SystemExit as err:  # Lightning's way out of fit on SIGTERM (SIGTERMException) and on Ctrl-C (exit 1)
        raise interrupted(trainer, run_dir, err) from None

    if module.stop_reason:
        guard_checkpoint = run_dir / "checkpoints" / "guard-stop.ckpt"
        trainer.save_checkpoint(guard_checkpoint)
        if logger is not None:
            logger.experiment.set_tag(logger.run_id, "stopped_by", "loss_guard")
        raise LabError(f"{module.stop_reason}. Checkpoint: {guard_checkpoint}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if module.last_val_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)  # the objective is always measured at the end
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    if settings.train.export_hf:
        # every rank: gathering sharded weights is a collective
        export_from_trainer(trainer, module, run_dir / "hf", datamodule.manifest.tokenizer_dir,
                            model_max_length=settings.seq_len, card={"stage": "final", "step": trainer.global_step},
                            artifact_path="hf", register=bool(cfg.callbacks.register_model))
    if trainer.is_global_zero:  # (the export logged hf/ itself: registering a model needs it there first)
        logger.experiment.set_tag(logger.run_id, "run_dir", str(run_dir))
    if logger is not None:
        logger.finalize("success")
    return {"run_id": logger.run_id if logger is not None else None, "metrics": metrics, "run_dir": run_dir,
            "module": module}


def interrupted(trainer: L.Trainer, run_dir: Path, err: SystemExit) -> Interrupted:
    """The one line for a fit stopped by a signal: which, at what step, and the checkpoint to continue from."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    what = "SIGTERM/SIGUSR1 (preemption)" if isinstance(err, SIGTERMException) else "Ctrl-C"
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    newest = f"the newest checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
    return Interrupted(f"stopped by {what} after step {trainer.global_step}; {newest}; run the same command with "
                       "ckpt_path=last to continue")


def reused_result(run: Any) -> dict[str, Any]:
    """A finished run with the same settings and data stands for this job (reuse_finished=true): nothing is trained."""
    log.info("reusing finished MLflow run %s (%s): same settings, same data", run.info.run_id, run.info.run_name)
    return {"run_id": run.info.run_id, "metrics": dict(run.data.metrics),
            "run_dir": Path(run.data.tags.get("run_dir", ".")), "module": None, "reused": True}


def _shown(path: Path, cfg: DictConfig) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(cfg.paths.root_dir).resolve()))
    except ValueError:
        return str(path)


def objective_value(result: dict[str, Any], name: str) -> float:
    value = result["metrics"].get(name)
    if value is None or not math.isfinite(value):
        return float("inf")  # a diverged or unvalidated run loses the sweep instead of crashing it
    return value


@hydra.main(config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # validation sums are all-reduced in the module before logging; Lightning cannot see that
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    try:
        result = train(cfg)
    except Exception as err:  # noqa: BLE001 - the one exit path (lab.exit_with)
        if HydraConfig.get().mode.name == "MULTIRUN":
            report_job_failure(err, log)
            raise  # let the sweep record the failure
        exit_with(err, log)
    value = objective_value(result, cfg.objective)
    # the run's one console line; the rest is in the job's log file in its run folder
    log.info("%s: %s = %.4f (MLflow run %s; log and export in %s)", cfg.run_name, cfg.objective, value,
             result["run_id"], _shown(result["run_dir"], cfg))
    return value


if __name__ == "__main__":
    main()
