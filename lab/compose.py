"""Composing conf/ outside `@hydra.main`, as Hydra would: for lab.study's plan and the tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from lab import CONF_DIR
from lab import launchers as _launchers  # noqa: F401 - registers conf/hydra's resolvers, as the commands do


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
