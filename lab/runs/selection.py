"""Models chosen by MLflow experiment and tags instead of by path: `runs=experiment:<name>`.

    python -m lab.quantize runs=experiment:arch_bakeoff_tiny
    python -m lab.evaluate runs=experiment:arch_bakeoff_tiny "run_tags={bakeoff:tiny-v1}"
    python -m lab.evaluate runs=experiment:arch_bakeoff_tiny +run_tags.bakeoff=tiny-v1 run_latest=false

Settings (conf/quantize.yaml, conf/evaluate.yaml):

    runs        null (use model_path) | experiment:<MLflow experiment name>
    run_tags    null: any tags | {key: value, ...}: only runs with all these tags
    run_latest  true: the newest finished run per run name (lab.train names runs <arch>-<size>-s<seed>) |
                false: every finished run

The store is the one every tool uses (lab.runs.tracking.tracking_uri: `mlflow.tracking_uri` where the command has
it, then $MLFLOW_TRACKING_URI, then the project's sqlite store). Only FINISHED training runs are chosen, by
the rule lab.compare applies (lab.runs.records.select_runs: not an evaluation or comparison run, has an `arch`
tag). Each run's model is its HF export, `<run_dir tag>/hf`. A run whose export is missing or damaged is
skipped with one warning line and reported as failed at the end; the other runs go on. No run at all is
an error that names the command which trains them.

`for_each_model` runs a command's job once per model (its config with `model_path` set to the export and
its output folders given a per-run subfolder), goes on past a failing one, and ends with one LabError line
listing every run that failed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar


from lab import LabError, error_line, log_to_files
from lab.models.settings import ModelSettings
from lab.config.checks import field, resolved
from lab.runs.records import search_runs, select_runs as training_runs
from lab.runs.tracking import tracking_uri
from lab.models.loading import check_model_folder, has_weights, resolve_source


log = logging.getLogger("lab.runs.selection")

T = TypeVar("T")
S = TypeVar("S", bound="RunSelectionSettings")
RUNS_FORM = "runs=experiment:<name>"
_EXPERIMENT_PREFIX = "experiment:"


def _runs(value: Any, key: str) -> Any:
    return value  # lab.runs.selection.parse_runs checks runs / run_tags / run_latest together, with their forms


@dataclasses.dataclass(frozen=True)
class RunSelectionSettings(ModelSettings):
    """`runs=experiment:<name>` instead of model_path (lab/runs/selection.py)."""

    runs: Any = field(_runs)
    run_tags: Any = field(_runs)
    run_latest: Any = field(_runs)


@dataclass(frozen=True)
class RunQuery:
    """What `runs=` / `run_tags=` / `run_latest=` ask for."""

    experiment: str
    tags: Mapping[str, str]
    latest: bool

    def train_command(self) -> str:
        return f"python -m lab.train -m experiment={self.experiment}"

    def describe(self) -> str:
        tags = ", ".join(f"{k}={v}" for k, v in self.tags.items())
        return f"experiment {self.experiment!r}" + (f" with tags {tags}" if tags else "")


@dataclass(frozen=True)
class SelectedRun:
    """One training run and the model it exported (`model_path`), or why that model cannot be used (`problem`)."""

    run_id: str
    run_name: str
    label: str                     # unique in its selection; names the run's output subfolders
    run_dir: Path | None
    model_path: Path | None        # <run_dir>/hf when it is a readable HF folder
    problem: str | None = None


@dataclass
class RunSelection:
    query: RunQuery
    tracking_uri: str
    models: list[SelectedRun]      # runs whose export can be loaded, by label
    failed: list[SelectedRun]      # runs skipped: export missing or damaged (each has a `problem`)


def parse_runs(runs: Any, run_tags: Any, run_latest: Any) -> RunQuery | None:
    """The query of a command's `runs`, `run_tags`, `run_latest` settings; None when `runs` is not set."""
    if runs is None or (isinstance(runs, str) and not runs.strip()):
        if run_tags:
            raise LabError(f"run_tags={resolved(run_tags)} is given without runs=; tags filter the runs of "
                           f"{RUNS_FORM}")
        return None
    if not isinstance(runs, str):
        raise LabError(f"runs={resolved(runs)!r} is a {type(runs).__name__}, not a selection; give {RUNS_FORM} "
                       "(quote a name with commas)")
    text = runs.strip()
    experiment = text[len(_EXPERIMENT_PREFIX):].strip() if text.startswith(_EXPERIMENT_PREFIX) else None
    if not experiment:
        raise LabError(f"runs={text!r} is not a run selection; give {RUNS_FORM} (the MLflow experiment the runs "
                       "were trained into), with run_tags={key:value} to narrow it")
    if "'" in experiment:
        raise LabError(f"runs={text!r}: an experiment name with a quote cannot be looked up")
    if not isinstance(run_latest, bool):
        raise LabError(f"run_latest={run_latest!r} must be true (newest run per run name) or false (every run)")
    return RunQuery(experiment, _check_tags(run_tags), run_latest)



def _check_tags(run_tags: Any) -> dict[str, str]:
    tags = resolved(run_tags) or {}
    if not isinstance(tags, Mapping):
        raise LabError(f"run_tags={tags!r} is a {type(tags).__name__}, not a mapping; give run_tags={{key:value}} "
                       "(e.g. \"run_tags={bakeoff:tiny-v1}\")")
    checked = {}
    for key, value in tags.items():
        if isinstance(value, (Mapping, list, tuple)) or value is None:
            raise LabError(f"run_tags.{key}={value!r}: a tag is matched against one plain value")
        key, value = str(key), str(value)
        if "`" in key or "'" in value:  # the MLflow filter quotes keys with ` and values with '
            raise LabError(f"run_tags.{key}={value!r}: quotes cannot be matched in an MLflow filter")
        checked[key] = value
    return checked


