"""Callbacks of the training run: throughput/MFU/memory, stage-end exports and generations, a per-step log,
energy. The export itself (weights, tokenizer, model card, registry) is lab/training/export.py."""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from lab import LabError
from lab.training.export import (export_from_trainer, gathered_weights, mlflow_run_of, model_from_weights,
                                 training_command, weights_are_sharded)
from lab.generation.stage_samples import GenerationSpec
from lab.training.mlflow_run import drain_metrics
from lab.models.build import load_tokenizer_folder


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's metrics to the loggers (every trainer.log_every_n_steps-th).
    A value logged on any other step is kept as a tensor and never sent: the step path logs only on these."""
    connector = trainer._logger_connector  # the predicate Lightning itself applies (update_train_step_metrics)
    return bool(connector.should_update_logs or trainer.fast_dev_run)


def log_host_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Python floats straight to the loggers, at the step Lightning gives the step's own metrics (its count of
    optimizer steps before this one): no device tensor, no host sync."""
    step = trainer.fit_loop.epoch_loop._batches_that_stepped
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class EndOfTraining(L.Callback):
    """A callback whose stage-end and end-of-training records must exist even for a run resumed from a checkpoint
    taken at its last step (killed before it ended): Lightning then skips the whole training loop, and with it
    on_train_epoch_end and on_train_end; on_fit_end still runs, and does their work once."""

    _loop_ran = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loop_ran = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loop_ran or trainer.global_step == 0:
            return
        self.on_train_epoch_end(trainer, pl_module)
        self.on_train_end(trainer, pl_module)


