"""Tables: the lab's one markdown table writer, and the comparison table built from run records.

`markdown_table(header, rows)` writes every markdown table the lab prints or saves (lab.compare, lab.study.report,
lab.evaluate, lab.bench, lab.bench_eval). The comparison table has one `Column` per value a run may have
(`table_columns`), one `Row` per arch, curriculum or run with the mean ± sample std over its runs
(`build_rows`), and is written as markdown, CSV (every column, secondary metrics too) and HTML.
"""

from __future__ import annotations

import html
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lab.runs.records import FORGETTING, RunData, SOURCE_TOKENS, STAGE_TOKENS, VAL_DOMAIN
from lab.runs.tracking import is_launch_setting


BY = ("arch", "run", "curriculum")  # rows: per arch, per run, or per curriculum (and arch, for a grid)
PER_RUN_KEYS = ("trial", "pruned_at_step")  # facts of one run, meaningless as a mean over runs
# Evaluation metrics shown in the table (all `quant/...` metrics go to the CSV): perplexity per
# source, size on disk, time to first token.
_QUANT_SHOWN = re.compile(r"^quant/(?P<variant>[^/]+)/(?:val/(?P<source>[^/]+)/ppl|size_mb|ttft_ms_(?P<len>\d+))$")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """The lab's one markdown table writer: a `|` or a line break inside a cell cannot break the table."""
    if not header:
        raise ValueError("a markdown table needs at least one column")
    for index, row in enumerate(rows):
        if len(row) != len(header):  # a short or long row would shift every cell after it: a wrong table
            raise ValueError(f"markdown table row {index} has {len(row)} cells for {len(header)} columns")
    return "\n".join([_table_line(header), "|" + "|".join("---" for _ in header) + "|", *map(_table_line, rows)])


def _table_line(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_table_cell(c) for c in cells) + " |"


def _table_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


# -- formats ------------------------------------------------------------------------------------------------------


def format_count(x: float) -> str:
    """1234567 -> 1.23M: parameters and tokens."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}" if abs(x) / scale < 100 else f"{x / scale:.0f}{unit}"
    return f"{x:.3g}"


def format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


FORMATS: dict[str, Callable[[float], str]] = {
    "count": format_count,
    "loss": lambda x: f"{x:.4f}",
    "ppl": lambda x: f"{x:.2f}" if x < 1e4 else f"{x:.3g}",
    "rate": lambda x: f"{x:,.0f}",
    "pct": lambda x: f"{100 * x:.2f}%",
    "gb": lambda x: f"{x:.2f}",
    "time": format_duration,
    "sci": lambda x: f"{x:.3g}",
    "int": lambda x: f"{x:.0f}",
    "num": lambda x: f"{x:.4g}",
}


# -- columns --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    key: str              # CSV name, and the key of a run's values
    label: str            # table header
    fmt: str              # a FORMATS key
    in_table: bool = True  # False: CSV only (the many secondary evaluation metrics)


def table_columns(data: Sequence["RunData"]) -> list[Column]:
    """The comparison's columns, in table order: those at least one run has a value for."""
    keys = {key for item in data for key in item.values}
    token_keys = sorted(k for k in keys if SOURCE_TOKENS.match(k) or STAGE_TOKENS.match(k))
    columns = [
        Column("lr", "lr", "sci"),
        Column("params_total", "params", "count"),
        Column("params_non_embedding", "non-emb params", "count"),
        Column("tokens_seen", "tokens", "count"),
        *[Column(k, f"{k.split('/', 1)[1]} tokens", "count") for k in token_keys if SOURCE_TOKENS.match(k)],
        Column("flops_per_token", "FLOPs/token", "sci"),
        Column("val_loss", "val loss", "loss"),
        Column("ppl", "ppl", "ppl"),
    ]
    for domain in sorted({m.group(1) for k in keys if (m := VAL_DOMAIN.match(k))}):
        columns += [Column(f"val/{domain}/loss", f"{domain} loss", "loss"),
                    Column(f"val/{domain}/bpb", f"{domain} bpb", "loss"),
                    Column(f"val/{domain}/ppl", f"{domain} ppl", "ppl")]
    # how much a domain's loss rose after the last stage that trained mainly on it (lab/training/module.py)
    columns += [Column(k, f"{m.group(1)} forgetting", "loss") for k in sorted(keys) if (m := FORGETTING.match(k))]
    columns += [Column(k, k, "count", in_table=False) for k in token_keys if STAGE_TOKENS.match(k)]
    columns += [
        Column("tokens_per_s", "tokens/s", "rate"),
        Column("mfu", "MFU", "pct"),
        Column("peak_memory_gb", "peak mem GB", "gb"),
        Column("wall_time_s", "wall time", "time"),
        Column("kwh", "kWh", "num"),
        Column("trial", "trial", "int"),
        Column("pruned_at_step", "pruned at step", "int"),
    ]
    columns += [quant_column(k) for k in sorted((k for k in keys if k.startswith("quant/")), key=natural_order)]
    # a column no run has is noise (e.g. kWh without codecarbon); an empty cell is for a run that lacks it
    return [c for c in columns if any(d.values.get(c.key) is not None for d in data)]


