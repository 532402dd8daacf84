"""lab.study's plan: the experiment's jobs (its sweep expanded as Hydra would), what each one needs (train, resume or
reuse, and why), the report folder, and the plan as printed by `--dry-run`. The command: lab/study/__main__.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from lab import CONF_DIR, PROJECT_ROOT, LabError
from lab.config.compose import compose_config
from lab.training.resume import finished_twin, resolve_ckpt_path
from lab.training.settings import TrainSettings
from lab.runs.records import default_name
from lab.runs.tracking import tracking_uri


log = logging.getLogger("lab.study")  # the command's name: its console lines keep their prefix

TRAIN_EXTRA = ["reuse_finished=true", "ckpt_path=auto"]
EVAL_TAG = "study_eval"  # on evaluation runs: the fingerprint of the evaluation settings that produced them


@dataclass
class Outcome:
    """What happened to each run after training: its quantization and evaluation, or why not."""

    run_name: str
    run: Any = None
    quantize: str = ""            # done | reused | skipped: why | failed: why
    evaluate: str = ""
    skipped_variants: dict[str, str] = field(default_factory=dict)


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


    cfg = compose_job(experiment, [*overrides, *TRAIN_EXTRA])
    TrainSettings.from_config(cfg)  # a bad value is one line now, before anything runs
    resolved = OmegaConf.to_container(cfg, resolve=True)  # as lab.train resolves it (no hydra node)
    job = Job(overrides, str(cfg.run_name))
    twin = finished_twin(cfg.logger.experiment_name, cfg.logger.run_name, resolved, data_hash, uri) if data_hash else None
    if twin is not None:
        job.action, job.why, job.run = "reuse", f"finished MLflow run {twin.info.run_id[:8]}: same settings and data", twin
        return job
    with _quiet("lab.training.resume"):
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

    if cfg.study.get("report_dir"):
        return Path(str(cfg.study.report_dir)).resolve()
    name = default_name(str(cfg.experiment_name), {k: str(v) for k, v in (cfg.get("tags") or {}).items()})
    return PROJECT_ROOT / "experiments" / f"{(today or dt.date.today()).isoformat()}_{name}"


def make_plan(experiment: str, overrides: Sequence[str]) -> Plan:

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
    lines.append(f"  quantize  every finished run's hf/ export: variants {list(as_list(plan.cfg.study.variants))} "
                 "(reused where quantize.json lists them all, made with the same options)")
    lines.append(f"  evaluate  every finished run and its variants (reused where evaluation runs carry {EVAL_TAG}=<settings>)")
    lines.append("  compare   the table with quantized columns, then REPORT.md / REPORT.html (always rewritten)")
    return "\n".join(lines)


def as_list(value: Any) -> list[Any]:
    if value is None or isinstance(value, str):
        return [value] if value else []
    return list(value)


# -- running it ----------------------------------------------------------------------------------------------------------
