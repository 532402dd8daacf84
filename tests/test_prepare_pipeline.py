"""End-to-end tests of `lab.prepare`: the embedded sample, leakage, bad input, reuse and resume after kill -9."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from lab import PROJECT_ROOT, LabError
from lab.config.units import GiB, MiB
from lab.data.filters import WORD
from lab.data.split import assign_split
from lab.data.pipeline import Settings, prepare
from tests.conftest import SAMPLE_DIR, compose_config

TINY = ["tokenizer.vocab_size=400", "tokenizer.name=t400", "data.seq_len=16", "prepare.progress=false",
        "prepare.workers=1", "prepare.report.variants=[no_fold]"]
WORDS = ("casa drum munte pădure râu sat oraș școală carte prieten familie copil bunic lumină seară dimineață "
         "vară iarnă toamnă primăvară câmp grădină fereastră masă pâine apă vânt ploaie soare lună stea "
         "poveste cântec joc muncă drumeț pescar morar învățător doctor vecin frate soră mamă tată").split()
GLUE = "și în cu de la pe că să nu un o mai care pentru din este sunt".split()


def ro_doc(rng: random.Random, n_words: int = 100) -> str:
    """A Romanian-looking document that passes the default filters (distinct per seed)."""
    words = [rng.choice(GLUE) if i % 3 == 0 else rng.choice(WORDS) for i in range(n_words)]
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, n_words, 12)]
    return " ".join(sentences)


def compose(tmp: Path, web: Path, books: Path, *extra: str):
    out = tmp / "prepared"
    overrides = [*TINY, f"data.web_path={web}", f"data.books_dir={books}", f"data.prepared_dir={out}", *extra]
    return compose_config("prepare", overrides, run_dir=tmp / "hydra"), overrides


def bin_hashes(prepared: Path) -> dict[str, str]:
    files = sorted(prepared.glob("*/*.bin")) + [prepared / "tokenizer" / "tokenizer.json"]
    return {str(p.relative_to(prepared)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def decoded_docs(prepared: Path, split: str) -> list[str]:
    """The documents of every source's split, decoded from the packed tokens (the cut last one dropped)."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer" / "tokenizer.json"))
    docs = []
    for source in manifest["sources"].values():
        tokens = np.fromfile(prepared / source["splits"][split]["file"], dtype=manifest["dtype"]).tolist()
        pieces = []
        current: list[int] = []
        for token in tokens:
            if token == manifest["eos_token_id"]:
                pieces.append(current)
                current = []
            else:
                current.append(token)
        docs += [tokenizer.decode(p) for p in pieces]
    return docs


# --- the embedded sample ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sample")
    cfg = compose_config("prepare", ["tokenizer=bpe2k", "data.seq_len=64", f"data.prepared_dir={tmp / 'out'}",
                                     "prepare.progress=false"], run_dir=tmp / "hydra")
    return prepare(cfg)


