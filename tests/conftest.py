"""Shared fixtures: configs composed from the real conf/ and shrunk, and the embedded sample prepared once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from lab import CONF_DIR, PROJECT_ROOT

ARCHS = ["llama_gqa", "mistral_swa", "falcon_mqa", "mamba2", "llama_mha"]
SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"
# The test-sized data: the embedded sample, a 2k BPE, blocks of 64 tokens.
TINY_DATA = ["tokenizer=bpe2k", "data.seq_len=64"]


def compose_config(config_name: str, overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """Compose conf/<config_name>.yaml as Hydra would, with `${hydra:...}` resolvable."""
    GlobalHydra.instance().clear()
    run_dir_override = [f"hydra.run.dir={run_dir}"] if run_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose(config_name, overrides=[*overrides, *run_dir_override], return_hydra_config=True)
    if run_dir is not None:
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # as under @hydra.main: the task's config has no hydra node
    return cfg


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Each test writes MLflow runs into its own sqlite store, never the project's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory) -> Path:
    """The embedded sample run through lab.prepare once per session (tokenizer bpe2k, seq_len 64)."""
    from lab.prepare import run as prepare

    out = tmp_path_factory.mktemp("prepared")
    cfg = compose_config("prepare", [*TINY_DATA, f"data.prepared_dir={out}"], run_dir=out / "hydra")
    old_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        return Path(prepare(cfg))
    finally:
        if old_uri:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def tiny_train_overrides(prepared: Path, *extra: str) -> list[str]:
    return ["debug=fast", f"data.prepared_dir={prepared}", "trainer.enable_progress_bar=false",
            "callbacks.energy=false", *extra]
