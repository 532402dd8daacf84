"""lab.compare on MLflow runs made here, with the metric names of docs/CONTRACTS.md."""

from __future__ import annotations

import csv
import datetime as dt
import math
import time

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from lab import LabError
from lab.compare import compare, main

TOKENS_PER_STEP = 512
TODAY = dt.date(2026, 11, 22)


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("bakeoff_t", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp_id


def make_run(client, exp_id, arch, seed, final_loss, *, tags=None, status="FINISHED", lr=3e-3, skip=(),
             steps=20, tokens_per_s=1000.0):
    """A training run as lab.train logs it: val histories every 10 steps, tokens_seen every step."""
    tags = {"arch": arch, "seed": str(seed), "bakeoff": "t1", **(tags or {})}
    run = client.create_run(exp_id, run_name=f"{arch}-tiny-s{seed}", tags=tags)
    run_id, now = run.info.run_id, int(time.time() * 1000)
    metrics = []
    for step in range(1, steps + 1):
        if step % 3 == 0:  # logged every few steps, so the last value lags the final step
            metrics.append(Metric("tokens_seen", step * TOKENS_PER_STEP, now, step))
        metrics.append(Metric("throughput/tokens_per_s", tokens_per_s * (2 if step == 1 else 1), now, step))
        metrics.append(Metric("throughput/mfu", 0.25, now, step))
    for step in (10, 20):
        loss = final_loss + (0.5 if step == 10 else 0.0)
        metrics += [Metric("val/loss", loss, now, step),
                    Metric("val/web/loss", loss + 0.1, now, step), Metric("val/web/bpb", loss / 4, now, step),
                    Metric("val/web/ppl", math.exp(loss + 0.1), now, step),
                    Metric("val/books/loss", loss - 0.1, now, step), Metric("val/books/bpb", loss / 5, now, step)]
    metrics += [Metric("memory/peak_gb", 1.5, now, steps), Metric("energy/kwh", 0.002, now, steps)]
    metrics = [m for m in metrics if m.key not in skip]
    params = [Param("optim.lr", str(lr)), Param("objective", "val/loss"), Param("seed", str(seed)),
              Param("model/params_total", "1000000"), Param("model/params_non_embedding", "800000"),
              Param("model/flops_per_token", "None" if arch == "mamba2" else "6000000.0"),
              Param("train/tokens_per_step", str(TOKENS_PER_STEP)),
              Param("train/total_tokens", str(steps * TOKENS_PER_STEP))]
    client.log_batch(run_id, metrics=metrics, params=params)
    if status == "FINISHED":
        client.set_terminated(run_id, "FINISHED", end_time=run.info.start_time + 90_000)
    return run_id


@pytest.fixture
def bakeoff(store):
    uri, client, exp_id = store
    ids = {
        ("llama_gqa", 1): make_run(client, exp_id, "llama_gqa", 1, 3.0),
        ("llama_gqa", 2): make_run(client, exp_id, "llama_gqa", 2, 3.2, tokens_per_s=1200.0),
        ("mamba2", 1): make_run(client, exp_id, "mamba2", 1, 2.5, skip=("memory/peak_gb",)),
        ("mamba2", 2): make_run(client, exp_id, "mamba2", 2, 2.7, skip=("memory/peak_gb", "val/books/bpb")),
    }
    make_run(client, exp_id, "falcon_mqa", 1, 9.9, status="RUNNING")         # unfinished: skipped
    make_run(client, exp_id, "llama_mha", 1, 1.0, tags={"bakeoff": "other"})  # another round: filtered out
    # quantized variants of one llama run, logged by another job in the same experiment
    # (lab.evaluate's names; it tags kind=eval, and copies no bake-off tag)
    evaluation = client.create_run(exp_id, run_name="eval", tags={"eval_of": ids[("llama_gqa", 1)], "kind": "eval",
                                                                  "arch": "llama_gqa"})
    client.log_batch(evaluation.info.run_id, metrics=[
        Metric("quant/int8wo/val/web/ppl", 21.5, 0, 0), Metric("quant/int8wo/ttft_ms_128", 12.0, 0, 0),
        Metric("quant/int8wo/size_mb", 1.1, 0, 0), Metric("quant/int8wo/load_s", 0.3, 0, 0)])
    client.set_terminated(evaluation.info.run_id, "FINISHED")
    orphan = client.create_run(exp_id, run_name="eval-orphan", tags={"kind": "eval", "arch": "mamba2",
                                                                     "bakeoff": "t1"})
    client.set_terminated(orphan.info.run_id, "FINISHED")  # an evaluation with no training run: not a row
    return uri, client, exp_id, ids


def test_table_rows_by_arch(bakeoff, tmp_path):
    uri, client, exp_id, ids = bakeoff
    result = compare("bakeoff_t", {"bakeoff": "t1"}, uri=uri, out_dir=tmp_path / "out", today=TODAY)
    rows = {row.label: row for row in result.rows}
    assert [row.label for row in result.rows] == ["mamba2", "llama_gqa"]  # lowest val loss first
    llama, mamba = rows["llama_gqa"], rows["mamba2"]
    assert len(llama.runs) == 2 and len(mamba.runs) == 2
    assert llama.mixed == [] and mamba.mixed == []  # seeds only: a clean mean ± std
    assert llama.mean["val_loss"] == pytest.approx(3.1)
    assert llama.std["val_loss"] == pytest.approx(math.sqrt(0.02))  # sample std of 3.0, 3.2
    assert llama.mean["ppl"] == pytest.approx((math.exp(3.0) + math.exp(3.2)) / 2)
    assert llama.mean["tokens_seen"] == 20 * TOKENS_PER_STEP      # the budget, not the lagging last log (18)
    assert llama.mean["tokens_per_s"] == pytest.approx(1100.0)  # medians 1000 and 1200, not the warm-up step
    assert llama.mean["wall_time_s"] == pytest.approx(90.0)
    assert llama.mean["quant/int8wo/val/web/ppl"] == 21.5         # joined through eval_of
    assert mamba.mean["quant/int8wo/val/web/ppl"] is None
    assert mamba.mean["flops_per_token"] is None                  # logged as "None"
    assert mamba.mean["val/books/bpb"] == pytest.approx(2.5 / 5)  # the one run that has it

    labels = [c.label for c in result.columns]
    for label in ("params", "non-emb params", "tokens", "FLOPs/token", "val loss", "ppl", "web loss", "web bpb",
                  "books loss", "books bpb", "tokens/s", "MFU", "peak mem GB", "wall time", "kWh",
                  "int8wo web ppl", "int8wo TTFT ms (128 tok)", "int8wo size MB"):
        assert label in labels
    assert "int8wo/load_s" in labels and "load_s" not in result.markdown  # CSV only
    lines = result.markdown.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    mamba_cells = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
    llama_cells = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert llama_cells["val loss"] == "3.1000 ± 0.1414"
    assert llama_cells["params"] == "1M"                          # equal over seeds: no ± 0
    assert llama_cells["MFU"] == "25.00%"
    assert mamba_cells["peak mem GB"] == ""                       # missing metric: empty cell
    assert mamba_cells["int8wo web ppl"] == "" and llama_cells["int8wo web ppl"] == "21.50"
    assert mamba_cells["FLOPs/token"] == ""

    skipped = {run.info.run_name for run, _ in result.selection.skipped}
    assert skipped == {"falcon_mqa-tiny-s1", "eval-orphan"}
    with (result.out_dir / "table.csv").open() as handle:
        table = {r["arch"]: r for r in csv.DictReader(handle)}
    assert float(table["llama_gqa"]["val_loss"]) == pytest.approx(3.1)
    assert float(table["llama_gqa"]["val_loss_std"]) == pytest.approx(math.sqrt(0.02))
    assert table["mamba2"]["peak_memory_gb"] == ""
    assert float(table["llama_gqa"]["quant/int8wo/load_s"]) == 0.3
    assert set(table["llama_gqa"]["run_ids"].split()) == {ids[("llama_gqa", 1)], ids[("llama_gqa", 2)]}
    for name in ("table.md", "table.html", "val_loss_vs_tokens.png", "throughput.png", "README.md"):
        assert (result.out_dir / name).stat().st_size > 0
    assert not (result.out_dir / "lr_vs_objective.png").exists()  # one lr only: no lr plot
    readme = (result.out_dir / "README.md").read_text()
    assert ids[("llama_gqa", 1)] in readme and "bakeoff=t1" in readme and result.compare_run_id in readme
    assert "Lowest val/loss: **mamba2** (2.6000 ± 0.1414), 0.5000 below llama_gqa" in readme

    logged = client.get_run(result.compare_run_id)
    assert logged.data.tags["kind"] == "compare" and logged.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(result.compare_run_id)}
    assert {"table.md", "table.csv", "table.html", "throughput.png", "README.md"} <= artifacts
    # the compare run is not read back as a training run
    again = compare("bakeoff_t", {"bakeoff": "t1"}, uri=uri, out_dir=tmp_path / "again", log_to_mlflow=False)
    assert sum(len(r.runs) for r in again.rows) == 4