def natural_order(key: str) -> tuple[Any, ...]:
    """Numbers inside a key compare as numbers: ttft_ms_63 < ttft_ms_128 < ttft_ms_512 < ttft_ms_2048."""
    # re.split with a group alternates text (even indices) and digit runs (odd indices)
    return tuple(int(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+)", key)))


def quant_column(key: str) -> Column:
    match = _QUANT_SHOWN.match(key)
    if match is None:
        return Column(key, key.removeprefix("quant/"), "num", in_table=False)
    variant, source, length = match.group("variant", "source", "len")
    if source:
        return Column(key, f"{variant} {source} ppl", "ppl")
    if length:
        return Column(key, f"{variant} TTFT ms ({length} tok)", "num")
    return Column(key, f"{variant} size MB", "num")  # size_mb: lab.config.units.MB


# -- rows -----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    arch: str
    runs: list["RunData"]
    mean: dict[str, float | None]
    std: dict[str, float | None]
    mixed: list[str] = field(default_factory=list)  # settings that differ between the runs averaged here


_SEED_PARAMS = {"seed", "data.shuffle_seed"}  # what a row's runs are meant to differ in


def mixed_settings(items: Sequence["RunData"]) -> list[str]:
    """Config params whose values differ between runs that one row averages (besides the seed)."""

    params = [i.run.data.params for i in items]
    keys = set().union(*params) if params else set()
    return sorted(k for k in keys if k not in _SEED_PARAMS and not is_launch_setting(k)
                  and len({p.get(k) for p in params}) > 1)


def _group_key(item: "RunData", by: str) -> tuple[str, ...]:
    if by == "arch":
        return (item.arch,)
    if by == "curriculum":  # an arch x curriculum grid keeps one row per pair
        return (item.curriculum, item.arch)
    return (item.run_id,)


def build_rows(data: Sequence["RunData"], columns: Sequence[Column], by: str = "arch") -> list[Row]:
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


# -- writers --------------------------------------------------------------------------------------------------------


def _header(by: str) -> list[str]:
    return {"arch": ["arch", "runs"], "curriculum": ["curriculum", "arch", "runs"]}.get(by, ["run", "arch", "seed"])


def _identity(row: Row, by: str) -> list[str]:
    if by == "arch":
        return [row.label, str(len(row.runs))]
    if by == "curriculum":
        return [row.label, row.arch, str(len(row.runs))]
    return [row.label, row.arch, row.runs[0].seed]


def to_markdown(rows: Sequence[Row], columns: Sequence[Column], by: str) -> str:
    shown = [c for c in columns if c.in_table]
    return markdown_table([*_header(by), *(c.label for c in shown)],
                          [[*_identity(row, by), *(cell(row, c) for c in shown)] for row in rows])


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
