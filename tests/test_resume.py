"""ckpt_path=auto and reuse_finished=true (lab/training/resume.py): what lab.study relies on to redo no finished work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lab.training.resume import finished_twin, resolve_ckpt_path
from lab.train import train
from tests.conftest import compose_config, tiny_train_overrides

RUN = "resume-me"


def job(prepared: Path, root: Path, folder: str, *extra: str) -> dict:
    overrides = tiny_train_overrides(prepared, f"paths.root_dir={root}", f"run_name={RUN}", "experiment_name=resume",
                                     "trainer.max_steps=4", "callbacks.checkpoint.every_n_steps=2",
                                     "train.export_hf=false", *extra)
    return train(compose_config("train", overrides, run_dir=root / "outputs" / RUN / folder))


def runs(root: Path) -> list:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return client.search_runs([client.get_experiment_by_name("resume").experiment_id])


@pytest.fixture
def root(tmp_path):
    return tmp_path / "root"


def test_auto_without_an_earlier_run_starts_fresh(prepared_sample, root):
    result = job(prepared_sample, root, "t0", "ckpt_path=auto")
    assert result["module"].global_step == 4 and len(runs(root)) == 1


def test_a_finished_run_with_the_same_settings_is_reused(prepared_sample, root):
    first = job(prepared_sample, root, "t0")
    again = job(prepared_sample, root, "t1", "reuse_finished=true", "ckpt_path=auto")
    assert again.get("reused") and again["run_id"] == first["run_id"]
    assert again["metrics"]["val/loss"] == pytest.approx(first["metrics"]["val/loss"])
    assert len(runs(root)) == 1 and not (root / "outputs" / RUN / "t1" / "checkpoints").exists()


@pytest.mark.parametrize("change", ["optim.lr=1e-3", "seed=7"])
def test_other_settings_are_trained_not_reused(prepared_sample, root, change):
    first = job(prepared_sample, root, "t0")
    other = job(prepared_sample, root, "t1", "reuse_finished=true", "ckpt_path=auto", change)
    assert not other.get("reused") and other["run_id"] != first["run_id"] and len(runs(root)) == 2


def test_other_data_is_not_reused(prepared_sample, root):
    first = job(prepared_sample, root, "t0")
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(first["run_id"])
    params = run.data.params
    uri = os.environ["MLFLOW_TRACKING_URI"]
    same = {"seed": params["seed"]}
    assert finished_twin("resume", RUN, same, run.data.tags["data_sha256"], uri) is not None
    assert finished_twin("resume", RUN, same, "0" * 64, uri) is None
    assert finished_twin("resume", RUN, {"seed": "99"}, run.data.tags["data_sha256"], uri) is None
    assert finished_twin("no-such-experiment", RUN, same, run.data.tags["data_sha256"], uri) is None


def test_an_unfinished_run_is_resumed_into_the_same_mlflow_run(prepared_sample, root):
    first = job(prepared_sample, root, "t0", "trainer.max_steps=2")
    # as if killed: the run never ended (kill -9 leaves it RUNNING), its checkpoints stay
    MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).update_run(first["run_id"], "RUNNING")
    # the run recorded trainer.max_steps=2: only a job with those settings continues it
    again = job(prepared_sample, root, "t1", "reuse_finished=true", "ckpt_path=auto", "trainer.max_steps=2")
    assert again["run_id"] == first["run_id"] and not again.get("reused")
    assert again["module"].global_step == 2  # restored at its end, nothing trained twice
    assert len(runs(root)) == 1 and runs(root)[0].info.status == "FINISHED"


def test_auto_skips_unfinished_runs_with_other_settings_and_unreadable_checkpoints(prepared_sample, root, caplog):
    first = job(prepared_sample, root, "t0", "trainer.max_steps=2")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    client.update_run(first["run_id"], "KILLED")
    uri = os.environ["MLFLOW_TRACKING_URI"]
    cfg = compose_config("train", [f"paths.root_dir={root}", f"run_name={RUN}", "ckpt_path=auto", "experiment_name=resume",
                                   *tiny_train_overrides(prepared_sample, "trainer.max_steps=2")])
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolve_ckpt_path(cfg, uri, resolved).endswith(".ckpt")
    resolved["optim"]["lr"] = 0.5
    assert resolve_ckpt_path(cfg, uri, resolved) is None  # other settings: start fresh, never refuse
    resolved["optim"]["lr"] = cfg.optim.lr
    for path in (root / "outputs").rglob("*.ckpt"):
        path.write_bytes(b"PK\x03\x04broken")
    with caplog.at_level("WARNING", logger="lab.training.resume"):
        assert resolve_ckpt_path(cfg, uri, resolved) is None
    assert "cannot be resumed from" in caplog.text
    (root / "outputs" / RUN / "t0" / "mlflow_run_id").write_text("no-such-run")
    assert resolve_ckpt_path(cfg, uri, resolved) is None  # a folder whose run is not in this store
