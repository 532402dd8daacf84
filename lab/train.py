"""Train one model: `python -m lab.train arch=<name>`; several: `python -m lab.train -m arch=<name>,<name>`.

<name> is any file of conf/arch; nothing here depends on which.

Returns the configured objective (val/loss by default) so Hydra's Optuna sweeper can minimise it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lab import TRUSTED_TARGETS, LabError, exit_with, report_job_failure
from lab.callbacks import Energy, SourceTokens, StageEnd, StepLog, Throughput, TrainClock, export_from_trainer
from lab.checkpoints import resolve_ckpt_path
from lab.data.publish import verify_prepared
from lab.datamodule import CurriculumDataModule
from lab.module import CausalLMModule
from lab.settings import TrainSettings
from lab.tracking import (describe_changes, get_or_create_experiment, git_info, is_launch_setting, params_from_config,
                          tracking_uri)

log = logging.getLogger("lab.train")


def output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def prepare_command(cfg: DictConfig) -> str:
    """The lab.prepare command that writes the data this training config reads."""
    hydra_on = HydraConfig.initialized()
    choices = HydraConfig.get().runtime.choices if hydra_on else {}
    words = ["python -m lab.prepare"] + [f"{group}={choices[group]}" for group in ("data", "tokenizer")
                                         if choices.get(group)]
    words += [f"paths.corpus_dir={cfg.paths.corpus_dir}", f"data.seq_len={cfg.data.seq_len}"]
    for override in (HydraConfig.get().overrides.task if hydra_on else []):
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(("data.", "tokenizer.", "prepare.")) and key != "data.seq_len":
            words.append(override)
    return " ".join(words)


def check_resume_settings(uri: str, run_id: str, resolved: Mapping[str, Any]) -> None:
    """Refuse, before anything is logged, a resume whose training settings differ from the run's record."""
    from mlflow.tracking import MlflowClient

    try:
        recorded = MlflowClient(uri).get_run(run_id).data.params
    except Exception:  # the run is gone from this store: nothing to compare with
        return
    now = params_from_config({k: v for k, v in resolved.items() if k != "hydra"})
    changed = sorted(k for k, v in now.items() if k in recorded and recorded[k] != v and not is_launch_setting(k))
    if changed:
        raise LabError(f"resuming MLflow run {run_id} with other settings ({describe_changes(recorded, now, changed)}). "
                       "Resume with the run's own settings, or start a new run (without ckpt_path) to train differently")


def validate_at_stage_ends(trainer: L.Trainer) -> None:
    """Make the last batch of every epoch (= curriculum stage) a validation point.

    Lightning validates every `val_check_interval` batches of an epoch, and at its last batch only when
    the stage length happens to be a multiple; the stage-end numbers (and `forgetting`, measured from
    them) must not depend on that. The stage checkpoint is written after this validation.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    lightning_says = epoch_loop._should_check_val_fx

    def should_check_val(data_fetcher: Any) -> bool:
        at_stage_end = epoch_loop.batch_progress.is_last_batch and epoch_loop._should_check_val_epoch()
        return lightning_says(data_fetcher) or at_stage_end

    epoch_loop._should_check_val_fx = should_check_val


def fsdp_strategy(cfg: DictConfig) -> Any:
    """FSDP with one unit per decoder block: the classes the model itself names in _no_split_modules."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lab.models import build_config, build_model

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
    if trainer_cfg.get("strategy") == "fsdp":
        # a strategy object cannot sit inside a config node (OmegaConf refuses it): it goes beside it
        trainer_cfg = {k: v for k, v in trainer_cfg.items() if k != "strategy"}
        objects["strategy"] = fsdp_strategy(cfg)
    return instantiate(trainer_cfg, **objects, _convert_="all", _execution_whitelist_=TRUSTED_TARGETS)