def test_rows_by_run_and_lr_plot(store, tmp_path):
    uri, client, exp_id = store
    for trial, (lr, loss) in enumerate([(1e-4, 3.5), (1e-3, 3.0), (1e-2, 4.0)]):
        tags = {"optuna_trial": str(trial), **({"optuna_pruned_at_step": "10"} if lr == 1e-2 else {})}
        make_run(client, exp_id, "llama_gqa", 1, loss, lr=lr, tags=tags)
    result = compare("bakeoff_t", by="run", uri=uri, out_dir=tmp_path / "sweep", log_to_mlflow=False, today=TODAY)
    assert [row.mean["lr"] for row in result.rows] == [1e-3, 1e-4, 1e-2]
    assert [row.mean["pruned_at_step"] for row in result.rows] == [None, None, 10.0]
    assert [row.mean["tokens_seen"] for row in result.rows] == [20 * TOKENS_PER_STEP] * 2 + [10 * TOKENS_PER_STEP]
    assert "pruned at step" in [c.label for c in result.columns]
    assert (result.out_dir / "lr_vs_objective.png").stat().st_size > 0


def test_latest_per_arch_keeps_the_newest(store, tmp_path):
    uri, client, exp_id = store
    make_run(client, exp_id, "llama_gqa", 1, 3.0)
    newest = make_run(client, exp_id, "llama_gqa", 1, 2.0)
    result = compare("bakeoff_t", latest=True, uri=uri, out_dir=tmp_path / "o", log_to_mlflow=False)
    assert [r.run_id for r in result.rows[0].runs] == [newest]
    assert len(result.selection.skipped) == 1


