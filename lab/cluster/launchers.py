"""What the Hydra launchers need from the lab: the callback that lets submitit pickle the task, and the setup of
a shared Optuna database for sweep workers, run by every sweep before it starts (OptunaStorageReady) and as a
command (lab/launch.py). The resolvers of conf/hydra: lab/config/resolvers.py."""

from __future__ import annotations

import importlib
import logging
import random
import sys
import time
import types
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lab import LabError, exit_with

log = logging.getLogger(__name__)


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
