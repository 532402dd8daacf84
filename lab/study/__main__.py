"""The whole study in one resumable command: prepare -> train every job -> quantize and evaluate every run ->
compare -> report.

    python -m lab.study experiment=arch_bakeoff_tiny [hydra/launcher=local_parallel] [<overrides>] [--dry-run]
    make study EXPERIMENT=arch_bakeoff_tiny

Every step is skipped when its output exists for the same inputs, so a study killed anywhere finishes when the
same command runs again, without redoing finished work:

- prepare: reused when the prepared folder has its manifest (lab.train verifies it before training);
- training: the experiment's multirun runs through whichever Hydra launcher is configured, every job with
  `reuse_finished=true ckpt_path=auto` (lab/training/resume.py): a finished MLflow run with the same settings and data is
  reused, an unfinished one resumes from its last checkpoint;
- quantize: reused when the run's quantize.json lists every variant asked for, made with the same options;
- evaluate: reused when the run has finished evaluation runs tagged with the same evaluation settings;
- compare + report: rewritten each time from MLflow (lab/study/report.py).

`--dry-run` prints that plan (which steps run, which are reused, and why) and changes nothing. The study's own
settings are the `study` node (conf/study/default.yaml), which experiments override.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Sequence

from lab import PROJECT_ROOT, USER_ERROR_EXIT, report_error
from lab.study.steps import run_study

log = logging.getLogger("lab.study")

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="experiment=<name> and any lab.train overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (what runs, what is reused, why)")
    args = parser.parse_args(argv)
    experiment = [o.split("=", 1)[1] for o in args.overrides if o.startswith("experiment=")]
    if len(experiment) != 1 or not experiment[0]:
        print("error: give exactly one experiment=<name> (a file of conf/experiment/), e.g. "
              "python -m lab.study experiment=arch_bakeoff_tiny", file=sys.stderr)
        return USER_ERROR_EXIT
    overrides = [o for o in args.overrides if not o.startswith("experiment=")]
    log_file = start_log()
    try:
        return run_study(experiment[0], overrides, args.dry_run)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to go on from here", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one exit path: one line here, the traceback in the log file
        code = report_error(err, log)
        print(f"(log: {log_file})", file=sys.stderr)
        return code


def start_log() -> Path:
    """INFO to the console, everything (tracebacks included) to outputs/study/<time>.log."""
    folder = PROJECT_ROOT / "outputs" / "study"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dt.datetime.now():%Y-%m-%d_%H-%M-%S-%f}.log"
    form = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    console, to_file = logging.StreamHandler(), logging.FileHandler(path)
    console.setLevel(logging.INFO)
    for handler in (console, to_file):
        handler.setFormatter(form)
        logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return path


if __name__ == "__main__":
    sys.exit(main())