def test_default_folder_is_dated(bakeoff, tmp_path, monkeypatch):
    import lab.compare as compare_module

    monkeypatch.setattr(compare_module, "PROJECT_ROOT", tmp_path)
    uri = bakeoff[0]
    result = compare("bakeoff_t", {"bakeoff": "t1"}, uri=uri, log_to_mlflow=False, today=TODAY)
    assert result.out_dir == tmp_path / "experiments" / "2026-11-22_bakeoff_t_t1"


def test_bad_input_gives_clear_messages(store, tmp_path, capsys):
    uri, client, exp_id = store
    with pytest.raises(LabError, match="no MLflow experiment named 'nope'.*bakeoff_t"):
        compare("nope", uri=uri, out_dir=tmp_path)
    with pytest.raises(LabError, match="has no runs yet"):
        compare("bakeoff_t", uri=uri, out_dir=tmp_path)
    make_run(client, exp_id, "llama_gqa", 1, 3.0)
    with pytest.raises(LabError, match=r"none with tags \{'bakeoff': 'v9'\}.*'t1'"):
        compare("bakeoff_t", {"bakeoff": "v9"}, uri=uri, out_dir=tmp_path)
    make_run(client, exp_id, "mamba2", 1, 3.0, status="RUNNING", tags={"bakeoff": "t2"})
    with pytest.raises(LabError, match="no finished training runs.*status RUNNING"):
        compare("bakeoff_t", {"bakeoff": "t2"}, uri=uri, out_dir=tmp_path)

    assert main(["--experiment", "nope", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no MLflow experiment") and "Traceback" not in err
    assert main(["--experiment", "bakeoff_t", "--tag", "bakeoff", "--tracking-uri", uri]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_cli_prints_markdown(bakeoff, tmp_path, capsys):
    uri = bakeoff[0]
    code = main(["--experiment", "bakeoff_t", "--tag", "bakeoff=t1", "--tracking-uri", uri,
                 "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("| arch | runs | lr | params |")
    assert "| mamba2 | 2 |" in out and "logged to MLflow run" in out
    readme = (tmp_path / "cli" / "README.md").read_text()
    assert "python -m lab.compare --experiment bakeoff_t --tag bakeoff=t1" in readme


def test_quantized_columns_sort_numbers_as_numbers():
    from lab.runs.tables import natural_order

    keys = ["quant/int8wo/ttft_ms_2048", "quant/int8wo/ttft_ms_128", "quant/int8wo/ttft_ms_63",
            "quant/int8wo/ttft_ms_512"]
    assert [k.rsplit("_", 1)[1] for k in sorted(keys, key=natural_order)] == ["63", "128", "512", "2048"]


def test_rows_that_average_different_settings_say_so(store, tmp_path):
    uri, client, exp_id = store
    make_run(client, exp_id, "llama_gqa", 1, 3.0, lr=3e-3)
    make_run(client, exp_id, "llama_gqa", 2, 3.2, lr=1e-3)
    result = compare("bakeoff_t", {"bakeoff": "t1"}, uri=uri, out_dir=tmp_path / "out", today=TODAY)
    assert result.rows[0].mixed == ["optim.lr"]
    assert "differ in more than the seed: optim.lr" in (tmp_path / "out" / "README.md").read_text()
