"""Compare runs from MLflow: one table row per arch (mean ± std over seeds), plots, a README.

    python -m lab.compare --experiment arch_bakeoff [--tag bakeoff=v1] [--by arch|run|curriculum] [--latest-per-arch]
                          [--name NAME] [--out DIR] [--study NAME --storage URL] [--no-log]

Reads the metrics the trainer logs (docs/CONTRACTS.md): final validation loss, bits-per-byte and
perplexity per domain, forgetting per domain, tokens per source, parameters, tokens seen, FLOPs/token, throughput, MFU, peak memory, wall time
and energy; plus `quant/<variant>/<metric>` from evaluation runs tagged `eval_of=<training run id>`,
joined to the training run they evaluate. Writes table.md / table.csv / table.html and PNG plots to
experiments/<date>_<name>/ with a README recording the command, filters and run ids, and logs the
same folder to a "compare" run in the experiment. A metric a run lacks is an empty cell.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import logging
import math
import re
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError, report_error
from lab.tracking import is_launch_setting, tracking_uri

# Tags that mark runs which are not training runs of the study.
KIND_TAG = "kind"                 # kind=compare: a run this module logged
EVAL_OF_TAG = "eval_of"           # an evaluation (quantized variants) of the training run with that id
PRUNED_TAG = "optuna_pruned_at_step"
_VAL_DOMAIN = re.compile(r"^val/([^/]+)/(loss|bpb|ppl)$")
_FORGETTING = re.compile(r"^val/([^/]+)/forgetting$")
# tokens trained per source (tokens/<source>, in the table) and per stage (tokens/<stage>/<source>, CSV only)
_SOURCE_TOKENS = re.compile(r"^tokens/([^/]+)$")
_STAGE_TOKENS = re.compile(r"^tokens/([^/]+)/([^/]+)$")
BY = ("arch", "run", "curriculum")  # rows: per arch, per run, or per curriculum (and arch, for a grid)
# Evaluation metrics shown in the table (all `quant/...` metrics go to the CSV): perplexity per
# source, size on disk, time to first token.
_QUANT_SHOWN = re.compile(r"^quant/(?P<variant>[^/]+)/(?:val/(?P<source>[^/]+)/ppl|size_mb|ttft_ms_(?P<len>\d+))$")

log = logging.getLogger("lab.compare")


# -- formatting -------------------------------------------------------------------------------------------------


def _count(x: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}" if abs(x) / scale < 100 else f"{x / scale:.0f}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


FORMATS: dict[str, Callable[[float], str]] = {
    "count": _count,
    "loss": lambda x: f"{x:.4f}",
    "ppl": lambda x: f"{x:.2f}" if x < 1e4 else f"{x:.3g}",
    "rate": lambda x: f"{x:,.0f}",
    "pct": lambda x: f"{100 * x:.2f}%",
    "gb": lambda x: f"{x:.2f}",
    "time": _duration,
    "sci": lambda x: f"{x:.3g}",
    "int": lambda x: f"{x:.0f}",
    "num": lambda x: f"{x:.4g}",
}


@dataclass(frozen=True)
class Column:
    key: str              # CSV name, and the key of a run's values
    label: str            # table header
    fmt: str              # a FORMATS key
    in_table: bool = True  # False: CSV only (the many secondary evaluation metrics)


# -- reading MLflow ---------------------------------------------------------------------------------------------


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


def find_experiment(client: MlflowClient, name: str, uri: str):
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


@dataclass
class Selection:
    train: list[Run]
    evals: dict[str, list[Run]]          # training run id -> its evaluation runs, newest first
    skipped: list[tuple[Run, str]]       # run, why it is not in the table


def select_runs(runs: Sequence[Run], eval_runs: Sequence[Run] = (), include_unfinished: bool = False,
                latest: bool = False) -> Selection:
    """Training runs for the table; evaluation runs (any tags: another job logs them) keyed by what they evaluate."""
    train, evals, skipped = [], defaultdict(list), []
    for run in runs:  # newest first
        tags = run.data.tags
        if tags.get(EVAL_OF_TAG) or tags.get(KIND_TAG) == "compare":
            continue
        if tags.get(KIND_TAG, "train") != "train":
            skipped.append((run, f"a {tags[KIND_TAG]} run, not linked to a training run by `{EVAL_OF_TAG}`"))
            continue
        if "arch" not in tags:
            skipped.append((run, "no `arch` tag (not a lab.train run)"))
        elif run.info.status != "FINISHED" and not include_unfinished:
            skipped.append((run, f"status {run.info.status}"))
        else:
            train.append(run)
    if latest:
        seen: set[tuple[str, str]] = set()
        kept = []
        for run in train:
            key = (run.data.tags.get("arch", ""), run_curriculum(run), run.data.tags.get("seed", ""))
            if key in seen:
                skipped.append((run, "an older run of the same arch, curriculum and seed (--latest-per-arch)"))
            else:
                seen.add(key)
                kept.append(run)
        train = kept
    wanted = {run.info.run_id for run in train}
    for run in eval_runs:  # newest first
        target = run.data.tags.get(EVAL_OF_TAG)
        if target in wanted and (run.info.status == "FINISHED" or include_unfinished):
            evals[target].append(run)
    return Selection(train, dict(evals), skipped)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    by_step: dict[int, float] = {}
    for metric in points:  # a resumed run may log a step twice: keep the later value
        by_step[metric.step] = metric.value
    return sorted(by_step.items())


def _tokens_trained(run: Run) -> float | None:
    """The run's budget when it ran to the end, the tokens up to its stop when pruned; the last logged
    `tokens_seen` (which lags by up to log_every_n_steps) only when the run did not record either."""
    params, tags = run.data.params, run.data.tags
    per_step, pruned_at = _number(params.get("train/tokens_per_step")), _number(tags.get(PRUNED_TAG))
    if pruned_at is not None and per_step:
        return pruned_at * per_step
    total = _number(params.get("train/total_tokens"))
    if total is not None and run.info.status == "FINISHED":
        return total
    return run.data.metrics.get("tokens_seen")


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def collect(client: MlflowClient, selection: Selection) -> tuple[list[RunData], list[Column]]:
    """Per-run values of every column, and the columns that at least one run has."""
    domains: set[str] = set()
    forgetting: set[str] = set()
    token_keys: set[str] = set()
    quant_keys: set[str] = set()
    data = []
    for run in selection.train:
        metrics, params = run.data.metrics, run.data.params
        item = RunData(run)
        for key in ("val/loss", "tokens_seen", "stage", "throughput/tokens_per_s", "throughput/mfu",
                    *[k for k in metrics if _VAL_DOMAIN.match(k)]):
            if key in metrics:
                item.history[key] = _history(client, run.info.run_id, key)
        values = item.values
        values["lr"] = _number(params.get("optim.lr"))
        values["params_total"] = _number(params.get("model/params_total"))
        values["params_non_embedding"] = _number(params.get("model/params_non_embedding"))
        values["tokens_seen"] = _tokens_trained(run)
        values["flops_per_token"] = _number(params.get("model/flops_per_token"))
        objective = params.get("objective", "val/loss")
        values["val_loss"] = metrics.get("val/loss")
        values["objective"] = metrics.get(objective)
        values["ppl"] = math.exp(min(values["val_loss"], 50.0)) if values["val_loss"] is not None else None
        for key, value in metrics.items():
            match = _VAL_DOMAIN.match(key)
            if match:
                domains.add(match.group(1))
                values[key] = value
            elif _FORGETTING.match(key):
                forgetting.add(key)
                values[key] = value
            elif _SOURCE_TOKENS.match(key) or _STAGE_TOKENS.match(key):
                token_keys.add(key)
                values[key] = value
        # steady-state rates: the median over logging windows, not one noisy last window
        for key, name in (("throughput/tokens_per_s", "tokens_per_s"), ("throughput/mfu", "mfu")):
            points = [v for _, v in item.history.get(key, []) if math.isfinite(v)]
            values[name] = statistics.median(points) if points else None
        values["peak_memory_gb"] = metrics.get("memory/peak_gb")
        # time inside the fit loops, summed over resumes; runs logged before it existed: MLflow start/end
        start, end = run.info.start_time, run.info.end_time
        values["wall_time_s"] = metrics.get("time/train_s", (end - start) / 1000 if start and end else None)
        values["kwh"] = metrics.get("energy/kwh")
        values["trial"] = _number(run.data.tags.get("optuna_trial"))
        values["pruned_at_step"] = _number(run.data.tags.get(PRUNED_TAG))
        # quantized variants: the newest evaluation run that logged each metric wins
        for eval_run in reversed(selection.evals.get(run.info.run_id, [])):
            for key, value in eval_run.data.metrics.items():
                if key.startswith("quant/"):
                    values[key] = value
                    quant_keys.add(key)
        data.append(item)

    columns = [
        Column("lr", "lr", "sci"),
        Column("params_total", "params", "count"),
        Column("params_non_embedding", "non-emb params", "count"),
        Column("tokens_seen", "tokens", "count"),
        *[Column(k, f"{k.split('/', 1)[1]} tokens", "count") for k in sorted(token_keys) if _SOURCE_TOKENS.match(k)],
        Column("flops_per_token", "FLOPs/token", "sci"),
        Column("val_loss", "val loss", "loss"),
        Column("ppl", "ppl", "ppl"),
    ]
    for domain in sorted(domains):
        columns += [Column(f"val/{domain}/loss", f"{domain} loss", "loss"),
                    Column(f"val/{domain}/bpb", f"{domain} bpb", "loss"),
                    Column(f"val/{domain}/ppl", f"{domain} ppl", "ppl")]
    # how much a domain's loss rose after the last stage that trained mainly on it (lab/module.py)
    columns += [Column(k, f"{_FORGETTING.match(k).group(1)} forgetting", "loss") for k in sorted(forgetting)]
    columns += [Column(k, k, "count", in_table=False) for k in sorted(token_keys) if _STAGE_TOKENS.match(k)]
    columns += [
        Column("tokens_per_s", "tokens/s", "rate"),
        Column("mfu", "MFU", "pct"),
        Column("peak_memory_gb", "peak mem GB", "gb"),
        Column("wall_time_s", "wall time", "time"),
        Column("kwh", "kWh", "num"),
        Column("trial", "trial", "int"),
        Column("pruned_at_step", "pruned at step", "int"),
    ]
    for key in sorted(quant_keys, key=_natural_order):
        columns.append(_quant_column(key))
    # a column no run has is noise (e.g. kWh without codecarbon); an empty cell is for a run that lacks it
    columns = [c for c in columns if any(d.values.get(c.key) is not None for d in data)]
    return data, columns


def _natural_order(key: str) -> tuple[Any, ...]:
    """Numbers inside a key compare as numbers: ttft_ms_63 < ttft_ms_128 < ttft_ms_512 < ttft_ms_2048."""
    # re.split with a group alternates text (even indices) and digit runs (odd indices)
    return tuple(int(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+)", key)))


def _quant_column(key: str) -> Column:
    match = _QUANT_SHOWN.match(key)
    if match is None:
        return Column(key, key.removeprefix("quant/"), "num", in_table=False)
    variant, source, length = match.group("variant", "source", "len")
    if source:
        return Column(key, f"{variant} {source} ppl", "ppl")
    if length:
        return Column(key, f"{variant} TTFT ms ({length} tok)", "num")
    return Column(key, f"{variant} size MB", "num")


# -- the table ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    arch: str
    runs: list[RunData]
    mean: dict[str, float | None]
    std: dict[str, float | None]
    mixed: list[str] = field(default_factory=list)  # settings that differ between the runs averaged here


_SEED_PARAMS = {"seed", "data.shuffle_seed"}  # what a row's runs are meant to differ in


def mixed_settings(items: Sequence[RunData]) -> list[str]:
    """Config params whose values differ between runs that one row averages (besides the seed)."""
    params = [i.run.data.params for i in items]
    keys = set().union(*params) if params else set()
    return sorted(k for k in keys if k not in _SEED_PARAMS and not is_launch_setting(k)
                  and len({p.get(k) for p in params}) > 1)


def _group_key(item: RunData, by: str) -> tuple[str, ...]:
    if by == "arch":
        return (item.arch,)
    if by == "curriculum":  # an arch x curriculum grid keeps one row per pair
        return (item.curriculum, item.arch)
    return (item.run_id,)


def build_rows(data: Sequence[RunData], columns: Sequence[Column], by: str = "arch") -> list[Row]:
    """Rows by arch or by curriculum (and arch), mean ± sample std over their runs, or one per run; best
    objective first."""
    groups: dict[tuple[str, ...], list[RunData]] = defaultdict(list)
    for item in data:
        groups[_group_key(item, by)].append(item)
    rows = []
    for key, items in groups.items():
        mean, std = {}, {}
        for column in (*columns, Column("objective", "objective", "loss")):
            values = [v for v in (i.values.get(column.key) for i in items) if v is not None and math.isfinite(v)]
            mean[column.key] = statistics.fmean(values) if values else None
            std[column.key] = statistics.stdev(values) if len(values) > 1 else None
        label = key[0] if by != "run" else f"{items[0].name} ({items[0].run_id[:8]})"  # sweep runs share names
        mixed = mixed_settings(items) if by != "run" and len(items) > 1 else []
        rows.append(Row(label, items[0].arch, list(items), mean, std, mixed))
    rows.sort(key=lambda r: (r.mean["objective"] is None, r.mean["objective"] or 0.0, r.label))
    return rows


def cell(row: Row, column: Column) -> str:
    mean, std = row.mean.get(column.key), row.std.get(column.key)
    if mean is None:
        return ""
    fmt = FORMATS[column.fmt]
    if std is None or len(row.runs) < 2 or not any(ch in "123456789" for ch in fmt(std)):
        return fmt(mean)  # one run, or a spread below the shown precision
    return f"{fmt(mean)} ± {fmt(std)}"


def _header(by: str) -> list[str]:
    return {"arch": ["arch", "runs"], "curriculum": ["curriculum", "arch", "runs"]}.get(by, ["run", "arch", "seed"])


def _identity(row: Row, by: str) -> list[str]:
    if by == "arch":
        return [row.label, str(len(row.runs))]
    if by == "curriculum":
        return [row.label, row.arch, str(len(row.runs))]
    return [row.label, row.arch, row.runs[0].seed]


def to_markdown(rows: Sequence[Row], columns: Sequence[Column], by: str) -> str:
    columns = [c for c in columns if c.in_table]
    header = [*_header(by), *(c.label for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [*_identity(row, by), *(cell(row, c) for c in columns)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def to_csv(rows: Sequence[Row], columns: Sequence[Column], by: str, path: Path) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        stats = [name for c in columns for name in (c.key, f"{c.key}_std")]
        writer.writerow([*_header(by), *stats, "run_ids"])
        for row in rows:
            numbers = [_csv_number(v) for c in columns for v in (row.mean.get(c.key), row.std.get(c.key))]
            writer.writerow([*_identity(row, by), *numbers, " ".join(r.run_id for r in row.runs)])


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def to_html(rows: Sequence[Row], columns: Sequence[Column], by: str, title: str, notes: Sequence[str]) -> str:
    columns = [c for c in columns if c.in_table]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in [*_header(by), *(c.label for c in columns)])
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in
                                      [*_identity(row, by), *(cell(row, col) for col in columns)]) + "</tr>"
                     for row in rows)
    note_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}} th{{background:#f0f0f0}}
td:first-child{{text-align:left}}</style></head>
<body><h2>{html.escape(title)}</h2>{note_html}
<table><thead><tr>{header}</tr></thead><tbody>
{body}
</tbody></table></body></html>
"""


