"""What the Hydra launchers need from the lab: the OmegaConf resolvers of conf/hydra (the run folder's time, one
for every rank of a torchrun or srun job; one GPU per local_parallel job), registered on import (lab/prepare.py,
lab/compose.py and lab/tracking.py import this module, so every command composing conf/ has them), the callback that lets
submitit pickle the task, and the setup of a shared Optuna database for sweep workers, run by every sweep before
it starts (OptunaStorageReady) and as a command (lab/launch.py)."""

from __future__ import annotations

import importlib
import logging
import os
import random
import socket
import sys
import time
import types
from datetime import datetime, timedelta
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lab import LabError, exit_with

log = logging.getLogger(__name__)


def job_gpu(job_num: int | str, gpu_count: int | str) -> str:
    """The one GPU (CUDA_VISIBLE_DEVICES) of local multirun job `job_num`: round robin over `gpu_count`."""
    try:
        count, num = int(gpu_count), int(job_num)
    except (TypeError, ValueError):
        raise LabError(f"GPUS={gpu_count!r}: expected the number of GPUs of this machine (e.g. GPUS=8)") from None
    if count < 1 or num < 0:
        raise LabError(f"GPUS={gpu_count!r}: expected a positive number of GPUs (e.g. GPUS=8)")
    return str(num % count)


if not OmegaConf.has_resolver("lab.job_gpu"):
    OmegaConf.register_resolver("lab.job_gpu", job_gpu, annotation_validation="off")


# Other ranks wait this long for rank 0 to name the run folder: on a loaded machine it may start many seconds late.
RANK_ZERO_WAIT_S = 600
AGENT_STORE_CONNECT_S = 30

_agreed_moments: dict[tuple[str, ...], datetime] = {}  # per process: every folder of one job, one moment


def run_stamp(pattern: str) -> str:
    """${lab.run_stamp:<strftime pattern>}: the last part of the run (or sweep) folder's name, the same in every
    rank of a job, so that all of them write (checkpoints, the export) into one folder.

    One process: the time now, exactly as Hydra's ${now:} gives it. torchrun with several ranks: rank 0's time,
    shared through the store torchrun's agent runs (ranks that start in different seconds would otherwise name
    different folders). srun with several tasks and no torchrun (Lightning's SLURMEnvironment): no store exists
    before the process group, so the name is the job's and step's ids. Where the ranks cannot agree: LabError.
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and _count(env, "WORLD_SIZE") > 1:
        return rank_zero_moment(env).strftime(pattern)
    if _slurm_task_count(env) > 1:
        return slurm_step_name(env)
    return datetime.now().strftime(pattern)


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env.get(name, "1"))
    except ValueError:
        raise LabError(f"{name}={env[name]!r}: expected a number of processes") from None


def _slurm_task_count(env: Mapping[str, str]) -> int:
    if "SLURM_NTASKS" not in env:  # (checked first: most runs are not under SLURM and skip importing Lightning)
        return 1
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return _count(env, "SLURM_NTASKS") if SLURMEnvironment.detect() else 1


def rank_zero_moment(env: Mapping[str, str]) -> datetime:
    """The moment rank 0 of this torchrun job (this restart of it) started naming its folders; rank 0 picks it, the
    other ranks read it from the agent's store (a TCPStore at MASTER_ADDR:MASTER_PORT that outlives the workers)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        raise LabError("torchrun's agent shares no store with its workers here (TORCHELASTIC_USE_AGENT_STORE is not "
                       "True), so the ranks cannot agree on a run folder: name it, e.g. hydra.run.dir=outputs/<name>")
    from torch.distributed import TCPStore

    host, port, rank = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", ""), env.get("RANK", "")
    # one key per restart: a restarted job (torchrun --max-restarts) gets a folder of its own
    key = f"lab/run_stamp/{env['TORCHELASTIC_RUN_ID']}/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    cache_key = (host, port, rank, key)
    if cache_key in _agreed_moments:
        return _agreed_moments[cache_key]
    try:
        # The agent's store is up before any worker starts: one that does not answer soon is not there. Asked
        # first with a plain socket, as torch's own client prints a C++ stack on the console when it cannot connect.
        socket.create_connection((host, int(port)), timeout=AGENT_STORE_CONNECT_S).close()
        store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=AGENT_STORE_CONNECT_S))
        store.set_timeout(timedelta(seconds=RANK_ZERO_WAIT_S))
        if rank == "0":
            moment = datetime.now()
            store.set(key, moment.isoformat())
        else:
            moment = datetime.fromisoformat(store.get(key).decode())
    except (OSError, RuntimeError, ValueError) as err:  # torch's DistStoreError (timeout, refused) is a RuntimeError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise LabError(f"rank {rank}: cannot agree on the run folder through torchrun's store at {host}:{port} "
                       f"({reason}); did rank 0 fail to start?") from None
    _agreed_moments[cache_key] = moment
    return moment


