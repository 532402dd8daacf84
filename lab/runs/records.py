"""What MLflow holds about a study's runs, read back: which runs are training runs, and each one's final values.

Used by lab.compare (the comparison table), lab.study.report (a study's write-up) and lab.runs.selection (models chosen
by experiment). The metric names are those of docs/CONTRACTS.md; evaluation runs (lab.evaluate) are tagged
`eval_of=<training run id>` and joined to the training run they evaluate.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lab import LabError

if TYPE_CHECKING:  # mlflow is imported where a client is used: lab.runs.tables (the markdown writer) reads this file
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

# Tags that mark runs which are not training runs of the study.
KIND_TAG = "kind"                 # kind=compare / kind=report: a run lab.compare / lab.study.report logged
EVAL_OF_TAG = "eval_of"           # an evaluation (quantized variants) of the training run with that id
PRUNED_TAG = "optuna_pruned_at_step"
REFERENCE_VARIANTS = ("fp32", "bf16", "fp16")  # lab.evaluate names the float reference by its dtype

# Metric names (docs/CONTRACTS.md) whose final values become table columns.
VAL_DOMAIN = re.compile(r"^val/([^/]+)/(loss|bpb|ppl)$")
FORGETTING = re.compile(r"^val/([^/]+)/forgetting$")
# tokens trained per source (tokens/<source>, in the table) and per stage (tokens/<stage>/<source>, CSV only)
SOURCE_TOKENS = re.compile(r"^tokens/([^/]+)$")
STAGE_TOKENS = re.compile(r"^tokens/([^/]+)/([^/]+)$")
_HISTORIES = ("val/loss", "tokens_seen", "stage", "throughput/tokens_per_s", "throughput/mfu")  # the plots' curves


@dataclass
class RunData:
    """One training run: its identity and the values of every table column (None: not logged)."""

    run: Run
    values: dict[str, float | None] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)   # metric -> [(step, value)]

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run_id[:8]

    @property
    def arch(self) -> str:
        return self.run.data.tags.get("arch", "?")

    @property
    def seed(self) -> str:
        return self.run.data.tags.get("seed") or self.run.data.params.get("seed", "")

    @property
    def curriculum(self) -> str:
        return run_curriculum(self.run)


def run_curriculum(run: Run) -> str:
    """The curriculum a run trained under (tag, else param); runs from before curricula: `?`."""
    return run.data.tags.get("curriculum") or run.data.params.get("curriculum.name") or "?"


def as_number(text: Any) -> float | None:
    """A param or tag as a finite float; None when it is absent, not a number, or infinite."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def finite_mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(present) if present else None


# -- which runs ---------------------------------------------------------------------------------------------------


def find_experiment(client: MlflowClient, name: str, uri: str):
    from mlflow.entities import ViewType

    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        known = sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
        raise LabError(f"no MLflow experiment named {name!r} in {uri}; experiments there: "
                       f"{', '.join(known) if known else '(none)'}")
    return experiment


def search_runs(client: MlflowClient, experiment_id: str, tags: Mapping[str, str],
                has_tag: str | None = None) -> list[Run]:
    """Every active run of the experiment whose tags equal `tags` (and that has `has_tag`), newest first."""
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    if has_tag:
        clauses.append(f"tags.`{has_tag}` LIKE '%'")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=" and ".join(clauses), max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def default_name(experiment: str, tags: Mapping[str, str]) -> str:
    """A folder-safe name for a selection of runs: the experiment and the tag values it is filtered by."""
    name = "_".join([experiment, *tags.values()])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "compare"


@dataclass
class Selection:
    train: list[Run]
    evals: dict[str, list[Run]]          # training run id -> its evaluation runs, newest first
    skipped: list[tuple[Run, str]]       # run, why it is not in the table


def select_runs(runs: Sequence[Run], eval_runs: Sequence[Run] = (), include_unfinished: bool = False,
                latest: bool = False) -> Selection:
    """Training runs for the table; evaluation runs (any tags: another job logs them) keyed by what they evaluate."""
    train, skipped = [], []
    for run in runs:  # newest first
        if evaluates_or_compares(run):
            continue  # not a candidate at all, so not reported as skipped either
        why = why_not_training(run, include_unfinished)
        if why is None:
            train.append(run)
        else:
            skipped.append((run, why))
    if latest:
        train = _newest_per_arch(train, skipped)
    wanted = {run.info.run_id for run in train}
    evals: dict[str, list[Run]] = defaultdict(list)
    for run in eval_runs:  # newest first
        target = run.data.tags.get(EVAL_OF_TAG)
        if target in wanted and (run.info.status == "FINISHED" or include_unfinished):
            evals[target].append(run)
    return Selection(train, dict(evals), skipped)


def evaluates_or_compares(run: Run) -> bool:
    """A run logged about other runs: an evaluation (`eval_of`) or a lab.compare run."""
    return bool(run.data.tags.get(EVAL_OF_TAG)) or run.data.tags.get(KIND_TAG) == "compare"


