"""The scan: one parallel pass over the raw corpus that does all per-document work.

The main process streams raw records and cuts them into shards of ~`batch_mb` of input; a worker
parses, normalises, filters and signs each document of a shard and writes, atomically:

    <scan>/<source>/<index>.docs.jsonl.zst   kept documents {"id", "text"} (text before the cedilla fold)
    <scan>/<source>/<index>.meta.npz         per kept document: exact hash, split, sample key, bytes, words
    <scan>/<source>/<index>.bands.npy        [bands, docs] LSH band keys
    <scan>/<source>/<index>.sig.npy          [docs, num_perm] MinHash signatures (uint32)
    <scan>/<source>/<index>.stats.json       the shard's counts; written last, it marks the shard done

Shard boundaries depend only on the input bytes, so a killed scan resumes at shard granularity and
the outputs do not depend on the worker count.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zstandard

from lab.data.dedup import MinHasher, hash_text
from lab.data.filters import DocFilter, DocStats, NgramBatch
from lab.data.io import RawRecord, SourceSpec, iter_source, parse_record
from lab.data.normalize import Normalizer
from lab.data.split import assign_split, sample_key
from lab.data.steps import atomic_path, write_json_atomic

EXAMPLES = 5  # located examples kept per malformed reason / filter rule
# Words per batch of the n-gram rules and MinHash: large enough that numpy's per-call cost vanishes,
# small enough that the batch's arrays stay a few MB (~40 B per word).
BATCH_WORDS = 1 << 17


@dataclass(frozen=True)
class ScanTask:
    source: str
    index: int
    records: list[RawRecord] | None  # None: the shard is already on disk (resume)


@dataclass(frozen=True)
class SourceScanConfig:
    spec: SourceSpec
    normalize: dict[str, Any]
    filters: dict[str, Any]


@dataclass(frozen=True)
class ScanConfig:
    scan_dir: Path
    sources: dict[str, SourceScanConfig]
    minhash: dict[str, Any]
    split_salt: str
    zstd_level: int


def shard_prefix(scan_dir: Path, source: str, index: int) -> Path:
    return scan_dir / source / f"{index:06d}"


# --- worker side -----------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def init_worker(config: ScanConfig) -> None:
    """Build each source's normaliser and filter once per process."""
    _worker["config"] = config
    _worker["normalizers"] = {name: Normalizer.from_cfg(s.normalize) for name, s in config.sources.items()}
    _worker["filters"] = {name: DocFilter.from_cfg(s.filters) for name, s in config.sources.items()}
    _worker["minhasher"] = MinHasher(**config.minhash)


def scan_shard(task: ScanTask) -> dict[str, Any]:
    """Scan one shard in a worker: read, normalise, filter and fingerprint each record, then write the shard's
    outputs and stats atomically (a shard done before a kill is reused by its stats file)."""
    # Long on purpose: one pass shares per-document state and a dozen counters between reading, normalising,
    # filtering and fingerprinting; split into steps, every step would pass all of them around.
    config: ScanConfig = _worker["config"]
    prefix = shard_prefix(config.scan_dir, task.source, task.index)
    stats_path = Path(f"{prefix}.stats.json")
    if task.records is None:
        return json.loads(stats_path.read_text())
    spec = config.sources[task.source].spec
    normalizer: Normalizer = _worker["normalizers"][task.source]
    doc_filter: DocFilter = _worker["filters"][task.source]
    minhasher: MinHasher = _worker["minhasher"]

    malformed: Counter[str] = Counter()
    filtered: Counter[str] = Counter()
    malformed_examples: list[dict[str, Any]] = []
    filtered_examples: dict[str, list[str]] = {}
    notes: list[dict[str, Any]] = []
    docs_in = bytes_in = repaired = 0
    lines: list[bytes] = []
    meta: dict[str, list[int]] = {k: [] for k in ("exact", "split", "sample", "text_bytes", "words")}
    signatures: list[np.ndarray] = []

    # Documents that passed the per-document rules wait here for the n-gram rules and the MinHash,
    # which run over a whole batch at once (NgramBatch); order is kept, so outputs are unchanged.
    pending: list[tuple[int, str, str, str, DocStats]] = []
    pending_words = 0
    first_failed: dict[str, int] = {}  # rule -> position of its first document (orders the examples)

    def record_filtered(rule: str, doc_id: str, position: int) -> None:
        filtered[rule] += 1
        first_failed[rule] = min(position, first_failed.get(rule, position))
        examples = filtered_examples.setdefault(rule, [])
        if len(examples) < EXAMPLES:
            examples.append(doc_id)

    def flush() -> None:
        nonlocal pending_words
        if not pending:
            return
        all_stats = [item[4] for item in pending]
        batch = NgramBatch.of(all_stats)
        verdicts = doc_filter.batch_failures(batch) if doc_filter.has_batch_rules else [None] * len(pending)
        keep = [i for i, rule in enumerate(verdicts) if rule is None]
        for (position, doc_id, *_), rule in zip(pending, verdicts):
            if rule is not None:
                record_filtered(rule, doc_id, position)
        if keep:
            kept_batch = batch if len(keep) == len(pending) else batch.subset(np.array(keep, dtype=np.int64))
            signatures.append(minhasher.batch_signatures(kept_batch, [all_stats[i] for i in keep]))
        for i in keep:
            _, doc_id, text, folded, stats = pending[i]
            lines.append(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
            meta["exact"].append(hash_text(folded))
            meta["split"].append(assign_split(task.source, doc_id, spec.val_fraction, config.split_salt))
            meta["sample"].append(sample_key(task.source, doc_id))
            meta["text_bytes"].append(len(folded.encode("utf-8")))
            meta["words"].append(len(stats.words))
        pending.clear()
        pending_words = 0

    for position, record in enumerate(task.records):
        bytes_in += len(record.payload or b"")
        if not record.is_doc:
            notes.append({"file": record.file, "line": record.line, "reason": record.error})
            continue
        docs_in += 1
        parsed = parse_record(record, spec)
        if isinstance(parsed, str):
            malformed[parsed] += 1
            if sum(1 for e in malformed_examples if e["reason"] == parsed) < EXAMPLES:
                malformed_examples.append({"file": record.file, "line": record.line, "reason": parsed})
            continue
        doc_id, raw_text, was_repaired = parsed
        repaired += was_repaired
        text = normalizer(raw_text)
        folded = normalizer.fold(text)
        stats = DocStats(folded)
        rule = doc_filter.first_document_failure(stats)
        if rule is not None:
            record_filtered(rule, doc_id, position)
            continue
        pending.append((position, doc_id, text, folded, stats))
        pending_words += len(stats.words)
        if pending_words >= BATCH_WORDS:
            flush()
    flush()
    filtered_examples = {rule: filtered_examples[rule] for rule in sorted(first_failed, key=first_failed.get)}

    sig = np.concatenate(signatures) if signatures else np.empty((0, minhasher.num_perm), dtype=np.uint32)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(f"{prefix}.docs.jsonl.zst")) as tmp:
        tmp.write_bytes(zstandard.ZstdCompressor(level=config.zstd_level).compress(b"".join(lines)))
    with atomic_path(Path(f"{prefix}.meta.npz")) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, exact=np.array(meta["exact"], dtype=np.uint64),
                     split=np.array(meta["split"], dtype=np.uint8), sample=np.array(meta["sample"], dtype=np.uint64),
                     text_bytes=np.array(meta["text_bytes"], dtype=np.int64),
                     words=np.array(meta["words"], dtype=np.int64))
    for suffix, array in ((".bands.npy", minhasher.band_keys(sig)), (".sig.npy", sig)):
        with atomic_path(Path(f"{prefix}{suffix}")) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
    result = {
        "source": task.source, "index": task.index, "docs_in": docs_in, "docs_passed": len(lines),
        "bytes_in": bytes_in, "text_bytes": int(sum(meta["text_bytes"])), "words": int(sum(meta["words"])),
        "filtered": dict(sorted(filtered.items())), "malformed": dict(sorted(malformed.items())),
        "malformed_examples": malformed_examples, "filtered_examples": filtered_examples,
        "notes": notes, "utf8_repaired": int(repaired),
    }
    write_json_atomic(stats_path, result)
    return result


