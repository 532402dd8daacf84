"""Compare runs from MLflow: one table row per arch (mean ± std over seeds), plots, a README.

    python -m lab.compare --experiment arch_bakeoff [--tag bakeoff=v1] [--by arch|run|curriculum] [--latest-per-arch]
                          [--name NAME] [--out DIR] [--study NAME --storage URL] [--no-log]

Reads the metrics the trainer logs (docs/CONTRACTS.md): final validation loss, bits-per-byte and
perplexity per domain, forgetting per domain, tokens per source, parameters, tokens seen, FLOPs/token, throughput, MFU, peak memory, wall time
and energy; plus `quant/<variant>/<metric>` from evaluation runs tagged `eval_of=<training run id>`,
joined to the training run they evaluate. Writes table.md / table.csv / table.html and PNG plots to
experiments/<date>_<name>/ with a README recording the command, filters and run ids, and logs the
same folder to a "compare" run in the experiment. A metric a run lacks is an empty cell.

The command only: reading the runs is lab/runs/records.py, the table lab/runs/tables.py, the plots lab/runs/plots.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from mlflow.tracking import MlflowClient

from lab import PROJECT_ROOT, LabError, report_error
from lab.runs.plots import lr_points_from_runs, lr_points_from_study, plot_lr, plot_throughput, plot_val_loss
from lab.runs.records import (EVAL_OF_TAG, KIND_TAG, Selection, collect, default_name, find_experiment, search_runs,
                              select_runs)
from lab.runs.tables import (BY, PER_RUN_KEYS, Column, Row, build_rows, format_count, markdown_table, table_columns,
                             to_csv, to_html, to_markdown)
from lab.runs.tracking import tracking_uri

log = logging.getLogger("lab.compare")


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


def compare(experiment: str, tags: Mapping[str, str] | None = None, *, by: str = "arch", latest: bool = False,
            include_unfinished: bool = False, name: str | None = None, out_dir: Path | None = None,
            uri: str | None = None, study: str | None = None, storage: str | None = None,
            log_to_mlflow: bool = True, command: str | None = None, today: dt.date | None = None) -> Comparison:
    if by not in BY:
        raise LabError(f"--by {by!r}: expected one of {', '.join(BY)}")
    tags = dict(tags or {})
    uri = tracking_uri(uri)  # one rule (lab/runs/tracking.py): --tracking-uri, $MLFLOW_TRACKING_URI, project store
    client = MlflowClient(uri)
    exp = find_experiment(client, experiment, uri)
    runs = search_runs(client, exp.experiment_id, tags)
    eval_runs = search_runs(client, exp.experiment_id, {}, has_tag=EVAL_OF_TAG)
    selection = select_runs(runs, eval_runs, include_unfinished=include_unfinished, latest=latest)
    if not selection.train:
        raise LabError(_empty_message(client, exp.experiment_id, experiment, tags, selection))
    data = collect(client, selection)
    columns = table_columns(data)
    if by != "run":
        columns = [c for c in columns if c.key not in PER_RUN_KEYS]
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
    lines += ["## Runs", "", markdown_table(["run id", "name", "arch", "seed", "status"],
                                            [[f"`{run.info.run_id}`", run.info.run_name, run.data.tags.get("arch", ""),
                                              run.data.tags.get("seed", ""), run.info.status]
                                             for run in selection.train])]
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
    shown = ", ".join(f"{label} {format_count(tokens)}" for label, tokens in budgets.items())
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
