"""Reading checkpoints safely (plain data only); which one a run resumes from is decided in lab/training/resume.py."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from lab import LabError

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
