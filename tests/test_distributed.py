"""Beyond one process: every trainer config builds, and real torchrun launches (gloo on CPU, 127.0.0.1 only)
train one MLflow run whose export loads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lab import CONF_DIR, PROJECT_ROOT
from lab.models.loading import load_model
from lab.train import train
from lab.training.trainer import instantiate_trainer
from tests.conftest import compose_config, tiny_train_overrides

TRAINERS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_config_builds(name):
    cfg = compose_config("train", ["experiment=demo", f"trainer={name}"])
    trainer_cfg = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                   if k not in ("max_steps", "precision")}
    if not torch.cuda.is_available():
        trainer_cfg["accelerator"] = "cpu"
    if cfg.trainer.strategy == "fsdp" and not torch.cuda.is_available():
        # the config and the wrap policy build; Lightning itself then asks for a GPU
        with pytest.raises(ValueError, match="requires a GPU accelerator"):
            instantiate_trainer(cfg, trainer_cfg, precision="32-true", logger=False)
        return
    trainer = instantiate_trainer(cfg, trainer_cfg, precision="32-true", logger=False)
    assert trainer.world_size >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_trains_and_exports_on_a_gpu(prepared_sample, tmp_path):
    cmd = [sys.executable, "-m", "lab.train", *tiny_train_overrides(prepared_sample), "trainer=fsdp",
           "trainer.devices=1", "trainer.accelerator=gpu", "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    model, _ = load_model(tmp_path / "run" / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# torchrun --no-python runs this shell line for each worker: rank 1 starts LAB_DELAY_RANK_1 seconds after rank 0
DELAYED_RANK_1 = 'if [ "$RANK" = 1 ]; then sleep "$LAB_DELAY_RANK_1"; fi; exec "$0" "$@"'


def torchrun(prepared: Path, run_dir: Path | None, store: str, nnodes: int, node_rank: int, nproc: int, port: int,
             *extra: str, delay_rank_1_s: float = 0) -> subprocess.Popen:
    """A torchrun agent training the tiny model; run_dir None: the run folder Hydra names (conf/hydra/default.yaml)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(PROJECT_ROOT), "LAB_DELAY_RANK_1": str(delay_rank_1_s)}
    worker = ["--no-python", "sh", "-c", DELAYED_RANK_1, sys.executable] if delay_rank_1_s else []
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
           f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}", *worker, "-m", "lab.train",
           *tiny_train_overrides(prepared), "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={nproc}",
           f"trainer.num_nodes={nnodes}", "trainer.precision=32-true", "train.val_max_blocks=4",
           "run_name=torchrun", *([f"hydra.run.dir={run_dir}"] if run_dir else []), *extra]
    return subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        assert proc.returncode == 0, out[-4000:]


def one_finished_run(store: str) -> dict[str, float]:
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in runs]
    assert "val/loss" in runs[0].data.metrics
    return runs[0].data.metrics


def test_torchrun_two_processes_train_one_mlflow_run(prepared_sample, tmp_path):
    """2 ranks x 4 sequences against 1 process x 8: the same global batches (rank r reads positions r, r+2, ...),
    so the all-reduced validation loss after the same steps agrees up to float summation order."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    finish([torchrun(prepared_sample, tmp_path / "run", store, 1, 0, 2, free_port(), "train.batch_size=4")])
    metrics = one_finished_run(store)
    model, _ = load_model(tmp_path / "run" / "hf")
    assert sum(p.numel() for p in model.parameters()) > 0
    cfg = compose_config("train", tiny_train_overrides(prepared_sample, "train.batch_size=8", "train.val_max_blocks=4",
                                                       "train.export_hf=false"), run_dir=tmp_path / "single")
    single = train(cfg)["metrics"]
    assert metrics["val/loss"] == pytest.approx(single["val/loss"], rel=2e-3)


@pytest.mark.slow  # two torchrun agents, static rendezvous on 127.0.0.1 (~1 min on 2 cores)
def test_two_torchrun_nodes_started_seconds_apart_share_one_run_folder(prepared_sample, tmp_path):
    """Without hydra.run.dir each rank names the folder from the time: node 1's agent starts 2 s after node 0's and
    its rank 3 s after rank 0, in another second, yet both ranks write into rank 0's folder and the export is there."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = free_port()
    nodes = []
    for rank in range(2):
        nodes.append(torchrun(prepared_sample, None, store, 2, rank, 1, port, f"paths.root_dir={tmp_path}",
                              delay_rank_1_s=3))
        time.sleep(2)
    finish(nodes)
    one_finished_run(store)
    folders = sorted(p.name for p in (tmp_path / "outputs" / "torchrun").iterdir())
    assert len(folders) == 1, folders
    run_dir = tmp_path / "outputs" / "torchrun" / folders[0]
    load_model(run_dir / "hf")
    assert (run_dir / "mlflow_run_id").is_file()


@pytest.mark.slow  # two torchrun launches (~1 min on 2 cores)
def test_torchrun_killed_mid_run_resumes_from_last(prepared_sample, tmp_path):
    """A rank dies like kill -9 at step 3 (the whole torchrun job fails), then ckpt_path=last finishes the run,
    continuing the same MLflow run."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"paths.root_dir={tmp_path}", "callbacks.checkpoint.every_n_steps=2"]
    os.environ["LAB_FAULT_KILL_AT_STEP"] = "3"
    try:
        killed = torchrun(prepared_sample, tmp_path / "outputs" / "torchrun" / "first", store, 1, 0, 2, free_port(),
                          *common)
        out, _ = killed.communicate(timeout=300)
    finally:
        del os.environ["LAB_FAULT_KILL_AT_STEP"]
    assert killed.returncode != 0, out[-2000:]
    finish([torchrun(prepared_sample, tmp_path / "outputs" / "torchrun" / "second", store, 1, 0, 2, free_port(),
                     *common, "ckpt_path=last")])
    one_finished_run(store)
    load_model(tmp_path / "outputs" / "torchrun" / "second" / "hf")
