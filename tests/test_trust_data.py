"""What is trained on is what was prepared: prepared data checked against its manifest, re-preparing swaps a
folder in whole, damaged or oddly encoded input, and the OS refusing a read or a write (crafted cases)."""

from __future__ import annotations

import codecs
import dataclasses
import errno
import gzip
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

import lab.data.io as io_module
import lab.data.pipeline as prepare_module
from lab import PROJECT_ROOT, LabError
from lab.data import pack as pk, publish
from lab.data.io import SourceSpec, iter_source, parse_record
from lab.data.publish import verify_prepared
from lab.data.steps import run_lock
from lab.data.manifest import Manifest
from lab.data.pipeline import prepare as run
from tests.conftest import compose_config, shipped_prepare_settings, tiny_train_overrides
from tests.test_prepare_pipeline import bin_hashes, compose, ro_doc, write_corpus

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads and writes through chmod: inject faults instead
HINT = "re-run lab.prepare"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("trust_corpus"), seed=5, web_docs=60, books=2, chapters=3)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    cfg, _ = compose(tmp_path_factory.mktemp("trust_prepared"), *corpus)
    return run(cfg)


@pytest.fixture
def fresh(prepared, tmp_path) -> Path:
    """A private copy of the prepared folder (step cache included, so a re-prepare reuses what it can)."""
    return Path(shutil.copytree(prepared, tmp_path / "prepared"))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- verification before training ------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "one_token_short", "grown", "missing"])
