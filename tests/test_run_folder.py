"""${lab.run_stamp:} (lab/config/resolvers.py), the time in the run folder's name: Hydra's ${now:} for one process, one
value for every rank of a torchrun job (rank 0's, through the agent's store) or of an srun step (its ids). The
launches themselves are in tests/test_distributed.py; here the environments are faked and the store is a real
TCPStore on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime, timedelta

import pytest
from torch.distributed import TCPStore

from lab import LabError
from lab.config import resolvers as launchers
from lab.config.resolvers import run_stamp
from tests.conftest import compose_config

SECONDS = "%Y-%m-%d_%H-%M-%S"
MICROSECONDS = "%Y-%m-%d_%H-%M-%S-%f"
LAUNCH_VARIABLES = ["TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE",
                    "RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_ID",
                    "SLURM_PROCID", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT"]


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """No launcher around the test process, whatever runs the suite (e.g. a CI job inside SLURM)."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def agent_store():
    """What torchrun's agent runs: a TCPStore server the workers join as clients."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield store
    del store


def torchrun_env(store: TCPStore, rank: int, restart: int = 0, run_id: str = "none") -> dict[str, str]:
    return {"TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": "2",
            "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
            "TORCHELASTIC_RESTART_COUNT": str(restart)}


def test_one_process_gets_the_time_now_each_time_like_hydras_now():
    before = datetime.now().replace(microsecond=0)
    stamp = run_stamp(SECONDS)
    assert before <= datetime.strptime(stamp, SECONDS) <= datetime.now()
    # not pinned per process: two sweeps of one process (two commands in one test session) get folders of their own
    first = run_stamp(MICROSECONDS)
    time.sleep(0.01)
    assert run_stamp(MICROSECONDS) != first


def test_torchrun_ranks_started_seconds_apart_agree_on_rank_zeros_time(agent_store):
    """Rank 1 asks first and waits; rank 0 comes 1.2 s later (another second): both name rank 0's moment."""
    stamps: dict[int, str] = {}

    def rank_one() -> None:
        stamps[1] = launchers.rank_zero_moment(torchrun_env(agent_store, 1, run_id="job-a")).strftime(MICROSECONDS)

    waiting = threading.Thread(target=rank_one, daemon=True)
    waiting.start()
    rank_one_started = datetime.now()
    time.sleep(1.2)
    stamps[0] = launchers.rank_zero_moment(torchrun_env(agent_store, 0, run_id="job-a")).strftime(MICROSECONDS)
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert stamps[1] == stamps[0]
    assert datetime.strptime(stamps[0], MICROSECONDS) - rank_one_started >= timedelta(seconds=1.2)


def test_each_rank_keeps_its_moment_and_a_restart_gets_a_new_one(agent_store):
    first = launchers.rank_zero_moment(torchrun_env(agent_store, 0, run_id="job-b"))
    time.sleep(0.01)
    # Hydra resolves the folder on several copies of the config: every call of one attempt gives the same moment
    assert launchers.rank_zero_moment(torchrun_env(agent_store, 0, run_id="job-b")) == first
    restarted = launchers.rank_zero_moment(torchrun_env(agent_store, 0, restart=1, run_id="job-b"))
    assert restarted > first
    assert launchers.rank_zero_moment(torchrun_env(agent_store, 1, restart=1, run_id="job-b")) == restarted


def test_the_resolver_in_the_composed_run_and_sweep_folders(agent_store, monkeypatch):
    for name, value in torchrun_env(agent_store, 0, run_id="job-c").items():
        monkeypatch.setenv(name, value)
    cfg = compose_config("train", ["experiment=demo"], keep_hydra=True)
    moment = launchers.rank_zero_moment(torchrun_env(agent_store, 0, run_id="job-c"))
    assert cfg.hydra.run.dir.endswith(f"/outputs/{cfg.run_name}/{moment.strftime(SECONDS)}")
    assert cfg.hydra.sweep.dir.endswith(f"/multirun/{moment.strftime(MICROSECONDS)}")


def test_one_process_under_torchrun_is_not_a_job_to_agree_on(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "1")  # no store is asked: none is given
    assert datetime.strptime(run_stamp(SECONDS), SECONDS) <= datetime.now()


def test_torchrun_without_the_agents_store_refuses(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    with pytest.raises(LabError, match="cannot agree on a run folder: name it, e.g. hydra.run.dir="):
        run_stamp(SECONDS)


def test_rank_zero_never_naming_the_folder_is_one_line_after_the_wait(agent_store, monkeypatch):
    monkeypatch.setattr(launchers, "RANK_ZERO_WAIT_S", 1)
    with pytest.raises(LabError, match="rank 1: cannot agree on the run folder .* did rank 0 fail to start"):
        launchers.rank_zero_moment(torchrun_env(agent_store, 1, run_id="job-without-rank-0"))


@pytest.mark.parametrize("port", ["closed", "notaport"])
def test_a_store_that_is_not_there_is_one_line_at_once(port, capfd):
    """No agent at MASTER_ADDR:MASTER_PORT (a worker started by hand with torchrun's variables): refused at once,
    with no C++ stack from torch's store client on the console."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env = {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": "2", "RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(closed) if port == "closed" else port}
    started = time.monotonic()
    with pytest.raises(LabError, match="rank 1: cannot agree on the run folder through torchrun's store"):
        launchers.rank_zero_moment(env)
    assert time.monotonic() - started < 10
    assert "frame #" not in capfd.readouterr().err


def test_srun_tasks_are_named_by_their_job_and_step(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    names = set()
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_PROCID", task)
        names.add(run_stamp(SECONDS))
    assert names == {"slurm-4242.0"}
    monkeypatch.setenv("SLURM_STEP_ID", "1")  # the next srun of the allocation: another folder
    assert run_stamp(SECONDS) == "slurm-4242.1"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued: another folder again
    assert run_stamp(SECONDS) == "slurm-4242.1-r2"


def test_single_task_and_interactive_slurm_keep_the_time(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert datetime.strptime(run_stamp(SECONDS), SECONDS) <= datetime.now()
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's SLURMEnvironment ignores such a job too
    assert datetime.strptime(run_stamp(SECONDS), SECONDS) <= datetime.now()