def why_not_training(run: Run, include_unfinished: bool = False) -> str | None:
    """None for a (finished) lab.train run; else why it is not one."""
    tags = run.data.tags
    if tags.get(KIND_TAG, "train") != "train":
        return f"a {tags[KIND_TAG]} run, not linked to a training run by `{EVAL_OF_TAG}`"
    if "arch" not in tags:
        return "no `arch` tag (not a lab.train run)"
    if run.info.status != "FINISHED" and not include_unfinished:
        return f"status {run.info.status}"
    return None


def _newest_per_arch(train: list[Run], skipped: list[tuple[Run, str]]) -> list[Run]:
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for run in train:  # newest first
        key = (run.data.tags.get("arch", ""), run_curriculum(run), run.data.tags.get("seed", ""))
        if key in seen:
            skipped.append((run, "an older run of the same arch, curriculum and seed (--latest-per-arch)"))
        else:
            seen.add(key)
            kept.append(run)
    return kept


# -- their values ---------------------------------------------------------------------------------------------------


def collect(client: MlflowClient, selection: Selection) -> list[RunData]:
    """Every selected training run with its final values and curves, its evaluation runs' `quant/` metrics joined."""
    return [read_run(client, run, selection.evals.get(run.info.run_id, [])) for run in selection.train]


def read_run(client: MlflowClient, run: Run, eval_runs: Sequence[Run] = ()) -> RunData:
    metrics, params = run.data.metrics, run.data.params
    item = RunData(run)
    for key in (*_HISTORIES, *[k for k in metrics if VAL_DOMAIN.match(k)]):
        if key in metrics:
            item.history[key] = history(client, run.info.run_id, key)
    values = item.values
    values["lr"] = as_number(params.get("optim.lr"))
    values["params_total"] = as_number(params.get("model/params_total"))
    values["params_non_embedding"] = as_number(params.get("model/params_non_embedding"))
    values["tokens_seen"] = tokens_trained(run)
    values["flops_per_token"] = as_number(params.get("model/flops_per_token"))
    values["val_loss"] = metrics.get("val/loss")
    values["objective"] = metrics.get(params.get("objective", "val/loss"))
    values["ppl"] = math.exp(min(values["val_loss"], 50.0)) if values["val_loss"] is not None else None
    values.update({key: value for key, value in metrics.items()
                   if any(p.match(key) for p in (VAL_DOMAIN, FORGETTING, SOURCE_TOKENS, STAGE_TOKENS))})
    # steady-state rates: the median over logging windows, not one noisy last window
    for key, name in (("throughput/tokens_per_s", "tokens_per_s"), ("throughput/mfu", "mfu")):
        points = [v for _, v in item.history.get(key, []) if math.isfinite(v)]
        values[name] = statistics.median(points) if points else None
    values["peak_memory_gb"] = metrics.get("memory/peak_gb")
    # time inside the fit loops, summed over resumes; runs logged before it existed: MLflow start/end
    start, end = run.info.start_time, run.info.end_time
    values["wall_time_s"] = metrics.get("time/train_s", (end - start) / 1000 if start and end else None)
    values["kwh"] = metrics.get("energy/kwh")
    values["trial"] = as_number(run.data.tags.get("optuna_trial"))
    values["pruned_at_step"] = as_number(run.data.tags.get(PRUNED_TAG))
    # quantized variants: the newest evaluation run that logged each metric wins
    for eval_run in reversed(eval_runs):
        values.update({key: value for key, value in eval_run.data.metrics.items() if key.startswith("quant/")})
    return item


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    by_step: dict[int, float] = {}
    for metric in points:  # a resumed run may log a step twice: keep the later value
        by_step[metric.step] = metric.value
    return sorted(by_step.items())


def tokens_trained(run: Run) -> float | None:
    """The run's budget when it ran to the end, the tokens up to its stop when pruned; the last logged
    `tokens_seen` (which lags by up to log_every_n_steps) only when the run did not record either."""
    params, tags = run.data.params, run.data.tags
    per_step, pruned_at = as_number(params.get("train/tokens_per_step")), as_number(tags.get(PRUNED_TAG))
    if pruned_at is not None and per_step:
        return pruned_at * per_step
    total = as_number(params.get("train/total_tokens"))
    if total is not None and run.info.status == "FINISHED":
        return total
    return run.data.metrics.get("tokens_seen")


# -- grouping -------------------------------------------------------------------------------------------------------


def by_arch(data: Sequence[RunData]) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = defaultdict(list)
    for item in data:
        groups[item.arch].append(item)
    return dict(sorted(groups.items()))


def variants_of(data: Sequence[RunData]) -> list[str]:
    """The evaluated variants (`quant/<variant>/...`), the float reference first."""
    names = {key.split("/")[1] for item in data for key in item.values if key.startswith("quant/")}
    return sorted(names, key=lambda v: (v not in REFERENCE_VARIANTS, v))


def sources_of(data: Sequence[RunData]) -> list[str]:
    return sorted({key.split("/")[1] for item in data for key in item.values
                   if key.startswith("val/") and key.endswith("/bpb")})
