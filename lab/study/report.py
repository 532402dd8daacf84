"""The study's write-up: experiments/<date>_<study>/REPORT.md and REPORT.html, also logged to MLflow (kind=report).

Every number comes from the MLflow records of the study's own runs (lab.runs.records reads them): the comparison table
with quantized columns, per-domain bits-per-byte, loss curves with stage boundaries, quality against speed and
memory per arch x variant, the int8/int4 deltas, which arch differences exceed the spread across seeds (Welch's
t-test on the final validation loss), sample generations of every arch, and the commands, git sha, data and
tokenizer hashes that reproduce it.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import shlex
import statistics
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

from lab import LabError
from lab.runs.records import (EVAL_OF_TAG, REFERENCE_VARIANTS, RunData, by_arch, collect, finite_mean, search_runs,
                              select_runs, variants_of)
from lab.runs.tables import Column, Row, build_rows, cell, markdown_table, table_columns, to_csv
from lab.generation.sampling import Sampling, generate
from lab.models.loading import load_model, load_tokenizer, resolve_source
from lab.runs.tracking import get_or_create_experiment, tracking_uri
from lab.study.plan import Outcome, Plan, train_command
from lab.runs.plots import plot_bpb_per_domain, plot_quality_speed_memory, plot_val_loss


log = logging.getLogger("lab.study.report")


@dataclass
class Block:
    kind: str                        # text | table | image | code
    text: str = ""                   # text, code, or the image's file name
    header: Sequence[str] = ()
    rows: Sequence[Sequence[str]] = ()


@dataclass
class Section:
    title: str
    blocks: list[Block]


# -- rendering ----------------------------------------------------------------------------------------------------


def to_markdown(title: str, sections: Sequence[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        for block in section.blocks:
            if block.kind == "table":
                parts.append(markdown_table(block.header, block.rows))
            elif block.kind == "image":
                parts.append(f"![{block.text}]({block.text})")
            elif block.kind == "code":
                parts.append("```\n" + block.text + "\n```")
            else:
                parts.append(block.text)
    return "\n\n".join(parts) + "\n"


def to_html(title: str, sections: Sequence[Section]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if block.kind == "table":
                head = "".join(f"<th>{esc(str(c))}</th>" for c in block.header)
                rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif block.kind == "image":
                body.append(f'<p><img src="{esc(block.text)}" alt="{esc(block.text)}"></p>')
            elif block.kind == "code":
                body.append(f"<pre>{esc(block.text)}</pre>")
            else:
                body.append(f"<p>{esc(block.text)}</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;font-size:"
             "13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}pre{background:"
             "#f4f4f4;padding:8px;white-space:pre-wrap}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


# -- the numbers ----------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def quant_deltas(data: Sequence["RunData"]) -> Block | None:
    """Per arch and quantized variant: bits-per-byte change per source, size and decode speed against the reference."""
    variants = variants_of(data)
    reference = next((v for v in variants if v in REFERENCE_VARIANTS), None)
    quantized = [v for v in variants if v not in REFERENCE_VARIANTS]
    if reference is None or not quantized:
        return None
    sources = sorted({k.split("/")[3] for item in data for k in item.values
                      if k.startswith(f"quant/{reference}/val/") and k.endswith("/bpb")})
    header = ["arch", "variant", *[f"Δ {s} bpb %" for s in sources], f"size / {reference}", f"decode tok/s / {reference}"]
    rows = []
    for arch, items in by_arch(data).items():
        for variant in quantized:
            def ratio(key: str) -> float | None:
                pairs = [(i.values.get(f"quant/{variant}/{key}"), i.values.get(f"quant/{reference}/{key}")) for i in items]
                return finite_mean([q / r for q, r in pairs if q is not None and r])

            if all(i.values.get(f"quant/{variant}/size_mb") is None for i in items):
                continue
            deltas = [ratio(f"val/{s}/bpb") for s in sources]
            rows.append([arch, variant, *[_fmt(None if d is None else 100 * (d - 1), 3) for d in deltas],
                         _fmt(ratio("size_mb"), 3), _fmt(ratio("decode_tok_s_bs1"), 3)])
    return Block("table", header=header, rows=rows) if rows else None


def seed_test(data: Sequence["RunData"], alpha: float) -> list[Block]:
    """Which arch differences in final val/loss exceed the spread across seeds (Welch's two-sided t-test)."""
    groups = {arch: [i.values["val_loss"] for i in items if i.values.get("val_loss") is not None]
              for arch, items in by_arch(data).items()}
    seeds = sorted({len(v) for v in groups.values()})
    if not groups or min(seeds) < 2:
        return [Block("text", "Each arch has a single seed here, so no difference between archs can be told apart "
                              "from seed noise: run the experiment with two or more seeds (its sweep's `seed` list).")]
    from scipy import stats

    rows = []
    for a, b in combinations(groups, 2):
        test = stats.ttest_ind(groups[a], groups[b], equal_var=False)
        diff = statistics.fmean(groups[a]) - statistics.fmean(groups[b])
        verdict = "differs beyond seed spread" if test.pvalue < alpha else "within seed spread"
        rows.append([a, b, f"{diff:+.4f}", f"{test.pvalue:.3g}", verdict])
    text = (f"Welch's two-sided t-test on the final validation loss, {', '.join(map(str, seeds))} seed(s) per arch, "
            f"alpha = {alpha}: a difference counts only when p < alpha; with few seeds the test is weak, so "
            "'within seed spread' means 'not shown', not 'equal'.")
    return [Block("text", text), Block("table", header=["arch A", "arch B", "loss A - B", "p", "verdict"], rows=rows)]


# -- generations ---------------------------------------------------------------------------------------------------------


def sample_generations(data: Sequence["RunData"], prompts: Sequence[str], max_new_tokens: int) -> list[Block]:
    """Greedy continuations of the fixed prompts by the first run of each arch (its float export)."""

    if not prompts:
        return [Block("text", "No prompts configured (study.prompts).")]
    sampling = Sampling.greedy(max_new_tokens)
    rows = []
    for arch, items in by_arch(data).items():
        folder = Path(items[0].run.data.tags.get("run_dir", "")) / "hf"
        try:
            source = resolve_source(folder)
            model, _ = load_model(source, "cpu")
            # greedy: the seed is unused; a prompt starts a new document, as in training
            continuations = generate(model, load_tokenizer(source), list(prompts), sampling, seed=0, prepend_eos=True)
        except LabError as err:
            rows.append([arch, "", f"(no generations: {err})"])
            continue
        rows += [[arch, prompt, texts[0].strip()] for prompt, texts in zip(prompts, continuations)]
    text = (f"Greedy (argmax, no repetition penalty), {max_new_tokens} new tokens, from the float export of each "
            "arch's first run.")
    return [Block("text", text), Block("table", header=["arch", "prompt", "continuation"], rows=rows)]


# -- the report -----------------------------------------------------------------------------------------------------------


def study_data(plan: "Plan") -> tuple[Any, list["RunData"], list["Column"], list["Row"]]:
    """The study's own finished runs and their evaluations, as lab.compare reads them."""
    from mlflow.tracking import MlflowClient


    client = MlflowClient(tracking_uri(plan.cfg.logger.tracking_uri))
    runs = [client.get_run(job.run.info.run_id) for job in plan.jobs if job.run is not None]
    if not runs:
        return client, [], [], []
    evals = search_runs(client, runs[0].info.experiment_id, {}, has_tag=EVAL_OF_TAG)
    data = collect(client, select_runs(runs, evals))
    columns = table_columns(data)
    columns = [c for c in columns if c.key not in ("trial", "pruned_at_step")]
    return client, data, columns, build_rows(data, columns, "arch")


def reproduce_block(plan: "Plan", data: Sequence["RunData"]) -> list[Block]:

    tags = data[0].run.data.tags if data else {}
    facts = [["git sha", tags.get("git_sha", tags.get("mlflow.source.git.commit", "?"))],
             ["data sha256", tags.get("data_sha256", "?")], ["tokenizer sha256", tags.get("tokenizer_sha256", "?")],
             ["MLflow experiment", str(plan.cfg.logger.experiment_name)]]
    command = shlex.join(["python", "-m", "lab.study", f"experiment={plan.experiment}", *plan.overrides])
    steps = "\n".join([command, "# which runs:", shlex.join(["python", *train_command(plan)[1:]]),
                       "# then, per run: python -m lab.quantize model_path=<run_dir>/hf; python -m lab.evaluate "
                       "model_path=<run_dir>/hf"])
    return [Block("table", header=["what", "value"], rows=facts), Block("code", steps)]


def status_block(outcomes: Sequence["Outcome"], train_code: int) -> list[Block]:
    rows = [[o.run_name, o.run.info.run_id[:8] if o.run is not None else "-",
             "finished" if o.run is not None else "FAILED (see the training log)", o.quantize, o.evaluate,
             "; ".join(f"{k}: {v}" for k, v in o.skipped_variants.items())] for o in outcomes]
    blocks = [Block("table", header=["run", "MLflow run", "training", "quantize", "evaluate", "variants skipped"],
                    rows=rows)]
    if train_code:
        blocks.insert(0, Block("text", f"The training multirun exited with status {train_code}: the runs marked "
                                       "FAILED are left out of every table below."))
    return blocks


def write_report(plan: "Plan", outcomes: Sequence["Outcome"], train_code: int) -> Path:

    out = plan.report_dir
    out.mkdir(parents=True, exist_ok=True)
    client, data, columns, rows = study_data(plan)
    sections = [Section("Reproduce", reproduce_block(plan, data)), Section("Runs", status_block(outcomes, train_code))]
    if data:
        shown = [c for c in columns if c.in_table]
        to_csv(rows, columns, "arch", out / "table.csv")  # every column, the secondary evaluation metrics too
        table = Block("table", header=["arch", "runs", *[c.label for c in shown]],
                      rows=[[r.label, str(len(r.runs)), *[cell(r, c) for c in shown]] for r in rows])
        sections.append(Section("Comparison", [Block("text", "Mean ± sample std over seeds; quantized columns come "
                                                             "from lab.evaluate runs of each training run."), table]))
        plots = [("Quality per domain", plot_bpb_per_domain(data, out / "bpb_per_domain.png")),
                 ("Loss curves (dashed: stage boundaries)", plot_val_loss(data, "arch", out / "val_loss_vs_tokens.png")),
                 ("Quality vs speed vs memory", plot_quality_speed_memory(data, out / "quality_speed_memory.png"))]
        sections += [Section(title, [Block("image", path.name)]) for title, path in plots if path is not None]
        deltas = quant_deltas(data)
        if deltas is not None:
            sections.append(Section("Quantization: change against the float reference", [deltas]))
        sections.append(Section("Seeds: which differences are real", seed_test(data, float(plan.cfg.study.alpha))))
        prompts = [str(p) for p in (plan.cfg.study.prompts or [])]
        sections.append(Section("Sample generations", sample_generations(data, prompts, int(plan.cfg.study.max_new_tokens))))
    else:
        sections.append(Section("Comparison", [Block("text", "No training run of this study finished: nothing to "
                                                             "compare yet.")]))
    title = f"Study {plan.experiment}: {dt.date.today().isoformat()}"
    report = out / "REPORT.md"
    _write_atomic(report, to_markdown(title, sections))
    _write_atomic(out / "REPORT.html", to_html(title, sections))
    log_report(client, plan, out, data)
    return report


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def log_report(client: Any, plan: "Plan", out: Path, data: Sequence["RunData"]) -> None:
    """The report as an MLflow run (kind=report) in the study's experiment, beside its runs."""

    uri = tracking_uri(plan.cfg.logger.tracking_uri)
    experiment_id = get_or_create_experiment(str(plan.cfg.logger.experiment_name), uri)
    run = client.create_run(experiment_id, run_name=f"report-{out.name}",
                            tags={"kind": "report", "study": plan.experiment, "runs": ",".join(d.run_id for d in data)})
    for path in sorted(out.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            client.log_artifact(run.info.run_id, str(path), artifact_path="report")
    client.set_terminated(run.info.run_id, "FINISHED")
