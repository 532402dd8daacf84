"""The MLflow run of one training job: opened by rank 0 only, its inputs recorded, ended FAILED when the job fails.

One MLflow run per job, created and recorded by rank 0 only: the other ranks never touch the store (a sqlite
store created by two processes at once breaks), and their Lightning logger is a stand-in. A resumed job
continues the MLflow run of the run folder it resumes from (lab/training/resume.py picks the checkpoint).
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lab import LabError
from lab.training.resume import RUN_ID_FILE, check_resume_settings
from lab.runs.tracking import get_or_create_experiment, git_info, params_from_config

log = logging.getLogger("lab.training.mlflow_run")


class QueuedMetricsLogger(MLFlowLogger):
    """Lightning's MLflow logger whose metric writes run on one background thread, off the training step's path
    (a synchronous sqlite write costs 4-9 ms a logging step, an HTTP round trip against a server).

    Writes keep their order. `drain()` waits until every queued write is in the store; it runs before the run ends
    (`finalize`, `end_run_after_failure`) and before anything reads the run back (a stage end's model card).
    Params stay synchronous: MLflow refusing one raises where it is logged. Not MLflow's own async logging
    (`synchronous=False`): each of its flushes waits up to 1 s on its worker's queue timeout, a few per run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._failures: list[BaseException] = []

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_queued, name="lab-mlflow-metrics", daemon=True)
            self._writer.start()
        self._queue.put((dict(metrics), step))

    def _write_queued(self) -> None:
        while True:
            metrics, step = self._queue.get()
            try:
                super().log_metrics(metrics, step)
            except Exception as err:  # noqa: BLE001 - kept and raised by drain(), on the training thread
                self._failures.append(err)
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Wait until every queued metric is written; a write that failed is one LabError here."""
        self._queue.join()
        if self._failures:
            failures, self._failures = self._failures, []
            raise LabError(f"{len(failures)} MLflow metric write(s) of run {self.run_id} failed; the first: "
                           f"{type(failures[0]).__name__}: {failures[0]}")

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if status == "finished":
            # Lightning's SLURM requeue handler (SIGUSR1) "saves the logger" this way, then trains on until SLURM
            # stops the job: the run is not over, so only its metrics are written (it ends KILLED at the stop)
            self.drain()
            return
        try:
            self.drain()
        except LabError as err:
            if status == "success":
                raise
            log.warning("%s", err)  # the run failed already: that error is the one to report
        super().finalize(status)


def drain_metrics(loggers: Any) -> None:
    """Every queued metric of these loggers in the store: before reading the run back from MLflow."""
    for logger in loggers:
        if isinstance(logger, QueuedMetricsLogger):
            logger.drain()


def open_run(cfg: DictConfig, uri: str, run_dir: Path, ckpt_path: str | None, resolved: Mapping[str, Any],
             tags: Mapping[str, str]) -> MLFlowLogger | None:
    """Rank 0: the job's MLflow logger (a new run, or the resumed run's), its id written to run_dir/RUN_ID_FILE.
    Other ranks: None (even constructing Lightning's MLflow logger opens the store)."""
    if rank_zero_only.rank != 0:
        return None
    run_id_file = run_dir / RUN_ID_FILE
    get_or_create_experiment(cfg.logger.experiment_name, uri, cfg.logger.artifact_location)
    if ckpt_path and (Path(ckpt_path).parent.parent / RUN_ID_FILE).is_file():
        # a resumed run continues the same MLflow run
        run_id_file.write_text((Path(ckpt_path).parent.parent / RUN_ID_FILE).read_text())
    if run_id_file.is_file():
        check_resume_settings(uri, run_id_file.read_text().strip(), resolved)
    resumed = run_id_file.read_text().strip() if run_id_file.is_file() else None
    logger = QueuedMetricsLogger(experiment_name=cfg.logger.experiment_name, run_name=cfg.logger.run_name,
                          tracking_uri=uri, tags=dict(tags), log_model=False, run_id=resumed)
    run_id_file.write_text(logger.run_id)
    if resumed and logger.experiment.get_run(resumed).info.status != "RUNNING":
        logger.experiment.update_run(resumed, "RUNNING")  # a KILLED (preempted) run that continues is running again
    return logger


def run_tags(cfg: DictConfig, run_dir: Path, curriculum: str, data_sha256: str,
             tokenizer_sha256: str) -> dict[str, str]:
    """What a training run is tagged with: arch, size, seed, curriculum, data and code versions, tags.*."""
    return {"arch": str(cfg.arch_name), "size": str(cfg.size.name), "seed": str(cfg.seed), "curriculum": curriculum,
            "data_sha256": data_sha256, "tokenizer_sha256": tokenizer_sha256,
            "experiment_name": str(cfg.experiment_name), "run_dir": str(run_dir), **git_info(),
            **{str(k): str(v) for k, v in cfg.tags.items()}}


def log_run_inputs(logger: MLFlowLogger, resolved: Mapping[str, Any], run_dir: Path, manifest: Any, module: Any,
                   extra_params: Mapping[str, str]) -> None:
    """Everything needed to reproduce the run: resolved config, data manifest, tokenizer, model facts."""
    client, run_id = logger.experiment, logger.run_id
    params = params_from_config({k: v for k, v in resolved.items() if k not in ("hydra",)})
    params.update({"model/params_total": str(module.params.total),
                   "model/params_non_embedding": str(module.params.non_embedding),
                   "model/class": type(module.model).__name__, **extra_params})
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


class Interrupted(LabError):
    """The job was stopped by a signal (SIGTERM, SIGUSR1, Ctrl-C): its MLflow run ends KILLED, not FAILED."""


def end_run_after_failure(logger: MLFlowLogger, err: BaseException) -> None:
    """A start or a fit that failed ends its MLflow run FAILED (KILLED when interrupted), never RUNNING: a run
    left RUNNING shadows the real run of the same name in every later search. An interrupted fit was already
    ended FAILED by Lightning (its loggers' finalize("failed")): that becomes KILLED."""
    interrupted = isinstance(err, (KeyboardInterrupt, Interrupted))
    status = "KILLED" if interrupted else "FAILED"
    try:
        if isinstance(logger, QueuedMetricsLogger):
            logger.drain()  # the metrics up to the failure belong in the record
    except LabError as drain_err:
        log.warning("%s", drain_err)
    try:
        client = logger.experiment
        if client.get_run(logger.run_id).info.status in (("RUNNING", "FAILED") if interrupted else ("RUNNING",)):
            client.set_terminated(logger.run_id, status)
    except Exception as mlflow_err:  # noqa: BLE001 - the original error is the one to report
        log.warning("could not mark MLflow run %s %s: %s", logger.run_id, status, mlflow_err)