# --- main-process side -----------------------------------------------------------------------------

def iter_tasks(config: ScanConfig, batch_bytes: int, max_doc_bytes: int, on_bytes=None) -> Iterator[ScanTask]:
    """Shards of ~batch_bytes of raw input per source, in order; shards already on disk are not re-sent."""
    for name, source in config.sources.items():
        index, batch, size = 0, [], 0
        for record in iter_source(source.spec, max_doc_bytes, on_bytes):
            batch.append(record)
            size += len(record.payload or b"") + 64
            if size >= batch_bytes:
                yield _task(config, name, index, batch)
                index, batch, size = index + 1, [], 0
        if batch or index == 0:
            yield _task(config, name, index, batch)


def _task(config: ScanConfig, source: str, index: int, records: list[RawRecord]) -> ScanTask:
    done = Path(f"{shard_prefix(config.scan_dir, source, index)}.stats.json").is_file()
    return ScanTask(source, index, None if done else records)


def summarize(shard_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """One source's scan counts from its shards' counts (examples: the first ones, in order)."""
    total: dict[str, Any] = {"docs_in": 0, "docs_passed": 0, "bytes_in": 0, "text_bytes": 0, "words": 0,
                             "utf8_repaired": 0, "filtered": Counter(), "malformed": Counter(),
                             "malformed_examples": [], "filtered_examples": {}, "notes": [], "shards": []}
    for stats in shard_stats:
        for key in ("docs_in", "docs_passed", "bytes_in", "text_bytes", "words", "utf8_repaired"):
            total[key] += stats[key]
        total["filtered"].update(stats["filtered"])
        total["malformed"].update(stats["malformed"])
        for example in stats["malformed_examples"]:
            if sum(1 for e in total["malformed_examples"] if e["reason"] == example["reason"]) < EXAMPLES:
                total["malformed_examples"].append(example)
        for rule, ids in stats["filtered_examples"].items():
            have = total["filtered_examples"].setdefault(rule, [])
            have.extend(ids[: EXAMPLES - len(have)])
        total["notes"].extend(stats["notes"])
        total["shards"].append([stats["index"], stats["docs_passed"]])
    total["filtered"] = dict(sorted(total["filtered"].items()))
    total["malformed"] = dict(sorted(total["malformed"].items()))
    return total


def reset_dir(folder: Path, fp: str) -> None:
    """Start `folder` afresh unless it holds partial work of the same fingerprint (resume)."""
    stamp = folder / "FINGERPRINT"
    if folder.is_dir() and (not stamp.is_file() or stamp.read_text() != fp):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        with atomic_path(stamp) as tmp:
            tmp.write_text(fp)


def read_docs(prefix: Path) -> Iterator[dict[str, str]]:
    """The kept documents of one shard, in order, streaming."""
    with open(f"{prefix}.docs.jsonl.zst", "rb") as raw:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw), 1 << 20)
        for line in reader:
            yield json.loads(line)
