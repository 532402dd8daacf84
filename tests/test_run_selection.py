"""lab.runs.selection: runs chosen by MLflow experiment and tags, and lab.quantize / lab.evaluate over them.

Most tests register lab.train-like runs (the tags lab.train writes, run folders from tests/test_quantize.py)
in the test's own MLflow store; the last one (slow) trains two real tiny runs and goes through both commands.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError
from lab.config.compose import settings_for
from lab.evaluation.suite import evaluate_command
from lab.quantization.quantizer import quantize_command
from lab.runs.selection import RunQuery, model_config, parse_runs, select_runs, selection_from_config
from lab.runs.tracking import get_or_create_experiment, tracking_uri
from tests.conftest import compose_config, tiny_train_overrides
from tests.test_quantize import make_runs
from lab.evaluation.settings import EvaluateSettings
from lab.quantization.settings import QuantizeSettings

EXPERIMENT = "bakeoff_sel"
ARCHS = ("llama_gqa", "falcon_mqa")   # the two quickest to quantize and evaluate


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory) -> dict[str, Path]:
    """{arch: lab.train-like run folder} (hf/ export, checkpoint, config.yaml), one shared tokenizer and data."""
    return make_runs(tmp_path_factory.mktemp("selruns"), ARCHS)


def register(run_dir: Path | None, run_name: str, experiment: str = EXPERIMENT, status: str = "FINISHED",
             start: int = 1_000, **tags: str) -> str:
    """A training run as lab.train records it (arch, seed, run_dir tags; FINISHED) in the test's store."""
    client = MlflowClient(tracking_uri())
    all_tags = {"arch": run_name.split("-")[0], "size": "tiny", "seed": "0", **tags}
    if run_dir is not None:
        all_tags["run_dir"] = str(run_dir)
    run = client.create_run(get_or_create_experiment(experiment), start_time=start, run_name=run_name, tags=all_tags)
    client.set_terminated(run.info.run_id, status)
    if run_dir is not None:
        (run_dir / "mlflow_run_id").write_text(run.info.run_id)
    return run.info.run_id


@pytest.fixture
def two_runs(run_folders, tmp_path) -> dict[str, Path]:
    """{run name: run folder}: copies of the two runs (tests may damage them), registered as finished runs."""
    runs = {}
    for index, (arch, folder) in enumerate(run_folders.items()):
        copy = Path(shutil.copytree(folder, tmp_path / "runs" / arch))
        name = f"{arch}-tiny-s1"
        register(copy, name, start=1_000 + index, bakeoff="v1")
        runs[name] = copy
    return runs


def quantize_cfg(tmp_path: Path, **values):
    return settings_for(QuantizeSettings, **{"runs": f"experiment:{EXPERIMENT}", "variants": ["int8wo"], "device": "cpu",
                                       **values})


def evaluate_cfg(tmp_path: Path, **values):
    """Quality only (the held-out blocks of the run's data), no timings: the selection is what is tested."""
    return settings_for(EvaluateSettings, **{"runs": f"experiment:{EXPERIMENT}", "device": "cpu", "max_blocks": 2,
                                       "batch_size": 4, "texts": [], "tasks": [], "output_dir": str(tmp_path / "eval"),
                                       "efficiency": {"enabled": False}, **values})


# -- the runs= setting ------------------------------------------------------------------------------------------------


def test_parse_runs_accepts_the_documented_forms():
    assert all(parse_runs(empty, None, True) is None for empty in (None, "", "  "))
    query = parse_runs("experiment:arch_bakeoff_tiny", None, True)
    assert query == RunQuery("arch_bakeoff_tiny", {}, True)
    assert query.train_command() == "python -m lab.train -m experiment=arch_bakeoff_tiny"
    query = parse_runs(" experiment: demo ", {"bakeoff": "tiny-v1", "seed": 1}, False)
    assert (query.experiment, dict(query.tags), query.latest) == ("demo", {"bakeoff": "tiny-v1", "seed": "1"}, False)


