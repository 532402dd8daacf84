"""lab.study's steps, each skipped when its output exists for the same inputs: prepare, the experiment's multirun,
quantize and evaluate every finished run, the report (lab/study/report.py). The command: lab/study/__main__.py."""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from lab import LabError, PROJECT_ROOT, USER_ERROR_EXIT, error_line, log_to_files

from lab.study.plan import (EVAL_TAG, Job, Outcome, Plan, as_list, data_sha256, decide_job, describe,
                            eval_fingerprint, make_plan, train_command)
from lab.evaluation.settings import EvaluateSettings
from lab.quantization.settings import QuantizeSettings
from lab.data.datamodule import prepare_command
from lab.runs.tracking import tracking_uri
from lab.training.resume import changed_settings
from lab.config.compose import settings_for
from lab.models.loading import default_output_dir, read_index, resolve_device, resolve_source
from lab.models.quant_formats import VARIANTS, supported_variants
from lab.quantization.quantizer import made_with, quantize
from lab.evaluation.suite import evaluate
from lab.study.report import write_report

log = logging.getLogger("lab.study")  # the command's name: its console lines keep their prefix


def lock_report_dir(path: Path) -> Iterator[None]:
    """One study at a time writes a report folder: a second one stops with one line."""
    import contextlib

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        path.mkdir(parents=True, exist_ok=True)
        lock = path / ".study.lock"
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise LabError(f"another lab.study ({owner}) is writing {path}; wait for it to finish, or give this "
                               "one its own folder with study.report_dir=<folder>") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return held()


def run_prepare(plan: Plan) -> None:

    if plan.prepare[0] == "reuse":
        return
    command = shlex.split(prepare_command(_without_hydra(plan.cfg)))
    log.info("preparing the data: %s", shlex.join(command))
    if subprocess.run([sys.executable, *command[1:]], cwd=PROJECT_ROOT).returncode != 0:
        raise LabError(f"lab.prepare failed (its lines above say why); run it alone: {shlex.join(command)}")


def _without_hydra(cfg: DictConfig) -> DictConfig:
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    copy.pop("hydra", None)
    return copy


def run_training(plan: Plan) -> int:
    """The experiment's multirun, every job reusing or resuming what exists; its exit code (failed jobs: non-zero)."""
    if all(job.action == "reuse" for job in plan.jobs):
        return 0
    command = train_command(plan)
    log.info("training: %s", shlex.join(["python", *command[1:]]))
    return subprocess.run(command, cwd=PROJECT_ROOT).returncode


def finished_runs(plan: Plan) -> None:
    """After training: each job's finished run (None where its training failed)."""

    uri = tracking_uri(plan.cfg.logger.tracking_uri)
    data_hash = data_sha256(Path(str(plan.cfg.data.prepared_dir)))
    for job in plan.jobs:
        job.run = decide_job(plan.experiment, job.overrides, data_hash, uri).run
        if job.run is not None:
            end_abandoned_attempts(job.run, uri)


def end_abandoned_attempts(finished: Any, uri: str) -> None:
    """An attempt killed before its first checkpoint stays RUNNING in MLflow (kill -9 ends nothing) and was
    trained again from the start: once the same settings have a finished run, mark it KILLED, so the experiment
    holds one finished run per job and no run that looks alive. The report folder's lock keeps other studies out."""
    from mlflow.tracking import MlflowClient


    client = MlflowClient(uri)
    name = finished.info.run_name.replace("'", "\\'")
    for run in client.search_runs([finished.info.experiment_id], max_results=100,
                                  filter_string=f"attributes.run_name = '{name}' and attributes.status = 'RUNNING'"):
        same = not changed_settings(run.data.params, finished.data.params)  # flat params flatten to themselves
        if run.info.run_id != finished.info.run_id and same:
            client.set_terminated(run.info.run_id, "KILLED")
            log.info("marked MLflow run %s KILLED: an interrupted attempt at %s, trained again as %s",
                     run.info.run_id, run.info.run_name, finished.info.run_id)


