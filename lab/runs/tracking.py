"""MLflow plumbing shared by every job: where the store is, and what makes a run reproducible.

The embedded default is a sqlite store plus an artifact folder inside the project (MLflow's plain
file store is refused by current MLflow, so Lightning's `./mlruns` default cannot be used).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError
from lab.config import resolvers as _resolvers  # noqa: F401 - registers conf/hydra's resolvers

MLFLOW_DIR = PROJECT_ROOT / "mlflow"
# MLflow caps one param value at 6000 characters.
_PARAM_VALUE_LIMIT = 6000


def tracking_uri(configured: str | None = None) -> str:
    """The MLflow tracking URI, by one rule for every tool (lab.train, lab.compare, lab.evaluate, ...):
    an explicit setting (logger.tracking_uri=..., --tracking-uri) wins, then $MLFLOW_TRACKING_URI, then
    the project's sqlite store (mlflow/mlflow.db)."""
    if configured is not None and not isinstance(configured, str):
        raise LabError(f"tracking URI {configured!r} is a {type(configured).__name__}, not a URI; "
                       "give logger.tracking_uri=http://host:5000 (or sqlite:///path/mlflow.db)")
    uri = (configured or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = f"sqlite:///{MLFLOW_DIR / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        _init_sqlite_store(uri)
    return uri


@functools.cache
def _init_sqlite_store(uri: str) -> None:
    """Create the sqlite store's tables once, under a file lock: jobs that start together on a fresh store
    (make bakeoff LAUNCHER=local_parallel, several sweep workers) would otherwise all run MLflow's schema
    migration at once and all but one fail (`table _alembic_tmp_experiments already exists`)."""
    db = Path(uri.removeprefix("sqlite:///"))
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent local jobs there
        fcntl = None
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                MlflowClient(uri).search_experiments(max_results=1)  # builds (or checks) the schema
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as err:
        raise LabError(f"MLflow store {uri}: cannot create {db.parent} ({err.strerror}); give a writable "
                       "logger.tracking_uri / MLFLOW_TRACKING_URI (sqlite:///path/mlflow.db or http://host:5000)") from err


# `scheme:` at the start: s3://, gs://, file://, mlflow-artifacts:/, hdfs:// ... (two letters or more, so a
# Windows drive `C:\` stays a path)
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_uri(location: str) -> bool:
    return bool(_URI_SCHEME.match(location))


def artifact_location(configured: str | Path | None = None) -> str:
    """Where a new experiment keeps its artifacts: a URI (s3://bucket/x, file:///..., mlflow-artifacts:/...)
    goes to MLflow untouched; a local path (relative to the working folder) is made absolute and created."""
    if configured is not None and not isinstance(configured, (str, Path)):
        raise LabError(f"artifact location {configured!r} is a {type(configured).__name__}, not a path or URI; "
                       "give logger.artifact_location=s3://bucket/prefix or a folder")
    if isinstance(configured, str):
        configured = configured.strip()
        if is_uri(configured):
            return configured
    folder = Path(configured).expanduser() if configured else MLFLOW_DIR / "artifacts"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LabError(f"artifact location {str(folder)!r}: cannot create the folder ({err.strerror}); "
                       "give logger.artifact_location=<a writable folder or a URI such as s3://bucket/x>") from err
    return folder.resolve().as_uri()


def get_or_create_experiment(name: str, uri: str | None = None, artifacts: str | Path | None = None) -> str:
    """Experiment id for `name`; a new one gets `artifacts` as its artifact location. A tracking server
    (http[s]://) gets only a URI from us: a local path of this machine means nothing to it, so by default
    the server's own --artifacts-destination / --default-artifact-root decides."""
    uri = tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    if _is_remote(uri):
        location = artifacts.strip() if isinstance(artifacts, str) and is_uri(artifacts.strip()) else None
    else:
        location = artifact_location(artifacts)
    return client.create_experiment(name, artifact_location=location)


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def git_info(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Commit sha and whether the tree had uncommitted changes (a dirty run is not reproducible)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD") or "unknown"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}
    return {"git_sha": sha, "git_dirty": str(dirty).lower()}


def flatten(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """('optim.lr', 3e-4) pairs of a nested config; lists are kept whole as one value."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def params_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value)[:_PARAM_VALUE_LIMIT] for key, value in flatten(config)}


# Run params that say how a run was launched, shown, checkpointed or recorded, and where its data
# lives (the data's content is pinned by data_sha256), not what it trains. Two runs that differ only
# here trained the same model on the same data.
_LAUNCH_PREFIXES = ("ckpt_path", "reuse_finished", "study.", "run_name", "paths.", "logger.", "tags.", "callbacks.",
                    "hydra", "fast/",
                    "throughput/peak", "trainer.enable_progress_bar", "trainer.devices", "trainer.num_nodes",
                    "trainer.accelerator", "trainer.strategy", "trainer.log_every_n_steps", "train.num_workers",
                    "train.export_hf", "train.eval_every_steps", "data.prepared_dir", "data.web_path",
                    "data.books_dir")


def is_launch_setting(key: str) -> bool:
    """True for a run param that does not change what is trained (see _LAUNCH_PREFIXES)."""
    return key.startswith(_LAUNCH_PREFIXES) or (key.startswith("data.sources.") and key.endswith(".path"))


def describe_changes(recorded: Mapping[str, Any], now: Mapping[str, Any], keys: Sequence[str], limit: int = 8) -> str:
    """`key: old -> new; ...` for the changed `keys` (the first `limit`), as refusals of changed settings say it."""
    shown = "; ".join(f"{key}: {recorded.get(key)} -> {now.get(key)}" for key in keys[:limit])
    return shown + ("; ..." if len(keys) > limit else "")
