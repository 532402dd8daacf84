"""MLflow plumbing shared by every job: where the store is, and what makes a run reproducible.

The embedded default is a sqlite store plus an artifact folder inside the project (MLflow's plain
file store is refused by current MLflow, so Lightning's `./mlruns` default cannot be used).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import mlflow
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT

MLFLOW_DIR = PROJECT_ROOT / "mlflow"
# MLflow caps one param value at 6000 characters.
_PARAM_VALUE_LIMIT = 6000


def tracking_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the configured URI, then the project's sqlite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        uri = f"sqlite:///{MLFLOW_DIR / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(configured: str | Path | None = None) -> str:
    folder = Path(configured) if configured else MLFLOW_DIR / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve().as_uri()


def get_or_create_experiment(name: str, uri: str | None = None, artifacts: str | Path | None = None) -> str:
    """Experiment id for `name`, created with the project's artifact folder when new."""
    client = MlflowClient(tracking_uri(uri))
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None if _is_remote(tracking_uri(uri)) else artifact_location(artifacts)
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
_LAUNCH_PREFIXES = ("ckpt_path", "run_name", "paths.", "logger.", "tags.", "callbacks.", "hydra", "fast/",
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
