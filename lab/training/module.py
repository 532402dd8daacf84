"""The one LightningModule: any causal LM built from its transformers config, trained on packed blocks.

The module never looks at which arch it holds. Labels are the input block itself; the shift by one
position happens exactly once, inside the model's loss (transformers' ForCausalLMLoss).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
from torch import nn

from lab import LabError
from lab.training.callbacks import is_logging_step
from lab.data.datamodule import DataInfo
from lab.models.kernels import FLEX, FastPaths, apply_fast_paths, causal_lm_loss, compile_model
from lab.models.build import build_config, check_hf_folder
from lab.models.arch import build_model, count_params
from lab.data.step_budget import StepSchedule
from lab.training.schedules import lr_multiplier
from lab.training.settings import TrainSettings

LN2 = math.log(2.0)
log = logging.getLogger("lab.training.module")


class _KernelFallbackNotice(logging.Filter):
    """transformers says once per kernel what the one "fast paths:" line below already says for all of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is falling back to its reference PyTorch implementation" not in record.getMessage()


logging.getLogger("transformers.integrations.hub_kernels").addFilter(_KernelFallbackNotice())


class CausalLMModule(L.LightningModule):
    def __init__(self, arch: Mapping[str, Any], size: Mapping[str, Any] | None, settings: TrainSettings,
                 schedule: StepSchedule, data_info: DataInfo, config_overrides: Mapping[str, Any] | None = None,
                 init_from: str | None = None):
        """
        arch/size: the resolved conf/arch and conf/size nodes; config_overrides: fields set from the data
        (vocab size, special token ids). settings: the checked config (optim, scheduler and train are read
        here). schedule: the run's optimizer steps by stage. data_info: the prepared data's facts.
        """
        super().__init__()
        # The checkpoint keeps plain containers only, so it loads with weights_only=True (lab.models.loading rebuilds
        # the model from arch, size and config_overrides); lab.train logs the whole resolved config as MLflow
        # params itself (logger=False avoids a second, slash-keyed copy).
        self.save_hyperparameters({"arch": dict(arch), "size": dict(size) if size is not None else None,
                                   "optim": settings.optim.record(), "scheduler": settings.scheduler.record(),
                                   "train": settings.train.record(), "schedule": schedule.record(),
                                   "data_info": data_info.record(), "config_overrides": dict(config_overrides or {}),
                                   "init_from": init_from}, logger=False)
        self.settings, self.schedule, self.data_info = settings, schedule, data_info
        self.config = build_config(arch, size, **(config_overrides or {}))
        self.model = build_model(self.config)
        if init_from:
            load_initial_weights(self.model, init_from)
        if settings.train.activation_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.fast_paths: FastPaths | None = None  # chosen in setup(), once the device is known
        self.params = count_params(self.model)
        self.seq_len = data_info.seq_len
        self.tokens_per_step = schedule.tokens_per_step
        self._loss_ema: float | None = None
        self.skipped_steps = 0
        self.stop_reason: str | None = None
        self._val_sums: dict[str, torch.Tensor] = {}
        self._stage_end_val: dict[str, float] = {}  # source -> val loss after the last stage that trained on it
        self.last_val_step: int | None = None

    # -- model ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Pick the attention/SSM kernels for the device this rank runs on, then compile (in place, so
        parameter names and checkpoints stay unchanged). Everything falls back to torch paths on CPU."""
        if self.fast_paths is not None:
            return
        train = self.settings.train
        device = self.trainer.strategy.root_device
        if train.attention == FLEX and device.type != "cuda":
            raise LabError(f"train.attention={FLEX} trains on CUDA only: torch has no backward for it on {device.type}; "
                           "use train.attention=auto (or sdpa)")
        self.fast_paths = apply_fast_paths(self.model, device, attention=train.attention)
        for note in self.fast_paths.notes:
            log.info("fast paths: %s", note)
        if train.compile:
            compile_model(self.model, chunked_loss=bool(train.loss_chunk_size))
        if self.trainer.is_global_zero and self.logger is not None:
            try:
                self.logger.log_hyperparams(self.fast_paths.as_params())
            except Exception as err:  # a resumed run on another device: MLflow refuses to change a param
                log.warning("fast-path params not logged: %s", err)

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch of blocks. input_ids: [batch, seq_len]."""
        return causal_lm_loss(self.model, input_ids, chunk_size=self.settings.train.loss_chunk_size)

    # -- training -----------------------------------------------------------------------------------------
    # The step's path reads the device once: the loss, for the guard (it must decide before the backward). The
    # guard, the running mean and the step log (StepLog, through the step's output) all use that one float;
    # every other metric stays a tensor, logged only on the steps Lightning writes to the loggers.
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, Any] | None:
        loss = self.loss(batch)
        value = loss.detach().float().item()
        if self._is_bad(value, loss.device):
            return self._handle_bad_step(value)
        self._loss_ema = value if self._loss_ema is None else 0.95 * self._loss_ema + 0.05 * value
        if is_logging_step(self.trainer):
            self.log("train/loss", loss.detach(), on_step=True, prog_bar=self._has_progress_bar(),
                     batch_size=batch.shape[0])
        return {"loss": loss, "loss_value": value}

    def _is_bad(self, value: float, device: torch.device) -> bool:
        guard = self.settings.train.guard
        bad = not math.isfinite(value)
        if not bad and self._loss_ema is not None and self.global_step >= guard.warmup_steps:
            bad = value > guard.spike_factor * self._loss_ema
        if self.trainer.world_size > 1:  # every rank must agree, or the skipped rank hangs in all-reduce
            flag = torch.tensor(float(bad), device=device)
            bad = bool(self.trainer.strategy.reduce(flag, reduce_op="max").item())
        return bad

    def _handle_bad_step(self, value: float) -> None:
        guard = self.settings.train.guard
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        detail = f"loss {value:.4g} at step {self.global_step} (running mean {self._loss_ema})"
        if guard.action == "stop" or self.skipped_steps > guard.max_skips:
            self.stop_reason = f"loss guard stopped the run: {detail}; skipped steps so far: {self.skipped_steps}"
            self.trainer.should_stop = True
        return None  # Lightning then skips backward and the optimizer step for this batch

    def _has_progress_bar(self) -> bool:
        # a prog_bar metric is read to the host (.item()) at every step, bar or no bar
        return self.trainer.progress_bar_callback is not None

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping, except that the clip by norm is done here so that the norm it computes is the one
        logged (`train/grad_norm`), not computed a second time. The same call as Lightning's
        (Precision.clip_grad_by_norm: clip_grad_norm_ over the optimizer's parameters, in its order), so the clipped
        gradients are bit for bit the same. Sharded gradients and other precision plugins keep Lightning's path."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision

        precision = self.trainer.precision_plugin
        by_norm = bool(gradient_clip_val) and (gradient_clip_algorithm or "norm") == "norm"
        scaled_inside_optimizer = (isinstance(precision, MixedPrecision) and precision.scaler is not None
                                   and getattr(optimizer, "_step_supports_amp_scaling", False))
        plain_norm_clip = (by_norm and not self._grads_are_sharded() and not scaled_inside_optimizer
                           and type(precision).clip_grad_by_norm is Precision.clip_grad_by_norm)
        if plain_norm_clip:
            norm = torch.nn.utils.clip_grad_norm_(precision.main_params(optimizer), gradient_clip_val)
        else:  # Lightning's own checks and clipping (value clipping, FSDP, a GradScaler the optimizer applies)
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                                gradient_clip_algorithm=gradient_clip_algorithm)
            norm = None
        # (a step the loss guard skipped has no gradients, and no norm to log)
        if is_logging_step(self.trainer) and any(p.grad is not None for p in self.parameters()):
            self.log("train/grad_norm", norm if norm is not None else self._grad_norm(), on_step=True)

    def _grad_norm(self) -> torch.Tensor:
        """The total gradient norm, for logging when clipping did not compute it (the gradients as they are now)."""
        norm = torch.stack([p.grad.detach().norm(2) for p in self.parameters() if p.grad is not None]).norm(2)
        if self._grads_are_sharded():
            # each rank holds a shard of every gradient: the global norm sums the squares over ranks
            norm = self.trainer.strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        return norm

    def _grads_are_sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return self.trainer.world_size > 1 and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def on_train_batch_end(self, outputs: Any, batch: torch.Tensor, batch_idx: int) -> None:
        if not is_logging_step(self.trainer):
            return  # host floats become device tensors when logged: only on the steps that are written
        self.log("tokens_seen", float(self.global_step * self.tokens_per_step), on_step=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        self.log("stage", float(self.schedule.stage_at(self.global_step)), on_step=True)

    # -- validation, per domain -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        source = self.data_info.val_sources[dataloader_idx]
        n_predicted = batch.shape[0] * (batch.shape[1] - 1)  # one target per position after the first
        loss_sum = self.loss(batch).detach().float() * n_predicted
        sums = self._val_sums.setdefault(source, torch.zeros(2, device=self.device, dtype=torch.float64))
        sums += torch.stack([loss_sum.double(), torch.tensor(float(n_predicted), device=self.device).double()])

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        bytes_per_token = self.data_info.val_bytes_per_token
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        losses: dict[str, float] = {}
        for source, sums in sorted(self._val_sums.items()):
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # every rank held a slice
            loss = (sums[0] / sums[1]).item()
            losses[source] = loss
            total += sums
            self.log(f"val/{source}/loss", loss, sync_dist=False)
            self.log(f"val/{source}/ppl", math.exp(min(loss, 50.0)), sync_dist=False)
            if bytes_per_token.get(source):
                self.log(f"val/{source}/bpb", loss / LN2 / bytes_per_token[source], sync_dist=False)
            if source in self._stage_end_val:
                # forgetting: how far this domain moved since the last stage that trained on it
                self.log(f"val/{source}/forgetting", loss - self._stage_end_val[source], sync_dist=False)
        self.log("val/loss", (total[0] / total[1]).item(), prog_bar=self._has_progress_bar(), sync_dist=False)
        self.last_val_step = self.global_step
        self._remember_stage_end(losses)

    def _remember_stage_end(self, losses: Mapping[str, float]) -> None:
        ended = self.schedule.stage_ending_at(self.global_step)
        if ended is not None:
            for source in self.schedule.stage_sources[ended]:
                if source in losses:
                    self._stage_end_val[source] = losses[source]

    # -- optimisation ---------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optim, schedule = self.settings.optim, self.schedule
        fused = torch.cuda.is_available() and self.device.type == "cuda" if optim.fused == "auto" else optim.fused
        optimizer = torch.optim.AdamW(param_groups(self.model, optim.weight_decay), lr=optim.lr,
                                      betas=optim.betas, eps=optim.eps, fused=fused or None)
        multiplier = lr_multiplier(self.settings.scheduler, schedule.total_steps, schedule.tokens_per_step,
                                   schedule.stage_names, schedule.stage_bounds)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: provenance and RNG for exact resume ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lab"] = {
            "data_sha256": self.data_info.data_sha256,
            "tokenizer_sha256": self.data_info.tokenizer_sha256,
            "loss_ema": self._loss_ema,
            "skipped_steps": self.skipped_steps,
            "stage_end_val": dict(self._stage_end_val),
            "rng": {
                "python": list(random.getstate()[1]),
                "numpy": _numpy_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called before Lightning restores its loops from the same dict. A stage checkpoint is written
        # inside on_train_epoch_end, where the epoch counts as processed but not completed; restored as
        # is, Lightning starts the next stage with the finished stage's batch count and skips most of it.
        # Marked as "last batch done, epoch not processed" (what a step checkpoint at the boundary
        # holds), Lightning closes the stage and starts the next one from its first batch.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
        if progress:
            for counts in (progress["current"], progress["total"]):
                counts["processed"] = min(counts["processed"], counts["completed"])
        # a checkpoint is read as it was written, by this or an older lab: every key may be absent
        saved = checkpoint.get("lab", {})
        for key in ("data_sha256", "tokenizer_sha256"):
            ours = getattr(self.data_info, key)
            if saved.get(key) and ours and saved[key] != ours:
                raise LabError(f"cannot resume: the checkpoint was trained with {key}={saved[key][:12]}…, but the "
                               f"prepared data now has {ours[:12]}…; resume with the data it was trained on")
        self._loss_ema = saved.get("loss_ema")
        self.skipped_steps = saved.get("skipped_steps", 0)
        self._stage_end_val = dict(saved.get("stage_end_val", {}))
        rng = saved.get("rng")
        if rng:
            random.setstate((3, tuple(rng["python"]), None))
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def load_initial_weights(model: nn.Module, folder: str) -> None:
    """init_from: the weights of an HF folder (checked like any model from elsewhere) into `model`; shapes must fit."""
    from transformers import AutoModelForCausalLM

    if not Path(folder).is_dir():
        raise LabError(f"init_from={folder!r} is not a folder (expected an HF save_pretrained export)")
    check_hf_folder(Path(folder))  # a folder from elsewhere: one of the lab's config classes, no code
    try:
        source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers each raise their own types
        raise LabError(f"init_from={folder}: the weights cannot be loaded ({type(err).__name__}); "
                       "the folder is damaged or does not match its config.json") from None
    ours, theirs = model.state_dict(), source.state_dict()
    mismatched = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    if mismatched:
        raise LabError(f"init_from={folder}: {len(mismatched)} weights do not fit this arch "
                       f"(first: {mismatched[:3]}); continued pretraining needs the same shapes")
    model.load_state_dict(theirs, strict=False)


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases, SSM vectors and embeddings (tied head included) are exempt."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():  # unique parameters: a tied head appears once, as the embedding
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embedding_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