def test_a_packed_file_of_the_wrong_size_is_refused_in_every_mode(fresh, damage):
    path = fresh / "web" / "train.bin"
    size = path.stat().st_size
    if damage == "truncated":
        os.truncate(path, size // 2)
    elif damage == "one_token_short":
        os.truncate(path, size - 2)
    elif damage == "grown":
        with open(path, "ab") as handle:
            handle.write(b"\0" * 64)
    else:
        path.unlink()
    for mode in ("sizes", "auto", "full"):
        with pytest.raises(LabError, match="web/train.bin") as caught:
            verify_prepared(fresh, mode, HINT)
        message = str(caught.value)
        assert HINT in message and "\n" not in message
        assert ("missing" in message) if damage == "missing" else (f"the manifest says {size:,}" in message)


def test_one_flipped_byte_is_caught_by_full_and_auto_not_by_sizes(fresh):
    assert verify_prepared(fresh, "auto", HINT) == "sizes"  # prepare verified it fully: the stamp is fresh
    path = fresh / "books" / "train.bin"
    flip_byte(path, path.stat().st_size // 2)
    assert verify_prepared(fresh, "sizes", HINT) == "sizes"
    for mode in ("full", "auto"):  # auto: the file changed since the stamp, so it hashes again
        with pytest.raises(LabError, match=r"books/train.bin has sha256 \w+…, the manifest records"):
            verify_prepared(fresh, mode, HINT)


def test_a_tampered_or_missing_tokenizer_is_refused(fresh):
    tokenizer = fresh / "tokenizer" / "tokenizer.json"
    text = tokenizer.read_text()
    tokenizer.write_text(text.replace('"casa"', '"cosa"', 1) if '"casa"' in text else text + " ")
    with pytest.raises(LabError, match="tokenizer/tokenizer.json has sha256"):
        verify_prepared(fresh, "auto", HINT)
    tokenizer.unlink()
    with pytest.raises(LabError, match="tokenizer/tokenizer.json is missing"):
        verify_prepared(fresh, "sizes", HINT)


def test_the_tokenizers_other_files_are_covered(fresh):
    special = fresh / "tokenizer" / "special_tokens_map.json"
    assert "tokenizer/special_tokens_map.json" in manifest_of(fresh)["files"]
    special.write_text(special.read_text().replace("<|endoftext|>", "<|end|>") + "\n")
    with pytest.raises(LabError, match="tokenizer/special_tokens_map.json has sha256"):
        verify_prepared(fresh, "auto", HINT)


@pytest.mark.parametrize("edit", ["blocks", "file_hash", "both_hashes", "not_json", "no_splits", "wrong_types",
                                  "file_outside"])
def test_an_edited_manifest_is_refused(fresh, edit):
    manifest_path = fresh / "manifest.json"
    manifest = manifest_of(fresh)
    split = manifest["sources"]["web"]["splits"]["train"]
    if edit == "blocks":
        split["blocks"] += 1
        expected = "web/train.bin has"
    elif edit == "file_hash":  # one record changed, the other not: the manifest contradicts itself
        manifest["files"]["web/train.bin"] = "0" * 64
        expected = "cannot be read as a manifest"
    elif edit == "both_hashes":
        manifest["files"]["web/train.bin"] = split["sha256"] = "0" * 64
        expected = "web/train.bin has sha256"
    elif edit == "no_splits":
        del manifest["sources"]["web"]["splits"]
        expected = "cannot be read as a manifest"
    elif edit == "wrong_types":
        manifest["seq_len"] = "sixteen"
        expected = "cannot be read as a manifest"
    elif edit == "file_outside":  # a copied folder must not point training at other files
        split["file"] = "../../../etc/hostname"
        expected = "not a path inside the prepared folder"
    if edit == "not_json":
        manifest_path.write_text(manifest_path.read_text()[:100])
        expected = "cannot be read as a manifest"
    else:
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(LabError, match=expected):
        verify_prepared(fresh, "auto", HINT)


def test_a_full_check_is_stamped_and_a_read_only_folder_is_checked_each_time(fresh, monkeypatch):
    (fresh / publish.VERIFIED_FILE).unlink()
    assert verify_prepared(fresh, "auto", HINT) == "full"  # no stamp: hash everything once
    assert json.loads((fresh / publish.VERIFIED_FILE).read_text())["manifest_sha256"]
    assert verify_prepared(fresh, "auto", HINT) == "sizes"
    (fresh / publish.VERIFIED_FILE).unlink()

    def read_only(*_args, **_kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(fresh / publish.VERIFIED_FILE))

    monkeypatch.setattr(publish, "write_json_atomic", read_only)
    assert verify_prepared(fresh, "auto", HINT) == "full"
    assert verify_prepared(fresh, "auto", HINT) == "full"  # never stamped, so never skipped
    assert not (fresh / publish.VERIFIED_FILE).exists()


def test_an_unknown_verify_mode_is_refused(fresh):
    with pytest.raises(LabError, match="data.verify='fast'"):
        verify_prepared(fresh, "fast", HINT)


def test_packed_blocks_never_read_a_partial_file(fresh):
    assert len(Manifest.load(fresh).blocks("web", "train")) > 0
    path = fresh / "web" / "train.bin"
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(LabError, match="web/train.bin holds"):
        Manifest.load(fresh).blocks("web", "train")
    (fresh / "manifest.json").write_text('{"seq_len": 16, "sour')
    with pytest.raises(LabError, match="cannot be read as a manifest"):
        Manifest.load(fresh)


def test_packed_blocks_never_read_outside_the_prepared_folder(fresh):
    manifest = manifest_of(fresh)
    manifest["sources"]["web"]["splits"]["train"]["file"] = "/etc/hostname"
    (fresh / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LabError, match="not a path inside the prepared folder"):
        Manifest.load(fresh).blocks("web", "train")


def test_training_refuses_damaged_data_and_names_the_prepare_command(fresh, tmp_path):
    from lab.train import train

    flip_byte(fresh / "web" / "val.bin", 3)
    cfg = compose_config("train", tiny_train_overrides(fresh, "data.seq_len=16", "data.verify=full"),
                         run_dir=tmp_path / "run")
    with pytest.raises(LabError, match=r"web/val.bin has sha256.*python -m lab.prepare") as caught:
        train(cfg)
    assert "\n" not in str(caught.value)


# --- re-preparing swaps the folder in whole ----------------------------------------------------------------------

def staging_dirs(folder: Path) -> list[Path]:
    return list(folder.parent.glob(f".{folder.name}{publish.STAGING_MARK}*"))


def test_a_crash_mid_reprepare_leaves_the_old_data_whole_and_trainable(corpus, fresh, monkeypatch, caplog):
    before_manifest, before_files = (fresh / "manifest.json").read_bytes(), bin_hashes(fresh)

    def crash(point: str) -> None:
        if point == "pack.done":  # the new .bin files and the new tokenizer are written, the manifest not yet
            raise KeyboardInterrupt(point)

    monkeypatch.setattr(prepare_module, "crash_point", crash)
    cfg, _ = compose(fresh.parent, *corpus, "data.seq_len=32", "tokenizer.vocab_size=380")
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    assert (fresh / "manifest.json").read_bytes() == before_manifest and bin_hashes(fresh) == before_files
    assert verify_prepared(fresh, "full", HINT) == "full"
    assert len(Manifest.load(fresh).blocks("books", "train")) > 0
    assert len(staging_dirs(fresh)) == 1  # the dead run's work, kept for the next run to reuse
    caplog.set_level(logging.INFO, logger="lab.prepare")
    run(cfg)
    assert "reusing pack" in caplog.text and "reusing scan" in caplog.text
    assert manifest_of(fresh)["seq_len"] == 32 and not staging_dirs(fresh)
    assert verify_prepared(fresh, "full", HINT) == "full"


def test_a_swap_interrupted_between_its_renames_is_restored(corpus, fresh):
    before = bin_hashes(fresh)
    aside = fresh.parent / f".{fresh.name}{publish.OLD_MARK}dead0000"
    os.rename(fresh, aside)  # as a crash after the first rename of a swap without renameat2 leaves it
    for stale in ("dead0001", "dead0002"):  # building folders of two killed runs, one with a half-written file
        (fresh.parent / f".{fresh.name}{publish.STAGING_MARK}{stale}" / "web").mkdir(parents=True)
    write(fresh.parent / f".{fresh.name}{publish.STAGING_MARK}dead0002" / "web" / "train.bin.tmp-0000", b"\0" * 7)
    cfg, _ = compose(fresh.parent, *corpus)
    run(cfg)
    assert bin_hashes(fresh) == before and not aside.exists() and not staging_dirs(fresh)
    assert verify_prepared(fresh, "full", HINT) == "full"


def test_a_second_prepare_of_the_same_folder_is_refused(corpus, fresh):
    before = (fresh / "manifest.json").read_bytes()
    cfg, _ = compose(fresh.parent, *corpus, "data.seq_len=32")
    with run_lock(publish.lock_path(fresh), fresh):
        with pytest.raises(LabError, match="another lab.prepare is writing"):
            run(cfg)
    assert (fresh / "manifest.json").read_bytes() == before


def test_no_space_left_mid_write_is_one_line_and_keeps_the_old_data(corpus, fresh, monkeypatch):
    before_manifest, before_files = (fresh / "manifest.json").read_bytes(), bin_hashes(fresh)

    class FullDisk:
        """A file on a disk that fills up halfway through the first write."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data: bytes) -> int:
            self.handle.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode else handle

    monkeypatch.setattr(pk, "open", open_on_full_disk, raising=False)
    cfg, _ = compose(fresh.parent, *corpus, "data.seq_len=32")
    with pytest.raises(LabError, match=r"cannot write \S*web/train.bin\S*: No space left on device") as caught:
        run(cfg)
    assert "\n" not in str(caught.value) and str(fresh) in str(caught.value)
    assert (fresh / "manifest.json").read_bytes() == before_manifest and bin_hashes(fresh) == before_files
    assert verify_prepared(fresh, "full", HINT) == "full"


def test_a_read_only_output_folder_is_one_line(corpus, tmp_path, monkeypatch):
    parent = tmp_path / "read_only"
    parent.mkdir()
    if AS_ROOT:
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):
            if self.parent == parent and not self.exists():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        parent.chmod(0o555)
    cfg = compose(parent, *corpus)[0]
    try:
        with pytest.raises(LabError, match=rf"cannot write {parent}.*: Permission denied") as caught:
            run(cfg)
    finally:
        parent.chmod(0o755)
    assert "\n" not in str(caught.value)


# --- damaged and oddly encoded input -----------------------------------------------------------------------------

def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def jsonl_lines(n: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)  # random numbers compress poorly, so damage lands mid-file, not in one block
    return [json.dumps({"id": f"d{i}", "text": " ".join(str(rng.random()) for _ in range(30))}).encode() + b"\n"
            for i in range(n)]


def shipped_source(name: str, path: Path) -> SourceSpec:
    """data.sources.<name> as conf/ ships it (fields, val_fraction), reading `path`."""
    return dataclasses.replace(shipped_prepare_settings().sources[name], path=path)


def read_source(path: Path) -> tuple[list, list]:
    """(documents as (id, text) or reason code, notes about the file) as the scan sees them."""
    spec = shipped_source("web", path)
    records = list(iter_source(spec, 1 << 20))
    docs = [parse_record(r, spec) for r in records if r.is_doc]
    return [d if isinstance(d, str) else (d.doc_id, d.text) for d in docs], [r.error for r in records if not r.is_doc]


def assert_a_clean_prefix(docs: list, clean: list) -> None:
    assert 0 < len(docs) < len(clean) and docs == clean[:len(docs)]


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.9])
def test_a_truncated_gzip_keeps_what_precedes_the_cut(tmp_path, cut, caplog):
    lines = jsonl_lines(1500)
    clean, _ = read_source(write(tmp_path / "clean.jsonl", b"".join(lines)))
    data = gzip.compress(b"".join(lines))
    docs, notes = read_source(write(tmp_path / "web.jsonl.gz", data[:int(len(data) * cut)]))
    assert_a_clean_prefix(docs, clean)
    assert len(docs) >= int(len(lines) * cut * 0.8)  # nothing but the cut neighbourhood is lost
    assert notes == ["truncated_stream"] and "unreadable after line" in caplog.text


@pytest.mark.parametrize("damage", ["cut_mid_frame", "cut_last_byte", "corrupt_second_frame", "garbage_tail"])
def test_a_damaged_zstd_keeps_what_precedes_the_damage(tmp_path, damage):
    lines = jsonl_lines(1200)
    clean, _ = read_source(write(tmp_path / "clean.jsonl", b"".join(lines)))
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    first, second = compressor.compress(b"".join(lines[:600])), compressor.compress(b"".join(lines[600:]))
    if damage == "cut_mid_frame":
        data = first + second[:len(second) // 2]
    elif damage == "cut_last_byte":  # zstandard's reader ends such a file silently: it must still be noticed
        data = first + second[:-1]
    elif damage == "corrupt_second_frame":
        middle = bytearray(second)
        middle[len(middle) // 2:len(middle) // 2 + 16] = bytes(16)
        data = first + bytes(middle)
    else:
        data = first + second + b"not zstd at all"
    docs, notes = read_source(write(tmp_path / "web.jsonl.zst", data))
    if damage in ("garbage_tail", "cut_last_byte"):  # every document is whole; the file is still noted as damaged
        assert docs == clean
    else:
        assert_a_clean_prefix(docs, clean)
        assert len(docs) >= 600
    assert notes == ["truncated_stream"]


def test_damaged_input_is_counted_in_the_manifest(corpus, tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    lines = [json.dumps({"id": f"w{i}", "text": ro_doc(random.Random(i))}).encode() + b"\n" for i in range(40)]
    data = gzip.compress(b"".join(lines))
    (web / "a.jsonl.gz").write_bytes(data[:len(data) * 3 // 4])
    cfg, _ = compose(tmp_path, web, corpus[1])
    stats = manifest_of(run(cfg))["sources"]["web"]
    assert [note["reason"] for note in stats["file_notes"]] == ["truncated_stream"]
    assert stats["file_notes"][0]["file"] == "a.jsonl.gz" and 10 <= stats["docs_in"] < 40


ENCODINGS = {
    "utf8_bom": lambda text: codecs.BOM_UTF8 + text.encode(),
    "crlf": lambda text: text.replace("\n", "\r\n").encode(),
    "cr": lambda text: text.replace("\n", "\r").encode(),
    "bom_crlf_no_final_newline": lambda text: codecs.BOM_UTF8 + text.rstrip("\n").replace("\n", "\r\n").encode(),
    "utf16_le": lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
    "utf16_be_crlf": lambda text: codecs.BOM_UTF16_BE + text.replace("\n", "\r\n").encode("utf-16-be"),
}


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_other_encodings_of_a_file_read_as_the_same_documents(tmp_path, encoding, compression):
    rng = random.Random(9)
    text = "".join(json.dumps({"id": f"d{i}", "text": ro_doc(rng, 20) + " ăîșțâ „citat” 😀"}, ensure_ascii=False)
                   + "\n" for i in range(30))
    clean, _ = read_source(write(tmp_path / "clean.jsonl", text.encode()))
    data = ENCODINGS[encoding](text)
    if compression == ".gz":
        data = gzip.compress(data)
    elif compression == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    docs, notes = read_source(write(tmp_path / f"odd.jsonl{compression}", data))
    assert docs == clean and notes == [] and all(not isinstance(d, str) for d in docs)


def test_other_encodings_prepare_to_the_same_bytes(corpus, prepared, tmp_path):
    web, books = corpus
    odd_books = tmp_path / "books"
    odd_books.mkdir()
    for book in sorted(books.iterdir()):
        text = book.read_text()
        odd = ENCODINGS["utf16_le"](text) if book.name == "b0.txt" else ENCODINGS["bom_crlf_no_final_newline"](text)
        (odd_books / book.name).write_bytes(odd)
    odd_web = write(tmp_path / "web.jsonl.gz", gzip.compress(ENCODINGS["utf16_be_crlf"](web.read_text())))
    cfg, _ = compose(tmp_path, odd_web, odd_books)
    out = run(cfg)
    assert bin_hashes(out) == bin_hashes(prepared)
    ours, reference = manifest_of(out)["sources"], manifest_of(prepared)["sources"]
    for name in ("web", "books"):
        assert ours[name]["docs_kept"] == reference[name]["docs_kept"] and ours[name]["docs_malformed"] == 0


def test_invalid_utf8_inside_a_record_is_counted(tmp_path):
    lines = jsonl_lines(5)
    lines[2] = lines[2][:20] + b"\xc3\x28" + lines[2][20:]
    docs, _ = read_source(write(tmp_path / "web.jsonl", b"".join(lines)))
    assert docs[2] == "invalid_utf8" and sum(isinstance(d, tuple) for d in docs) == 4


def test_utf16_damage_costs_only_its_own_record_or_the_cut_tail(tmp_path):
    lines = [line.decode() for line in jsonl_lines(400)]
    clean, _ = read_source(write(tmp_path / "clean.jsonl", "".join(lines).encode()))
    encoded = [line.encode("utf-16-le") for line in lines]
    encoded[200] = encoded[200][:40] + b"\x00\xd8" + encoded[200][40:]  # a lone high surrogate inside record 201
    docs, notes = read_source(write(tmp_path / "web.jsonl", codecs.BOM_UTF16_LE + b"".join(encoded)))
    assert docs[200] == "invalid_utf8" and docs[:200] + docs[201:] == clean[:200] + clean[201:] and notes == []
    cut = codecs.BOM_UTF16_LE + b"".join(encoded[:300])[:-1]  # an odd byte count: the last character is cut
    docs, notes = read_source(write(tmp_path / "cut.jsonl", cut))
    assert notes == ["truncated_stream"] and len(docs) >= 250 and docs[:200] == clean[:200]


# --- the OS refusing to read ---------------------------------------------------------------------------------------

def refuse_reading(path: Path, monkeypatch) -> None:
    """Make `path` unreadable: chmod where that binds, else an injected EACCES from the reader's `open`."""
    if not AS_ROOT:
        path.chmod(0)
        return

    def guarded_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(io_module, "open", guarded_open, raising=False)


@pytest.mark.parametrize("which", ["jsonl", "book"])
def test_an_unreadable_source_file_is_one_line_not_fewer_documents(corpus, tmp_path, monkeypatch, which):
    web, books = (Path(shutil.copy(corpus[0], tmp_path / "web.jsonl")),
                  Path(shutil.copytree(corpus[1], tmp_path / "books")))
    victim = web if which == "jsonl" else books / "b1.txt"
    refuse_reading(victim, monkeypatch)
    cfg, _ = compose(tmp_path, web, books)
    try:
        with pytest.raises(LabError, match=rf"cannot read {victim}: Permission denied") as caught:
            run(cfg)
    finally:
        victim.chmod(0o644)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "prepared" / "manifest.json").exists()


def test_an_unlistable_source_folder_is_one_line(corpus, tmp_path, monkeypatch):
    books = Path(shutil.copytree(corpus[1], tmp_path / "books"))
    hidden = books / "more"
    hidden.mkdir()
    (hidden / "b9.txt").write_text(ro_doc(random.Random(1), 150))
    if AS_ROOT:
        real_walk = os.walk

        def walk(top, onerror=None, **kwargs):
            for root, dirs, files in real_walk(top, onerror=onerror, **kwargs):
                if Path(root) == hidden:
                    onerror(PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(hidden)))
                    continue
                yield root, dirs, files

        monkeypatch.setattr(io_module.os, "walk", walk)
    else:
        hidden.chmod(0)
    try:
        with pytest.raises(LabError, match=rf"cannot list {hidden}: Permission denied"):
            shipped_source("books", books).files()
    finally:
        hidden.chmod(0o755)


