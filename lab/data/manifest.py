"""manifest.json: the accounting of every document, the output files and their hashes.

The invariant docs_in == docs_kept + sum(docs_filtered) + docs_duplicate + docs_malformed is
checked for every source before the manifest is written: a document the pipeline lost silently is
a bug, and it stops the run.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Any

from lab.units import MB

log = logging.getLogger(__name__)

VERSION = 1


class AccountingError(AssertionError):
    """A source's counts do not add up (a bug in the pipeline, not in the input)."""


def check_accounting(name: str, source: dict[str, Any]) -> None:
    accounted = (source["docs_kept"] + sum(source["docs_filtered"].values()) + source["docs_duplicate"]
                 + source["docs_malformed"])
    if source["docs_in"] != accounted:
        raise AccountingError(f"source {name!r}: docs_in={source['docs_in']} but kept + filtered + duplicate "
                              f"+ malformed = {accounted}")
    split_docs = sum(split["docs"] for split in source["splits"].values())
    if split_docs != source["docs_kept"]:
        raise AccountingError(f"source {name!r}: docs_kept={source['docs_kept']} but the splits hold {split_docs}")


def data_sha256(files: dict[str, str]) -> str:
    """One hash over the .bin files' hashes (path-sorted), for run records and resume checks."""
    lines = "".join(f"{path}\t{sha}\n" for path, sha in sorted(files.items()) if path.endswith(".bin"))
    return hashlib.sha256(lines.encode()).hexdigest()


def summary_table(manifest: dict[str, Any]) -> str:
    header = (f"{'source':<8} {'docs in':>9} {'kept':>9} {'filtered':>9} {'dup':>8} {'malformed':>9} "
              f"{'MB in':>9} {'MB kept':>9} {'tokens':>13} {'blocks':>9} {'val blocks':>10}")
    rows = [header]
    for name, s in manifest["sources"].items():
        rows.append(f"{name:<8} {s['docs_in']:>9,} {s['docs_kept']:>9,} {sum(s['docs_filtered'].values()):>9,} "
                    f"{s['docs_duplicate']:>8,} {s['docs_malformed']:>9,} {s['bytes_in'] / MB:>9.2f} "
                    f"{s['text_bytes'] / MB:>9.2f} {s['tokens']:>13,} {s['blocks']:>9,} "
                    f"{s['splits']['val']['blocks']:>10,}")
    for name, s in manifest["sources"].items():
        if any(s["docs_filtered"].values()):
            rules = ", ".join(f"{rule} {n}" for rule, n in sorted(s["docs_filtered"].items(), key=lambda kv: -kv[1]) if n)
            rows.append(f"  {name} filtered: {rules}")
        if s["docs_malformed"]:
            reasons = ", ".join(f"{reason} {n}" for reason, n in s["malformed_reasons"].items())
            rows.append(f"  {name} malformed: {reasons}")
    return "\n".join(rows)


def log_to_mlflow(manifest: dict[str, Any]) -> bool:
    """Log the summary into the active MLflow run, if there is one (never starts a run)."""
    mlflow = sys.modules.get("mlflow")  # no run can be active if nobody imported mlflow
    if mlflow is None or mlflow.active_run() is None:
        return False
    metrics: dict[str, float] = {}
    for name, s in manifest["sources"].items():
        for key in ("docs_in", "docs_kept", "docs_duplicate", "docs_malformed", "tokens", "blocks"):
            metrics[f"data/{name}/{key}"] = float(s[key])
        metrics[f"data/{name}/docs_filtered"] = float(sum(s["docs_filtered"].values()))
        for split, info in s["splits"].items():
            if info["tokens"]:
                metrics[f"data/{name}/{split}_bytes_per_token"] = info["text_bytes"] / info["tokens"]
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"data_sha256": manifest["data_sha256"], "tokenizer_sha256": manifest["tokenizer_sha256"]})
    mlflow.log_dict(manifest, "data/manifest.json")
    return True