def select_runs(query: RunQuery, uri: str | None = None) -> RunSelection:
    """The finished training runs `query` names and their HF exports; LabError when there are none."""
    from mlflow.tracking import MlflowClient


    uri = tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(query.experiment)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments())
        raise LabError(f"runs=experiment:{query.experiment}: no MLflow experiment of that name in {uri} "
                       f"(there: {', '.join(known) or 'none'}); train its runs with: {query.train_command()}")
    found = training_runs(search_runs(client, experiment.experiment_id, dict(query.tags)))
    chosen = found.train  # newest first
    if query.latest:
        newest: dict[str, Any] = {}
        for run in chosen:
            newest.setdefault(run.info.run_name or run.info.run_id, run)
        chosen = list(newest.values())
    if not chosen:
        reasons = sorted({why for _, why in found.skipped})
        passed_over = f" ({len(found.skipped)} other runs: {'; '.join(reasons)})" if reasons else ""
        raise LabError(f"{query.describe()} has no finished training runs in {uri}{passed_over}; train them with: "
                       f"{query.train_command()}" + (" (with the same tags)" if query.tags else ""))
    labels = _labels([(run.info.run_name or run.info.run_id, run.info.run_id) for run in chosen])
    models, failed = [], []
    for run, label in sorted(zip(chosen, labels), key=lambda pair: pair[1]):
        selected = _with_export(run, label)
        if selected.problem:
            log.warning("skipping run %s (%s): %s", label, selected.run_id, selected.problem)
            failed.append(selected)
        else:
            models.append(selected)
    return RunSelection(query, uri, models, failed)


def _labels(names_and_ids: list[tuple[str, str]]) -> list[str]:
    """A folder-safe name per run: the run name, plus the run id's start where names repeat."""
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or run_id for name, run_id in names_and_ids]
    return [label if safe.count(label) == 1 else f"{label}-{run_id[:8]}"
            for label, (_, run_id) in zip(safe, names_and_ids)]


def _with_export(run: Any, label: str) -> SelectedRun:
    """The run with its HF export when that folder is there and readable, else with the reason it is not."""

    run_id, name = run.info.run_id, run.info.run_name or run.info.run_id
    run_dir_tag = run.data.tags.get("run_dir")
    if not run_dir_tag:
        return SelectedRun(run_id, name, label, None, None, "no run_dir tag (not recorded by lab.train)")
    run_dir = Path(run_dir_tag)
    export = run_dir / "hf"
    if not export.is_dir():
        return SelectedRun(run_id, name, label, run_dir, None,
                           f"no HF export at {export} (trained with train.export_hf=false, moved, or deleted)")
    try:
        check_export(resolve_source(export).path)
    except LabError as err:
        return SelectedRun(run_id, name, label, run_dir, None, f"damaged HF export: {err}")
    return SelectedRun(run_id, name, label, run_dir, export)


def check_export(folder: Path) -> None:
    """A cheap look before loading: config.json is one the lab reads, and there is a weight file."""

    check_model_folder(folder)
    if not has_weights(folder):
        raise LabError(f"model folder {folder}: no weight file (*.safetensors / *.bin)")


def selection_from_config(settings: "RunSelectionSettings", uri: str | None = None) -> RunSelection | None:
    """None when the settings name one model (`model_path`); the runs they select with `runs=`. Both: refused."""
    query = parse_runs(settings.runs, settings.run_tags, settings.run_latest)
    if query is None:
        if settings.model_path is None:
            raise LabError("model_path is required: an HF export folder (e.g. outputs/<run>/<time>/hf) or a lab.train "
                           f"checkpoint (.../checkpoints/last.ckpt); or select trained runs with {RUNS_FORM}")
        return None
    if settings.model_path is not None:
        raise LabError(f"give model_path= or runs=, not both (model_path={settings.model_path}, runs={settings.runs})")
    return select_runs(query, uri)


def model_config(settings: S, run: SelectedRun, folders: Iterable[str] = ()) -> S:
    """The settings for one selected run: model_path = its export, no runs=, and each set `folders` setting given
    the run's own subfolder (so that the runs' outputs do not overwrite each other)."""
    own = {key: str(Path(getattr(settings, key)) / run.label) for key in folders if getattr(settings, key)}
    return dataclasses.replace(settings, model_path=str(run.model_path), runs=None, run_tags=None, **own)


def for_each_model(selection: RunSelection, job: Callable[[SelectedRun], T], command: str) -> dict[str, T]:
    """{label: job(run)} over the selection's models, going on past failures; then one LabError line naming
    every run that failed (here or at selection) when any did."""
    results: dict[str, T] = {}
    failed = {run.label: run.problem or "" for run in selection.failed}
    total = len(selection.models) + len(selection.failed)
    for number, run in enumerate(selection.models, 1):
        log.info("%s %d/%d: run %s (%s), model %s", command, number, len(selection.models), run.label, run.run_id,
                 run.model_path)
        try:
            results[run.label] = job(run)
        except Exception as err:  # noqa: BLE001 - one run's failure must not stop the others
            failed[run.label] = error_line(err)
            log.warning("%s failed for run %s: %s", command, run.label, failed[run.label])
            if not isinstance(err, LabError):
                log_to_files(log, logging.ERROR, f"traceback of run {run.label}'s failure", exc_info=err)
    if failed:
        names = ", ".join(f"{label} ({why[:160]})" for label, why in sorted(failed.items()))
        raise LabError(f"{command}: {len(failed)} of {total} runs of {selection.query.describe()} failed, "
                       f"{len(results)} done; failed: {names}")
    log.info("%s: all %d runs of %s done", command, total, selection.query.describe())
    return results
