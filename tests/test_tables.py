"""lab.runs.tables (the one markdown writer, the comparison's columns and rows), lab.runs.records' run rule, lab.config.units."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab import PROJECT_ROOT
from lab.config import units
from lab.runs.records import RunData, as_number, read_run, select_runs
from lab.runs.tables import Column, build_rows, cell, markdown_table, table_columns, to_markdown


def cells_of(line: str) -> list[str]:
    """A markdown table line's cells, split on the pipes that are not escaped."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def assert_well_formed(table: str, columns: int) -> list[list[str]]:
    lines = table.split("\n")
    assert lines[1] == "|" + "|".join(["---"] * columns) + "|"
    rows = [cells_of(line) for line in lines[:1] + lines[2:]]
    assert all(len(row) == columns for row in rows), rows
    return rows


# -- the one markdown writer ----------------------------------------------------------------------------------------


def test_markdown_table_layout():
    table = markdown_table(["a", "b"], [["1", "x"], [2, None]])
    assert table == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | None |"
    assert markdown_table(["only"], []) == "| only |\n|---|"


@pytest.mark.parametrize("text", ["a|b", "|", "a\nb", "a\r\nb", "x\r", "\\|", "a || b\n|c|"])
def test_a_cell_cannot_break_the_table(text):
    rows = assert_well_formed(markdown_table(["h|1", "h2"], [[text, "after"]]), 2)
    assert rows[0] == ["h|1", "h2"]
    assert rows[1][1] == "after"                        # the next cell did not move
    assert "\n" not in rows[1][0] and "\r" not in rows[1][0]


@pytest.mark.parametrize("rows", [[["1"]], [["1", "2", "3"]], [["1", "2"], []]])
def test_a_row_of_the_wrong_width_is_refused(rows):
    with pytest.raises(ValueError, match="cells for 2 columns"):
        markdown_table(["a", "b"], rows)


def test_a_table_without_columns_is_refused():
    with pytest.raises(ValueError):
        markdown_table([], [])


def test_every_writer_goes_through_markdown_table():
    from lab.bench import COLUMNS, Row as BenchRow, results_table
    from lab.bench_eval import Criterion, format_criteria
    from lab.evaluation.suite import Report, format_table

    evaluated = format_table([Report("fp|32", Path("."), False, {"size_mb": 1.5, "val/web/ppl": 12.0}),
                              Report("int8wo", Path("."), True, {"val/web/ppl": 12.5})])
    assert assert_well_formed(evaluated, 3)[1:] == [["fp|32", "1.5", "12.00"], ["int8wo", "", "12.50"]]
    criteria = format_criteria([Criterion("ppl_increase", 0.01, 0.02, True, "a | note\non two lines")], "v", "r")
    assert assert_well_formed(criteria, 5)[1] == ["ppl_increase", "+1.000%", "<= 2.00%", "PASS",
                                                  "a | note on two lines"]
    benched = results_table([BenchRow("llama_gqa", "tuned", 2, 32, notes="x | y")])
    assert assert_well_formed(benched, len(COLUMNS))[1][-1] == "x | y"


def test_no_module_writes_markdown_tables_by_hand():
    for path in sorted((PROJECT_ROOT / "lab").rglob("*.py")):
        name = path.relative_to(PROJECT_ROOT).as_posix()
        if name == "lab/runs/tables.py":
            continue
        rule = re.search(r"""["']\|-{3}|-{3}\|["']|["']-{3}["']""", path.read_text())  # "|---", "---|", "---"
        assert rule is None, f"{name} writes a markdown table rule itself: use lab.runs.tables.markdown_table"


# -- units ----------------------------------------------------------------------------------------------------------


def test_byte_units_have_one_meaning():
    assert (units.MB, units.GB, units.MiB, units.GiB) == (10**6, 10**9, 2**20, 2**30)


def test_no_module_defines_its_own_byte_unit():
    for path in sorted((PROJECT_ROOT / "lab").rglob("*.py")):
        name = path.relative_to(PROJECT_ROOT).as_posix()
        if name == "lab/config/units.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
                assert not targets & {"MB", "MiB", "GB", "GiB", "KB", "KiB"}, f"{name}:{node.lineno} defines a unit"


# -- run records: which runs, which values ------------------------------------------------------------------------


def fake_run(run_id: str, tags: dict, status: str = "FINISHED", metrics: dict | None = None,
             params: dict | None = None):
    """The parts of an mlflow Run that lab.runs.records reads."""
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name=run_id, status=status, start_time=0,
                                                end_time=60_000),
                           data=SimpleNamespace(tags=tags, metrics=metrics or {}, params=params or {}))


