"""Every configuration value checked before anything starts; failed starts end their MLflow run; resume skips
unreadable checkpoints; every command fails with one line and no console traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError
from lab.training.resume import resolve_ckpt_path
from lab.training.settings import TrainSettings
from lab.train import train
from tests.conftest import compose_config, tiny_train_overrides
from lab.quantization.settings import QuantizeSettings
from lab.evaluation.settings import EvaluateSettings
from lab.generation.sampling import GenerateSettings
from lab.data.pipeline import Settings as PrepareSettings


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-0.001", "optim.lr=-0.001 is not allowed: expected a number >= 0"),
    ("optim.lr=abc", "optim.lr='abc' is not allowed"),
    ("optim.lr=inf", "optim.lr=inf is not allowed"),
    ("optim.eps=0", "optim.eps=0 is not allowed: expected a positive number"),
    ("optim.betas=[0.9,1.5]", "optim.betas[1]=1.5"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1 is not allowed: expected a number >= 0"),
    ("train.batch_size=0", "train.batch_size=0 is not allowed: expected an integer >= 1"),
    ("train.batch_size=true", "train.batch_size=True"),
    ("train.batch_size=2.5", "train.batch_size=2.5"),
    ("train.eval_every_steps=-3", "train.eval_every_steps=-3"),
    ("train.attention=magic", "train.attention='magic' is not allowed: expected one of auto, sdpa"),
    ("train.guard.action=ignore", "train.guard.action='ignore'"),
    ("scheduler.warmup_fraction=1.5", "scheduler.warmup_fraction=1.5"),
    ("scheduler=wsd", None),
    ("scheduler.min_lr_ratio=-0.1", "scheduler.min_lr_ratio=-0.1"),
    ("trainer.precision=fp7", "trainer.precision='fp7' is not allowed: expected one of auto"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
    ("callbacks.checkpoint.every_n_steps=0", "callbacks.checkpoint.every_n_steps=0"),
    ("data.seq_len=1", "data.seq_len=1"),
    ("data.shuffle_seed=-3", "data.shuffle_seed=-3 is not allowed: expected an integer >= 0"),
    ("seed=1.5", "seed=1.5"),
    ("~optim.eps", "optim.eps is missing from the config"),
    ("~train.guard.max_skips", "train.guard.max_skips is missing from the config"),
    ("~data.shuffle_seed", "data.shuffle_seed is missing from the config"),
    ("~callbacks.register_model", "callbacks.register_model is missing from the config"),
    ("callbacks.register_model=maybe", "callbacks.register_model='maybe' is not allowed: expected true or false"),
    ("trainer.accelerator=3", "trainer.accelerator=3 is not allowed: expected a non-empty string"),
    ("~trainer.accelerator", "trainer.accelerator is missing from the config"),
    ("optim.fused=sometimes", "optim.fused='sometimes' is not allowed"),
    ("scheduler.warmup_tokens=-5", "scheduler.warmup_tokens=-5"),
    ("train.val_max_blocks=0", "train.val_max_blocks=0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    cfg = compose_config("train", ["experiment=demo", override])
    if message is None:
        TrainSettings.from_config(cfg)
        return
    with pytest.raises(LabError, match=re.escape(message)) as caught:
        TrainSettings.from_config(cfg)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("command, override, message", [
    ("generate", "max_new_tokens=abc", "max_new_tokens='abc' is not allowed"),
    ("generate", "top_p=high", "top_p='high' is not allowed: expected a finite number"),
    ("generate", "temperature=nan", "temperature=nan is not allowed"),
    ("generate", "seed=-1", "seed=-1 is not allowed: expected an integer >= 0"),
    ("generate", "do_sample=yes", "do_sample='yes' is not allowed: expected true or false"),
    ("generate", "num_return_sequences=true", "num_return_sequences=True"),
    ("generate", "prepend_eos=1", "prepend_eos=1 is not allowed: expected true or false"),
    ("generate", "~top_k", "top_k is missing from the config"),
    ("generate", "~device", "device is missing from the config"),
    ("evaluate", "batch_size=0", "batch_size=0 is not allowed"),
    ("evaluate", "max_blocks=-1", "max_blocks=-1 is not allowed: expected an integer >= 1 or auto"),
    ("evaluate", "efficiency.repeats=nan", "efficiency.repeats=nan"),
    ("evaluate", "efficiency.batch_sizes=[1,0]", "efficiency.batch_sizes[1]=0 is not allowed"),
    ("evaluate", "efficiency.prompt_lengths=128", "efficiency.prompt_lengths=128 is not allowed: expected a list"),
    ("evaluate", "efficiency.compile=sometimes", "efficiency.compile='sometimes' is not allowed"),
    ("evaluate", "~efficiency.warmup", "efficiency.warmup is missing from the config"),
    ("evaluate", "texts=poveste.txt", "texts='poveste.txt' is not allowed: expected a list"),
    ("evaluate", "threads=0", "threads=0 is not allowed"),
    ("evaluate", "mlflow.enabled=maybe", "mlflow.enabled='maybe' is not allowed"),
    ("evaluate", "+mlflow.tags.nested={a:b}", "mlflow.tags.nested={'a': 'b'} is not allowed"),
    ("evaluate", "lm_eval.bootstrap_iters=-5", "lm_eval.bootstrap_iters=-5"),
    ("evaluate", "bench.max_weight_memory_ratio=0", "bench.max_weight_memory_ratio=0 is not allowed"),
    ("evaluate", "~bench", "bench is missing from the config"),
    ("evaluate", "+lm_eval.limt=3", "lm_eval.limt is not a setting here (the settings are task_dirs, num_fewshot"),
    ("evaluate", "+efficiency.warmups=2", "efficiency.warmups is not a setting here"),
    ("evaluate", "efficiency.repeats=${nope}", "efficiency.repeats does not resolve: Interpolation key 'nope'"),
    ("quantize", "+variant_options.int4wo.quantize_embedding=true", "int4wo: quantize_embedding=true is supported"),
    ("quantize", "variant_options.int4wo.group_size=0", "variant_options.int4wo.group_size=0"),
    ("quantize", "variant_options.intx4wo.group_size=32.5", "variant_options.intx4wo.group_size=32.5"),
    ("quantize", "variant_options.int8wo.quantize_embedding=no", "variant_options.int8wo.quantize_embedding='no'"),
    ("quantize", "~variant_options.intx4wo.group_size", "variant_options.intx4wo.group_size is missing"),
    ("quantize", "+variant_options.int8wo.group_size=64", "variant_options.int8wo.group_size: not a knob of int8wo"),
    ("quantize", "+variant_options.int3=null", "variant_options.int3: not a variant"),
    ("quantize", "variants=[int8wo,7]", "variants[1]=7 is not allowed: expected a non-empty string"),
    ("prepare", "data.seq_len=1", "data.seq_len=1"),
    ("prepare", "prepare.workers=0", "prepare.workers=0"),
    ("prepare", "prepare.batch_mb=-4", "prepare.batch_mb=-4"),
])
def test_the_other_commands_check_their_settings(command, override, message):
    kinds = {"generate": GenerateSettings, "quantize": QuantizeSettings, "evaluate": EvaluateSettings}

    def parse(cfg):
        return PrepareSettings.from_cfg(cfg) if command == "prepare" else kinds[command].from_config(cfg)

    extra = [] if command == "prepare" else ["model_path=/nowhere"]
    parse(compose_config(command, extra))  # the shipped values pass
    with pytest.raises(LabError, match=re.escape(message)) as caught:
        parse(compose_config(command, [*extra, override]))
    assert "\n" not in str(caught.value)


def test_settings_for_overrides_and_harmless_knobs():
    from lab.config.compose import settings_for

    with pytest.raises(LabError, match=r"cannot compose conf/quantize.yaml with \['variant_options'\]") as caught:
        settings_for(QuantizeSettings, ["variant_options"], model_path="x")  # an override without =, as a typo in a list
    assert "\n" not in str(caught.value)
    # quantize_embedding=false on a variant that never quantizes it: what it does anyway, accepted
    settings = settings_for(QuantizeSettings, ["+variant_options.int4wo.quantize_embedding=false"], model_path="x")
    assert settings.variant_options["int4wo"] == {"group_size": 128}


TINY_SAMPLE_USERS = [["experiment=demo"], ["experiment=arch_bakeoff_tiny"], ["experiment=curriculum_study_tiny"],
                     ["debug=fast"], ["experiment=demo", "debug=fast"]]


@pytest.mark.parametrize("overrides", TINY_SAMPLE_USERS, ids=" ".join)
def test_tiny_configs_extend_the_one_tiny_sample_base(overrides):
    """size, tokenizer, trainer and seq_len of "tiny on the sample" come from conf/experiment/tiny_sample.yaml."""
    def shape(cfg):
        choices = cfg.hydra.runtime.choices
        return choices.size, choices.tokenizer, choices.trainer, cfg.data.seq_len, cfg.data.prepared_dir

    base = shape(compose_config("train", ["experiment=tiny_sample"], keep_hydra=True))
    assert base[:4] == ("tiny", "bpe2k", "cpu", 64)
    assert shape(compose_config("train", overrides, keep_hydra=True)) == base
    # the command line still wins over the base's choices
    assert compose_config("train", [*overrides, "size=full"], keep_hydra=True).hydra.runtime.choices.size == "full"


def test_the_makefile_prepares_the_tiny_sample_data():
    """lab.prepare cannot read tiny_sample.yaml (no size or trainer group): the Makefile's DEMO_DATA must match it."""
    from tests.conftest import TINY_DATA

    makefile = (PROJECT_ROOT / "Makefile").read_text()
    demo_data = re.search(r"^DEMO_DATA := (.*)$", makefile, re.MULTILINE).group(1).split()
    assert demo_data == TINY_DATA == ["tokenizer=bpe2k", "data.seq_len=64"]
    prepare = compose_config("prepare", demo_data)
    train_cfg = compose_config("train", ["experiment=tiny_sample"])
    assert prepare.data.prepared_dir == train_cfg.data.prepared_dir  # the folder demo training reads


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (PROJECT_ROOT / "conf" / "experiment").glob("*.yaml")))
def test_the_shipped_configs_pass(experiment):
    for trainer in ("default", "cpu", "gpu", "ddp", "fsdp"):
        TrainSettings.from_config(compose_config("train", [f"experiment={experiment}", f"trainer={trainer}"]))


