"""Shared fixtures: configs composed from the real conf/ and shrunk, and the embedded sample prepared once."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lab import PROJECT_ROOT
from lab.config.compose import compose_config  # the tests' way to compose conf/

if TYPE_CHECKING:
    from lab.data.pipeline import Settings

ARCHS = ["llama_gqa", "mistral_swa", "falcon_mqa", "mamba2", "llama_mha"]
SAMPLE_DIR = PROJECT_ROOT / "data" / "sample"


def _tiny_data() -> list[str]:
    """The data half of conf/experiment/tiny_sample.yaml (the sample, a 2k BPE, blocks of 64 tokens) as
    lab.prepare overrides: lab.prepare cannot read that file (it has no size or trainer group)."""
    cfg = compose_config("train", ["experiment=tiny_sample"], keep_hydra=True)
    return [f"tokenizer={cfg.hydra.runtime.choices.tokenizer}", f"data.seq_len={cfg.data.seq_len}"]


# The test-sized data; training runs shrink with debug=fast, which extends the same base.
TINY_DATA = _tiny_data()


@functools.lru_cache(maxsize=None)
def shipped_prepare_settings() -> Settings:
    """conf/prepare.yaml as lab.prepare reads it. Tests build the data pipeline's parts (SourceSpec, Normalizer,
    MinHasher, ...) from it as the pipeline does, so they run at the shipped settings (the code has no defaults).
    Shared: copy before changing any of it."""
    from lab.data.pipeline import Settings

    return Settings.from_cfg(compose_config("prepare", []))


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Each test writes MLflow runs into its own sqlite store, never the project's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory) -> Path:
    """The embedded sample run through lab.prepare once per session (tokenizer bpe2k, seq_len 64)."""
    from lab.data.pipeline import prepare

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