@pytest.mark.parametrize("runs, tags, latest, message", [
    ("foo", None, True, r"runs='foo' is not a run selection; give runs=experiment:<name>"),
    ("experiment:", None, True, r"runs='experiment:' is not a run selection"),
    ("experiment:   ", None, True, r"is not a run selection"),
    ("run:abc", None, True, r"runs='run:abc' is not a run selection"),
    (5, None, True, r"runs=5 is a int, not a selection"),
    (["experiment:a"], None, True, r"is a list, not a selection"),
    ("experiment:it's", None, True, r"quote cannot be looked up"),
    ("experiment:a", ["bakeoff"], True, r"run_tags=\['bakeoff'\] is a list, not a mapping"),
    ("experiment:a", "bakeoff=v1", True, r"is a str, not a mapping"),
    ("experiment:a", {"bakeoff": {"x": 1}}, True, r"run_tags.bakeoff=.* one plain value"),
    ("experiment:a", {"bakeoff": None}, True, r"run_tags.bakeoff=None"),
    ("experiment:a", {"note": "it's"}, True, r"quotes cannot be matched"),
    ("experiment:a", None, "yes", r"run_latest='yes' must be true .* or false"),
    (None, {"bakeoff": "v1"}, True, r"run_tags=.* without runs="),
])
def test_malformed_run_settings_are_one_clear_line(runs, tags, latest, message):
    with pytest.raises(LabError, match=message):
        parse_runs(runs, tags, latest)


def test_model_path_and_runs_exclude_each_other(tmp_path):
    with pytest.raises(LabError, match=r"give model_path= or runs=, not both"):
        selection_from_config(settings_for(QuantizeSettings, model_path=str(tmp_path), runs="experiment:x"))
    with pytest.raises(LabError, match=r"model_path is required.*or select trained runs with runs=experiment:<name>"):
        selection_from_config(settings_for(EvaluateSettings))  # model_path: ??? in the YAML, and no runs
    assert selection_from_config(settings_for(QuantizeSettings, model_path=str(tmp_path))) is None


def test_hydra_overrides_compose_into_the_selection():
    # the documented command-line spellings, through Hydra's own override grammar
    for command in ("quantize", "evaluate"):
        cfg = compose_config(command, ["runs=experiment:arch_bakeoff_tiny", "run_tags={bakeoff:tiny-v1}",
                                       "run_latest=false"])
        query = parse_runs(cfg.runs, cfg.run_tags, cfg.run_latest)
        assert query == RunQuery("arch_bakeoff_tiny", {"bakeoff": "tiny-v1"}, False)
        cfg = compose_config(command, ["runs=experiment:demo", "+run_tags.seed=2"])
        assert parse_runs(cfg.runs, cfg.run_tags, cfg.run_latest) == RunQuery("demo", {"seed": "2"}, True)


# -- selecting runs in MLflow -----------------------------------------------------------------------------------------


def test_finished_training_runs_are_selected_newest_per_run_name(run_folders, tmp_path):
    llama, falcon = run_folders["llama_gqa"], run_folders["falcon_mqa"]
    old = register(llama, "llama_gqa-tiny-s1", start=1_000, bakeoff="v1")
    new = register(llama, "llama_gqa-tiny-s1", start=2_000, bakeoff="v1")
    other = register(falcon, "falcon_mqa-tiny-s1", start=1_500, bakeoff="v2")
    register(falcon, "falcon_mqa-tiny-s2", status="FAILED", start=3_000, bakeoff="v1")
    register(falcon, "falcon_mqa-tiny-s3", status="RUNNING", start=3_100, bakeoff="v1")
    register(falcon, "eval-int8wo", start=4_000, kind="eval", eval_of=other)
    register(None, "falcon_mqa-tiny-s4", experiment="elsewhere", start=5_000)

    selection = select_runs(RunQuery(EXPERIMENT, {}, True))
    assert [(r.label, r.run_id) for r in selection.models] == [("falcon_mqa-tiny-s1", other), ("llama_gqa-tiny-s1", new)]
    assert selection.failed == [] and selection.tracking_uri == tracking_uri()
    assert selection.models[1].model_path == llama / "hf" and selection.models[1].run_dir == llama
    # tags narrow the selection; run_latest=false keeps every finished run, labels made unique by the run id
    assert [r.run_id for r in select_runs(RunQuery(EXPERIMENT, {"bakeoff": "v2"}, True)).models] == [other]
    every = select_runs(RunQuery(EXPERIMENT, {"bakeoff": "v1"}, latest=False)).models
    assert sorted(r.run_id for r in every) == sorted([old, new])
    assert sorted(r.label for r in every) == sorted([f"llama_gqa-tiny-s1-{old[:8]}", f"llama_gqa-tiny-s1-{new[:8]}"])