def slurm_step_name(env: Mapping[str, str]) -> str:
    """slurm-<job id>.<step id>[-r<requeues>]: the same in every task of an srun step, and another name for the
    next step of the allocation, another job, or the job requeued."""
    job, step = env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID", "batch")
    if not job:
        raise LabError(f"{_count(env, 'SLURM_NTASKS')} SLURM tasks without SLURM_JOB_ID: the tasks cannot agree on "
                       "a run folder; name it, e.g. hydra.run.dir=outputs/<name>")
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    return f"slurm-{job}.{step}" + (f"-r{restarts}" if restarts not in ("", "0") else "")


def _run_stamp_or_exit(pattern: str) -> str:
    # Hydra resolves the run folder before the task runs: a refusal here must still be the lab's one error line
    try:
        return run_stamp(pattern)
    except LabError as err:
        exit_with(err, log)


if not OmegaConf.has_resolver("lab.run_stamp"):
    # cached like ${now:}: a multirun's jobs (their configs take the sweep's resolver cache) share the sweep folder
    OmegaConf.register_resolver("lab.run_stamp", _run_stamp_or_exit, use_cache=True, annotation_validation="off")


_TASK_PREFIX = "hydra_task__"


class ImportableTask(Callback):
    """Lets submitit's launchers pickle the task of `python -m lab.train -m ...` by reference.

    The task function lives in `__main__` there, so cloudpickle would copy it by value with everything it
    reaches, and fails on torch's module objects (`cannot pickle 'CudnnModule'`). Before the sweep, the task is
    renamed to an attribute of this module that names its real module (`hydra_task__lab__train__main`); the job
    process resolves that name by importing lab.train (module __getattr__ below). Only lab.* modules qualify.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        main_module = sys.modules.get("__main__")
        spec = getattr(main_module, "__spec__", None)
        if spec is None or not spec.name.startswith("lab."):
            return
        for value in list(vars(main_module).values()):
            task = getattr(value, "__wrapped__", None)  # hydra.main's wrapper keeps the task here
            if isinstance(task, types.FunctionType) and task.__module__ == "__main__":
                name = _TASK_PREFIX + "__".join([*spec.name.split("."), task.__name__])
                task.__module__, task.__qualname__ = __name__, name
                globals()[name] = task


def __getattr__(name: str) -> Any:
    """`hydra_task__lab__train__main` -> the undecorated task function `main` of lab.train (see ImportableTask)."""
    if name.startswith(_TASK_PREFIX):
        *module_parts, function = name.removeprefix(_TASK_PREFIX).split("__")
        if module_parts and module_parts[0] == "lab" and all(part.isidentifier() for part in module_parts):
            task = getattr(importlib.import_module(".".join(module_parts)), function, None)
            task = getattr(task, "__wrapped__", None)
            if isinstance(task, types.FunctionType):
                task.__module__, task.__qualname__ = __name__, name
                globals()[name] = task
                return task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OptunaStorageReady(Callback):
    """Creates the Optuna sweeper's tables before its sweep starts (conf/sweep/lr.yaml `hydra.callbacks`).

    The sweeper creates them itself on first use, but two workers started at the same moment on an empty shared
    database race to do so and one dies; here the loser retries (init_storage), so bare `lab.train -m sweep=lr`
    workers can start together on any host."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if not (isinstance(storage, str) and storage):  # null: Optuna's in-memory storage, nothing to create
            return
        try:
            init_storage(storage, setting="hydra.sweeper.storage")
        except Exception as err:  # noqa: BLE001 - Hydra turns a callback's exception into a warning and goes on
            exit_with(err, log)


def init_storage(url: str, setting: str, attempts: int = 5) -> None:
    """Create Optuna's tables in a fresh database. Workers that start at once on an empty PostgreSQL race to
    create them (one gets a unique-violation on its CREATE TYPE); the loser retries and finds them made."""
    import optuna
    import sqlalchemy.exc

    if not url.startswith(("postgresql", "mysql", "sqlite:")):
        raise LabError(f"{setting}={url!r}: expected a database URL such as postgresql+psycopg://user@host:5432/db")
    if url.startswith("postgresql://"):
        raise LabError(f"{setting}={url!r}: name the driver: postgresql+psycopg://... (psycopg 3 is the one installed)")
    for attempt in range(1, attempts + 1):
        try:
            optuna.storages.RDBStorage(url)
            return
        except sqlalchemy.exc.ArgumentError as err:
            raise LabError(f"{setting}={url!r}: not a database URL ({err})") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts:
                raise
            time.sleep(0.2 + random.random())  # another worker is creating the tables: let it finish
        except sqlalchemy.exc.OperationalError as err:
            reason = str(err.orig).strip().splitlines()[0] if err.orig else "cannot connect"
            raise LabError(f"{setting}={url!r}: cannot reach the database ({reason}); is the server up?") from None
