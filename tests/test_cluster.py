"""Beyond one machine: launcher configs, shared Optuna storage on a real PostgreSQL, a real MLflow server, and the
one tracking-URI rule. Servers are started here on 127.0.0.1 (free port, temp folder) and stopped after; every
wait is bounded."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lab import CONF_DIR, PROJECT_ROOT, LabError
from lab.config.resolvers import job_gpu
from lab.runs.tracking import artifact_location, get_or_create_experiment, tracking_uri
from tests.conftest import ARCHS, tiny_train_overrides

PY = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, what: str, timeout_s: float = 60.0, every_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every_s)
    raise AssertionError(f"{what}: not ready after {timeout_s:.0f} s")


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return compose("train", overrides=overrides, return_hydra_config=True)


def lab_train(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "lab.train", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- the tracking-URI rule and artifact locations -------------------------------------------------------------

def test_tracking_uri_explicit_beats_env_beats_default(monkeypatch, tmp_path):
    monkeypatch.setattr("lab.runs.tracking.MLFLOW_DIR", tmp_path / "mlflow")  # the default store, but not the project's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking_uri("http://10.0.0.1:5000") == "http://10.0.0.1:5000"
    assert tracking_uri(None) == "http://127.0.0.1:9"
    assert tracking_uri("  ") == "http://127.0.0.1:9"  # blank counts as not given
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()  # created, schema ready


def test_sqlite_store_in_an_unwritable_place_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(LabError, match="cannot create"):
        tracking_uri(f"sqlite:///{tmp_path / 'file' / 'sub' / 'mlflow.db'}")


def test_concurrent_first_use_of_a_sqlite_store(tmp_path):
    """Three processes open one fresh store at once: each must find a ready schema (no migration race)."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = ("import sys; from lab.runs.tracking import tracking_uri; from mlflow.tracking import MlflowClient; "
            "MlflowClient(tracking_uri(sys.argv[1])).create_experiment(sys.argv[2])")
    procs = [subprocess.Popen([PY, "-c", code, uri, f"e{i}"], stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    from mlflow.tracking import MlflowClient

    assert {e.name for e in MlflowClient(uri).search_experiments()} >= {"e0", "e1", "e2"}


@pytest.mark.parametrize("bad", [5000, ["http://x"], {"uri": "x"}, True])
def test_tracking_uri_of_wrong_type_is_one_clear_error(bad):
    with pytest.raises(LabError, match="not a URI"):
        tracking_uri(bad)


def test_logger_config_leaves_the_uri_to_the_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert compose_with_hydra([]).logger.tracking_uri is None  # so the env (or the default) decides in tracking_uri
    assert compose_with_hydra(["logger.tracking_uri=http://h:1"]).logger.tracking_uri == "http://h:1"


@pytest.mark.parametrize("uri", ["s3://bucket/x", "gs://b/p/q", "file:///srv/artifacts", "mlflow-artifacts:/exp",
                                 "hdfs://nn:8020/a b"])
def test_artifact_uris_pass_untouched(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert artifact_location(uri) == uri
    assert artifact_location(f"  {uri}\n") == uri
    assert list(tmp_path.iterdir()) == []  # no local folder named `s3:` or the like


def test_artifact_paths_become_absolute_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert artifact_location("rel/arts") == (tmp_path / "rel" / "arts").as_uri()
    assert (tmp_path / "rel" / "arts").is_dir()
    assert artifact_location(tmp_path / "p") == (tmp_path / "p").as_uri()
    # one letter then a colon is a Windows drive, not a scheme: a path here
    assert artifact_location("C:/x") == (tmp_path / "C:" / "x").as_uri()


def test_artifact_location_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(LabError, match="cannot create the folder"):
        artifact_location(tmp_path / "file" / "sub")
    with pytest.raises(LabError, match="not a path or URI"):
        artifact_location(42)


def test_new_experiment_keeps_an_s3_artifact_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    from mlflow.tracking import MlflowClient

    exp_id = get_or_create_experiment("s3exp", uri, "s3://bucket/x")
    assert MlflowClient(uri).get_experiment(exp_id).artifact_location == "s3://bucket/x"
    assert not (tmp_path / "s3:").exists()


# --- launchers ----------------------------------------------------------------------------------------------

def test_job_gpu_round_robin_and_bad_counts():
    assert [job_gpu(n, 3) for n in range(5)] == ["0", "1", "2", "0", "1"]
    assert job_gpu("7", "8") == "7"
    for bad in ("0", "-2", "eight", None):
        with pytest.raises(LabError, match="GPUS="):
            job_gpu(1, bad)


def test_slurm_launcher_follows_the_trainer(monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "a100")
    monkeypatch.setenv("SLURM_ACCOUNT", "proj7")
    monkeypatch.delenv("SLURM_MEM_GB", raising=False)
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=3"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 3)
    assert (launcher.partition, launcher.account, launcher.mem_gb, launcher.timeout_min) == ("a100", "proj7", 0, 1440)
    assert launcher.setup and launcher.submitit_folder.endswith("/.submitit/%j")
    monkeypatch.delenv("SLURM_PARTITION")
    assert compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher.partition is None  # the cluster default
    out = subprocess.run([PY, "-m", "lab.train", "hydra/launcher=slurm", "--cfg", "hydra"], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gpus_per_node: ${trainer.devices}" in out.stdout and "nodes: ${trainer.num_nodes}" in out.stdout


def test_local_parallel_pins_one_gpu_per_job(monkeypatch):
    monkeypatch.setenv("LAB_GPUS", "3")
    cfg = compose_with_hydra(["hydra/launcher=local_parallel"])
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.gpus_per_node == 0
    gpus = []
    for num in range(4):
        cfg.hydra.job.num = num
        gpus.append(cfg.hydra.job.env_set.CUDA_VISIBLE_DEVICES)
    assert gpus == ["0", "1", "2", "0"]


def test_two_sweeps_in_one_second_get_their_own_folders():
    dirs = {str(compose_with_hydra([]).hydra.sweep.dir) for _ in range(3)}
    assert len(dirs) == 3


@pytest.mark.slow
def test_tiny_bakeoff_through_the_local_parallel_launcher(prepared_sample, tmp_path):
    """The five archs of the tiny bake-off as one multirun, all at once (`make bakeoff LAUNCHER=local_parallel`)."""
    env = {**os.environ, "LAB_GPUS": "5"}
    sweep_dir = tmp_path / "sweep"
    out = lab_train(["-m", "experiment=arch_bakeoff_tiny", "hydra/launcher=local_parallel",
                     "hydra.sweeper.max_batch_size=5", "hydra.sweeper.params.seed=1", f"hydra.sweep.dir={sweep_dir}",
                     *tiny_train_overrides(prepared_sample, "trainer.max_steps=4")], env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("arch_bakeoff_tiny").experiment_id])
    assert sorted(r.data.tags["arch"] for r in runs) == sorted(ARCHS)
    assert all(r.info.status == "FINISHED" and r.data.tags["bakeoff"] == "tiny-v1" for r in runs)
    # jobs overlap: at some moment several runs were training at once (2 cores: not necessarily all five)
    at_once = max(sum(r.info.start_time <= t < r.info.end_time for r in runs) for t in (r.info.start_time for r in runs))
    assert at_once >= 3, f"at most {at_once} job(s) ran at once"
    assert len(list(sweep_dir.glob(".submitit/[0-9]*"))) == 5  # one submitit job (process) each
    table = subprocess.run([PY, "-m", "lab.compare", "--experiment", "arch_bakeoff_tiny", "--tag", "bakeoff=tiny-v1",
                            "--out", str(tmp_path / "compare")], cwd=PROJECT_ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    assert all(arch in table.stdout for arch in ARCHS)


# --- Optuna on PostgreSQL -----------------------------------------------------------------------------------

PG_BIN = None
try:
    import pgserver

    PG_BIN = Path(pgserver.__file__).parent / "pginstall" / "bin"
except ImportError:
    pass


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 (pgserver's binaries); postgres refuses to run as root, so as root it
    runs as `nobody`."""
    if PG_BIN is None or not (PG_BIN / "postgres").is_file():
        pytest.skip("pgserver (PostgreSQL binaries) is not installed: pip install pgserver==0.1.4")
    # not under pytest's tmp folder: its parents are private to root, and `nobody` must reach the data dir
    root = Path(tempfile.mkdtemp(prefix="lab-pg-"))
    user = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    data = root / "data"
    subprocess.run([PG_BIN / "initdb", "-D", data, "--auth=trust", "-U", "postgres", "-E", "utf8"], check=True,
                   capture_output=True, timeout=120, **user)
    port = free_port()
    log = open(root / "server.log", "wb")
    server = subprocess.Popen([PG_BIN / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", root],
                              stdout=log, stderr=subprocess.STDOUT, **user)
    try:
        wait_until(lambda: subprocess.run([PG_BIN / "pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                                          capture_output=True, timeout=10).returncode == 0, "postgres", 60)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown: this test process still holds pooled connections
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


SWEEP_WORKER = """
import sys, optuna
from lab.cluster.launchers import init_storage
storage, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
init_storage(storage, "STORAGE")  # as every sweep=lr run does first: both workers meet an empty database at once
study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.3) ** 2, n_trials=n, n_jobs=1)
"""


def test_two_workers_share_one_study_on_postgres(postgres):
    workers = [subprocess.Popen([PY, "-c", SWEEP_WORKER, postgres, "shared", "6"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-2000:]
    import optuna

    trials = optuna.load_study(study_name="shared", storage=postgres).trials
    assert len(trials) == 12 and sorted(t.number for t in trials) == list(range(12))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.params["x"] for t in trials}) == 12
    subprocess.run([PY, "-c", SWEEP_WORKER, postgres, "shared", "2"], check=True, capture_output=True, timeout=120)
    assert len(optuna.load_study(study_name="shared", storage=postgres).trials) == 14  # resumed, not restarted


@pytest.mark.slow
def test_lab_train_sweep_workers_on_postgres(postgres, prepared_sample, tmp_path):
    """Two real `lab.train -m sweep=lr` workers at once on one study, then a third resumes it."""
    import optuna

    env = dict(os.environ)
    common = ["-m", "sweep=lr", "experiment=demo", "arch=llama_gqa", f"hydra.sweeper.storage={postgres}",
              "hydra.sweeper.study_name=pg-lr", "hydra.sweeper.n_jobs=1", "hydra.sweeper.n_trials=2",
              *tiny_train_overrides(prepared_sample)]
    # each worker as `make sweep-worker` runs it, both at the same moment on an empty database: the sweep's
    # OptunaStorageReady callback creates the tables first, the worker that loses that race retries
    workers = [subprocess.Popen([PY, "-m", "lab.train", *common, f"hydra.sweep.dir={tmp_path / f'w{i}'}"],
                                cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=400)
        assert worker.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="pg-lr", storage=postgres).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert len({t.params["optim.lr"] for t in trials}) == 4
    assert all(t.user_attrs.get("mlflow_run_id") for t in trials)  # lab/cluster/pruning.py found its trial in postgres
    out = lab_train([*common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path / 'w2'}"], env, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(optuna.load_study(study_name="pg-lr", storage=postgres).trials) == 5


def test_a_sweep_with_an_unusable_storage_stops_in_one_line(tmp_path):
    """The sweep's OptunaStorageReady callback runs before any job: a bad URL is the command's one error line
    and exit 1 (Hydra would only warn about a callback's exception and let the sweeper fail with a traceback)."""
    out = lab_train(["-m", "sweep=lr", "experiment=demo", "arch=llama_gqa", "hydra.sweeper.storage=postgresql://x",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"], dict(os.environ), timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: hydra.sweeper.storage='postgresql://x': name the driver: postgresql+psycopg://... "
                      "(psycopg 3 is the one installed)"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "sweep").exists()


# --- MLflow tracking server ---------------------------------------------------------------------------------

@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_BACKEND": f"sqlite:///{tmp_path / 'server.db'}",
           "MLFLOW_ARTIFACTS": str(artifacts), "MLFLOW_WORKERS": "1", "PY": PY}
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(["bash", str(PROJECT_ROOT / "scripts" / "mlflow_server.sh")], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, "mlflow server", 90, 0.5)
        yield url, artifacts
    finally:
        os.killpg(server.pid, 15)  # the server's own process group: its gunicorn/uvicorn workers too
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(10)
        log.close()


def test_mlflow_server_script_refuses_a_bad_port():
    out = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "mlflow_server.sh")],
                         env={**os.environ, "MLFLOW_PORT": "50x0"}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and out.stderr.strip().startswith("error: MLFLOW_PORT=50x0")


@pytest.mark.slow
def test_train_and_compare_through_an_mlflow_server(mlflow_server, prepared_sample, tmp_path):
    url, artifacts = mlflow_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    out = lab_train(["experiment=demo", "arch=llama_gqa", f"hydra.run.dir={tmp_path / 'run'}",
                     *tiny_train_overrides(prepared_sample)], env)
    assert out.returncode == 0, out.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    run, = MlflowClient(url).search_runs([MlflowClient(url).get_experiment_by_name("demo").experiment_id])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(artifacts.rglob("manifest.json")), "artifacts did not reach the server's artifact root"
    compare = subprocess.run([PY, "-m", "lab.compare", "--experiment", "demo", "--tracking-uri", url,
                              "--out", str(tmp_path / "cmp")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=200, env={**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "llama_gqa" in compare.stdout
