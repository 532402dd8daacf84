"""The OmegaConf resolvers of conf/hydra, registered on import (lab/config/compose.py and every command that
composes conf/ import this module): the run folder's time, one for every rank of a torchrun or srun job
(${lab.run_stamp:}), and the one GPU of each local_parallel job (${lab.job_gpu:})."""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime, timedelta
from typing import Mapping

from omegaconf import OmegaConf

from lab import LabError, exit_with

log = logging.getLogger(__name__)

# Other ranks wait this long for rank 0 to name the run folder: on a loaded machine it may start many seconds late.
RANK_ZERO_WAIT_S = 600
AGENT_STORE_CONNECT_S = 30

_agreed_moments: dict[tuple[str, ...], datetime] = {}  # per process: every folder of one job, one moment


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