def test_sample_manifest_follows_the_contract(sample):
    manifest = json.loads((sample / "manifest.json").read_text())
    assert {"version", "seq_len", "dtype", "vocab_size", "eos_token_id", "pad_token_id", "tokenizer_sha256",
            "data_sha256", "sources", "config", "tokenizer_report"} <= set(manifest)
    assert (manifest["seq_len"], manifest["dtype"], manifest["eos_token_id"], manifest["pad_token_id"]) == (64, "uint16", 0, 1)
    assert manifest["vocab_size"] <= 2048
    assert manifest["tokenizer_sha256"] == hashlib.sha256((sample / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest()
    for name, source in manifest["sources"].items():
        # every document is accounted for
        assert source["docs_in"] == (source["docs_kept"] + sum(source["docs_filtered"].values())
                                     + source["docs_duplicate"] + source["docs_malformed"]), name
        for split in ("train", "val"):
            info = source["splits"][split]
            path = sample / info["file"]
            assert path.stat().st_size == info["blocks"] * 64 * 2
            assert info["tokens"] == info["blocks"] * 64 + info["tail_tokens"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
            assert manifest["files"][info["file"]] == info["sha256"]
    web, books = manifest["sources"]["web"], manifest["sources"]["books"]
    # the sample's deliberate defects are counted, with line numbers
    for reason in ("invalid_json", "invalid_utf8", "missing_text_field", "null_text", "blank_line"):
        assert web["malformed_reasons"].get(reason, 0) >= 1, reason
    assert all(e["line"] > 0 for e in web["malformed_examples"])
    assert web["docs_duplicate_exact"] >= 1 and web["docs_duplicate_near"] >= 1
    assert web["docs_filtered"]["min_words"] >= 1 and web["docs_filtered"]["min_stopword_frac"] >= 1
    assert books["malformed_reasons"] == {"empty_file": 1}
    assert books["malformed_examples"][0]["file"] == "gol.txt"
    rows = manifest["tokenizer_report"]["comparison"]["rows"]
    assert [r["tokenizer"] for r in rows][0] == "bpe2k (this)" and rows[-1]["tokenizer"] == "utf-8 bytes"


def test_sample_tokens_decode_to_normalised_text(sample):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sample / "tokenizer")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    text = "".join(decoded_docs(sample, "train"))
    assert "ș" in text and "ț" in text
    assert not set("şţŞŢ") & set(text)  # cedillas folded
    assert "\x07" not in text and "\u200b" not in text
    assert "Bârsana" in text  # a word the sample book splits over a page break


def test_sample_run_logs_to_an_active_mlflow_run(sample, tmp_path):
    import mlflow

    cfg = compose_config("prepare", ["tokenizer=bpe2k", "data.seq_len=64", f"data.prepared_dir={sample}",
                                     "prepare.progress=false"], run_dir=tmp_path / "hydra")
    with mlflow.start_run() as active:
        prepare(cfg)  # every step reused
    logged = mlflow.get_run(active.info.run_id).data
    assert logged.metrics["data/web/docs_in"] > 0 and "data_sha256" in logged.tags


# --- leakage, bad input, errors ----------------------------------------------------------------------

def test_near_duplicates_never_straddle_train_and_val(tmp_path):
    (tmp_path / "books").mkdir()
    cfg, _ = compose(tmp_path, tmp_path / "web.jsonl", tmp_path / "books", "data.sources.web.val_fraction=0.3")
    salt = cfg.prepare.split.salt  # the split this run draws
    rng = random.Random(0)
    lines, straddling = [], 0
    for i in range(60):
        doc = ro_doc(rng)
        twin = doc.replace(doc.split()[50], "schimbat", 1)  # one word differs: Jaccard ~0.9
        lines += [{"id": f"a{i}", "text": doc}, {"id": f"b{i}", "text": twin}]
        straddling += assign_split("web", f"a{i}", 0.3, salt) != assign_split("web", f"b{i}", 0.3, salt)
    assert straddling >= 5  # the test means something
    (tmp_path / "web.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    prepared = prepare(cfg)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["sources"]["web"]["docs_duplicate"] == 60
    shingles = lambda text: {tuple(w) for w in zip(*(WORD.findall(text.lower())[k:] for k in range(5)))}
    train = [shingles(d) for d in decoded_docs(prepared, "train")]
    val = [shingles(d) for d in decoded_docs(prepared, "val")]
    assert val and train
    for v in val:
        assert max(len(v & t) / len(v | t) for t in train) < 0.5


def test_bad_input_is_counted_not_fatal(tmp_path):
    rng = random.Random(1)
    web = tmp_path / "web"
    web.mkdir()
    good = [json.dumps({"id": f"d{i}", "text": ro_doc(rng)}).encode() for i in range(6)]
    bad = [b'{"id": "x1", "text": "unfinished', b'{"id": "x2"}', b'{"id": "x3", "text": null}',
           b'{"id": "x4", "text": "ok \xff\xfe"}', b"", b"[1, 2]"]
    lines = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3], bad[5], good[4], good[5]]
    (web / "part-0.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    (web / "part-1.jsonl").write_bytes(b"")
    books = tmp_path / "books"
    books.mkdir()
    (books / "carte.txt").write_text("\n\n".join(ro_doc(rng, 120) for _ in range(3)))
    (books / "gol.txt").write_bytes(b"")
    (books / "stricat.txt").write_bytes(bytes(range(128, 256)) * 20)
    cfg, _ = compose(tmp_path, web, books)
    manifest = json.loads((prepare(cfg) / "manifest.json").read_text())
    web_stats, book_stats = manifest["sources"]["web"], manifest["sources"]["books"]
    assert web_stats["docs_in"] == 12 and web_stats["docs_kept"] == 6
    assert web_stats["malformed_reasons"] == {"blank_line": 1, "invalid_json": 1, "invalid_utf8": 1,
                                              "missing_text_field": 1, "not_an_object": 1, "null_text": 1}
    assert {(e["file"], e["line"], e["reason"]) for e in web_stats["malformed_examples"]} >= {
        ("part-0.jsonl.gz", 2, "invalid_json"), ("part-0.jsonl.gz", 7, "invalid_utf8")}
    assert web_stats["file_notes"] == [{"file": "part-1.jsonl", "line": 0, "reason": "empty_file"}]
    assert book_stats["docs_in"] == 3 and book_stats["docs_kept"] == 1
    assert book_stats["malformed_reasons"] == {"empty_file": 1}
    assert book_stats["docs_utf8_repaired"] == 1 and sum(book_stats["docs_filtered"].values()) == 1


def test_missing_path_is_one_clear_error(tmp_path):
    cfg, overrides = compose(tmp_path, tmp_path / "nope.jsonl", SAMPLE_DIR / "books")
    with pytest.raises(LabError, match="nope.jsonl"):
        prepare(cfg)
    proc = subprocess.run([sys.executable, "-m", "lab.prepare", *overrides, f"hydra.run.dir={tmp_path / 'h'}"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 1
    assert "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


# --- reuse, changes and resume ---------------------------------------------------------------------

def write_corpus(tmp: Path, seed: int, web_docs: int, books: int, chapters: int) -> tuple[Path, Path]:
    """web.jsonl + books/ of Romanian-looking documents, deterministic by seed."""
    rng = random.Random(seed)
    (tmp / "web.jsonl").write_text("".join(json.dumps({"id": f"w{i}", "text": ro_doc(rng)}) + "\n"
                                           for i in range(web_docs)))
    (tmp / "books").mkdir()
    for i in range(books):
        (tmp / "books" / f"b{i}.txt").write_text("\n\n".join(ro_doc(rng, 150) for _ in range(chapters)))
    return tmp / "web.jsonl", tmp / "books"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=2, web_docs=150, books=3, chapters=4)


SHARDS = ["prepare.batch_mb=0.02"]  # several scan shards, so a kill lands mid-step


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, str]:
    """Hashes of an uninterrupted run."""
    cfg, _ = compose(tmp_path_factory.mktemp("reference"), *corpus, *SHARDS)
    return bin_hashes(prepare(cfg))


def test_rerun_reuses_and_a_change_redoes_only_what_it_affects(corpus, reference, tmp_path, caplog):
    cfg, _ = compose(tmp_path, *corpus, *SHARDS)
    prepare(cfg)
    caplog.set_level(logging.INFO, logger="lab.prepare")
    caplog.clear()
    prepare(cfg)
    for step in ("scan", "dedup", "tokenizer", "report", "pack"):
        assert f"reusing {step}" in caplog.text
    assert bin_hashes(tmp_path / "prepared") == reference
    caplog.clear()
    prepare(compose(tmp_path, *corpus, *SHARDS, "data.seq_len=32")[0])
    assert all(f"reusing {step}" in caplog.text for step in ("scan", "dedup", "tokenizer", "report"))
    assert "reusing pack" not in caplog.text
    # the redone step's sizes and rates are binary, and say so
    assert re.search(r"pack: [\d.]+ MiB in [\d.]+ s, \d+ process(es)? \([\d.]+ MiB/s, [\d.]+ MiB/s per core\)",
                     caplog.text), caplog.text
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["seq_len"] == 32
    caplog.clear()
    prepare(compose(tmp_path, *corpus, *SHARDS, "data.seq_len=32", "prepare.filters.default.min_words=30")[0])
    assert "reusing scan" not in caplog.text


@pytest.mark.parametrize("kill_at", ["scan.shard:2", "pack.part:2"])
def test_resume_after_kill_9_gives_identical_outputs(corpus, reference, tmp_path, kill_at):
    _, overrides = compose(tmp_path, *corpus, *SHARDS)
    env = {**os.environ, "LAB_PREPARE_KILL_AT": kill_at}
    # the killed run uses two worker processes, the resumed one a single process: same bytes either way
    proc = subprocess.run([sys.executable, "-m", "lab.prepare", *overrides, "prepare.workers=2",
                           f"hydra.run.dir={tmp_path / 'h'}"], env=env, capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=180)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "prepared" / "manifest.json").exists()
    cfg, _ = compose(tmp_path, *corpus, *SHARDS)
    assert bin_hashes(prepare(cfg)) == reference


def test_resume_after_a_crash_between_steps(corpus, reference, tmp_path, monkeypatch):
    import lab.data.pipeline as pipeline_module

    def crash(point: str) -> None:
        if point == "tokenizer.done":
            raise KeyboardInterrupt(point)

    monkeypatch.setattr(pipeline_module, "crash_point", crash)
    cfg, _ = compose(tmp_path, *corpus, *SHARDS)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    monkeypatch.undo()
    assert bin_hashes(prepare(cfg)) == reference


def test_both_tokenize_backends_give_the_same_bytes(corpus, reference, tmp_path):
    pytest.importorskip("fastokens")
    manifest = json.loads((Path(prepare(compose(tmp_path / "a", *corpus, *SHARDS)[0])) / "manifest.json").read_text())
    assert set(manifest["pack_encoder"]["backends"]) == {"fastokens"}
    assert manifest["pack_encoder"]["checked_chars"] > 0 and manifest["pack_encoder"]["mismatched_shards"] == 0
    slow = Path(prepare(compose(tmp_path / "b", *corpus, *SHARDS, "prepare.pack.encoder=tokenizers")[0]))
    assert bin_hashes(slow) == reference
    assert set(json.loads((slow / "manifest.json").read_text())["pack_encoder"]["backends"]) == {"tokenizers"}


def test_a_fast_encoder_that_disagrees_is_not_trusted(corpus, reference, tmp_path, monkeypatch, caplog):
    pytest.importorskip("fastokens")
    from lab.data.encode import BatchEncoder

    honest = BatchEncoder.fast_ids

    def off_by_one(self, texts, dtype):
        ids = honest(self, texts, dtype)
        if len(ids[0]):
            ids[0] = ids[0].copy()
            ids[0][0] = (int(ids[0][0]) + 1) % 300
        return ids

    monkeypatch.setattr(BatchEncoder, "fast_ids", off_by_one)  # workers=1: the packing runs in this process
    caplog.set_level(logging.WARNING, logger="lab.prepare")
    prepared = Path(prepare(compose(tmp_path, *corpus, *SHARDS)[0]))
    assert bin_hashes(prepared) == reference  # every shard was redone by tokenizers
    check = json.loads((prepared / "manifest.json").read_text())["pack_encoder"]
    assert check["mismatched_shards"] == sum(check["backends"].values()) > 0
    assert "disagreed" in caplog.text


def test_a_source_that_keeps_nothing_is_an_error_that_names_the_field(tmp_path):
    rng = random.Random(2)
    web = tmp_path / "web.jsonl"
    web.write_text("\n".join(json.dumps({"id": f"d{i}", "content": ro_doc(rng)}) for i in range(5)) + "\n")
    cfg, _ = compose(tmp_path, web, SAMPLE_DIR / "books")
    with pytest.raises(LabError, match=r"\['web'\] kept no documents.*text_field"):
        prepare(cfg)
    # the accounting is still written: every line counted as missing the text field
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["sources"]["web"]["malformed_reasons"] == {"missing_text_field": 5}


def test_prepared_data_of_another_corpus_is_not_replaced_silently(sample, tmp_path):
    rng = random.Random(3)
    web = tmp_path / "other.jsonl"
    web.write_text("\n".join(json.dumps({"id": f"d{i}", "text": ro_doc(rng)}) for i in range(5)) + "\n")
    cfg, _ = compose(tmp_path, web, SAMPLE_DIR / "books", f"data.prepared_dir={sample}")
    with pytest.raises(LabError, match="other files.*prepare.overwrite=true"):
        prepare(cfg)


def test_a_validation_split_shorter_than_a_block_is_warned_about(corpus, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lab.prepare")
    prepared = Path(prepare(compose(tmp_path, *corpus, "data.seq_len=4096")[0]))
    manifest = json.loads((prepared / "manifest.json").read_text())
    for name, source in manifest["sources"].items():
        assert source["splits"]["val"]["blocks"] == 0
        assert f"source {name}: its validation split" in caplog.text


def test_progress_goes_to_the_log_where_no_terminal_shows_bars(caplog):
    from lab.data.progress import LogProgress

    caplog.set_level(logging.INFO, logger="lab.data.progress")
    with LogProgress("scan", 4 * MiB, every=0) as bar:
        bar.update(MiB)
    assert "scan: 1.0 MiB of 4.0 MiB (25%)" in caplog.text and "MiB/s" in caplog.text and "min left" in caplog.text
    LogProgress("dedup", 16, unit="band", every=0).update(3)
    assert "dedup: 3 of 16 bands" in caplog.text
    caplog.clear()
    LogProgress("pack", 100, every=3600).update(50)  # not a minute yet: quiet
    assert caplog.text == ""


def test_progress_off_a_terminal_logs_to_the_given_logger(caplog, monkeypatch):
    from types import SimpleNamespace

    from lab.data import progress
    from lab.data.progress import LogProgress, progress_bar

    monkeypatch.setattr(progress, "sys", SimpleNamespace(stderr=SimpleNamespace(isatty=lambda: False)))
    caplog.set_level(logging.INFO, logger="lab.prepare")
    bar = progress_bar("scan", 2 * MiB, enabled=True, logger=logging.getLogger("lab.prepare"))
    assert isinstance(bar, LogProgress)
    bar.every = 0
    bar.update(MiB)
    assert [r.name for r in caplog.records] == ["lab.prepare"] and "1.0 MiB of 2.0 MiB" in caplog.text
    assert not isinstance(progress_bar("scan", 1, enabled=False), LogProgress)  # progress=false: no lines at all


def test_sizes_are_labelled_with_the_binary_unit_they_are_divided_by():
    from lab.data.progress import format_size

    assert format_size(MiB) == "1.0 MiB" and format_size(0) == "0.0 MiB"
    assert format_size(GiB - MiB) == "1023.0 MiB" and format_size(GiB) == "1.00 GiB"
    assert format_size(1.5 * GiB) == "1.50 GiB"


@pytest.mark.parametrize(("setting", "value", "field", "expected"), [
    ("prepare.batch_mb", "1", "batch_bytes", MiB), ("prepare.batch_mb", "0.5", "batch_bytes", MiB // 2),
    ("prepare.max_doc_mb", "2", "max_doc_bytes", 2 * MiB), ("prepare.batch_mb", "1e-9", "batch_bytes", 1)])
def test_mb_settings_count_mib(tmp_path, setting, value, field, expected):
    cfg, _ = compose(tmp_path, SAMPLE_DIR / "web.jsonl", SAMPLE_DIR / "books", f"{setting}={value}")
    assert getattr(Settings.from_cfg(cfg), field) == expected
