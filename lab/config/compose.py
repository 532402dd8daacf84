"""Composing conf/ outside `@hydra.main`, as Hydra would: for lab.study's plan and steps, lab.bench_eval and the
tests; `settings_for` composes a command's config and parses it into that command's settings class."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lab import CONF_DIR, LabError
from lab.config import resolvers as _resolvers  # noqa: F401 - registers conf/hydra's resolvers, as the commands do

S = TypeVar("S")


def compose_config(config_name: str, overrides: list[str], run_dir: Path | None = None,
                   keep_hydra: bool = False) -> DictConfig:
    """conf/<config_name>.yaml with `overrides`, `${hydra:...}` resolvable (HydraConfig is set), the hydra node
    removed as under @hydra.main unless `keep_hydra`."""
    GlobalHydra.instance().clear()
    run_dir_override = [f"hydra.run.dir={run_dir}"] if run_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose(config_name, overrides=[*overrides, *run_dir_override], return_hydra_config=True)
    if run_dir is not None:
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    if not keep_hydra:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    return cfg


def settings_for(kind: type[S], overrides: list[str] | tuple[str, ...] = (), **values: Any) -> S:
    """conf/<kind.config_name>.yaml composed with Hydra `overrides`, then `values` merged on top (nested mappings
    merge; a key the YAML does not have is refused), parsed by `kind.from_config`. Inside a running Hydra job
    (lab.bench_eval) the job's own HydraConfig is put back afterwards."""
    command = kind.config_name
    job = HydraConfig.instance().cfg
    try:
        try:
            cfg = compose_config(command, list(overrides))
        except Exception as err:  # noqa: BLE001 - Hydra's own message names the bad override
            raise LabError(f"cannot compose conf/{command}.yaml with {list(overrides)}: "
                           f"{str(err).strip().splitlines()[0]}") from None
        if values:
            try:
                cfg = OmegaConf.merge(cfg, values)
            except Exception as err:  # noqa: BLE001 - omegaconf's key/validation errors, as one line
                raise LabError(f"{command} settings {sorted(values)}: {str(err).splitlines()[0]}") from None
        return kind.from_config(cfg)
    finally:
        if job is not None:
            HydraConfig.instance().cfg = job