def test_a_bad_value_is_refused_before_the_mlflow_run_exists(prepared_sample, tmp_path):
    cfg = compose_config("train", tiny_train_overrides(prepared_sample, "optim.lr=-1"), run_dir=tmp_path)
    with pytest.raises(LabError, match="optim.lr"):
        train(cfg)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_start_that_fails_after_the_run_exists_ends_it(prepared_sample, tmp_path, monkeypatch, failure):
    import lab.train as train_module

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(train_module, "CausalLMModule", broken)
    cfg = compose_config("train", tiny_train_overrides(prepared_sample), run_dir=tmp_path)
    with pytest.raises(type(failure)):
        train(cfg)
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    status = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status
    assert status == ("KILLED" if isinstance(failure, KeyboardInterrupt) else "FAILED")


# -- resume: unreadable checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(prepared_sample, tmp_path_factory) -> Path:
    """A tiny run with a step checkpoint, a stage checkpoint and last.ckpt under <root>/outputs/<run_name>/."""
    root = tmp_path_factory.mktemp("resume_root")
    run_dir = root / "outputs" / "trust-resume" / "t0"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        cfg = compose_config("train", tiny_train_overrides(prepared_sample, "trainer.max_steps=4",
                                                           "callbacks.checkpoint.every_n_steps=2",
                                                           "train.export_hf=false"), run_dir=run_dir)
        train(cfg)
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return root


