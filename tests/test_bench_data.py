"""lab.bench_data on the embedded sample: the step table, the two targets, the JSON record, replication."""

from __future__ import annotations

import json

from lab import bench_data
from tests.conftest import SAMPLE_DIR


def test_benchmark_of_the_sample_prints_steps_targets_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_data.main(["--corpus", str(SAMPLE_DIR), "--vocab", "400", "--seq-len", "16", "--batch-mb", "0.05",
                     "--workers", "1", "--skip-flat", "--json", str(out)])
    printed = capsys.readouterr().out
    for line_start in ("scan ", "pack ", "end to end (scan + dedup + pack", "tokenize (pack", "peak RSS:", "projection"):
        assert any(line.startswith(line_start) for line in printed.splitlines()), line_start
    report = json.loads(out.read_text())
    timings = report["main"]["timings"]
    assert {"scan", "dedup", "tokenizer", "pack"} <= set(timings)
    assert timings["scan"]["bytes"] == report["main"]["bytes"] and timings["pack"]["cpu_seconds"] > 0
    assert report["main"]["tokens"] > 0 and report["main"]["tree_peak"] > 0


def test_replicated_corpus_has_fresh_ids_and_every_book_per_copy(tmp_path):
    web, books = bench_data.replicate_corpus(SAMPLE_DIR, tmp_path / "x3", 3)
    lines = web.read_bytes().splitlines()
    originals = (SAMPLE_DIR / "web.jsonl").read_bytes().splitlines()  # holds malformed lines on purpose
    assert len(lines) == 3 * len(originals)
    ids = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("id") is not None:
            ids.append(doc["id"])
    assert len(ids) > len(originals) and len(set(ids)) == len(ids)
    n_books = len(list((SAMPLE_DIR / "books").rglob("*.txt")))
    assert len(list(books.rglob("*.txt"))) == 3 * n_books
    assert bench_data.corpus_bytes(web, books) > 3 * (SAMPLE_DIR / "web.jsonl").stat().st_size