def test_the_training_run_rule():
    runs = [fake_run("new", {"arch": "a", "seed": "1"}), fake_run("eval", {"eval_of": "new", "kind": "eval"}),
            fake_run("cmp", {"kind": "compare"}), fake_run("rep", {"kind": "report"}),
            fake_run("noarch", {}), fake_run("running", {"arch": "a"}, status="RUNNING"),
            fake_run("old", {"arch": "a", "seed": "1"}), fake_run("other", {"arch": "b", "kind": "train"})]
    chosen = select_runs(runs, [runs[1]])
    assert [r.info.run_id for r in chosen.train] == ["new", "old", "other"]
    why = {run.info.run_id: reason for run, reason in chosen.skipped}
    assert set(why) == {"rep", "noarch", "running"}  # evaluation and compare runs are no candidates at all
    assert "report" in why["rep"] and "arch" in why["noarch"] and "RUNNING" in why["running"]
    assert [r.info.run_id for r in chosen.evals["new"]] == ["eval"]
    latest = select_runs(runs, latest=True, include_unfinished=True)
    # the newest run per (arch, curriculum, seed): "old" repeats "new"; "running" has no seed, its own key
    assert [r.info.run_id for r in latest.train] == ["new", "running", "other"]
    assert "latest-per-arch" in dict((r.info.run_id, why) for r, why in latest.skipped)["old"]


@pytest.mark.parametrize("text, expected", [("3e-4", 3e-4), ("7", 7.0), (None, None), ("", None), ("None", None),
                                            ("nan", None), ("inf", None), ("-inf", None), ("abc", None),
                                            ([1], None)])
def test_params_read_as_numbers_only_when_they_are(text, expected):
    assert as_number(text) == expected


def test_damaged_params_give_empty_cells_not_errors():
    run = fake_run("r", {"arch": "a", "optuna_trial": "x", "optuna_pruned_at_step": "nan"},
                   metrics={"val/loss": 3.0, "val/web/bpb": 0.5, "tokens/web": 10.0},
                   params={"optim.lr": "not a number", "model/params_total": "inf", "train/total_tokens": "[1, 2]"})
    client = SimpleNamespace(get_metric_history=lambda run_id, key: [])
    item = read_run(client, run)
    values = item.values
    assert values["lr"] is None and values["params_total"] is None and values["trial"] is None
    assert values["pruned_at_step"] is None and values["tokens_seen"] is None
    assert values["val_loss"] == 3.0 and values["ppl"] == pytest.approx(math.exp(3.0))
    assert values["val/web/bpb"] == 0.5 and values["tokens/web"] == 10.0


# -- the comparison's columns and rows ---------------------------------------------------------------------------------


def run_data(arch: str, seed: str, **values: float | None) -> RunData:
    return RunData(fake_run(f"{arch}-{seed}", {"arch": arch, "seed": seed}, params={"seed": seed}), dict(values))


def test_columns_follow_the_table_order_and_drop_what_no_run_has():
    data = [run_data("a", "1", val_loss=3.0, objective=3.0, lr=1e-3, **{
        "val/web/loss": 3.1, "val/books/bpb": 0.6, "val/web/forgetting": 0.1, "tokens/web": 5.0,
        "tokens/0/web": 5.0, "quant/int8wo/ttft_ms_128": 2.0, "quant/int8wo/ttft_ms_63": 1.0,
        "quant/int8wo/size_mb": 1.0, "quant/int8wo/load_s": 0.2, "kwh": None})]
    columns = table_columns(data)
    keys = [c.key for c in columns]
    assert keys == ["lr", "tokens/web", "val_loss", "val/books/bpb", "val/web/loss", "val/web/forgetting",
                    "tokens/0/web", "quant/int8wo/load_s", "quant/int8wo/size_mb", "quant/int8wo/ttft_ms_63",
                    "quant/int8wo/ttft_ms_128"]
    hidden = {c.key for c in columns if not c.in_table}
    assert hidden == {"tokens/0/web", "quant/int8wo/load_s"}  # CSV only
    assert {c.key: c.label for c in columns}["quant/int8wo/size_mb"] == "int8wo size MB"
    assert table_columns([]) == []


def test_rows_average_seeds_and_hide_a_spread_below_the_precision():
    data = [run_data("a", "1", val_loss=3.0, objective=3.0, lr=1e-3), run_data("a", "2", val_loss=3.2, objective=3.2,
                                                                               lr=1e-3),
            run_data("b", "1", val_loss=2.0, objective=2.0, lr=float("nan")), run_data("c", "1", val_loss=None)]
    columns = [Column("val_loss", "val loss", "loss"), Column("lr", "lr", "sci")]
    rows = build_rows(data, columns)
    assert [r.label for r in rows] == ["b", "a", "c"]  # best objective first, no objective last
    a = rows[1]
    assert cell(a, columns[0]) == "3.1000 ± 0.1414" and cell(a, columns[1]) == "0.001"  # equal lr: no ± 0
    assert cell(rows[0], columns[1]) == "" and cell(rows[2], columns[0]) == ""  # nan and missing: empty
    table = to_markdown(rows, columns, "arch")
    assert assert_well_formed(table, 4)[0] == ["arch", "runs", "val loss", "lr"]