def test_unknown_or_empty_experiment_names_the_training_command():
    register(None, "llama_gqa-tiny-s1", experiment="other")
    with pytest.raises(LabError, match=r"no MLflow experiment of that name .*there: .*other.*"
                                       r"python -m lab.train -m experiment=nope"):
        select_runs(RunQuery("nope", {}, True))
    get_or_create_experiment("empty_one")
    with pytest.raises(LabError, match=r"experiment 'empty_one' has no finished training runs .*"
                                       r"train them with: python -m lab.train -m experiment=empty_one"):
        select_runs(RunQuery("empty_one", {}, True))
    register(None, "mamba2-tiny-s1", experiment="empty_one", status="FAILED")
    with pytest.raises(LabError, match=r"has no finished training runs .*status FAILED"):
        select_runs(RunQuery("empty_one", {}, True))
    with pytest.raises(LabError, match=r"with tags bakeoff=v9 has no finished.*\(with the same tags\)"):
        select_runs(RunQuery("other", {"bakeoff": "v9"}, True))


@pytest.mark.parametrize("damage, problem", [
    (lambda run: shutil.rmtree(run / "hf"), r"no HF export at .*/hf"),
    (lambda run: (run / "hf" / "config.json").write_text('{"model_type": "lla'), r"damaged HF export: .*config.json"),
    (lambda run: (run / "hf" / "config.json").write_text('{"model_type": "gpt2"}'), r"damaged HF export: .*gpt2"),
    (lambda run: (run / "hf" / "model.safetensors").unlink(), r"damaged HF export: .*no weight file"),
])
def test_a_damaged_export_is_skipped_with_one_warning_and_listed(two_runs, damage, problem, caplog):
    damage(two_runs["falcon_mqa-tiny-s1"])
    with caplog.at_level(logging.WARNING, logger="lab.runs.selection"):
        selection = select_runs(RunQuery(EXPERIMENT, {}, True))
    assert [r.label for r in selection.models] == ["llama_gqa-tiny-s1"]
    assert [r.label for r in selection.failed] == ["falcon_mqa-tiny-s1"]
    assert selection.failed[0].model_path is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falcon_mqa-tiny-s1" in warnings[0]
    assert re.search(problem, selection.failed[0].problem), selection.failed[0].problem


def test_a_run_without_run_dir_tag_is_listed_as_failed():
    register(None, "llama_gqa-tiny-s1")
    selection = select_runs(RunQuery(EXPERIMENT, {}, True))
    assert selection.models == [] and "no run_dir tag" in selection.failed[0].problem


def test_model_config_gives_each_run_its_own_output_folders(two_runs, tmp_path):
    run = select_runs(RunQuery(EXPERIMENT, {}, True)).models[0]
    settings = settings_for(EvaluateSettings, runs="experiment:x", run_tags={"a": "b"}, output_dir=str(tmp_path / "o"))
    own = model_config(settings, run, ("output_dir", "quantized_dir"))
    assert own.model_path == str(run.model_path) and own.runs is None and own.run_tags is None
    assert own.output_dir == str(tmp_path / "o" / run.label) and own.quantized_dir is None
    assert own.efficiency == settings.efficiency  # everything else as it was


# -- the commands over a selection ------------------------------------------------------------------------------------


def test_quantize_runs_quantizes_every_selected_run(two_runs, tmp_path):
    results = quantize_command(quantize_cfg(tmp_path))
    assert sorted(results) == sorted(two_runs)
    for name, run_dir in two_runs.items():
        index = json.loads((run_dir / "quantized" / "hf" / "quantize.json").read_text())
        assert index == results[name] and set(index["variants"]) == {"fp32", "int8wo"}
        assert index["run_dir"] == str(run_dir) and index["train_run_id"] == (run_dir / "mlflow_run_id").read_text()
    # an explicit output_dir: one subfolder per run
    results = quantize_command(quantize_cfg(tmp_path, output_dir=str(tmp_path / "q")))
    assert {p.name for p in (tmp_path / "q").iterdir()} == set(two_runs)
    assert all((tmp_path / "q" / name / "int8wo" / "model.safetensors").is_file() for name in two_runs)