def flops_and_peak(config: Any, seq_len: int, precision: str) -> tuple[float | None, float | None, str]:
    """FLOPs per trained token, the device's peak FLOP/s and where that peak came from."""
    from lab.flops import PEAK_ENV, flops_per_token, measured_matmul_flops, peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    peak = peak_flops(device, dtype)
    source = "env" if os.environ.get(PEAK_ENV) else "table"
    if peak is None and device.type == "cpu":
        peak, source = measured_matmul_flops(device, dtype), "measured_matmul"  # no published CPU peak
    return flops_per_token(config, seq_len), peak, source if peak else "unknown"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job from a composed config; returns final metrics and the MLflow run id."""
    TrainSettings.from_config(cfg)  # every value checked before anything starts (one line for the first bad one)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    if not (Path(str(cfg.data.prepared_dir)) / "manifest.json").is_file():
        raise LabError(f"no prepared data at {cfg.data.prepared_dir}; prepare it first with: {prepare_command(cfg)}")
    # what is trained on is what was prepared: sizes always, hashes when asked or when the folder changed
    checked = verify_prepared(Path(str(cfg.data.prepared_dir)), str(cfg.data.get("verify", "auto")),
                              f"re-prepare it (intact steps are reused) with: {prepare_command(cfg)}")
    log.info("prepared data at %s verified (%s)", cfg.data.prepared_dir, checked)
    datamodule = CurriculumDataModule(
        cfg.data.prepared_dir, cfg.curriculum, cfg.data.seq_len, cfg.train.batch_size,
        val_batch_size=cfg.train.val_batch_size, val_max_blocks=cfg.train.val_max_blocks,
        shuffle_seed=cfg.data.shuffle_seed, accumulate_grad_batches=accumulate, num_workers=cfg.train.num_workers)
    manifest = datamodule.manifest
    if manifest.vocab_size > cfg.tokenizer.vocab_size:
        raise LabError(f"the prepared tokenizer has {manifest.vocab_size} tokens, more than tokenizer.vocab_size="
                       f"{cfg.tokenizer.vocab_size} that sizes the embedding")
    if manifest.vocab_size < 0.95 * cfg.tokenizer.vocab_size:
        # A corpus too small for the configured vocabulary: BPE stops early. The embedding keeps
        # tokenizer.vocab_size rows, so parameter counts stay those of the spec across archs.
        log.warning("the prepared tokenizer has %d tokens, fewer than tokenizer.vocab_size=%d (the corpus ran out "
                    "of merges); the embedding keeps %d rows, %d of them never used", manifest.vocab_size,
                    cfg.tokenizer.vocab_size, cfg.tokenizer.vocab_size, cfg.tokenizer.vocab_size - manifest.vocab_size)

    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise LabError(f"trainer.accelerator={cfg.trainer.accelerator} asks for a GPU, but no CUDA device is "
                       "visible here; use trainer=cpu (or trainer=default, which picks what there is)")
    precision = resolve_precision(cfg.trainer.precision)
    ckpt_path = resolve_ckpt_path(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    uri = tracking_uri(cfg.logger.tracking_uri)
    run_id_file = run_dir / "mlflow_run_id"
    # one MLflow run per job, created and recorded by rank 0 only: other ranks never touch the store (a sqlite
    # store created by two processes at once breaks), and their Lightning logger is a stand-in
    rank_zero = rank_zero_only.rank == 0
    if rank_zero:
        get_or_create_experiment(cfg.logger.experiment_name, uri, cfg.logger.artifact_location)
        if ckpt_path and (Path(ckpt_path).parent.parent / "mlflow_run_id").is_file():
            # a resumed run continues the same MLflow run
            run_id_file.write_text((Path(ckpt_path).parent.parent / "mlflow_run_id").read_text())
        if run_id_file.is_file():
            check_resume_settings(uri, run_id_file.read_text().strip(), resolved)
    tags = {"arch": str(cfg.arch_name), "size": str(cfg.size.name), "seed": str(cfg.seed),
            "curriculum": datamodule.curriculum.name,
            "data_sha256": manifest.data_sha256, "tokenizer_sha256": manifest.tokenizer_sha256,
            "experiment_name": str(cfg.experiment_name), "run_dir": str(run_dir), **git_info(),
            **{str(k): str(v) for k, v in (cfg.get("tags") or {}).items()}}
    # (even constructing Lightning's MLflow logger opens the store, so the other ranks get none)
    logger = MLFlowLogger(experiment_name=cfg.logger.experiment_name, run_name=cfg.logger.run_name,
                          tracking_uri=uri, tags=tags, log_model=False,
                          run_id=run_id_file.read_text().strip() if run_id_file.is_file() else None) if rank_zero else None
    if logger is not None:
        run_id_file.write_text(logger.run_id)
    try:
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        max_steps_cap = int(trainer_cfg.pop("max_steps", -1))
        trainer_cfg.pop("precision", None)
        checkpoint_cfg = cfg.callbacks.checkpoint
        checkpoints = run_dir / "checkpoints"
        callbacks: list[L.Callback] = [
            ModelCheckpoint(dirpath=checkpoints, filename="step{step:07d}", auto_insert_metric_name=False,
                            every_n_train_steps=checkpoint_cfg.every_n_steps, save_top_k=checkpoint_cfg.keep_last,
                            monitor="step", mode="max", save_last=True, enable_version_counter=False),
            # stage ends are epoch ends: one checkpoint per stage, kept. It refreshes last.ckpt too, so
            # last.ckpt is the final state even when the run does not end on a multiple of every_n_steps
            # (both callbacks write the same last.ckpt: no version counter, or the second writes last-v1).
            ModelCheckpoint(dirpath=checkpoints, filename="stage{epoch}", auto_insert_metric_name=False,
                            save_on_train_epoch_end=True, every_n_epochs=1, save_top_k=-1, save_last=True,
                            enable_version_counter=False),
            StepLog(run_dir / "steps.jsonl"),
        ]
        if cfg.callbacks.get("optuna_pruning"):  # selected by conf/sweep/lr.yaml: stop hopeless trials early
            callbacks.append(instantiate(cfg.callbacks.optuna_pruning, _execution_whitelist_=TRUSTED_TARGETS))
        trainer = instantiate_trainer(cfg, trainer_cfg, precision=precision, logger=logger or False, callbacks=callbacks,
                                      max_epochs=len(datamodule.stages), reload_dataloaders_every_n_epochs=1,
                                      num_sanity_val_steps=0, check_val_every_n_epoch=1,
                                      default_root_dir=str(run_dir))
        datamodule.set_world(trainer.world_size, trainer.global_rank)

        bounds = datamodule.stage_boundaries()
        total_steps = bounds[-1] if max_steps_cap <= 0 else min(bounds[-1], max_steps_cap)
        if total_steps < bounds[-2]:
            log.warning("trainer.max_steps=%d ends inside stage %r: the later stage(s) %s will not run",
                        total_steps, datamodule.stages[datamodule.stage_at(total_steps)].name,
                        [s.name for s in datamodule.stages[datamodule.stage_at(total_steps) + 1:]])
        # a run shorter than the logging interval would record no training metrics at all
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, total_steps))
        trainer.fit_loop.epoch_loop.max_steps = total_steps
        # validate every eval_every_steps and at each stage end; Lightning counts micro-batches per epoch
        shortest_stage = min(b - a for a, b in zip(bounds, bounds[1:]))
        trainer.val_check_interval = max(1, min(cfg.train.eval_every_steps, shortest_stage)) * accumulate
        validate_at_stage_ends(trainer)

        stage_names = [s.name for s in datamodule.stages]
        schedule = {"total_steps": total_steps, "tokens_per_step": datamodule.tokens_per_step,
                    "stage_names": stage_names, "stage_bounds": bounds,
                    "stage_sources": [datamodule.main_sources(i) for i in range(len(datamodule.stages))]}
        data_info = {"seq_len": cfg.data.seq_len, "val_sources": datamodule.val_sources,
                     "val_bytes_per_token": {s: manifest.bytes_per_token(s, "val") for s in datamodule.val_sources},
                     "data_sha256": manifest.data_sha256, "tokenizer_sha256": manifest.tokenizer_sha256}
        special = {k: manifest.raw[k] for k in ("eos_token_id", "pad_token_id") if manifest.raw.get(k) is not None}
        if "eos_token_id" in special:
            special["bos_token_id"] = special["eos_token_id"]  # documents are separated (not opened) by EOS
        module = CausalLMModule(arch=resolved["arch"], size=resolved["size"], optim=resolved["optim"],
                                scheduler=resolved["scheduler"], train=resolved["train"], schedule=schedule,
                                data_info=data_info, config_overrides=special, init_from=cfg.init_from)

        flops_per_token, peak, peak_source = flops_and_peak(module.config, cfg.data.seq_len, precision)
        trainer.callbacks.append(Throughput(flops_per_token, peak, window=max(1, min(10, total_steps // 4))))
        trainer.callbacks.append(TrainClock())
        trainer.callbacks.append(StageEnd(run_dir, stage_names, bounds, manifest.tokenizer_dir, cfg.train.export_hf))
        trainer.callbacks.append(SourceTokens(datamodule.source_tokens))  # tokens/<stage>/<source>
        if cfg.callbacks.energy in (True, "auto"):
            try:
                trainer.callbacks.append(Energy(run_dir))
            except ImportError:
                if cfg.callbacks.energy is True:
                    raise LabError("callbacks.energy=true needs codecarbon: pip install codecarbon") from None

        if trainer.is_global_zero:
            peak_info = {"throughput/peak_tflops": f"{peak / 1e12:.4g}" if peak else "unknown",
                         "throughput/peak_source": peak_source}
            _log_run_inputs(logger, cfg, resolved, run_dir, manifest, module, flops_per_token, total_steps, datamodule,
                            peak_info)
        log.info("training %s (%s params) for %d steps over stages %s", cfg.arch_name, f"{module.params.total:,}",
                 total_steps, dict(zip(stage_names, datamodule.stage_steps())))

        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

        if module.stop_reason:
            trainer.save_checkpoint(checkpoints / "guard-stop.ckpt")
            if logger is not None:
                logger.experiment.set_tag(logger.run_id, "stopped_by", "loss_guard")
            raise LabError(f"{module.stop_reason}. Checkpoint: {checkpoints / 'guard-stop.ckpt'}")

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if module.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)  # the objective is always measured at the end
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        if cfg.train.export_hf:
            export_from_trainer(trainer, module, run_dir / "hf", manifest.tokenizer_dir)  # every rank: a collective
        if trainer.is_global_zero:
            if cfg.train.export_hf:
                logger.experiment.log_artifacts(logger.run_id, str(run_dir / "hf"), artifact_path="hf")
            logger.experiment.set_tag(logger.run_id, "run_dir", str(run_dir))
        if logger is not None:
            logger.finalize("success")
        return {"run_id": logger.run_id if logger is not None else None, "metrics": metrics, "run_dir": run_dir,
                "module": module}
    except BaseException as err:
        if logger is not None:
            end_run_after_failure(logger, err)
        raise


def end_run_after_failure(logger: MLFlowLogger, err: BaseException) -> None:
    """A start or a fit that failed ends its MLflow run FAILED (KILLED when interrupted), never RUNNING: a run
    left RUNNING shadows the real run of the same name in every later search."""
    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    try:
        client = logger.experiment
        if client.get_run(logger.run_id).info.status == "RUNNING":
            client.set_terminated(logger.run_id, status)
    except Exception as mlflow_err:  # noqa: BLE001 - the original error is the one to report
        log.warning("could not mark MLflow run %s %s: %s", logger.run_id, status, mlflow_err)


def _log_run_inputs(logger: MLFlowLogger, cfg: DictConfig, resolved: dict[str, Any], run_dir: Path, manifest: Any,
                    module: CausalLMModule, flops_per_token: float | None, total_steps: int,
                    datamodule: CurriculumDataModule, extra: dict[str, str] | None = None) -> None:
    """Everything needed to reproduce the run: resolved config, data manifest, tokenizer, model facts."""
    client, run_id = logger.experiment, logger.run_id
    params = params_from_config({k: v for k, v in resolved.items() if k not in ("hydra",)})
    params.update({"model/params_total": str(module.params.total),
                   "model/params_non_embedding": str(module.params.non_embedding),
                   "model/flops_per_token": str(flops_per_token), "model/class": type(module.model).__name__,
                   "train/total_steps": str(total_steps), "train/tokens_per_step": str(datamodule.tokens_per_step),
                   "train/total_tokens": str(total_steps * datamodule.tokens_per_step), **(extra or {})})
    # the effective model fields, after the size preset (arch.* holds the file's full-size values)
    params.update({f"model.{k}": str(v) for k, v in module.config.to_diff_dict().items()
                   if isinstance(v, (int, float, str, bool))})
    existing = client.get_run(run_id).data.params
    logger.log_hyperparams({k: v for k, v in params.items() if k not in existing})
    config_file = run_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(resolved))
    client.log_artifact(run_id, str(config_file))
    client.log_artifact(run_id, str(manifest.root / "manifest.json"), artifact_path="data")
    client.log_artifacts(run_id, str(manifest.tokenizer_dir), artifact_path="tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        model_config = Path(tmp) / "model_config.json"
        model_config.write_text(json.dumps(module.config.to_dict(), indent=1, default=str))
        client.log_artifact(run_id, str(model_config))


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
    log.info("%s = %.4f (MLflow run %s)", cfg.objective, value, result["run_id"])
    return value


if __name__ == "__main__":
    main()
