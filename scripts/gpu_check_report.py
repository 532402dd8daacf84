"""The table at the end of scripts/gpu_check.sh: one row per step from <out>/steps.tsv and the steps' logs, then the
tables the steps wrote (gpu tests, lab.bench, decode), into <out>/README.md. Standard library only.

    python scripts/gpu_check_report.py OUT_DIR
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

TIMED_OUT = {124, 137}
# How a step says that it stopped where CUDA is needed: the lab's one error line, or a skip reason.
NEEDS_CUDA = re.compile(r"needs (a )?CUDA|no CUDA device|asks for a GPU|sees no CUDA", re.IGNORECASE)


def last_error_line(log: str) -> str:
    errors = [line.strip() for line in log.splitlines() if line.startswith("error:")]
    if errors:
        return errors[-1]
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def test_outcomes(junit: Path) -> list[tuple[str, str, str]]:
    """(test, outcome, reason) per test case of pytest's JUnit XML."""
    if not junit.is_file():
        return []
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError:
        return []
    rows = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, reason = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                reason = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                break
        rows.append((name, outcome, reason))
    return rows


def outcome(name: str, code: int, log: str, tests: list[tuple[str, str, str]]) -> str:
    if code in TIMED_OUT:
        return "timed out"
    if code != 0:
        line = last_error_line(log)
        return f"needs CUDA: {line}" if NEEDS_CUDA.search(line) else f"failed: {line}"
    if name == "gpu_tests" and tests:
        counts = {o: sum(1 for _, got, _ in tests if got == o) for o in ("passed", "skipped")}
        if counts["passed"] == 0 and all(NEEDS_CUDA.search(reason) for _, _, reason in tests):
            return f"needs CUDA: all {len(tests)} gpu tests skipped ({tests[0][2]})"
        return f"ok: {counts['passed']} passed, {counts['skipped']} skipped"
    notes = [line.strip() for line in log.splitlines() if NEEDS_CUDA.search(line) and "skipped" in line]
    return "ok" + (f" ({notes[0]})" if notes else "")


def report(out: Path) -> str:
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line.strip()]
    tests = test_outcomes(out / "logs" / "gpu_tests.xml")
    lines = [f"# GPU check ({datetime.now():%Y-%m-%d %H:%M})", "",
             "Written by `bash scripts/gpu_check.sh`; each step's log is in `logs/<step>.log`.", "",
             "| step | outcome | seconds |", "|---|---|---:|"]
    for name, code, seconds in steps:
        log_file = out / "logs" / f"{name}.log"
        log = log_file.read_text(errors="replace") if log_file.is_file() else ""
        lines.append(f"| {name} | {outcome(name, int(code), log, tests).replace('|', '/')} | {seconds} |")
    env_log = out / "logs" / "env.log"
    if env_log.is_file():
        lines += ["", "## Machine", "", "```", env_log.read_text(errors="replace").strip(), "```"]
    if tests:
        lines += ["", "## gpu tests", "", "| test | outcome | reason |", "|---|---|---|"]
        lines += [f"| {t} | {o} | {r.replace('|', '/')} |" for t, o, r in tests]
    for title, table in (("lab.bench (full size, seq 2048, bf16)", sorted((out / "bench").glob("*.md"))),
                         ("Decode at batch 1 (lab.evaluate, static cache + compile)", [out / "decode" / "eval.md"])):
        for path in table:
            if path.is_file():
                lines += ["", f"## {title}", "", path.read_text(errors="replace").strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not (Path(argv[0]) / "steps.tsv").is_file():
        print("error: give the gpu_check output folder (the one holding steps.tsv)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = report(out)
    (out / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
