"""lab.study: the whole study in one resumable command (plan, reuse, failures listed, report from MLflow)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError
from lab.study.plan import make_plan, sweep_overrides
from lab.study.steps import lock_report_dir
from tests.conftest import ARCHS

PY = sys.executable


def study_args(prepared: Path, root: Path, *extra: str) -> list[str]:
    """A study of the tiny bake-off cut to seconds: a few steps, one int8 variant, no speed timings."""
    return ["experiment=arch_bakeoff_tiny", "debug=fast", "callbacks.energy=false", f"data.prepared_dir={prepared}",
            f"paths.root_dir={root}", f"study.report_dir={root / 'report'}", "study.variants=[int8wo]",
            "study.max_new_tokens=4", 'study.evaluate=["efficiency.enabled=false","tasks=[]"]', *extra]


def run_study(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "lab.study", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def training_runs(experiment: str = "arch_bakeoff_tiny") -> list:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [r for r in client.search_runs([found.experiment_id]) if r.data.tags.get("kind", "train") == "train"
            and "eval_of" not in r.data.tags and "arch" in r.data.tags]


# -- the plan, without running anything ------------------------------------------------------------------------------


def test_sweep_expands_like_hydras_basic_sweeper_and_the_command_line_wins():
    fixed, jobs = sweep_overrides({"arch": "a,b", "seed": "1,2"}, ["seed=7", "optim.lr=1e-3"])
    assert fixed == ["seed=7", "optim.lr=1e-3"]
    assert jobs == [["arch=a"], ["arch=b"]]
    assert sweep_overrides({"arch": "a,b"}, ["seed=1,2"])[1] == [["arch=a", "seed=1"], ["arch=a", "seed=2"],
                                                                  ["arch=b", "seed=1"], ["arch=b", "seed=2"]]
    assert sweep_overrides({}, ["x=1"]) == (["x=1"], [[]])


def test_dry_run_prints_the_plan_and_changes_nothing(prepared_sample, tmp_path):
    out = run_study(["--dry-run", *study_args(prepared_sample, tmp_path, "arch=llama_gqa,mamba2")])
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = re.findall(r"^  train +train +(\S+): no finished run", out.stdout, re.M)
    assert sorted(jobs) == sorted(f"{a}-tiny-s{s}" for a in ("llama_gqa", "mamba2") for s in (1, 2))
    assert "prepare   reuse" in out.stdout and "training command: python -m lab.train -m" in out.stdout
    assert not (tmp_path / "report").exists() and not training_runs()


@pytest.mark.parametrize("experiment, overrides, message", [
    ("no_such_study", [], "cannot compose experiment=no_such_study"),
    ("arch_bakeoff_tiny", ["optim.lr=fast"], "optim.lr"),
    ("arch_bakeoff_tiny", ["train.batch_size=0"], "train.batch_size"),
    ("arch_bakeoff_tiny", ["run_name=same"], "share a run_name"),
    ("arch_bakeoff_tiny", ["sweep=lr"], "grid sweeps"),
])
def test_bad_study_plans_are_one_line(experiment, overrides, message):
    with pytest.raises(LabError, match=message) as caught:
        make_plan(experiment, overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("args, message", [
    (["experiment=no_such_study"], "error: cannot compose experiment=no_such_study"),
    (["arch=llama_gqa"], "error: give exactly one experiment="),
])
def test_the_command_fails_with_one_line_and_status_1(args, message):
    out = run_study(["--dry-run", *args], timeout=120)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_two_studies_cannot_write_one_report_folder(tmp_path):
    with lock_report_dir(tmp_path / "report"):
        with pytest.raises(LabError, match="another lab.study .* is writing"):
            with lock_report_dir(tmp_path / "report"):
                pass
    with lock_report_dir(tmp_path / "report"):  # released: the next study goes ahead
        pass


# -- end to end ---------------------------------------------------------------------------------------------------------


def report_numbers(report: Path) -> dict[str, list[str]]:
    """The comparison table of REPORT.md: arch -> its cells."""
    text = report.read_text()
    table = text.split("## Comparison", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    return {"header": header, **{row[0].strip(): [c.strip() for c in row] for row in body}}


def test_a_study_runs_end_to_end_reuses_finished_work_and_lists_failures(prepared_sample, tmp_path):
    args = study_args(prepared_sample, tmp_path, "arch=llama_gqa", "seed=1")
    first = run_study(args)
    assert first.returncode == 0, first.stderr[-3000:]
    report = tmp_path / "report" / "REPORT.md"
    table = report_numbers(report)
    assert any(h.startswith("int8wo ") for h in table["header"]), table["header"]
    # the report's numbers are the MLflow records they came from
    (run,) = training_runs()
    val_loss = table["llama_gqa"][table["header"].index("val loss")]
    assert float(val_loss) == pytest.approx(run.data.metrics["val/loss"], abs=5e-5)
    assert (tmp_path / "report" / "REPORT.html").is_file() and (tmp_path / "report" / "table.csv").is_file()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    reports = client.search_runs([run.info.experiment_id], filter_string="tags.kind = 'report'")
    assert len(reports) == 1

    again = run_study(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"train +reuse +llama_gqa-tiny-s1", again.stdout)
    assert "| llama_gqa-tiny-s1 | " in report.read_text() and "| reused | reused |" in report.read_text()
    assert len(training_runs()) == 1
    evals = client.search_runs([run.info.experiment_id], filter_string="tags.eval_of LIKE '%'")
    assert len(evals) == 2  # fp32 and int8wo, once

    # an export that is gone or damaged: that run is listed as failed, the study exits non-zero with one line
    hf = Path(run.data.tags["run_dir"]) / "hf"
    (hf / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    shutil.rmtree(Path(run.data.tags["run_dir"]) / "quantized")
    broken = run_study(args)
    assert broken.returncode == 1
    assert "did not finish every step" in broken.stderr and "Traceback" not in broken.stderr
    assert "failed: " in report.read_text()


@pytest.mark.slow
def test_the_tiny_bakeoff_study_has_quantized_columns_for_all_five_archs(prepared_sample, tmp_path):
    # int4wo needs CUDA: on a CPU it is listed as skipped, not an error for the whole study
    out = run_study(study_args(prepared_sample, tmp_path, "seed=1", "study.variants=[int8wo,int4wo]"), timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    if not __import__("torch").cuda.is_available():
        assert "int4wo: " in (tmp_path / "report" / "REPORT.md").read_text()
    table = report_numbers(tmp_path / "report" / "REPORT.md")
    column = next(i for i, h in enumerate(table["header"]) if h.startswith("int8wo ") and h.endswith(" size MB"))
    assert sorted(k for k in table if k != "header") == sorted(ARCHS)
    assert all(table[arch][column] for arch in ARCHS)


def kill_when(args: list[str], ready, timeout: float = 900) -> None:
    """Start the study and kill its whole process group (SIGKILL, like a lost node) once `ready()` holds."""
    proc = subprocess.Popen([PY, "-m", "lab.study", *args], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.2)
        assert proc.poll() is None, "the study ended before the moment to kill it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.slow
def test_a_study_killed_in_training_and_in_evaluation_ends_like_an_uninterrupted_one(prepared_sample, tmp_path,
                                                                                       monkeypatch):
    two = ["arch=llama_gqa,falcon_mqa", "seed=1", "callbacks.checkpoint.every_n_steps=2"]
    straight = tmp_path / "straight"
    out = run_study(study_args(prepared_sample, straight, *two))
    assert out.returncode == 0, out.stderr[-3000:]
    expected = report_numbers(straight / "report" / "REPORT.md")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'killed.db'}")
    killed = tmp_path / "killed"
    args = study_args(prepared_sample, killed, *two)
    # once during training: the second job has written a checkpoint
    kill_when(args, lambda: any(killed.glob("multirun/*/1_*/checkpoints/*.ckpt")))
    # once during evaluation: the first run's evaluation has started
    kill_when(args, lambda: (killed / "report" / "eval").is_dir())
    out = run_study(args)
    assert out.returncode == 0, out.stderr[-3000:]
    finished = [r for r in training_runs() if r.info.status == "FINISHED"]
    assert len(finished) == 2 and all(r.info.status != "RUNNING" for r in training_runs())
    got = report_numbers(killed / "report" / "REPORT.md")
    quality = [i for i, h in enumerate(expected["header"]) if re.search(r"(loss|bpb|ppl|params|tokens)$", h)
               and "TTFT" not in h and "tokens/s" not in h]
    for arch in ("llama_gqa", "falcon_mqa"):
        assert [got[arch][i] for i in quality] == [expected[arch][i] for i in quality]
