"""Trust under real faults (issue #25): signals, servers and neighbours, each crafted here and driven through the
commands as a user runs them (`python -m lab.<cmd>` in a subprocess), each ending as README's "What the lab
guarantees" promises: one `error:` line and exit status 1 (no traceback on the console), nothing lost, no MLflow
run left RUNNING after its process is gone, and an exact resume where there is something to resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT
from tests.conftest import tiny_train_overrides

RUN = "faulty"
# 12 web + 8 books steps (as tests/test_train.py's kill -9 test), a step checkpoint every 3
COMMON = ["trainer.max_steps=-1", "train.export_hf=false", "train.eval_every_steps=4", "train.val_max_blocks=2",
          "callbacks.checkpoint.every_n_steps=3", f"run_name={RUN}", "experiment_name=faults",
          "curriculum.stages=[{name:web,sources:[web],tokens:3072},{name:books,sources:[books],tokens:2048}]"]


def lab_train(prepared: Path, root: Path, folder: str, *extra: str, uri: str | None = None, fault: str | None = None,
              env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m lab.train` of the tiny 20-step run into <root>/outputs/faulty/<folder>; fault: `<step>:<SIGNAL>`,
    a real signal the process sends itself after that step (LAB_FAULT_KILL_AT_STEP)."""
    full_env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("LAB_DEBUG", None), full_env.pop("HYDRA_FULL_ERROR", None)
    if uri:
        full_env["MLFLOW_TRACKING_URI"] = uri
    if fault:
        full_env["LAB_FAULT_KILL_AT_STEP"] = fault
    return subprocess.run([sys.executable, "-m", "lab.train", *tiny_train_overrides(prepared), *COMMON,
                           f"paths.root_dir={root}", f"hydra.run.dir={root / 'outputs' / RUN / folder}", *extra],
                          env=full_env, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)


def one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The command failed the lab's way: status 1, exactly one `error:` line on stderr, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def steps(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def mlflow_runs(uri: str) -> list:
    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture(scope="module")
def straight(prepared_sample, tmp_path_factory) -> dict[int, float]:
    """The per-step losses of the uninterrupted run."""
    root = tmp_path_factory.mktemp("straight")
    proc = lab_train(prepared_sample, root, "t0", uri=f"sqlite:///{root / 'mlflow.db'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = steps(root / "outputs" / RUN / "t0")
    assert sorted(losses) == list(range(1, 21))
    return losses


# -- preemption: SIGTERM (schedulers), SIGUSR1 (Lightning's requeue signal), Ctrl-C -------------------------------


def assert_preempted_at_7(proc: subprocess.CompletedProcess, run_dir: Path, uri: str) -> str:
    one_error_line(proc, "stopped by SIGTERM/SIGUSR1 (preemption) after step 7", str(run_dir / "checkpoints"),
                   "ckpt_path=last")
    # the checkpoint was written at the signal, between steps 7 and 8 (the step checkpoints are at 3 and 6)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 7
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    return run_id


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_checkpoints_ends_killed_and_says_so(prepared_sample, tmp_path, sig):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    proc = lab_train(prepared_sample, tmp_path, "killed", fault=f"7:{sig}")
    assert_preempted_at_7(proc, tmp_path / "outputs" / RUN / "killed", uri)
    assert [r.info.status for r in mlflow_runs(uri)] == ["KILLED"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, resume", [("SIGTERM", "last"), ("SIGUSR1", "auto")])
def test_a_preempted_run_resumes_exactly_into_the_same_mlflow_run(prepared_sample, tmp_path, straight, sig, resume):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    killed_dir = tmp_path / "outputs" / RUN / "killed"
    run_id = assert_preempted_at_7(lab_train(prepared_sample, tmp_path, "killed", fault=f"7:{sig}"), killed_dir, uri)
    again = lab_train(prepared_sample, tmp_path, "resumed", f"ckpt_path={resume}")
    assert again.returncode == 0, again.stderr[-3000:]
    after = steps(tmp_path / "outputs" / RUN / "resumed")
    assert min(after) == 8  # nothing trained twice, nothing skipped
    assert {**{s: v for s, v in steps(killed_dir).items() if s <= 7}, **after} == straight  # bit for bit
    assert (tmp_path / "outputs" / RUN / "resumed" / "mlflow_run_id").read_text().strip() == run_id
    assert [(r.info.run_id, r.info.status) for r in mlflow_runs(uri)] == [(run_id, "FINISHED")]


def fake_slurm(tmp_path: Path, db: Path) -> dict[str, str]:
    """A one-task SLURM job as Lightning's SLURMEnvironment sees it, with an `scontrol` on PATH that records its
    arguments and the MLflow run's status at that moment (sqlite, read directly), then does what `scontrol requeue`
    does to a running job: SIGTERM to its tasks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    status = f"import sqlite3; print(*sqlite3.connect('{db}').execute('select status from runs').fetchone())"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n'
                        f'{sys.executable} -c "{status}" >> {tmp_path / "scontrol.log"}\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "lab-train",
            "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def test_sigusr1_under_slurm_is_lightnings_requeue_and_the_run_is_not_marked_finished(prepared_sample, tmp_path):
    """Under SLURM, SIGUSR1 is Lightning's auto-requeue: it "saves the loggers" with finalize("finished") (which
    once marked the MLflow run FINISHED half-way), writes hpc_ckpt_1.ckpt and runs `scontrol requeue <job>`;
    SLURM's SIGTERM then stops the job at the next step with last.ckpt, its run KILLED."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    run_dir = tmp_path / "outputs" / RUN / "slurm"
    db = Path(uri.removeprefix("sqlite:///"))
    proc = lab_train(prepared_sample, tmp_path, "slurm", fault="7:SIGUSR1", env=fake_slurm(tmp_path, db))
    # requeued while the run was still RUNNING: a FINISHED half-run would be skipped by ckpt_path=auto and taken
    # as a result by reuse_finished=true, had SLURM's SIGKILL come before the next step
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242", "RUNNING"]
    assert_preempted_at_7(proc, run_dir, uri)
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