@pytest.mark.parametrize("odd", ["dangling_link", "fifo"])
def test_an_input_that_is_not_a_readable_file_is_one_line(tmp_path, odd):
    web = tmp_path / "web"
    web.mkdir()
    write(web / "a.jsonl", b"".join(jsonl_lines(3)))
    if odd == "dangling_link":
        (web / "b.jsonl.gz").symlink_to(tmp_path / "gone.jsonl.gz")
    else:
        os.mkfifo(web / "b.jsonl.gz")  # reading it would wait forever
    with pytest.raises(LabError, match=rf"cannot read {web / 'b.jsonl.gz'}: "):
        shipped_source("web", web).files()


def test_the_command_line_reports_an_os_refusal_as_one_line_and_exit_1(corpus, tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    shutil.copy(corpus[0], web / "a.jsonl")
    (web / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")  # an OS refusal that binds even as root
    _, overrides = compose(tmp_path, web, corpus[1])
    proc = subprocess.run([sys.executable, "-m", "lab.prepare", *overrides, f"hydra.run.dir={tmp_path / 'h'}"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"cannot read {web / 'b.jsonl'}" in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "prepared" / "manifest.json").exists()



def test_the_command_line_reports_a_bad_setting_as_one_line_and_exit_1(corpus, tmp_path):
    _, overrides = compose(tmp_path, *corpus, "prepare.batch_mb=lots")
    proc = subprocess.run([sys.executable, "-m", "lab.prepare", *overrides, f"hydra.run.dir={tmp_path / 'h'}"],
                          capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: prepare.batch_mb='lots' is not allowed: expected a positive number"]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "prepared").exists()  # checked before anything is written
