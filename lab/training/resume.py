"""What a training job does about earlier runs of its name: resume from a checkpoint, or reuse a finished run.

    ckpt_path=last         the newest readable checkpoint of an earlier run with this run_name (error if none)
    ckpt_path=auto         the same, among unfinished runs with the same settings; none: start fresh
    ckpt_path=<file>       that checkpoint
    reuse_finished=true    a FINISHED MLflow run with this run_name, the same settings and the same data is the
                           result: nothing is trained (lab.study runs every job this way)

"The same settings" means every recorded param except those that say how a run was launched or shown
(lab.runs.tracking.is_launch_setting); "the same data" means the same data_sha256 tag.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from lab import LabError
from lab.models.checkpoints import read_checkpoint
from lab.runs.tracking import describe_changes, is_launch_setting, params_from_config

log = logging.getLogger("lab.training.resume")

RUN_ID_FILE = "mlflow_run_id"  # in every run folder: the MLflow run the folder belongs to


def changed_settings(recorded: Mapping[str, str], resolved: Mapping[str, Any]) -> list[str]:
    """Training settings whose recorded value differs from the resolved config's (launch settings aside)."""
    now = params_from_config({k: v for k, v in resolved.items() if k != "hydra"})
    return sorted(k for k, v in now.items() if k in recorded and recorded[k] != v and not is_launch_setting(k))


def check_resume_settings(uri: str, run_id: str, resolved: Mapping[str, Any]) -> None:
    """Refuse, before anything is logged, a resume whose training settings differ from the run's record."""
    from mlflow.tracking import MlflowClient

    try:
        recorded = MlflowClient(uri).get_run(run_id).data.params
    except Exception:  # the run is gone from this store: nothing to compare with
        return
    changed = changed_settings(recorded, resolved)
    if changed:
        now = params_from_config({k: v for k, v in resolved.items() if k != "hydra"})
        raise LabError(f"resuming MLflow run {run_id} with other settings ({describe_changes(recorded, now, changed)}). "
                       "Resume with the run's own settings, or start a new run (without ckpt_path) to train differently")


def _candidates(cfg: DictConfig) -> list[Path]:
    """Every checkpoint of an earlier run with this run_name (single runs and multiruns), newest first. Every
    kind counts (step, stage end, guard stop): a run killed before its first step checkpoint may have a stage one."""
    root = Path(cfg.paths.root_dir)
    found = [*root.glob(f"outputs/{cfg.run_name}/*/checkpoints/*.ckpt"),
             *root.glob(f"multirun/*/*_{cfg.run_name}/checkpoints/*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _resumable(path: Path) -> bool:
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except LabError as err:
        log.warning("skipping a checkpoint that cannot be resumed from: %s", err)
        return False
    if "state_dict" in checkpoint and "loops" in checkpoint:
        return True
    log.warning("skipping %s: not a complete Lightning training checkpoint", path)
    return False


def _run_of(checkpoint: Path, uri: str) -> Any | None:
    """The MLflow run a checkpoint's run folder belongs to (None: not recorded, or not in this store)."""
    from mlflow.tracking import MlflowClient

    id_file = checkpoint.parent.parent / RUN_ID_FILE
    if not id_file.is_file():
        return None
    try:
        return MlflowClient(uri).get_run(id_file.read_text().strip())
    except Exception:  # noqa: BLE001 - another store, or a deleted run: not this job's to continue
        return None


def _auto_checkpoint(cfg: DictConfig, uri: str, resolved: Mapping[str, Any]) -> str | None:
    """The newest readable checkpoint of an unfinished run of this name with the same settings, if any."""
    for path in _candidates(cfg):
        run = _run_of(path, uri)
        if run is None or run.info.status == "FINISHED":
            continue  # a finished run is a result (reuse_finished), not something to continue
        changed = changed_settings(run.data.params, resolved)
        if changed:
            log.info("not resuming %s: its run trained other settings (%s)", path, ", ".join(changed[:5]))
            continue
        if _resumable(path):
            return str(path)
    return None


def resolve_ckpt_path(cfg: DictConfig, uri: str | None = None, resolved: Mapping[str, Any] | None = None) -> str | None:
    """The checkpoint a run resumes from (see the module docstring); unreadable ones are skipped, each named in the log."""
    if not cfg.ckpt_path:
        return None
    if cfg.ckpt_path == "auto":
        if uri is None or resolved is None:
            raise ValueError("ckpt_path=auto needs the tracking URI and the resolved config")
        return _auto_checkpoint(cfg, uri, resolved)
    if cfg.ckpt_path != "last":
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise LabError(f"ckpt_path={cfg.ckpt_path} does not exist")
        read_checkpoint(path, mmap=True)  # one clear line now rather than Lightning's advice to load unsafely
        return str(path)
    candidates = _candidates(cfg)
    if not candidates:
        raise LabError(f"ckpt_path=last: no earlier checkpoint for run_name={cfg.run_name} under outputs/ or multirun/")
    for path in candidates:
        if _resumable(path):
            return str(path)
    raise LabError(f"ckpt_path=last: none of the {len(candidates)} checkpoint(s) for run_name={cfg.run_name} can be "
                   "read (each is named in the log); start a new run without ckpt_path")


def finished_twin(experiment: str, run_name: str, resolved: Mapping[str, Any], data_sha256: str, uri: str) -> Any | None:
    """The newest FINISHED training run of `experiment` named `run_name` that trained the same settings on the same
    data, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    escaped = run_name.replace("'", "\\'")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=200,
                              filter_string=f"attributes.run_name = '{escaped}' and attributes.status = 'FINISHED'")
    for run in runs:
        tags = run.data.tags
        if tags.get("eval_of") or tags.get("kind", "train") != "train":
            continue
        if tags.get("data_sha256") == data_sha256 and not changed_settings(run.data.params, resolved):
            return run
    return None
