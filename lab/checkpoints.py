"""Reading checkpoints safely and choosing the one a run resumes from (`ckpt_path=last` or a path)."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lab import LabError

log = logging.getLogger("lab.checkpoints")


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint read with safe loading (plain data only), or one LabError line saying why not."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "can still be loaded" in str(err):
            raise LabError(f"checkpoint {path} holds Python objects beyond plain data, which the lab does not load; "
                           "it was not written by lab.train, or it was altered") from None
        raise LabError(f"cannot read checkpoint {path}: damaged or truncated (not a torch checkpoint); "
                       "use another checkpoint of the run (checkpoints/*.ckpt)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "damaged or truncated"
        raise LabError(f"cannot read checkpoint {path}: {reason} ({type(err).__name__}); "
                       "use another checkpoint of the run (checkpoints/*.ckpt) or re-export it") from None
    if not isinstance(checkpoint, dict):
        raise LabError(f"{path} is not a lab.train checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint a run resumes from: a named one (must be readable), or for `last` the newest readable
    checkpoint among earlier runs with this run_name (single runs and multiruns); unreadable ones are skipped,
    each named in the log."""
    if not cfg.ckpt_path:
        return None
    if cfg.ckpt_path != "last":
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise LabError(f"ckpt_path={cfg.ckpt_path} does not exist")
        read_checkpoint(path, mmap=True)  # one clear line now rather than Lightning's advice to load unsafely
        return str(path)
    root = Path(cfg.paths.root_dir)
    # every checkpoint counts (step, stage end, guard stop): a run killed before its first step checkpoint
    # may still have a stage checkpoint
    candidates = [*root.glob(f"outputs/{cfg.run_name}/*/checkpoints/*.ckpt"),
                  *root.glob(f"multirun/*/*_{cfg.run_name}/checkpoints/*.ckpt")]
    if not candidates:
        raise LabError(f"ckpt_path=last: no earlier checkpoint for run_name={cfg.run_name} under outputs/ or multirun/")
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            checkpoint = read_checkpoint(path, mmap=True)
        except LabError as err:
            log.warning("skipping a checkpoint that cannot be resumed from: %s", err)
            continue
        if "state_dict" in checkpoint and "loops" in checkpoint:
            return str(path)
        log.warning("skipping %s: not a complete Lightning training checkpoint", path)
    raise LabError(f"ckpt_path=last: none of the {len(candidates)} checkpoint(s) for run_name={cfg.run_name} can be "
                   "read (each is named in the log); start a new run without ckpt_path")