def quantize_run(plan: Plan, job: Job, outcome: Outcome) -> list[str]:
    """Quantize one run's export (unless done); returns the variants there are to evaluate."""

    hf = Path(job.run.data.tags.get("run_dir", "")) / "hf"
    source = resolve_source(hf)  # a missing or damaged export is one LabError line
    device = resolve_device(str(plan.cfg.study.device))
    asked = [str(v) for v in as_list(plan.cfg.study.variants)]
    wanted = supported_variants(device) if asked in ([], ["auto"]) else asked
    for name in list(wanted):
        reason = VARIANTS[name].unsupported_reason(device) if name in VARIANTS else "not a lab.quantize variant"
        if reason:
            outcome.skipped_variants[name] = reason
            wanted.remove(name)
    try:
        index = read_index(default_output_dir(source)) or {}
    except (OSError, ValueError):
        index = {}  # a quantize.json cut short by a kill: quantize again
    overrides = [f"model_path={hf}", f"variants=[{','.join(wanted)}]", f"device={device.type}",
                 *[str(o) for o in plan.cfg.study.quantize]]
    settings = settings_for(QuantizeSettings, overrides)
    if all(made_with(index, source, name, settings.variant_options[name]) for name in wanted):
        outcome.quantize = "reused"
        return wanted
    quantize(settings)
    outcome.quantize = "done"
    return wanted


def evaluate_run(plan: Plan, job: Job, variants: list[str], outcome: Outcome) -> None:
    from mlflow.tracking import MlflowClient


    fingerprint = eval_fingerprint(plan.cfg.study, variants)
    client = MlflowClient(tracking_uri(plan.cfg.logger.tracking_uri))
    done = client.search_runs([job.run.info.experiment_id], max_results=100, filter_string=(
        f"tags.eval_of = '{job.run.info.run_id}' and tags.{EVAL_TAG} = '{fingerprint}' and attributes.status = 'FINISHED'"))
    if set(variants) <= {run.data.tags.get("variant") for run in done} and done:
        outcome.evaluate = "reused"
        return
    hf = Path(job.run.data.tags["run_dir"]) / "hf"
    out = plan.report_dir / "eval" / job.run_name
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"model_path={hf}", "variants=auto", f"+mlflow.tags.{EVAL_TAG}={fingerprint}", f"output_dir={out}",
                 *[str(o) for o in plan.cfg.study.evaluate]]
    evaluate(settings_for(EvaluateSettings, overrides))
    outcome.evaluate = "done"


def after_training(plan: Plan) -> list[Outcome]:
    """Quantize and evaluate every finished run; a run that fails is recorded and the others go on."""
    outcomes = []
    for job in plan.jobs:
        outcome = Outcome(job.run_name, job.run)
        outcomes.append(outcome)
        if job.run is None:
            outcome.quantize = outcome.evaluate = "skipped: training did not finish"
            continue
        try:
            variants = quantize_run(plan, job, outcome)
        except Exception as err:  # noqa: BLE001 - one run's damaged export must not stop the others
            outcome.quantize, outcome.evaluate = f"failed: {step_failure(job, 'quantize', err)}", "skipped"
            continue
        try:
            evaluate_run(plan, job, variants, outcome)
        except Exception as err:  # noqa: BLE001 - as above
            outcome.evaluate = f"failed: {step_failure(job, 'evaluate', err)}"
    return outcomes


def step_failure(job: Job, step: str, err: Exception) -> str:
    """One line for the console and the report; an unexpected error's traceback goes to the log file only."""

    line = error_line(err)
    log.error("%s: %s failed: %s", job.run_name, step, line)
    if not isinstance(err, LabError):
        log_to_files(log, logging.ERROR, f"traceback of the {step} failure above", exc_info=err)
    return line


def run_study(experiment: str, overrides: Sequence[str], dry_run: bool = False) -> int:
    plan = make_plan(experiment, overrides)
    print(describe(plan), flush=True)
    if dry_run:
        return 0
    with lock_report_dir(plan.report_dir):
        run_prepare(plan)
        if plan.prepare[0] == "run":  # now the data exists: decide again (the data hash names the runs)
            plan = make_plan(experiment, overrides)
        train_code = run_training(plan)
        finished_runs(plan)
        outcomes = after_training(plan)

        report = write_report(plan, outcomes, train_code)
    print(f"report: {report}")
    failed = [o.run_name for o in outcomes if o.run is None or o.quantize.startswith("failed")
              or o.evaluate.startswith("failed")]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} runs did not finish every step ({', '.join(failed)}); "
              f"the report lists why; run the same command again to retry them", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0
