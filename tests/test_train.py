"""The training loop end to end on the embedded sample, at tiny size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError
from lab.data.datamodule import CurriculumDataModule, RankSampler
from lab.training.module import param_groups
from lab.train import train
from tests.conftest import ARCHS, compose_config, tiny_train_overrides


def run_train(prepared: Path, run_dir: Path, *overrides: str) -> dict:
    cfg = compose_config("train", tiny_train_overrides(prepared, *overrides), run_dir=run_dir)
    return train(cfg)


def datamodule(prepared: Path, batch_size: int = 4, **kwargs) -> CurriculumDataModule:
    cfg = compose_config("train", tiny_train_overrides(prepared))
    return CurriculumDataModule(prepared, cfg.curriculum, 64, batch_size, shuffle_seed=kwargs.pop("seed", 1),
                                **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_per_arch(prepared_sample, tmp_path, arch):
    result = run_train(prepared_sample, tmp_path, f"arch={arch}", "trainer.max_steps=2", "train.export_hf=false",
                       "train.val_max_blocks=2")
    module = result["module"]
    assert module.global_step == 2
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
    assert torch.isfinite(torch.tensor(result["metrics"]["val/loss"]))


def test_labels_are_shifted_exactly_once(prepared_sample, tmp_path):
    module = run_train(prepared_sample, tmp_path, "trainer.max_steps=1", "train.export_hf=false")["module"]
    batch = torch.randint(0, 2000, (2, 64))
    with torch.no_grad():
        logits = module.model(input_ids=batch).logits  # [2, 64, vocab]
        manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   batch[:, 1:].reshape(-1))
        assert module.loss(batch).item() == pytest.approx(manual.item(), rel=1e-5)


def test_weight_decay_spares_norms_biases_and_embeddings():
    from lab.models.build import build_config
    from lab.models.arch import build_model

    cfg = compose_config("train", ["arch=falcon_mqa", "experiment=tiny_sample"])
    model = build_model(build_config(cfg.arch, cfg.size))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert any("ln" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])
    assert any("word_embeddings" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_run_is_recorded_in_mlflow(prepared_sample, tmp_path):
    result = run_train(prepared_sample, tmp_path, "arch=mistral_swa", "+tags.purpose=test")
    run = MlflowClient().get_run(result["run_id"])
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    for name in ["train/loss", "val/loss", "val/web/loss", "val/books/loss", "val/web/bpb", "val/books/bpb",
                 "lr", "tokens_seen", "throughput/tokens_per_s", "train/grad_norm"]:
        assert name in metrics, name
    assert tags["arch"] == "mistral_swa" and tags["purpose"] == "test"
    assert len(tags["git_sha"]) == 40 and tags["data_sha256"] and tags["tokenizer_sha256"]
    assert params["optim.lr"] == "0.0003" and params["model.sliding_window"] == "16"
    assert int(params["model/params_total"]) > 0
    # the kernels chosen for this device are part of the record; on CPU the window runs on SDPA's mask
    assert params["fast/attention"] == "sdpa" and "fast/attention_reason" in params
    # a CPU has no published peak: MFU is against the matmul rate measured here, and says so
    assert params["throughput/peak_source"] == "measured_matmul" and float(params["throughput/peak_tflops"]) > 0
    assert 0 < metrics["throughput/mfu"] < 1
    artifacts = {a.path for a in MlflowClient().list_artifacts(result["run_id"])}
    assert {"config.yaml", "data", "tokenizer", "model_config.json", "hf"} <= artifacts
    assert (tmp_path / "config.yaml").read_text().count("mistral_swa") >= 1


def test_hf_export_loads_and_generates_with_plain_transformers(prepared_sample, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_train(prepared_sample, tmp_path, "arch=mamba2", "trainer.max_steps=3")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("Era odată un morar", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = result["module"].model.eval()(ids).logits
        theirs = model(ids).logits
    torch.testing.assert_close(ours, theirs)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5


def test_curriculum_orders_stages_and_is_seeded(prepared_sample):
    dm = datamodule(prepared_sample, seed=7)
    steps = dm.stage_steps()
    assert dm.stage_boundaries() == [0, steps[0], steps[0] + steps[1]]
    web_blocks = len(dm.manifest.blocks("web", "train"))
    books_blocks = len(dm.manifest.blocks("books", "train"))
    web = dm.stage_order(0)
    books = dm.stage_order(1)
    assert web.num_samples == (web_blocks // 4) * 4  # one epoch, whole steps
    assert books.num_samples == (2 * books_blocks // 4) * 4  # the books stage runs 2 epochs
    web_order = [web.index(i) for i in range(web.num_samples)]
    assert len(set(web_order)) == len(web_order)  # an epoch is a permutation: no block twice
    books_order = [books.index(i) for i in range(books.num_samples)]
    first, second = books_order[:books_blocks], books_order[books_blocks:]
    assert sorted(first) == list(range(books_blocks)) and first != second  # each pass reshuffled
    same = datamodule(prepared_sample, seed=7).stage_order(0)
    other = datamodule(prepared_sample, seed=8).stage_order(0)
    assert [same.index(i) for i in range(50)] == web_order[:50]
    assert [other.index(i) for i in range(50)] != web_order[:50]


def test_ranks_read_disjoint_blocks_covering_the_stage(prepared_sample):
    dm = datamodule(prepared_sample, batch_size=3)
    dm.set_world(2, 0)
    order = dm.stage_order(0)
    shards = [list(RankSampler(order, rank, 2)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == order.num_samples // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(order.index(i) for i in range(order.num_samples))
    # resuming after k optimizer steps continues each rank where it stopped
    resumed = list(RankSampler(order, 1, 2, start=2 * dm.samples_per_step))
    assert resumed == shards[1][dm.samples_per_step:]


def test_stage_budget_in_tokens(prepared_sample):
    cfg = compose_config("train", tiny_train_overrides(prepared_sample))
    stages = [{"name": "web", "sources": ["web"], "tokens": 64 * 40}, {"name": "books", "sources": ["books"],
                                                                       "epochs": 1}]
    dm = CurriculumDataModule(prepared_sample, stages, 64, 4, shuffle_seed=cfg.seed)
    assert dm.stage_steps()[0] == 10


def read_steps(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


KILL_RESUME_COMMON = ["trainer.max_steps=-1", "train.export_hf=false", "train.eval_every_steps=4",
                      "train.val_max_blocks=2",
                      "curriculum.stages=[{name:web,sources:[web],tokens:3072},{name:books,sources:[books],tokens:2048}]"]


def launch_train(prepared: Path, run_dir: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """lab.train in a subprocess (12 web + 8 books steps); kill_at: SIGKILL itself after that step."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
           **({"LAB_FAULT_KILL_AT_STEP": str(kill_at)} if kill_at else {})}
    return subprocess.run([sys.executable, "-m", "lab.train", *tiny_train_overrides(prepared), *KILL_RESUME_COMMON,
                           f"hydra.run.dir={run_dir}", *extra], env=env, capture_output=True, text=True, timeout=300)