def test_quantize_runs_goes_on_past_a_broken_run_and_fails_at_the_end(two_runs, tmp_path):
    # weights cut in half: the folder looks fine, loading fails (inside the loop, not at selection)
    weights = two_runs["falcon_mqa-tiny-s1"] / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(two_runs["llama_gqa-tiny-s1"], tmp_path / "runs" / "third")
    shutil.rmtree(tmp_path / "runs" / "third" / "hf")
    register(tmp_path / "runs" / "third", "mistral_swa-tiny-s1", start=5_000)
    with pytest.raises(LabError) as caught:
        quantize_command(quantize_cfg(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"lab.quantize: 2 of 3 runs of experiment '{EXPERIMENT}' failed, 1 done; failed: ")
    assert "falcon_mqa-tiny-s1 (cannot load" in message and "mistral_swa-tiny-s1 (no HF export at" in message
    assert (two_runs["llama_gqa-tiny-s1"] / "quantized" / "hf" / "int8wo" / "model.safetensors").is_file()


def test_evaluate_runs_evaluates_every_selected_run(two_runs, tmp_path):
    results = evaluate_command(evaluate_cfg(tmp_path))
    assert sorted(results) == sorted(two_runs)
    client = MlflowClient(tracking_uri())
    for name, run_dir in two_runs.items():
        saved = json.loads((tmp_path / "eval" / name / "eval.json").read_text())
        assert saved["model_path"] == str(run_dir / "hf") and list(saved["variants"]) == ["fp32"]
        report = results[name][0]
        assert report.metrics["val/web/ppl"] == pytest.approx(saved["variants"]["fp32"]["metrics"]["val/web/ppl"])
        # each evaluation is linked to its own training run
        assert client.get_run(report.run_id).data.tags["eval_of"] == (run_dir / "mlflow_run_id").read_text()
    # the tag filter and the failure summary go through evaluate too
    (two_runs["llama_gqa-tiny-s1"] / "hf" / "config.json").write_text("{")
    with pytest.raises(LabError, match=r"lab.evaluate: 1 of 2 runs .* failed, 1 done; failed: llama_gqa-tiny-s1 "
                                       r"\(damaged HF export"):
        evaluate_command(evaluate_cfg(tmp_path, run_tags={"bakeoff": "v1"}, output_dir=str(tmp_path / "eval2")))
    assert (tmp_path / "eval2" / "falcon_mqa-tiny-s1" / "eval.json").is_file()


def run_cli(command: str, *overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    return subprocess.run([sys.executable, "-m", command, *overrides, f"hydra.run.dir={tmp_path / 'hydra'}"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=180, env=env)


def test_cli_exits_non_zero_with_one_line_when_a_run_fails(two_runs, tmp_path):
    shutil.rmtree(two_runs["falcon_mqa-tiny-s1"] / "hf")
    result = run_cli("lab.quantize", f"runs=experiment:{EXPERIMENT}", "run_tags={bakeoff:v1}", "variants=[int8wo]",
                     "device=cpu", tmp_path=tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of 2 runs" in errors[0] and "falcon_mqa-tiny-s1 (no HF export" in errors[0]
    assert "Traceback" not in result.stderr
    assert (two_runs["llama_gqa-tiny-s1"] / "quantized" / "hf" / "quantize.json").is_file()


@pytest.mark.parametrize("command", ["lab.quantize", "lab.evaluate"])
def test_cli_refuses_bad_selections_in_one_line(tmp_path, command):
    for overrides, expected in [(["runs=foo"], "runs='foo' is not a run selection"),
                                ([f"model_path={tmp_path}", "runs=experiment:x"], "not both")]:
        result = run_cli(command, *overrides, tmp_path=tmp_path)
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr
        assert "Traceback" not in result.stderr


# -- end to end with lab.train ----------------------------------------------------------------------------------------


@pytest.mark.slow  # two lab.train runs: 13 s on an idle 2-core machine, a minute on a busy one
def test_trained_runs_are_quantized_and_evaluated_by_experiment(prepared_sample, tmp_path):
    from lab.train import train

    for seed in (1, 2):
        cfg = compose_config("train", tiny_train_overrides(
            prepared_sample, "arch=llama_gqa", f"seed={seed}", "trainer.max_steps=2", "train.val_max_blocks=2",
            "experiment_name=selected_e2e", "+tags.bakeoff=e2e"), run_dir=tmp_path / f"train{seed}")
        train(cfg)
    indexes = quantize_command(quantize_cfg(tmp_path, runs="experiment:selected_e2e", run_tags={"bakeoff": "e2e"}))
    assert sorted(indexes) == ["llama_gqa-tiny-s1", "llama_gqa-tiny-s2"]
    assert {index["run_dir"] for index in indexes.values()} == {str(tmp_path / "train1"), str(tmp_path / "train2")}
    reports = evaluate_command(evaluate_cfg(tmp_path, runs="experiment:selected_e2e"))
    assert {name: [r.name for r in rs] for name, rs in reports.items()} == {
        "llama_gqa-tiny-s1": ["fp32", "int8wo"], "llama_gqa-tiny-s2": ["fp32", "int8wo"]}
    for rs in reports.values():
        assert all(r.metrics["val/web/ppl"] > 1 for r in rs)