def resume_cfg(root: Path, ckpt_path: str):
    return compose_config("train", [f"paths.root_dir={root}", "run_name=trust-resume", f"ckpt_path={ckpt_path}"])


def age_in_order(paths: list[Path]) -> None:
    """Set modification times so `paths` are newest first (the order resolve_ckpt_path tries them in)."""
    now = time.time()
    for i, path in enumerate(paths):
        os.utime(path, (now - i * 10, now - i * 10))


@pytest.mark.parametrize("damage", ["truncate", "empty", "noise"])
def test_last_skips_unreadable_checkpoints_for_the_newest_intact_one(finished_run, tmp_path, damage, caplog):
    import shutil

    root = Path(shutil.copytree(finished_run, tmp_path / "root"))
    checkpoints = sorted((root / "outputs" / "trust-resume" / "t0" / "checkpoints").glob("*.ckpt"))
    last = next(p for p in checkpoints if p.name == "last.ckpt")
    older = [p for p in checkpoints if p != last]
    data = last.read_bytes()
    last.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "noise": os.urandom(4096)}[damage])
    age_in_order([last, *older])
    with caplog.at_level("WARNING", logger="lab.training.resume"):
        chosen = resolve_ckpt_path(resume_cfg(root, "last"))
    assert chosen == str(older[0])
    assert str(last) in caplog.text


def test_last_with_every_checkpoint_unreadable_is_one_line(finished_run, tmp_path):
    import shutil

    root = Path(shutil.copytree(finished_run, tmp_path / "root"))
    for path in (root / "outputs").rglob("*.ckpt"):
        path.write_bytes(b"PK\x03\x04broken")
    with pytest.raises(LabError, match="none of the .* checkpoint"):
        resolve_ckpt_path(resume_cfg(root, "last"))