def test_kill_and_resume_gives_the_same_losses(prepared_sample, tmp_path):
    """A run killed with SIGKILL mid-stage and resumed reproduces the uninterrupted loss sequence bit for bit."""
    def launch(run_dir: Path, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
        return launch_train(prepared_sample, run_dir, "callbacks.checkpoint.every_n_steps=3", *extra, kill_at=kill_at)

    straight = launch(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    # 20 steps, a step checkpoint every 3: last.ckpt is still the final state (lab.quantize/evaluate read it)
    final = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == 20
    killed = launch(tmp_path / "killed", kill_at=7)  # web stage has 12 steps: killed mid-stage after step 7
    assert killed.returncode == -9
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    resumed = launch(tmp_path / "resumed", f"ckpt_path={tmp_path / 'killed' / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected = read_steps(tmp_path / "straight")
    assert len(expected) == 20  # 12 web + 8 books steps
    before_kill, after_resume = read_steps(tmp_path / "killed"), read_steps(tmp_path / "resumed")
    assert min(after_resume) == 7  # last.ckpt was written at step 6
    combined = {**{s: v for s, v in before_kill.items() if s < 7}, **after_resume}
    assert combined == expected  # exact float equality, step by step
    # the resumed run continues the same MLflow run
    assert (tmp_path / "resumed" / "mlflow_run_id").read_text() == (tmp_path / "killed" / "mlflow_run_id").read_text()
    # its training time continues from the checkpoint's, not from zero (lab.compare's wall time)
    callbacks = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    before = next(state["train_s"] for key, state in callbacks.items() if key.startswith("TrainClock"))
    run_id = (tmp_path / "resumed" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # the store the subprocesses wrote
    times = [m.value for m in client.get_metric_history(run_id, "time/train_s")]
    assert 0 < before < max(times)


# the stage checkpoint is the case that once lost the next stage; the step checkpoint runs with `make test-slow`
@pytest.mark.parametrize("checkpoint", [pytest.param("step0000012.ckpt", marks=pytest.mark.slow), "stage0.ckpt"])
def test_resume_from_a_stage_boundary_trains_the_next_stage(prepared_sample, tmp_path, checkpoint):
    """A checkpoint taken exactly at the end of the web stage (step 12) resumes into the whole books stage."""
    every = ["callbacks.checkpoint.every_n_steps=12", "train.eval_every_steps=5"]  # 12 is no multiple of 5
    straight = launch_train(prepared_sample, tmp_path / "straight", *every)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = launch_train(prepared_sample, tmp_path / "killed", *every, kill_at=14)
    assert killed.returncode == -9
    resumed = launch_train(prepared_sample, tmp_path / "resumed", *every,
                           f"ckpt_path={tmp_path / 'killed' / 'checkpoints' / checkpoint}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, after_resume = read_steps(tmp_path / "straight"), read_steps(tmp_path / "resumed")
    assert sorted(after_resume) == list(range(13, 21))  # all 8 books steps, none of the web stage again
    assert after_resume == {s: v for s, v in expected.items() if s > 12}


def assert_plain_hyper_parameters(hparams: dict, cfg) -> None:
    """The module takes typed settings but saves plain containers, the config nodes as they were."""
    from omegaconf import OmegaConf

    assert set(hparams) == {"arch", "size", "optim", "scheduler", "train", "schedule", "data_info",
                            "config_overrides", "init_from"}
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for node in ("optim", "scheduler", "train"):
        assert hparams[node] == resolved[node], node
    assert type(hparams["optim"]["betas"]) is list
    schedule = hparams["schedule"]
    assert schedule["total_steps"] == 3 and schedule["stage_names"] == ["web", "books"]
    assert schedule["stage_bounds"][0] == 0 and schedule["stage_sources"] == [["web"], ["books"]]
    assert hparams["data_info"]["seq_len"] == 64 and sorted(hparams["data_info"]["val_sources"]) == ["books", "web"]


def test_resume_refuses_other_data(prepared_sample, tmp_path):
    first = ["trainer.max_steps=3", "train.export_hf=false", "callbacks.checkpoint.every_n_steps=1"]
    run_train(prepared_sample, tmp_path / "first", *first)
    saved = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled code
    assert saved["lab"]["data_sha256"] and saved["hyper_parameters"]["arch"]["_target_"].startswith("transformers.")
    assert_plain_hyper_parameters(saved["hyper_parameters"],
                                  compose_config("train", tiny_train_overrides(prepared_sample, *first)))
    assert (tmp_path / "first" / "hf_stages").exists() is False  # the web stage did not complete in 3 steps
    altered = tmp_path / "altered"
    shutil.copytree(prepared_sample, altered)
    manifest = json.loads((altered / "manifest.json").read_text())
    manifest["data_sha256"] = "0" * 64
    (altered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LabError, match="data_sha256"):
        run_train(altered, tmp_path / "second", "trainer.max_steps=3",
                  f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")


def test_loss_guard_skips_then_stops(prepared_sample, tmp_path):
    # spike_factor < 1 turns every step after the guard's warmup into a "spike"
    skip = run_train(prepared_sample, tmp_path / "skip", "trainer.max_steps=6", "train.export_hf=false",
                     "train.guard.spike_factor=0.5", "train.guard.warmup_steps=2", "train.guard.max_skips=100")
    assert skip["module"].skipped_steps > 0
    assert skip["module"].global_step < 6 + skip["module"].skipped_steps
    with pytest.raises(LabError, match="loss guard stopped the run"):
        run_train(prepared_sample, tmp_path / "stop", "trainer.max_steps=6", "train.export_hf=false",
                  "train.guard.spike_factor=0.5", "train.guard.warmup_steps=2", "train.guard.action=stop")
    assert (tmp_path / "stop" / "checkpoints" / "guard-stop.ckpt").is_file()


def test_missing_prepared_data_is_a_clear_error(tmp_path):
    with pytest.raises(LabError, match="lab.prepare"):
        run_train(tmp_path / "nowhere", tmp_path / "run")


def test_multirun_trains_two_archs_with_one_console_line_each(prepared_sample, tmp_path):
    """As `make demo` trains (a multirun, the bar off, exports on): the console gets one line per run; Lightning's
    device lines and tip, torch's deprecation, transformers' save bars and Mamba2 kernel notices do not show, and
    the job's log file keeps the set-up lines."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "lab.train", "-m", "arch=llama_gqa,mamba2",
           *tiny_train_overrides(prepared_sample), "trainer.max_steps=2",
           "train.val_max_blocks=2", "experiment_name=multirun-smoke", f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    console = [line for line in (done.stdout + done.stderr).replace("\r", "\n").splitlines() if line.strip()]
    results = [line for line in console if "][lab.train][INFO] - " in line and "val/loss = " in line]
    # max_steps=2 stops inside the first stage: that warning (the lab's own) must still reach the console
    warned = [line for line in console if "][WARNING] - trainer.max_steps=2 ends inside stage" in line]
    assert len(results) == 2 and len(warned) == 2 and len(console) == 4, "\n".join(console)
    log_file = next(tmp_path.glob("1_mamba2*/train.log")).read_text()
    assert "training mamba2" in log_file and "fast paths:" in log_file and "GPU available" in log_file
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["multirun-smoke"], output_format="list")
    assert sorted(r.data.tags["arch"] for r in runs) == ["llama_gqa", "mamba2"]
    assert all(r.info.status == "FINISHED" and "val/loss" in r.data.metrics for r in runs)


def test_two_process_ddp_ranks_read_disjoint_blocks(prepared_sample, tmp_path):
    """A real 2-process DDP run (gloo, CPU): each rank reads its own blocks; together they cover the stage."""
    trace = tmp_path / "trace"
    trace.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "LAB_TRACE_BLOCKS_DIR": str(trace)}
    stages = "curriculum.stages=[{name:web,sources:[web],tokens:6144}]"  # 96 blocks = 12 steps of 2 ranks x 4
    cmd = [sys.executable, "-m", "lab.train", *tiny_train_overrides(prepared_sample), "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=-1",
           "train.export_hf=false", "train.val_max_blocks=4", stages, f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [[int(x) for x in (trace / f"rank{r}.txt").read_text().split()] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 48
    assert not set(ranks[0]) & set(ranks[1])
    stage = CurriculumDataModule(prepared_sample, [{"name": "web", "sources": ["web"], "tokens": 6144}], 64, 4,
                                 shuffle_seed=compose_config("train", ["debug=fast"]).seed)
    stage.set_world(2, 0)
    order = stage.stage_order(0)
    assert sorted(ranks[0] + ranks[1]) == sorted(order.index(i) for i in range(order.num_samples))
    assert len(read_steps(tmp_path / "run")) == 12


@pytest.mark.slow  # three trainings (~1 min on 2 cores)
def test_init_from_continues_from_an_hf_export(prepared_sample, tmp_path):
    """Continued pretraining (init_from=<HF folder>): the run starts from the exported weights."""
    first = run_train(prepared_sample, tmp_path / "a", "arch=llama_gqa", "trainer.max_steps=2")
    exported = {k: v.clone() for k, v in first["module"].model.state_dict().items()}
    second = run_train(prepared_sample, tmp_path / "b", "arch=llama_gqa", "trainer.max_steps=1",
                       "optim.lr=0", f"init_from={tmp_path / 'a' / 'hf'}")
    for name, value in second["module"].model.state_dict().items():
        torch.testing.assert_close(value, exported[name], msg=name)  # lr 0: the weights are the export's
    with pytest.raises(LabError, match="do not fit"):
        run_train(prepared_sample, tmp_path / "c", "arch=llama_mha", f"init_from={tmp_path / 'a' / 'hf'}")


def test_energy_is_logged_when_codecarbon_is_installed(prepared_sample, tmp_path, monkeypatch):
    """callbacks.energy: kWh, CO2 and Wh per million tokens from codecarbon's tracker (a stand-in here)."""
    import types

    class FakeTracker:
        def __init__(self, **kwargs):
            assert kwargs["country_iso_code"] == "ROU"  # offline: no network lookup of the grid's carbon intensity
            self.final_emissions_data = None

        def start(self):
            pass

        def stop(self):
            self.final_emissions_data = types.SimpleNamespace(energy_consumed=0.002, emissions=0.0005)

    monkeypatch.setitem(sys.modules, "codecarbon", types.SimpleNamespace(OfflineEmissionsTracker=FakeTracker))
    result = run_train(prepared_sample, tmp_path, "arch=llama_gqa", "trainer.max_steps=2", "callbacks.energy=true")
    metrics = MlflowClient().get_run(result["run_id"]).data.metrics
    tokens = 2 * result["module"].tokens_per_step
    assert metrics["energy/kwh"] == 0.002 and metrics["energy/co2_kg"] == 0.0005
    assert abs(metrics["energy/wh_per_mtoken"] - 2.0 / tokens * 1e6) < 1e-6


def test_energy_true_without_codecarbon_is_a_clear_error(prepared_sample, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # import fails as if not installed
    with pytest.raises(LabError, match="pip install codecarbon"):
        run_train(prepared_sample, tmp_path, "arch=llama_gqa", "trainer.max_steps=1", "callbacks.energy=true")


def test_every_stage_end_is_validated(prepared_sample, tmp_path):
    """Stages of 12 and 8 steps with eval every 5: validation at 5, 10, 12 (web end), 17, 20 (books end)."""
    result = run_train(prepared_sample, tmp_path, *KILL_RESUME_COMMON[:2], "train.eval_every_steps=5",
                       *KILL_RESUME_COMMON[3:])
    client = MlflowClient()
    # Lightning stamps a validation inside the loop with the step count before the one just taken
    steps = {m.step + 1 for m in client.get_metric_history(result["run_id"], "val/web/loss")}
    assert steps == {5, 10, 12, 17, 20}
    # forgetting: web measured during books against its value at the end of the web stage
    assert client.get_metric_history(result["run_id"], "val/web/forgetting")


def test_resume_with_other_settings_is_refused_before_touching_the_run(prepared_sample, tmp_path):
    first = run_train(prepared_sample, tmp_path / "first", "trainer.max_steps=3", "callbacks.checkpoint.every_n_steps=1")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(LabError, match=r"optim.lr: 0.0003 -> 0.001"):
        run_train(prepared_sample, tmp_path / "second", "trainer.max_steps=3", "optim.lr=1e-3", f"ckpt_path={last}")
    assert MlflowClient().get_run(first["run_id"]).info.status == "FINISHED"  # the record is untouched
    # how a run is shown or exported may change on resume
    again = run_train(prepared_sample, tmp_path / "third", "trainer.max_steps=3", "train.export_hf=false",
                      f"ckpt_path={last}")
    assert again["run_id"] == first["run_id"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_trainer_without_a_gpu_is_a_clear_error(prepared_sample, tmp_path):
    with pytest.raises(LabError, match="no CUDA device"):
        run_train(prepared_sample, tmp_path, "trainer=gpu")


def test_training_before_preparing_names_the_prepare_command(tmp_path):
    with pytest.raises(LabError, match=r"prepare it first with: python -m lab\.prepare .*data\.seq_len=\d+") as err:
        run_train(tmp_path / "nothing_here", tmp_path / "run")
    assert "paths.corpus_dir=" in str(err.value)


def test_short_runs_still_log_training_metrics(prepared_sample, tmp_path):
    """Fewer steps than trainer.log_every_n_steps: the interval shrinks so the run still has its metrics."""
    result = run_train(prepared_sample, tmp_path, "trainer.max_steps=3", "trainer.log_every_n_steps=50")
    metrics = MlflowClient().get_run(result["run_id"]).data.metrics
    assert {"train/loss", "lr", "throughput/tokens_per_s"} <= set(metrics)


def test_no_validation_blocks_is_a_clear_error(prepared_sample, tmp_path):
    altered = tmp_path / "noval"
    shutil.copytree(prepared_sample, altered)
    manifest = json.loads((altered / "manifest.json").read_text())
    for source in manifest["sources"].values():
        source["splits"]["val"]["blocks"] = 0  # e.g. a corpus with fewer held-out tokens than one block
    (altered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LabError, match="no validation blocks"):
        datamodule(altered)


def test_a_run_resumed_from_its_last_step_still_writes_its_end_records(tmp_path):
    """Killed after its final checkpoint, a resumed run has nothing to train: Lightning skips the loop and its
    on_train_epoch_end / on_train_end hooks, so the end-of-training records (tokens per source, the final clock,
    the last stage's end) come from on_fit_end instead (lab.training.callbacks.EndOfTraining), once."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import Logger

    from lab.training.callbacks import SourceTokens, TrainClock

    class Recorder(Logger):
        name, version = "recorder", 0
        logged: list[tuple[int, dict]] = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    def fit(ckpt_path=None):
        recorder = Recorder()
        recorder.logged = []
        callbacks = [SourceTokens(lambda step: {"tokens/web": 64.0 * step}), TrainClock()]
        trainer = L.Trainer(max_steps=4, limit_train_batches=4, callbacks=callbacks, logger=recorder, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, enable_checkpointing=False, num_sanity_val_steps=0,
                            limit_val_batches=0)
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)
        return trainer, recorder.logged

    trainer, first = fit()
    assert (4, {"tokens/web": 256.0}) in first
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    _, resumed = fit(tmp_path / "last.ckpt")
    assert [m for _, m in resumed if "tokens/web" in m] == [{"tokens/web": 256.0}]   # once, at the end
    assert [step for step, m in resumed if "time/train_s" in m] == [4]
