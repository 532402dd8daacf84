"""manifest.json: the accounting of every document, the output files and their hashes; written here by
lab.prepare and read back here (`Manifest`) by training and evaluation.

The invariant docs_in == docs_kept + sum(docs_filtered) + docs_duplicate + docs_malformed is
checked for every source before the manifest is written: a document the pipeline lost silently is
a bug, and it stops the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import LabError


from lab.config.units import MB
from lab.data.packed import PackedBlocks
from lab.data.publish import relative_file

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


# -- reading it back (training, evaluation) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """The parts of lab.prepare's manifest.json that training reads (docs/CONTRACTS.md)."""

    root: Path
    raw: dict[str, Any]

    @classmethod
    def load(cls, prepared_dir: str | Path) -> "Manifest":
        root = Path(prepared_dir)
        path = root / "manifest.json"
        if not path.is_file():
            raise LabError(
                f"no prepared data at {root} (missing manifest.json). Run `python -m lab.prepare` with the same "
                "data/tokenizer/seq_len overrides first (`make data-sample` for the embedded sample, "
                "`make data CORPUS=...` for a corpus)."
            )
        try:
            return cls(root, json.loads(path.read_text()))
        except (OSError, ValueError) as err:  # a cut or hand-edited manifest: one line, not a traceback
            raise LabError(f"{path} cannot be read as a manifest ({err}); re-run lab.prepare") from None

    @property
    def seq_len(self) -> int:
        return int(self.raw["seq_len"])

    @property
    def dtype(self) -> str:
        return str(self.raw["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def sources(self) -> list[str]:
        return list(self.raw["sources"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.raw.get("tokenizer_sha256", ""))

    @property
    def data_sha256(self) -> str:
        return str(self.raw.get("data_sha256", ""))

    def split(self, source: str, split: str) -> dict[str, Any]:
        try:
            return self.raw["sources"][source]["splits"][split]
        except KeyError:
            raise LabError(f"prepared data at {self.root} has no {split!r} split for source {source!r}; "
                           f"sources there: {self.sources}") from None

    def blocks(self, source: str, split: str) -> "PackedBlocks":

        info = self.split(source, split)
        try:
            rel = relative_file(info.get("file"))
        except ValueError as err:
            raise LabError(f"{self.root / 'manifest.json'}: {err}; re-run lab.prepare") from None
        return PackedBlocks(self.root / rel, self.seq_len, self.dtype, info.get("blocks"))

    def bytes_per_token(self, source: str, split: str = "val") -> float | None:
        info = self.split(source, split)
        tokens, text_bytes = info.get("tokens"), info.get("text_bytes")
        return text_bytes / tokens if tokens and text_bytes else None
