"""The whole study in one resumable command: prepare -> train every job -> quantize and evaluate every run ->
compare -> report.

    python -m lab.study experiment=arch_bakeoff_tiny [hydra/launcher=local_parallel] [<overrides>] [--dry-run]
    make study EXPERIMENT=arch_bakeoff_tiny

Every step is skipped when its output exists for the same inputs, so a study killed anywhere finishes when the
same command runs again, without redoing finished work:

- prepare: reused when the prepared folder has its manifest (lab.train verifies it before training);
- training: the experiment's multirun runs through whichever Hydra launcher is configured, every job with
  `reuse_finished=true ckpt_path=auto` (lab/resume.py): a finished MLflow run with the same settings and data is
  reused, an unfinished one resumes from its last checkpoint;
- quantize: reused when the run's quantize.json lists every variant asked for;
- evaluate: reused when the run has finished evaluation runs tagged with the same evaluation settings;
- compare + report: rewritten each time from MLflow (lab/report.py).

`--dry-run` prints that plan (which steps run, which are reused, and why) and changes nothing. The study's own
settings are the `study` node (conf/study/default.yaml), which experiments override.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from lab import CONF_DIR, PROJECT_ROOT, USER_ERROR_EXIT, LabError, report_error

log = logging.getLogger("lab.study")

TRAIN_EXTRA = ["reuse_finished=true", "ckpt_path=auto"]
EVAL_TAG = "study_eval"  # on evaluation runs: the fingerprint of the evaluation settings that produced them


@dataclass
class Job:
    """One training job of the experiment's sweep, and what the study does about it."""

    overrides: list[str]
    run_name: str
    action: str = "train"         # train | resume | reuse
    why: str = ""
    run: Any = None               # the finished MLflow run, once there is one


@dataclass
class Plan:
    experiment: str
    overrides: list[str]          # the study's command-line overrides (training's too)
    cfg: DictConfig               # the experiment's first job (data, study node, tags)
    jobs: list[Job]
    prepare: tuple[str, str]      # action, why
    report_dir: Path
    steps: list[str] = field(default_factory=list)  # lines of the printed plan


# -- the sweep ----------------------------------------------------------------------------------------------------