@pytest.mark.parametrize("content, message", [
    (b"\x80\x04garbage", "damaged or truncated"),
    (b"", "damaged or truncated"),
    ({"state_dict": {}, "hook": Path("/etc/passwd")}, "Python objects beyond plain data"),  # needs unsafe loading
    ([1, 2, 3], "not a lab.train checkpoint"),
])
def test_a_named_unreadable_checkpoint_is_one_line_without_unsafe_advice(tmp_path, content, message):
    import torch

    bad = tmp_path / "bad.ckpt"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        torch.save(content, bad)
    with pytest.raises(LabError, match=message) as caught:
        resolve_ckpt_path(resume_cfg(tmp_path, str(bad)))
    text = str(caught.value)
    assert str(bad) in text and "weights_only" not in text and "\n" not in text


# -- sweep trials left RUNNING by a killed job ------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_resumed_study_fails_the_trials_of_dead_jobs(tmp_path):
    import socket
    import sqlite3

    import optuna
    from optuna.distributions import FloatDistribution

    from lab.cluster.pruning import OptunaPruning, open_storage

    db = tmp_path / "optuna.db"
    study = optuna.create_study(study_name="lr", storage=f"sqlite:///{db}", direction="minimize")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("lr_sweep")
    host, lr = socket.gethostname(), FloatDistribution(1e-4, 1e-2, log=True)

    def running_trial(**attrs) -> tuple[optuna.Trial, str]:
        trial = study.ask({"optim.lr": lr})
        run_id = client.create_run(experiment).info.run_id
        for key, value in {**attrs, "mlflow_run_id": run_id}.items():
            trial.set_user_attr(key, value)
        return trial, run_id

    killed, killed_run = running_trial(host=host, pid=dead_pid(), pid_started="1")
    alive, alive_run = running_trial(host=host, pid=os.getpid(), pid_started=None)  # a live job on this host
    ended, ended_run = running_trial(host=host, pid=dead_pid(), job_ended=True)  # waits for its sweeper's tell
    elsewhere, elsewhere_run = running_trial(host="other-host", pid=dead_pid())  # its pid means nothing here
    silent, silent_run = running_trial(host="other-host", pid=1)
    no_attrs = study.ask({"optim.lr": lr})  # asked, never started: nothing says it is dead
    storage = open_storage(f"sqlite:///{db}", heartbeat_interval=60, stale_after=None)
    for trial in (elsewhere, silent):
        storage.record_heartbeat(trial._trial_id)
    with sqlite3.connect(db) as conn:  # `silent`'s host stopped beating an hour ago
        conn.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour') WHERE trial_id = ?",
                     (silent._trial_id,))

    mine = study.ask({"optim.lr": lr})  # the new job's own trial
    callback = OptunaPruning(f"sqlite:///{db}", "lr", overrides=[f"optim.lr={mine.params['optim.lr']}"],
                             heartbeat_interval=60, stale_after=900)
    attached = callback.trial = callback._attach(client)  # what setup() does on rank 0
    try:
        states = {t.number: t.state.name for t in optuna.load_study(study_name="lr", storage=f"sqlite:///{db}").trials}
        assert attached is not None and attached.number == mine.number and callback.heartbeat is not None
        assert states == {killed.number: "FAIL", alive.number: "RUNNING", elsewhere.number: "RUNNING",
                          ended.number: "RUNNING",
                          silent.number: "FAIL", no_attrs.number: "RUNNING", mine.number: "RUNNING"}
        status = {run: client.get_run(run).info.status for run in (killed_run, alive_run, elsewhere_run, silent_run)}
        assert status == {killed_run: "FAILED", alive_run: "RUNNING", elsewhere_run: "RUNNING", silent_run: "FAILED"}
        mine_attrs = storage.get_trial(mine._trial_id).user_attrs
        assert mine_attrs["host"] == host and mine_attrs["pid"] == os.getpid()
        assert mine._trial_id not in storage._get_stale_trial_ids(study._study_id)  # it beats
    finally:
        callback.teardown(None, None, "fit")
    assert callback.heartbeat is None and storage.get_trial(mine._trial_id).user_attrs["job_ended"] is True


@pytest.mark.parametrize("knobs, message", [({"heartbeat_interval": 0}, "heartbeat_interval=0"),
                                            ({"heartbeat_interval": True}, "heartbeat_interval=True"),
                                            ({"heartbeat_interval": 60, "stale_after": 90}, "stale_after=90"),
                                            ({"stale_after": "1h"}, "stale_after='1h'")])
