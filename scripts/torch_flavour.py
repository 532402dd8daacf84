#!/usr/bin/env python3
"""Which torch build `make setup` installs here: cpu (requirements-cpu.lock) or cuda (requirements-cuda.lock).

Standard library only: it runs before any virtual environment exists. Prints ONE line on standard output,
`torch=<flavour>: <why>`, which the Makefile reads; bad input is one `error:` line on standard error and exit 1.

    TORCH=cpu|cuda      the user's choice (make setup TORCH=cuda); anything else is an error
    otherwise           cuda where `nvidia-smi -L` runs successfully (found on PATH) or <root>/proc/driver/nvidia
                        exists (a loaded NVIDIA driver), else cpu
    --root DIR          where /proc is looked for (tests pass a fake tree; default /)
    --need-gpu          for `make setup-gpu`: a machine with no NVIDIA driver, or TORCH=cpu, is an error
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

FLAVOURS = ("cpu", "cuda")
# The locks are compiled for this platform only (scripts/lock.sh: --python-platform x86_64-manylinux_2_28).
LOCKED_PLATFORM = ("Linux", "x86_64")


class ProbeError(Exception):
    pass


def nvidia_smi_says() -> tuple[bool, str]:
    """(ran successfully, what it said or why not)."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return False, "no nvidia-smi on PATH"
    try:
        done = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as failure:
        return False, f"nvidia-smi did not run ({failure.__class__.__name__})"
    if done.returncode != 0:
        return False, f"nvidia-smi -L failed with exit status {done.returncode}"
    gpus = [line for line in done.stdout.splitlines() if line.strip()]
    return True, f"nvidia-smi lists {len(gpus)} GPU(s)" + (f", {gpus[0].split(' (UUID')[0]}" if gpus else "")


def detect(root: Path) -> tuple[str, str]:
    """(flavour, reason) from the machine itself."""
    smi_ran, smi_reason = nvidia_smi_says()
    if smi_ran:
        return "cuda", smi_reason
    driver = root / "proc" / "driver" / "nvidia"
    if driver.exists():
        return "cuda", f"{driver} exists (an NVIDIA driver is loaded; {smi_reason})"
    return "cpu", f"no NVIDIA GPU found ({smi_reason}; no {driver})"


def choose(environ: dict[str, str], root: Path, need_gpu: bool, system: str, machine: str) -> tuple[str, str]:
    chosen = environ.get("TORCH", "").strip()
    if chosen and chosen not in FLAVOURS:
        raise ProbeError(f"TORCH={chosen!r} is not a torch flavour: use TORCH=cpu or TORCH=cuda, "
                         "or leave TORCH unset to detect the GPU")
    if (system, machine) != LOCKED_PLATFORM:
        raise ProbeError(f"the locks are for Linux x86-64 and this is {system} {machine}: install with "
                         "`pip install -c constraints.txt '.[cluster,eval,test]'` instead (README, Set-up)")
    if need_gpu:
        if chosen == "cpu":
            raise ProbeError("make setup-gpu builds CUDA kernels, and TORCH=cpu asks for the CPU build of torch")
        flavour, reason = detect(root)
        if flavour != "cuda":
            raise ProbeError(f"make setup-gpu needs an NVIDIA GPU with its driver: {reason}; "
                             "a CPU machine needs only `make setup`")
        return flavour, reason
    if chosen:
        return chosen, f"TORCH={chosen} was given"
    return detect(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("LAB_PROBE_ROOT", "/")),
                        help="where /proc/driver/nvidia is looked for (default /)")
    parser.add_argument("--need-gpu", action="store_true", help="fail unless an NVIDIA GPU is present")
    args = parser.parse_args(argv)
    try:
        flavour, reason = choose(dict(os.environ), args.root, args.need_gpu, platform.system(), platform.machine())
    except ProbeError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"torch={flavour}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