def sweep_overrides(sweeper_params: Any, overrides: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Split overrides into the fixed ones and the product of the sweeps (the experiment's hydra.sweeper.params,
    then the command line's `key=a,b`; the command line wins for a key given in both), as Hydra's basic sweeper
    expands them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = {}
    for key, value in (sweeper_params or {}).items():
        given[str(key)] = f"{key}={value}"
    for line in overrides:
        parsed = parser.parse_overrides([line])[0]
        given[parsed.get_key_element()] = line
    fixed, sweeps = [], []
    for line in given.values():
        parsed = parser.parse_overrides([line])[0]
        if parsed.is_sweep_override():
            key = parsed.get_key_element()
            sweeps.append([f"{key}={value}" for value in parsed.sweep_string_iterator()])
        else:
            fixed.append(line)
    return fixed, [list(combo) for combo in itertools.product(*sweeps)] if sweeps else [[]]


def is_hydra_override(line: str) -> bool:
    """Overrides of Hydra itself (launcher, sweeper, folders): they shape the multirun, not a job's config."""
    key = line.split("=", 1)[0].lstrip("+~")
    return key.startswith(("hydra.", "hydra/"))


def compose_job(experiment: str, overrides: Sequence[str], keep_hydra: bool = False) -> DictConfig:
    from lab.compose import compose_config

    return compose_config("train", [f"experiment={experiment}", *overrides], keep_hydra=keep_hydra)


def expand_jobs(experiment: str, overrides: Sequence[str]) -> tuple[DictConfig, list[list[str]]]:
    """The experiment's composed config (first job) and every job's overrides. `hydra.sweeper.params.<key>=...` on
    the command line replaces the experiment's sweep of <key>, as in `python -m lab.train -m`."""
    params_given, compose_lines = {}, []
    for line in overrides:
        key, _, value = line.partition("=")
        if key.startswith("hydra.sweeper.params."):
            params_given[key.removeprefix("hydra.sweeper.params.")] = value
        elif not _is_sweep(line):
            compose_lines.append(line)
    try:
        base = compose_job(experiment, compose_lines, keep_hydra=True)
    except Exception as err:  # noqa: BLE001 - Hydra's own errors: one line
        known = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
        raise LabError(f"cannot compose experiment={experiment} with {list(overrides)}: {str(err).splitlines()[0]} "
                       f"(experiments: {', '.join(known)})") from None
    if not str(base.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        raise LabError(f"experiment {experiment}: lab.study runs grid sweeps (Hydra's basic sweeper); an Optuna "
                       "sweep picks its jobs as it goes: run it with `python -m lab.train -m` and compare after")
    params = {**dict(base.hydra.sweeper.get("params") or {}), **params_given}
    fixed, combos = sweep_overrides(params, [o for o in overrides if not is_hydra_override(o)])
    return base, [[*fixed, *combo] for combo in combos]


def _is_sweep(line: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return not is_hydra_override(line) and OverridesParser.create().parse_overrides([line])[0].is_sweep_override()


# -- what is done already --------------------------------------------------------------------------------------------


def data_sha256(prepared_dir: Path) -> str | None:
    manifest = prepared_dir / "manifest.json"
    try:
        return json.loads(manifest.read_text())["data_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def decide_job(experiment: str, overrides: list[str], data_hash: str | None, uri: str) -> Job:
    from lab.resume import finished_twin, resolve_ckpt_path

    from lab.settings import TrainSettings

    cfg = compose_job(experiment, [*overrides, *TRAIN_EXTRA])
    TrainSettings.from_config(cfg)  # a bad value is one line now, before anything runs
    resolved = OmegaConf.to_container(cfg, resolve=True)  # as lab.train resolves it (no hydra node)
    job = Job(overrides, str(cfg.run_name))
    twin = finished_twin(cfg.logger.experiment_name, cfg.logger.run_name, resolved, data_hash, uri) if data_hash else None
    if twin is not None:
        job.action, job.why, job.run = "reuse", f"finished MLflow run {twin.info.run_id[:8]}: same settings and data", twin
        return job
    with _quiet("lab.resume"):
        checkpoint = resolve_ckpt_path(cfg, uri, resolved)
    if checkpoint:
        job.action, job.why = "resume", f"unfinished run, from {Path(checkpoint).relative_to(cfg.paths.root_dir)}"
    else:
        job.why = "no finished run with these settings" + ("" if data_hash else " (data not prepared yet)")
    return job


class _quiet:
    """Lower a logger to ERROR for a block (the plan reports its own reasons)."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


def eval_fingerprint(study: DictConfig, variants: Sequence[str]) -> str:
    """Names the evaluation settings: the same fingerprint on a run's evaluation runs means nothing to redo."""
    blob = json.dumps({"evaluate": list(study.evaluate), "variants": sorted(variants)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the plan ----------------------------------------------------------------------------------------------------------


def report_dir_for(cfg: DictConfig, today: dt.date | None = None) -> Path:
    from lab.run_records import default_name

    if cfg.study.get("report_dir"):
        return Path(str(cfg.study.report_dir)).resolve()
    name = default_name(str(cfg.experiment_name), {k: str(v) for k, v in (cfg.get("tags") or {}).items()})
    return PROJECT_ROOT / "experiments" / f"{(today or dt.date.today()).isoformat()}_{name}"


def make_plan(experiment: str, overrides: Sequence[str]) -> Plan:
    from lab.tracking import tracking_uri

    base, job_overrides = expand_jobs(experiment, overrides)
    uri = tracking_uri(base.logger.tracking_uri)
    prepared = Path(str(base.data.prepared_dir))
    data_hash = data_sha256(prepared)
    prepare = (("reuse", f"{_short(prepared)} holds a manifest (data {data_hash[:12]}); lab.train verifies it")
               if data_hash else ("run", f"no prepared data at {_short(prepared)}"))
    jobs = [decide_job(experiment, o, data_hash, uri) for o in job_overrides]
    names = [job.run_name for job in jobs]
    if len(set(names)) != len(names):
        raise LabError(f"experiment {experiment}: jobs share a run_name ({sorted({n for n in names if names.count(n) > 1})}); "
                       "lab.study tells runs apart by it: put the swept keys into run_name")
    return Plan(experiment, list(overrides), base, jobs, prepare, report_dir_for(base))


def _short(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def train_command(plan: Plan) -> list[str]:
    return [sys.executable, "-m", "lab.train", "-m", f"experiment={plan.experiment}", *plan.overrides, *TRAIN_EXTRA]


def describe(plan: Plan) -> str:
    lines = [f"study of experiment {plan.experiment} ({len(plan.jobs)} training jobs); report: {_short(plan.report_dir)}",
             f"  prepare   {plan.prepare[0]:7s} {plan.prepare[1]}"]
    for job in plan.jobs:
        lines.append(f"  train     {job.action:7s} {job.run_name}: {job.why}")
    todo = [job for job in plan.jobs if job.action != "reuse"]
    if todo:
        lines.append("  training command: " + shlex.join(["python", *train_command(plan)[1:]]))
    lines.append(f"  quantize  every finished run's hf/ export: variants {list(_as_list(plan.cfg.study.variants))} "
                 "(reused where quantize.json lists them all)")
    lines.append(f"  evaluate  every finished run and its variants (reused where evaluation runs carry {EVAL_TAG}=<settings>)")
    lines.append("  compare   the table with quantized columns, then REPORT.md / REPORT.html (always rewritten)")
    return "\n".join(lines)


def _as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, str):
        return [value] if value else []
    return list(value)


# -- running it ----------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to each run after training: its quantization and evaluation, or why not."""

    run_name: str
    run: Any = None
    quantize: str = ""            # done | reused | skipped: why | failed: why
    evaluate: str = ""
    skipped_variants: dict[str, str] = field(default_factory=dict)


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
    from lab.datamodule import prepare_command

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
    from lab.tracking import tracking_uri

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

    from lab.resume import changed_settings

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
    from lab.command_settings import settings_for
    from lab.model_io import default_output_dir, read_index, resolve_device, resolve_source
    from lab.quantization import VARIANTS, quantize, supported_variants

    hf = Path(job.run.data.tags.get("run_dir", "")) / "hf"
    source = resolve_source(hf)  # a missing or damaged export is one LabError line
    device = resolve_device(str(plan.cfg.study.device))
    asked = [str(v) for v in _as_list(plan.cfg.study.variants)]
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
    listed = {name for name, item in index.get("variants", {}).items() if Path(item.get("path", "")).is_dir()}
    if index.get("source") == str(source.path) and set(wanted) <= listed:
        outcome.quantize = "reused"
        return wanted
    overrides = [f"model_path={hf}", f"variants=[{','.join(wanted)}]", f"device={device.type}",
                 *[str(o) for o in plan.cfg.study.quantize]]
    quantize(settings_for("quantize", overrides))
    outcome.quantize = "done"
    return wanted


def evaluate_run(plan: Plan, job: Job, variants: list[str], outcome: Outcome) -> None:
    from mlflow.tracking import MlflowClient

    from lab.command_settings import settings_for
    from lab.evaluation import evaluate
    from lab.tracking import tracking_uri

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
    evaluate(settings_for("evaluate", overrides))
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
    from lab import error_line, log_to_files

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
        from lab.report import write_report

        report = write_report(plan, outcomes, train_code)
    print(f"report: {report}")
    failed = [o.run_name for o in outcomes if o.run is None or o.quantize.startswith("failed")
              or o.evaluate.startswith("failed")]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} runs did not finish every step ({', '.join(failed)}); "
              f"the report lists why; run the same command again to retry them", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


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