class Throughput(L.Callback):
    """tokens/s over each logging window, MFU from the family's FLOPs per token, peak memory.

    A step ends at a mark: perf_counter on CPU; on a GPU a CUDA event recorded on the stream, so the host does not
    wait for the step. The window's last event is waited for once, when its statistics are computed."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, window: int = 10):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.window = window
        self._steps: list[tuple[Any, Any]] = []  # (start mark, end mark) of each timed step in the window
        self._last: Any = None
        self._last_step = -1
        self.tokens_per_s: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the epoch boundary (validation, dataloader reload) is not training time

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:
            return  # mid-accumulation: the optimizer step has not happened yet
        self._last_step = trainer.global_step
        mark = self._mark(pl_module.device)
        if self._last is not None:
            self._steps.append((self._last, mark))
        self._last = mark
        if len(self._steps) >= self.window:
            step_time = statistics.median(self._step_seconds())
            self._steps.clear()
            self.tokens_per_s = pl_module.tokens_per_step / step_time
            metrics = {"throughput/tokens_per_s": self.tokens_per_s, "throughput/step_time_s": step_time,
                       "memory/peak_gb": peak_memory_gb(pl_module.device)}
            if self.flops_per_token:
                per_device = self.tokens_per_s / trainer.world_size
                metrics["throughput/tflops_per_device"] = per_device * self.flops_per_token / 1e12
                if self.peak_flops:  # known for GPUs (lab/models/flops.py table) or set by LAB_PEAK_TFLOPS
                    metrics["throughput/mfu"] = per_device * self.flops_per_token / self.peak_flops
            log_host_metrics(trainer, metrics)

    @staticmethod
    def _mark(device: torch.device) -> Any:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def _step_seconds(self) -> list[float]:
        if isinstance(self._steps[-1][1], float):
            return [end - start for start, end in self._steps]
        self._steps[-1][1].synchronize()  # the window's one wait: every earlier event has completed too
        return [start.elapsed_time(end) / 1e3 for start, end in self._steps]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # validation time is not step time


class TrainClock(EndOfTraining):
    """`time/train_s`: seconds inside this run's fit loops (validation included), summed over resumes
    through the checkpoints. lab.compare reports it as the wall time; MLflow's start/end would also
    count the hours between a kill and its resume."""

    def __init__(self) -> None:
        self.before = 0.0  # seconds of earlier attempts, restored from the checkpoint
        self._start: float | None = None

    def elapsed(self) -> float:
        return self.before + (time.monotonic() - self._start if self._start is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if is_logging_step(trainer):
            log_host_metrics(trainer, {"time/train_s": self.elapsed()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:  # the last value, not the last logging interval's
            logger.log_metrics({"time/train_s": self.elapsed()}, step=trainer.global_step)

    def state_dict(self) -> dict[str, float]:
        return {"train_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("train_s", 0.0))


class StageEnd(EndOfTraining):
    """At the end of each curriculum stage (= Lightning epoch): HF export of the weights with its model card,
    generations from a fixed set of prompts (MLflow `generations/<index>-<stage>.md`) and a tag; at the end of
    training, the generations again (`generations/final.md`)."""

    def __init__(self, output_dir: Path, stage_names: list[str], stage_bounds: list[int],
                 tokenizer_dir: Path | None, export: bool, generations: Any = None, seq_len: int | None = None,
                 command: str | None = None, source_tokens: Callable[[int], dict[str, float]] | None = None):
        self.output_dir = Path(output_dir)
        self.stage_names = stage_names
        self.stage_bounds = stage_bounds
        self.tokenizer_dir = tokenizer_dir
        self.export = export
        self.generations = GenerationSpec.from_config(generations)  # checked before training starts
        if self.generations.enabled and tokenizer_dir is None:
            raise LabError("callbacks.generations need the prepared tokenizer; set callbacks.generations.prompts=[] "
                           "to train without them")
        self.seq_len = seq_len
        self.command = command or training_command()
        self.source_tokens = source_tokens
        self._tokenizer: Any = None
        self._last_generated: tuple[int, list[dict[str, Any]]] | None = None  # (step, results): reused at the end

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        client, run_id = mlflow_run_of(trainer)
        if client is not None and self.command:
            client.set_tag(run_id, "command", self.command[:5000])  # MLflow caps tag values

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        index = min(trainer.current_epoch, len(self.stage_names) - 1)
        if trainer.global_step != self.stage_bounds[index + 1]:
            return  # stopped early (max_steps, guard): the stage did not complete
        name = self.stage_names[index]
        sharded = weights_are_sharded(trainer)
        weights = gathered_weights(trainer) if self.export or (sharded and self.generations.enabled) else None
        if self.export:
            drain_metrics(trainer.loggers)  # the model card reads the stage end's validation from the run
            metrics = self.source_tokens(trainer.global_step) if self.source_tokens else None
            export_from_trainer(trainer, pl_module, self.output_dir / "hf_stages" / f"{index}-{name}",
                                self.tokenizer_dir, model_max_length=self.seq_len, weights=weights,
                                card={"stage": name, "step": trainer.global_step, "command": self.command,
                                      "metrics": metrics})
        if self.generations.enabled:
            self._log_generations(trainer, pl_module, f"{index}-{name}", f"the end of stage `{name}`",
                                  weights if sharded else None)
        client, run_id = mlflow_run_of(trainer)
        if client is not None and trainer.is_global_zero:
            client.set_tag(run_id, "stage_completed", name)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.generations.enabled:
            return
        sharded = weights_are_sharded(trainer)
        if self._last_generated is not None and self._last_generated[0] == trainer.global_step:
            results = self._last_generated[1]  # the last stage end is the end: same weights, same texts
            if trainer.is_global_zero:
                self._log_text(trainer, "final", "the end of training", results)
            return
        self._log_generations(trainer, pl_module, "final", "the end of training",
                              gathered_weights(trainer) if sharded else None)

    def _log_generations(self, trainer: L.Trainer, pl_module: L.LightningModule, file_name: str, when: str,
                         weights: dict[str, torch.Tensor] | None) -> None:
        """Rank 0 generates (from a copy built of the gathered weights when the model is sharded) and logs;
        the others wait at the barrier."""
        if trainer.is_global_zero:
            model = pl_module.model if weights is None else model_from_weights(pl_module, weights)
            results = self.generations.run(model, self._load_tokenizer())
            self._last_generated = (trainer.global_step, results)
            self._log_text(trainer, file_name, when, results)
        trainer.strategy.barrier("generations")

    def _log_text(self, trainer: L.Trainer, file_name: str, when: str, results: list[dict[str, Any]]) -> None:
        text = self.generations.markdown(results, f"{when} (optimizer step {trainer.global_step})")
        client, run_id = mlflow_run_of(trainer)
        if client is not None:
            client.log_text(run_id, text, f"generations/{file_name}.md")
        else:  # no MLflow logger (a bare Trainer): the run folder keeps them
            path = self.output_dir / "generations" / f"{file_name}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")

    def _load_tokenizer(self) -> Any:

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer_folder(Path(self.tokenizer_dir))
        return self._tokenizer


class SourceTokens(EndOfTraining):
    """`tokens/<stage>/<source>` and `tokens/<source>`: tokens trained per source, at each stage end and at the end.

    Read off the curriculum's deterministic order (`counts(global_step)`), not counted batch by batch, so
    they are exact across resumes and ranks.
    """

    def __init__(self, counts: Callable[[int], dict[str, float]]):
        self.counts = counts
        self._logged_step = -1

    def _log(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._logged_step:
            return
        self._logged_step = trainer.global_step
        metrics = self.counts(trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)


class StepLog(L.Callback):
    """Appends {step, loss, lr} per optimizer step to steps.jsonl: a plain record that survives a kill.

    The file stays open for the run and each line is flushed to the OS as it is written, so a `kill -9` keeps
    every line up to the step it died in. The loss is the float the module already read for its loss guard
    (`loss_value` in the step's output): writing it costs no read of the device."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: Any = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        loss = step_loss(outputs)
        if not trainer.is_global_zero or loss is None:
            return  # a step the loss guard skipped has no loss
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps({"step": trainer.global_step, "loss": loss, "lr": lr}) + "\n")
        self._file.flush()
        fault = os.environ.get("LAB_FAULT_KILL_AT_STEP")  # test hook: `<step>` or `<step>:<signal name>`
        if fault and trainer.global_step == int(fault.partition(":")[0]):
            # a real signal from the OS, to this process: SIGKILL dies like `kill -9` (no cleanup, to prove resume
            # is exact); SIGTERM / SIGUSR1 / SIGINT reach whatever handler is installed, as a scheduler's would
            os.kill(os.getpid(), getattr(signal, fault.partition(":")[2] or "SIGKILL"))

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()


def step_loss(outputs: Any) -> float | None:
    """The training step's loss as a Python float: the module's own read (`loss_value`), else the loss tensor
    (a module that returns only a tensor pays one read here); None for a skipped step."""
    if isinstance(outputs, dict):
        if outputs.get("loss_value") is not None:
            return float(outputs["loss_value"])
        outputs = outputs.get("loss")
    return None if outputs is None else float(outputs)


class Energy(L.Callback):
    """kWh and CO2 of the run through codecarbon, when it is installed."""

    def __init__(self, output_dir: Path):
        from codecarbon import OfflineEmissionsTracker  # raises ImportError when absent: the caller decides

        self.tracker = OfflineEmissionsTracker(output_dir=str(output_dir), country_iso_code="ROU",
                                               log_level="error", save_to_file=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tracker.start()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tracker.stop()
        data = self.tracker.final_emissions_data
        if data is None:
            return
        tokens = max(1, trainer.global_step * pl_module.tokens_per_step)
        for logger in trainer.loggers:
            logger.log_metrics({"energy/kwh": data.energy_consumed, "energy/co2_kg": data.emissions,
                                "energy/wh_per_mtoken": data.energy_consumed * 1e3 / tokens * 1e6},
                               step=trainer.global_step)