# -- plots -----------------------------------------------------------------------------------------------------------


def group_colors(groups: Iterable[str]) -> dict[str, Any]:
    """One colour per arch (or run), the same in every plot."""
    import matplotlib.pyplot as plt

    return {g: plt.cm.tab10(i % 10) for i, g in enumerate(sorted(groups))}


def _tokens_at(item: RunData, steps: Sequence[int]) -> list[float] | None:
    """Tokens seen at each optimizer step: steps x tokens per step when the run logged it (exact),
    else read off the step-aligned `tokens_seen` history (which is only logged every few steps)."""
    import numpy as np

    per_step = _number(item.run.data.params.get("train/tokens_per_step"))
    if per_step:
        return [step * per_step for step in steps]
    tokens = item.history.get("tokens_seen")
    if not tokens:
        return None
    xs, ys = zip(*tokens)
    return list(np.interp(steps, xs, ys))


def _stage_starts(item: RunData, use_tokens: bool) -> list[float]:
    """Where the `stage` index steps up, in tokens (or steps)."""
    points = item.history.get("stage", [])
    steps = [step for (step, value), (_, before) in zip(points[1:], points) if value > before]
    if not steps:
        return []
    return (_tokens_at(item, steps) or steps) if use_tokens else steps


def plot_val_loss(data: Sequence[RunData], by: str, path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    keys = ["val/loss", *sorted({k for d in data for k in d.history if _VAL_DOMAIN.match(k) and k.endswith("/loss")})]
    keys = [k for k in keys if any(d.history.get(k) for d in data)]
    if not keys:
        return None
    several_archs = len({d.arch for d in data}) > 1

    def group_of(item: RunData) -> str:
        if by == "curriculum":
            return f"{item.curriculum} · {item.arch}" if several_archs else item.curriculum
        return item.arch if by == "arch" else item.name

    colors = group_colors({group_of(d) for d in data})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    use_tokens = all(_tokens_at(d, [0]) is not None for d in data)
    # curriculum stage changes of every run (one line where budgets match); per curriculum in its colour
    boundaries = sorted({(x, group_of(item) if by == "curriculum" else "") for item in data
                         for x in _stage_starts(item, use_tokens)})
    for ax, key in zip(axes[0], keys):
        for x, group in boundaries:
            ax.axvline(x, color=colors[group] if group else "grey", ls="--", lw=0.8, alpha=0.7 if group else 1.0)
        labelled = set()
        for item in data:
            points = item.history.get(key)
            if not points:
                continue
            steps, values = zip(*points)
            xs = _tokens_at(item, steps) if use_tokens else list(steps)
            group = group_of(item)
            ax.plot(xs, values, color=colors[group], alpha=0.85, lw=1.4, marker="o", ms=2.5,
                    label=None if group in labelled else group)
            labelled.add(group)
        ax.set_title(key)
        ax.set_xlabel("tokens seen" if use_tokens else "optimizer step")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=labels.__getitem__)
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    return _save_figure(fig, path)


