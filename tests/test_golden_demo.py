"""The demo's losses are deterministic for the seed: compared with a golden copy per platform.

tests/golden/demo_losses.json holds them; its "comment" says how to record a platform that has no entry
(LAB_UPDATE_GOLDEN=1). The fast test trains the demo config for 12 steps of one arch; the slow one runs the
demo's own multirun command (all five archs, the full schedule) and reads the final val/loss from MLflow.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from lab import PROJECT_ROOT
from lab.train import train
from tests.conftest import ARCHS, compose_config

GOLDEN = Path(__file__).parent / "golden" / "demo_losses.json"
UPDATE = os.environ.get("LAB_UPDATE_GOLDEN") == "1"


def platform_key() -> str:
    return f"{sys.platform}-{platform.machine()}-torch{torch.__version__}"


def check_golden(name: str, measured):
    """Compare `measured` (a float or {arch: float}) with the golden entry, or record it under LAB_UPDATE_GOLDEN=1."""
    golden = json.loads(GOLDEN.read_text())
    entry = golden["platforms"].setdefault(platform_key(), {})
    if UPDATE:
        entry[name] = {k: round(v, 6) for k, v in sorted(measured.items())} if isinstance(measured, dict) \
            else round(measured, 6)
        GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")
        return
    if name not in entry:
        pytest.skip(f"no golden {name!r} for platform {platform_key()!r} in {GOLDEN.name}; record it with "
                    f"LAB_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_demo.py")
    assert measured == pytest.approx(entry[name], abs=golden["tolerance"], rel=0), \
        f"{name} on {platform_key()}: measured {measured}, golden {entry[name]} (tolerance {golden['tolerance']})"


def test_golden_file_is_well_formed():
    golden = json.loads(GOLDEN.read_text())
    assert 0 < golden["tolerance"] < 0.01 and "LAB_UPDATE_GOLDEN=1" in golden["comment"]
    for key, entry in golden["platforms"].items():
        assert set(entry["demo"]) == set(ARCHS), key
        assert all(4.0 < v < 8.0 for v in [*entry["demo"].values(), entry["demo_llama_gqa_12_steps"]]), key


def test_demo_config_first_steps_match_golden(prepared_sample, tmp_path):
    """The demo's config (lr, schedule, batch, seed) for llama_gqa, cut to 12 steps: seconds, not minutes.
    Sample generations and the HF export are off: they take most of the time and leave the losses as they are."""
    cfg = compose_config("train", ["experiment=demo", "arch=llama_gqa", f"data.prepared_dir={prepared_sample}",
                                   "trainer.enable_progress_bar=false", "callbacks.energy=false",
                                   "callbacks.generations.prompts=[]", "train.export_hf=false",
                                   "trainer.max_steps=12"], run_dir=tmp_path)
    result = train(cfg)
    assert result["module"].global_step == 12
    check_golden("demo_llama_gqa_12_steps", result["metrics"]["val/loss"])


@pytest.mark.slow  # the whole demo: five archs x 94 steps (2-4 min on 2 cores)
def test_demo_losses_match_golden(prepared_sample, tmp_path):
    # the Makefile's demo command; only the prepared data (the same `lab.prepare tokenizer=bpe2k data.seq_len=64`,
    # done once per session), the sweep folder and the MLflow store (conftest) are the test's own
    cmd = [sys.executable, "-m", "lab.train", "-m", "experiment=demo", f"arch={','.join(ARCHS)}",
           "trainer.enable_progress_bar=false", "callbacks.energy=false", f"data.prepared_dir={prepared_sample}",
           f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    assert sorted(r.data.tags["arch"] for r in runs) == sorted(ARCHS)
    assert all(r.info.status == "FINISHED" for r in runs)
    check_golden("demo", {r.data.tags["arch"]: r.data.metrics["val/loss"] for r in runs})
