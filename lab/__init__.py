"""lab: pretrain and compare small language models under one Hydra + Lightning setup."""

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

# torchao (imported by transformers) reports its CUDA-only extensions missing on CPU machines, and
# torch warns about its enum registrations: noise on every command, not a problem to act on.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _find_project_root() -> Path:
    # The checkout holding pyproject.toml; configs resolve every path from it, whatever the cwd.
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "conf").is_dir():
            return folder
    return Path.cwd()


import omegaconf  # noqa: E402  (after the logging set-up above)
from omegaconf import OmegaConf  # noqa: E402

# OmegaConf 2.4 renamed register_new_resolver to register_resolver (the old name warns at every
# import, in every worker process); before 2.4, register_resolver is the legacy string-only API.
_OMEGACONF_2_4 = tuple(int(p) for p in omegaconf.__version__.split(".")[:2]) >= (2, 4)
_register_resolver = OmegaConf.register_resolver if _OMEGACONF_2_4 else OmegaConf.register_new_resolver
# ${lab.basename:/data/ro} -> "ro": names the prepared data after the corpus folder it came from.
_register_resolver("lab.basename", lambda path: Path(str(path)).name, replace=True)

PROJECT_ROOT = Path(os.environ.setdefault("PROJECT_ROOT", str(_find_project_root())))
CONF_DIR = PROJECT_ROOT / "conf"
# What config `_target_`s may instantiate (Hydra 1.4 asks call sites for an execution whitelist).
TRUSTED_TARGETS = ["transformers.*", "lightning.pytorch.*", "lab.*", "torch.*"]


class LabError(Exception):
    """An error the user can fix (bad path, bad override); entry points print it without a traceback."""


def run_or_exit(job: Callable[[Any], Any], cfg: Any, log: logging.Logger) -> Any:
    """Run an entry point's job; a LabError becomes one clear line and exit status 1, no traceback."""
    try:
        return job(cfg)
    except LabError as err:
        log_to_files(log, logging.ERROR, str(err))
        sys.exit(f"error: {err}")


def log_to_files(log: logging.Logger, level: int, message: str) -> None:
    """Record `message` in the run's log files only (Hydra's job log): the console gets it once,
    from the exit message, instead of twice."""
    record = log.makeRecord(log.name, level, "(lab)", 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