def plot_throughput(rows: Sequence[Row], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.mean.get("tokens_per_s") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    means = [r.mean["tokens_per_s"] for r in rows]
    errors = [r.std.get("tokens_per_s") or 0.0 for r in rows]
    colors = group_colors({r.arch for r in rows})
    bars = ax.bar([r.label for r in rows], means, yerr=errors if any(errors) else None, capsize=4,
                  color=[colors[r.arch] for r in rows])
    for bar, row in zip(bars, rows):
        mfu = row.mean.get("mfu")
        if mfu is not None:
            ax.annotate(f"MFU {100 * mfu:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("training tokens/s (median over windows)")
    ax.set_title("throughput")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


@dataclass
class LrPoint:
    lr: float
    objective: float
    group: str
    pruned: bool


def lr_points_from_runs(data: Sequence[RunData]) -> list[LrPoint]:
    return [LrPoint(d.values["lr"], d.values["objective"], d.arch, d.values.get("pruned_at_step") is not None)
            for d in data if d.values.get("lr") is not None and d.values.get("objective") is not None]


def lr_points_from_study(storage: str, study_name: str, param: str = "optim.lr") -> list[LrPoint]:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise LabError(f"no Optuna study {study_name!r} in {storage}") from None
    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if param in trial.params and trial.value is not None and math.isfinite(trial.value):
            points.append(LrPoint(trial.params[param], trial.value, study_name, "pruned_at_step" in trial.user_attrs))
    return points


def plot_lr(points: Sequence[LrPoint], objective: str, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if len({p.lr for p in points}) < 2:
        return None  # one learning rate: nothing to plot against
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = group_colors({p.group for p in points})
    for group, color in colors.items():
        mine = sorted((p for p in points if p.group == group), key=lambda p: p.lr)
        ax.plot([p.lr for p in mine], [p.objective for p in mine], color=color, alpha=0.4, lw=1)
        for pruned in (False, True):
            sel = [p for p in mine if p.pruned == pruned]
            if sel:
                ax.scatter([p.lr for p in sel], [p.objective for p in sel], color=color if not pruned else "none",
                           edgecolors=color, s=40, label=f"{group}{' (pruned)' if pruned else ''}")
        best = min(mine, key=lambda p: p.objective)
        ax.annotate(f"{best.lr:.2g}", (best.lr, best.objective), xytext=(0, -14), textcoords="offset points",
                    ha="center", fontsize=8, color=color)
    ax.set_xscale("log")
    ax.margins(y=0.15)  # room for the best-lr labels
    ax.set_xlabel("peak learning rate (optim.lr)")
    ax.set_ylabel(f"{objective} (final, or at pruning)")
    ax.set_title("learning rate vs objective")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


# -- the whole comparison ------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    out_dir: Path
    markdown: str
    rows: list[Row]
    columns: list[Column]
    selection: Selection
    files: list[Path]
    compare_run_id: str | None


def parse_tags(items: Iterable[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LabError(f"--tag {item!r}: expected KEY=VALUE, e.g. --tag bakeoff=v1")
        if "'" in value or "`" in key:
            raise LabError(f"--tag {item!r}: quotes cannot be matched in an MLflow filter")
        tags[key] = value
    return tags


def default_name(experiment: str, tags: Mapping[str, str]) -> str:
    name = "_".join([experiment, *tags.values()])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "compare"


def compare(experiment: str, tags: Mapping[str, str] | None = None, *, by: str = "arch", latest: bool = False,
            include_unfinished: bool = False, name: str | None = None, out_dir: Path | None = None,
            uri: str | None = None, study: str | None = None, storage: str | None = None,
            log_to_mlflow: bool = True, command: str | None = None, today: dt.date | None = None) -> Comparison:
    if by not in BY:
        raise LabError(f"--by {by!r}: expected one of {', '.join(BY)}")
    tags = dict(tags or {})
    uri = tracking_uri(uri)  # one rule (lab/tracking.py): --tracking-uri, $MLFLOW_TRACKING_URI, project store
    client = MlflowClient(uri)
    exp = find_experiment(client, experiment, uri)
    runs = search_runs(client, exp.experiment_id, tags)
    eval_runs = search_runs(client, exp.experiment_id, {}, has_tag=EVAL_OF_TAG)
    selection = select_runs(runs, eval_runs, include_unfinished=include_unfinished, latest=latest)
    if not selection.train:
        raise LabError(_empty_message(client, exp.experiment_id, experiment, tags, selection))
    data, columns = collect(client, selection)
    if by != "run":
        columns = [c for c in columns if c.key not in ("trial", "pruned_at_step")]  # per-run facts
    rows = build_rows(data, columns, by)

    today = today or dt.date.today()
    name = name or default_name(experiment, tags)
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "experiments" / f"{today.isoformat()}_{name}"
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, columns, by)
    files = [out / "table.md", out / "table.csv", out / "table.html"]
    files[0].write_text(markdown + "\n")
    to_csv(rows, columns, by, files[1])
    filters = ", ".join(f"{k}={v}" for k, v in tags.items()) or "none"
    notes = [f"MLflow experiment {experiment!r} ({uri}), tag filters: {filters}, rows by {by}, "
             f"{len(selection.train)} runs; cells are mean ± sample std over runs when they differ."]
    files[2].write_text(to_html(rows, columns, by, f"{experiment}: {name}", notes))

    objective = data[0].run.data.params.get("objective", "val/loss")
    points = lr_points_from_study(storage, study) if study and storage else lr_points_from_runs(data)
    plots = [plot_val_loss(data, by, out / "val_loss_vs_tokens.png"),
             plot_throughput(rows, out / "throughput.png"),
             plot_lr(points, objective, out / "lr_vs_objective.png")]
    files += [p for p in plots if p is not None]

    readme = out / "README.md"
    readme.write_text(_readme(experiment, name, uri, tags, by, latest, command, markdown, rows, objective,
                              selection, [p.name for p in plots if p is not None], today))
    files.append(readme)
    run_id = None
    if log_to_mlflow:
        run_id = _log_compare_run(client, exp.experiment_id, name, tags, by, out, len(selection.train))
        with readme.open("a") as handle:
            handle.write(f"\nLogged to MLflow as run `{run_id}` (tag {KIND_TAG}=compare).\n")
        client.log_artifact(run_id, str(readme))
    return Comparison(out, markdown, rows, columns, selection, files, run_id)


def _empty_message(client: MlflowClient, experiment_id: str, experiment: str, tags: Mapping[str, str],
                   selection: Selection) -> str:
    if selection.skipped:
        reasons = sorted({why for _, why in selection.skipped})
        return (f"experiment {experiment!r}: no finished training runs match tags {dict(tags) or '{}'} "
                f"({len(selection.skipped)} skipped: {'; '.join(reasons)}); --include-unfinished shows running "
                "or failed ones")
    if tags:
        everything = search_runs(client, experiment_id, {})
        seen = {k: sorted({r.data.tags[k] for r in everything if k in r.data.tags}) for k in tags}
        return (f"experiment {experiment!r} has {len(everything)} runs but none with tags {dict(tags)}; "
                f"values present: {seen}")
    return f"experiment {experiment!r} has no runs yet"


def _readme(experiment: str, name: str, uri: str, tags: Mapping[str, str], by: str, latest: bool,
            command: str | None, markdown: str, rows: Sequence[Row], objective: str, selection: Selection,
            plots: Sequence[str], today: dt.date) -> str:
    lines = [f"# {name}", "", f"Compared on {today.isoformat()} from MLflow.", "",
             "```", command or f"python -m lab.compare --experiment {experiment}", "```", "",
             f"- tracking URI: `{uri}`", f"- experiment: `{experiment}`",
             f"- tag filters: {', '.join(f'`{k}={v}`' for k, v in tags.items()) or 'none'}",
             f"- rows: one per {'curriculum and arch' if by == 'curriculum' else by}"
             + (" (newest run per arch, curriculum and seed)" if latest else "")
             + "; cells are mean ± sample std over the runs when they differ",
             "- values: final validation metrics (or at early stop), median throughput/MFU over logging windows,"
             " wall time inside the training loops summed over resumes (`time/train_s`)",
             "- `<domain> forgetting`: that domain's final loss minus its loss at the end of the last stage that "
             "trained mainly on it (higher: more forgotten; empty: no later stage); `<source> tokens`: tokens "
             "trained from that source", "", "## Table", "", markdown, ""]
    budget_note = unequal_budgets(rows, by)
    if budget_note:
        lines += [f"**Caution:** {budget_note}.", ""]
    for row in rows:
        if row.mixed:
            lines += [f"**Caution:** the {len(row.runs)} {row.label} runs averaged differ in more than the seed: "
                      f"{', '.join(row.mixed[:8])}{' ...' if len(row.mixed) > 8 else ''} (filter with --tag, "
                      "or --by run).", ""]
    ranked = [r for r in rows if r.mean.get("objective") is not None]
    if len(ranked) > 1:
        best, runner_up = ranked[0], ranked[1]
        spread = f" ± {best.std['objective']:.4f}" if best.std.get("objective") else ""
        lines += [f"Lowest {objective}: **{best.label}** ({best.mean['objective']:.4f}{spread}), "
                  f"{runner_up.mean['objective'] - best.mean['objective']:.4f} below {runner_up.label}.", ""]
    if plots:
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in plots), ""]
    lines += ["## Runs", "", "| run id | name | arch | seed | status |", "|---|---|---|---|---|"]
    for run in selection.train:
        lines.append(f"| `{run.info.run_id}` | {run.info.run_name} | {run.data.tags.get('arch', '')} | "
                     f"{run.data.tags.get('seed', '')} | {run.info.status} |")
    evals = [r for runs in selection.evals.values() for r in runs]
    if evals:
        lines += ["", "Evaluation runs joined by `eval_of`: " + ", ".join(f"`{r.info.run_id}`" for r in evals)]
    if selection.skipped:
        lines += ["", "Skipped:", *(f"- `{r.info.run_id}` ({r.info.run_name}): {why}" for r, why in selection.skipped)]
    return "\n".join(lines) + "\n"


def unequal_budgets(rows: Sequence[Row], by: str) -> str | None:
    """Curricula compare orders and mixtures: say so when their rows did not train on the same tokens."""
    budgets = {r.label: r.mean.get("tokens_seen") for r in rows if r.mean.get("tokens_seen") is not None}
    if by != "curriculum" or len(set(budgets.values())) < 2:
        return None
    shown = ", ".join(f"{label} {_count(tokens)}" for label, tokens in budgets.items())
    return (f"the curricula trained on different token budgets ({shown}); compare them at equal tokens with "
            "curriculum.total_tokens (experiment=curriculum_study)")


def _log_compare_run(client: MlflowClient, experiment_id: str, name: str, tags: Mapping[str, str], by: str,
                     out: Path, n_runs: int) -> str:
    run = client.create_run(experiment_id, run_name=f"compare-{name}", tags={KIND_TAG: "compare"})
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "compare/by", by)
        client.log_param(run_id, "compare/tags", ",".join(f"{k}={v}" for k, v in tags.items()) or "none")
        client.log_param(run_id, "compare/n_runs", n_runs)
        client.log_artifacts(run_id, str(out))
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# -- CLI ------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lab.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (e.g. arch_bakeoff)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs with this tag (repeatable), e.g. --tag bakeoff=v1")
    parser.add_argument("--by", choices=BY, default="arch",
                        help="one row per arch (mean ± std over seeds), per run (sweeps), or per curriculum "
                             "(and arch: an arch x curriculum grid)")
    parser.add_argument("--latest-per-arch", action="store_true",
                        help="only the newest finished run of each arch, curriculum and seed (re-run demos)")
    parser.add_argument("--include-unfinished", action="store_true", help="also running/failed/killed runs")
    parser.add_argument("--name", help="output name (default: experiment and tag values)")
    parser.add_argument("--out", type=Path, help="output folder (default: experiments/<date>_<name>)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or the project store)")
    parser.add_argument("--study", help="Optuna study for the lr plot (with --storage); default: runs' optim.lr")
    parser.add_argument("--storage", help="Optuna storage URL, e.g. sqlite:///multirun/optuna.db")
    parser.add_argument("--no-log", action="store_true", help="do not log a compare run to MLflow")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if bool(args.study) != bool(args.storage):
            raise LabError("--study and --storage go together")
        result = compare(args.experiment, parse_tags(args.tag), by=args.by, latest=args.latest_per_arch,
                         include_unfinished=args.include_unfinished, name=args.name, out_dir=args.out,
                         uri=args.tracking_uri, study=args.study, storage=args.storage,
                         log_to_mlflow=not args.no_log, command=shlex.join(["python", "-m", "lab.compare", *argv]))
    except Exception as err:  # noqa: BLE001 - the one exit path (lab.exit_with)
        return report_error(err, log)
    print(result.markdown)
    print()
    for run, why in result.selection.skipped:
        print(f"skipped {run.info.run_id[:8]} ({run.info.run_name}): {why}")
    for row in result.rows:
        if row.mixed:
            print(f"caution: the {len(row.runs)} {row.label} runs averaged differ in more than the seed: "
                  f"{', '.join(row.mixed[:8])} (filter with --tag, or use --by run)")
    budget_note = unequal_budgets(result.rows, args.by)
    if budget_note:
        print(f"caution: {budget_note}")
    print(f"wrote {', '.join(p.name for p in result.files)} to {result.out_dir}")
    if result.compare_run_id:
        print(f"logged to MLflow run {result.compare_run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
