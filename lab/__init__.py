"""lab: pretrain and compare small language models under one Hydra + Lightning setup."""

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

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
# What the user's config `_target_`s may instantiate (Hydra 1.4 asks call sites for an execution whitelist):
# the Trainer of conf/trainer and the pruning callback of conf/callbacks. Arch configs are built without
# instantiate (lab/models/build.py), and nothing read from a checkpoint or model folder is ever instantiated.
TRUSTED_TARGETS = ["lightning.pytorch.*", "lab.cluster.pruning.OptunaPruning"]


# The exit status of every lab command that stops on an error it has explained.
USER_ERROR_EXIT = 1


class LabError(Exception):
    """An error the user can fix (bad path, bad override); entry points print it without a traceback."""


def run_or_exit(job: Callable[[Any], Any], cfg: Any, log: logging.Logger) -> Any:
    """Run an entry point's job; any failure becomes one clear line and exit status 1 (see exit_with)."""
    try:
        return job(cfg)
    except Exception as err:  # noqa: BLE001 - the one exit path of every command
        exit_with(err, log)


_ASK_FOR_TRACEBACK = "set LAB_DEBUG=1 or HYDRA_FULL_ERROR=1 for the traceback"


def debug_requested() -> bool:
    return os.environ.get("LAB_DEBUG", "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


def error_line(err: BaseException) -> str:
    """One line for the console: the LabError's own message, the path and cause of an OS error, else the type."""
    if isinstance(err, LabError):
        return str(err)
    if isinstance(err, OSError) and (err.strerror or err.filename):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err} (the operating system refused; check the path, its permissions and free space)"
    text = (str(err).strip().splitlines() or [""])[0][:300]
    return f"unexpected {type(err).__name__}: {text}"


def report_error(err: BaseException, log: logging.Logger) -> int:
    """The one way the lab's commands fail: `error: <one line>` on stderr, exit status 1 (returned).

    The traceback goes to the run's log file; on the console only when LAB_DEBUG=1 or HYDRA_FULL_ERROR=1 asks.
    """
    line = error_line(err)
    expected = isinstance(err, LabError)
    log_to_files(log, logging.ERROR, line, exc_info=None if expected else err)
    if debug_requested():
        traceback.print_exception(err)
    elif not expected:
        files = [h.baseFilename for h in log.handlers + logging.getLogger().handlers
                 if isinstance(h, logging.FileHandler) and h.baseFilename != os.devnull]
        line += f" (details in {files[0]}; {_ASK_FOR_TRACEBACK})" if files else f" ({_ASK_FOR_TRACEBACK})"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


def exit_with(err: BaseException, log: logging.Logger) -> NoReturn:
    sys.exit(report_error(err, log))


def report_sweep_failure(exc_type: type[BaseException], err: BaseException, tb: Any) -> None:
    """sys.excepthook of a multirun whose job failed (see report_job_failure): Hydra re-raises the first failure
    after the sweep and hands it to a custom excepthook instead of printing its traceback. One line; the
    traceback is already in the failed job's log (on the console too with LAB_DEBUG=1 or HYDRA_FULL_ERROR=1)."""
    if debug_requested():
        traceback.print_exception(exc_type, err, tb)
    where = "" if isinstance(err, LabError) else f" (details in the failed job's log; {_ASK_FOR_TRACEBACK})"
    print(f"error: {error_line(err)}{where}", file=sys.stderr, flush=True)


def report_job_failure(err: BaseException, log: logging.Logger) -> None:
    """A job of a multirun failed: one line on the console and in the job's log (the traceback of an unexpected
    error in the log only). The caller re-raises so that the sweeper records the failure (an Optuna trial FAIL,
    the basic sweeper's exit status 1), and the sweep's last word is one line (report_sweep_failure)."""
    log.error("%s", error_line(err))
    if not isinstance(err, LabError):
        log_to_files(log, logging.ERROR, "traceback of the error above", exc_info=err)
    sys.excepthook = report_sweep_failure


def log_to_files(log: logging.Logger, level: int, message: str, exc_info: BaseException | None = None) -> None:
    """Record `message` in the run's log files only (Hydra's job log): the console gets it once,
    from the exit message, instead of twice."""
    info = (type(exc_info), exc_info, exc_info.__traceback__) if exc_info is not None else None
    record = log.makeRecord(log.name, level, "(lab)", 0, message, None, info)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
