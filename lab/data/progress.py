"""Progress and timing of the prepare steps: a tqdm bar on a terminal, a log line a minute elsewhere, and the
wall + CPU clock behind each step's timing (lab.bench_data reads them).

Sizes here are binary (lab.config.units.MiB, GiB), the unit prepare's `*_mb` settings count.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

from tqdm import tqdm

from lab.config.units import GiB, MiB

log = logging.getLogger(__name__)


def cpu_clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and every worker it has reaped)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def format_size(nbytes: float) -> str:
    """A byte count in GiB from one GiB up, else in MiB."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.1f} MiB"


def progress_bar(desc: str, total: float | None, unit: str = "B", *, enabled: bool,
                 logger: logging.Logger = log) -> Any:
    """A tqdm bar on a terminal; elsewhere (nohup, a job log) a progress line in `logger` each minute."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(desc, total, unit, logger=logger)
    # tqdm scales by 1000 and says "MB": decimal, so its label is right
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1000, mininterval=0.5,
                dynamic_ncols=True, disable=None if enabled else True, leave=False)


class LogProgress:
    """tqdm's `update` interface, reporting to the log every `every` seconds instead of drawing a bar."""

    def __init__(self, desc: str, total: float | None, unit: str = "B", every: float = 60.0,
                 logger: logging.Logger = log):
        self.desc, self.total, self.unit, self.every, self.log = desc, total, unit, every, logger
        self.n = 0.0
        self.start = self.last = time.monotonic()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        if self.unit != "B":
            done = f"{self.n:,.0f}" + (f" of {self.total:,.0f}" if self.total else "") + f" {self.unit}s"
            return f"{self.desc}: {done}, {elapsed / 60:.1f} min so far"
        text = f"{self.desc}: {format_size(self.n)}"
        if self.total:
            text += f" of {format_size(self.total)} ({100 * self.n / self.total:.0f}%)"
        text += f", {self.n / MiB / elapsed:.1f} MiB/s"
        if self.total and self.n:
            text += f", about {(self.total - self.n) / (self.n / elapsed) / 60:.0f} min left"
        return text