def test_bad_stale_trial_settings_are_one_line(knobs, message):
    from lab.cluster.pruning import OptunaPruning

    with pytest.raises(LabError, match=message):
        OptunaPruning("sqlite://", "s", **knobs)


# -- the commands' one exit path ---------------------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          timeout=180, env={**os.environ, "LAB_DEBUG": "", "HYDRA_FULL_ERROR": "", **(env or {})})


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_commands_fail_with_one_line(prepared_sample, tmp_path):
    hydra_dir = f"hydra.run.dir={tmp_path / 'h'}"
    assert_one_line(run_cli(tmp_path, "lab.train", *tiny_train_overrides(prepared_sample), "optim.lr=-1", hydra_dir),
                    "optim.lr=-1 is not allowed")
    assert_one_line(run_cli(tmp_path, "lab.compare", "--experiment", "no_such_experiment", "--tracking-uri",
                            f"sqlite:///{tmp_path / 'm.db'}"), "no_such_experiment")
    assert_one_line(run_cli(tmp_path, "lab.generate", f"model_path={tmp_path}", "max_new_tokens=-5", hydra_dir),
                    "max_new_tokens=-5 must be at least 1")


def test_a_multirun_reports_each_failed_job_and_ends_with_one_line(tmp_path, capsys, monkeypatch):
    from lab import report_sweep_failure

    sweep = run_cli(tmp_path, "lab.train", "-m", "experiment=demo", "optim.lr=-1,abc", f"hydra.sweep.dir={tmp_path}")
    assert_one_line(sweep, "optim.lr=-1 is not allowed")
    assert "optim.lr=-1 is not allowed" in sweep.stdout and "optim.lr='abc' is not allowed" in sweep.stdout
    try:  # the hook Hydra hands the failure to after the sweep prints the traceback only when asked
        raise ValueError("boom")
    except ValueError as err:
        monkeypatch.setenv("LAB_DEBUG", "1")
        report_sweep_failure(type(err), err, err.__traceback__)
    loud = capsys.readouterr().err
    assert "Traceback" in loud and loud.rstrip().splitlines()[-1].startswith("error: unexpected ValueError: boom")


def test_an_unexpected_error_is_one_line_with_the_traceback_in_the_log_file(tmp_path, capsys, monkeypatch):
    import logging

    from lab import report_error

    log = logging.getLogger("lab.test_exit")
    handler = logging.FileHandler(tmp_path / "job.log")
    log.addHandler(handler)
    try:
        try:
            {}["missing"]
        except KeyError as err:
            monkeypatch.delenv("LAB_DEBUG", raising=False)
            monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
            assert report_error(err, log) == 1
            quiet = capsys.readouterr().err
            monkeypatch.setenv("LAB_DEBUG", "1")
            report_error(err, log)
            loud = capsys.readouterr().err
        try:
            open(tmp_path / "no" / "such" / "file")
        except OSError as err:
            monkeypatch.delenv("LAB_DEBUG")
            report_error(err, log)
            os_line = capsys.readouterr().err
    finally:
        log.removeHandler(handler)
        handler.close()
    assert quiet.count("\n") == 1 and quiet.startswith("error: unexpected KeyError") and "job.log" in quiet
    assert "Traceback" not in quiet and "Traceback" in loud
    assert "Traceback" in (tmp_path / "job.log").read_text()
    assert os_line.startswith("error: ") and "no/such/file: No such file or directory" in os_line


def test_prepare_of_a_missing_corpus_is_one_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.write_text("not a folder")
    assert_one_line(run_cli(tmp_path, "lab.prepare", "tokenizer=bpe2k", "data.seq_len=64", f"paths.corpus_dir={corpus}",
                            f"data.prepared_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}"),
                    "does not exist")


@pytest.mark.parametrize("override, message", [
    ("callbacks.generations.max_new_tokens=0", "max_new_tokens"),
    ("callbacks.generations.prompts=[1,2]", "prompts"),
    ("callbacks.register_model=maybe", "callbacks.register_model"),
    ("callbacks.register_model=true train.export_hf=false", "train.export_hf=false"),
])
def test_export_callback_settings_are_checked_before_the_run(override, message):
    from lab.training.settings import TrainSettings

    cfg = compose_config("train", ["size=tiny", *override.split()])
    with pytest.raises(LabError, match=message):
        TrainSettings.from_config(cfg)
