"""scripts/gpu_check.sh on a machine without CUDA: every step runs up to where CUDA is needed and says so in one line;
scripts/gpu_check_report.py turns steps and logs into the table, also from damaged or missing logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "scripts" / "gpu_check.sh"
REPORT = PROJECT_ROOT / "scripts" / "gpu_check_report.py"

sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
import gpu_check_report  # noqa: E402

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the script")


def run_check(tmp_path: Path, steps: str, setup: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_STEPS": steps, "GPU_CHECK_SETUP": "1" if setup else "0"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=tmp_path)
    return done, out


def table_rows(readme: str) -> dict[str, str]:
    rows = {}
    for line in readme.split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("step", "---"):
            rows[cells[0]] = cells[1]
    return rows


@needs_no_cuda
def test_env_and_bench_stop_where_cuda_is_needed_with_one_line(tmp_path):
    done, out = run_check(tmp_path, "env,bench")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = table_rows((out / "README.md").read_text())
    assert list(rows) == ["env", "bench"]
    assert rows["env"] == "needs CUDA: error: needs CUDA: PyTorch sees no CUDA device here"
    assert rows["bench"].startswith("needs CUDA: error: --device cuda, but PyTorch sees no CUDA device")
    bench_log = (out / "logs" / "bench.log").read_text()
    assert "Traceback" not in bench_log and bench_log.count("error:") == 1
    assert done.stdout.count("gpu_check: ") == 2  # one progress line per step on the console


@pytest.mark.slow
@needs_no_cuda
def test_every_step_runs_up_to_cuda_and_the_table_says_so(tmp_path):
    in_venv = Path(sys.executable).parent.parent == PROJECT_ROOT / ".venv"
    done, out = run_check(tmp_path, "setup,env,gpu_tests,bench,decode", setup=in_venv)
    assert done.returncode == 0, done.stderr[-2000:]
    readme = (out / "README.md").read_text()
    rows = table_rows(readme)
    assert list(rows) == ["setup", "env", "gpu_tests", "bench", "decode"]
    assert rows["setup"].startswith("ok")
    for step in ("env", "gpu_tests", "bench", "decode"):
        assert rows[step].startswith("needs CUDA: "), (step, rows[step])
    # decode got as far as training: the data was prepared and the trainer refused the GPU it cannot have
    assert (tmp_path / "work" / "prepared" / "manifest.json").is_file()
    assert "trainer.accelerator=gpu asks for a GPU" in rows["decode"]
    assert "test_fsdp_trains_and_exports_on_a_gpu | skipped" in readme


def write_steps(out: Path, steps: list[tuple[str, int, str]]) -> None:
    (out / "logs").mkdir(parents=True)
    (out / "steps.tsv").write_text("".join(f"{name}\t{code}\t7\n" for name, code, _ in steps))
    for name, _, log in steps:
        (out / "logs" / f"{name}.log").write_bytes(log.encode("utf-8", "surrogateescape"))


def test_report_reads_failures_timeouts_and_odd_logs(tmp_path):
    out = tmp_path / "out"
    write_steps(out, [
        ("setup", 0, "flavour cuda\nsetup-gpu skipped: needs CUDA (no device)\n"),
        ("env", 0, "torch 2.13.0\n"),
        ("bench", 1, "Traceback (most recent call last):\n  ...\nerror: llama_gqa: out of memory | at batch 64\n"),
        ("decode", 124, "partial output"),
        ("gpu_tests", 2, ""),
    ])
    (out / "logs" / "bench.log").write_bytes(b"\xff\xfe binary \x00\nerror: broken | pipe\n")
    assert subprocess.run([sys.executable, str(REPORT), str(out)], capture_output=True).returncode == 0
    rows = table_rows((out / "README.md").read_text())
    assert rows["setup"] == "ok (setup-gpu skipped: needs CUDA (no device))"
    assert rows["env"] == "ok"
    assert rows["bench"] == "failed: error: broken / pipe"  # a | in a message cannot break the table
    assert rows["decode"] == "timed out"
    assert rows["gpu_tests"] == "failed: (no output)"


def test_report_tolerates_damaged_or_missing_junit(tmp_path):
    junit = tmp_path / "gpu_tests.xml"
    assert gpu_check_report.test_outcomes(junit) == []
    junit.write_text("<testsuites><testsuite><testcase classname='tests.test_x' name='a'>")  # truncated mid-write
    assert gpu_check_report.test_outcomes(junit) == []
    junit.write_text("<testsuites><testsuite>"
                     "<testcase classname='tests.test_x' name='a'/>"
                     "<testcase classname='tests.test_x' name='b'><skipped message='needs a CUDA device'/></testcase>"
                     "<testcase classname='tests.test_y' name='c'><failure message='assert 1 == 2&#10;more'/></testcase>"
                     "</testsuite></testsuites>")
    assert gpu_check_report.test_outcomes(junit) == [
        ("test_x::a", "passed", ""), ("test_x::b", "skipped", "needs a CUDA device"),
        ("test_y::c", "failed", "assert 1 == 2")]
    tests = gpu_check_report.test_outcomes(junit)
    assert gpu_check_report.outcome("gpu_tests", 0, "", tests) == "ok: 1 passed, 1 skipped"
    skipped = [("t::a", "skipped", "needs a CUDA device"), ("t::b", "skipped", "needs a CUDA device")]
    assert gpu_check_report.outcome("gpu_tests", 0, "", skipped).startswith("needs CUDA: all 2 gpu tests skipped")


@pytest.mark.parametrize("args", [[], ["a", "b"], ["/nonexistent/gpu_check"]])
def test_report_without_its_folder_is_one_error_line(args):
    done = subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: give the gpu_check output folder (the one holding steps.tsv)"]


@pytest.mark.parametrize("steps", ["benhc", "env,decoder", "env;bench"])
def test_an_unknown_step_is_one_error_line_before_anything_runs(tmp_path, steps):
    done, out = run_check(tmp_path, steps)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: GPU_CHECK_STEPS names '") and "choose from setup,env,gpu_tests" in done.stderr
