"""Tokenize the kept documents and pack them into fixed blocks of seq_len tokens.

Workers tokenize one scan shard each (batch encoding, one thread per process; lab/data/encode.py holds
the backend and its check against `tokenizers`) and write its token stream per split: every document
followed by the end-of-text token. The main process then
concatenates the parts in shard order into `<source>/<split>.bin`, cut to a whole number of blocks
(no padding; the leftover tail is counted, not written). Parts are written atomically with their
counts last, so a killed packing run resumes at shard granularity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lab.data.dedup import KEEP
from lab.data.encode import BatchEncoder, Mismatch, pieces
from lab.data.normalize import Normalizer
from lab.data.scan import read_docs
from lab.data.split import SPLITS
from lab.data.steps import atomic_path, write_json_atomic


@dataclass(frozen=True)
class PackTask:
    source: str
    index: int
    shard_prefix: Path
    status: bytes  # per scanned document: dedup status (KEEP, EXACT, NEAR)
    splits: bytes  # per scanned document: TRAIN or VAL


@dataclass(frozen=True)
class PackConfig:
    tokenizer_file: Path
    parts_dir: Path
    dtype: str
    normalize: dict[str, dict[str, Any]]  # per source, for the late cedilla fold
    batch_docs: int  # prepare.pack.*
    encoder: str  # lab/data/encode.py BACKENDS
    check_chars: int  # per shard, also encoded by `tokenizers` and compared (fast backend only)


# Memory bounds of one encode call: a long document is encoded in pieces of encode.PIECE_CHARS, and
# a batch is flushed at BATCH_CHARS characters (or `batch_docs` documents).
BATCH_CHARS = 1 << 21


def part_prefix(parts_dir: Path, source: str, index: int) -> Path:
    return parts_dir / source / f"{index:06d}"


_worker: dict[str, Any] = {}


def init_worker(config: PackConfig) -> None:
    # The text is already normalised the way the tokenizer's normalizer would (NFC in the scan, the
    # fold below), so the encoder runs without it (and without its alignment bookkeeping).
    encoder = BatchEncoder(config.tokenizer_file, config.encoder)
    _worker.update(config=config, encoder=encoder, eos=encoder.reference.token_to_id("<|endoftext|>"),
                   normalizers={s: Normalizer.from_cfg(n) for s, n in config.normalize.items()})


def pack_shard(task: PackTask) -> dict[str, Any]:
    config: PackConfig = _worker["config"]
    prefix = part_prefix(config.parts_dir, task.source, task.index)
    stats_path = Path(f"{prefix}.stats.json")
    if stats_path.is_file():
        return json.loads(stats_path.read_text())
    encoder: BatchEncoder = _worker["encoder"]
    budget = [config.check_chars]
    try:
        tokens, counts = _encode_shard(task, lambda texts: encoder.encode(texts, config.dtype, budget))
        check = {"backend": encoder.backend, "checked_chars": config.check_chars - budget[0], "mismatched_shards": 0}
    except Mismatch:  # never trust a fast path that disagreed: this shard is redone by the reference
        tokens, counts = _encode_shard(task, lambda texts: encoder.reference_ids(texts, config.dtype))
        check = {"backend": "tokenizers", "checked_chars": 0, "mismatched_shards": 1}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for split, split_tokens in tokens.items():
        counts[split]["tokens"] = int(len(split_tokens))
        with atomic_path(Path(f"{prefix}.{split}.bin")) as tmp:
            split_tokens.tofile(tmp)
    result = {"source": task.source, "index": task.index, **counts, "encoder": check}
    write_json_atomic(stats_path, result)
    return result


def _encode_shard(task: PackTask, encode: Callable[[list[str]], list[np.ndarray]]
                  ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    """The shard's kept documents as one token stream per split (EOS after each document), and counts."""
    config: PackConfig = _worker["config"]
    normalizer: Normalizer = _worker["normalizers"][task.source]
    status = np.frombuffer(task.status, dtype=np.uint8)
    splits = np.frombuffer(task.splits, dtype=np.uint8)
    eos = np.array([_worker["eos"]], dtype=config.dtype)
    # Per split: pending pieces, and whether each piece ends its document (then EOS follows it).
    batch: dict[int, list[str]] = {0: [], 1: []}
    ends: dict[int, list[bool]] = {0: [], 1: []}
    batch_chars = {0: 0, 1: 0}
    chunks: dict[int, list[np.ndarray]] = {0: [], 1: []}
    counts = {split: {"docs": 0, "text_bytes": 0, "tokens": 0} for split in SPLITS}

    def flush(split: int) -> None:
        if not batch[split]:
            return
        for ids, last in zip(encode(batch[split]), ends[split]):
            chunks[split].append(ids)
            if last:
                chunks[split].append(eos)
        batch[split], ends[split], batch_chars[split] = [], [], 0

    for position, doc in enumerate(read_docs(task.shard_prefix)):
        if status[position] != KEEP:
            continue
        split = int(splits[position])
        text = normalizer.fold(doc["text"])
        counts[SPLITS[split]]["docs"] += 1
        counts[SPLITS[split]]["text_bytes"] += len(text.encode("utf-8"))
        parts = pieces(text)
        batch[split].extend(parts)
        ends[split].extend([False] * (len(parts) - 1) + [True])
        batch_chars[split] += len(text)
        if len(batch[split]) >= config.batch_docs or batch_chars[split] >= BATCH_CHARS:
            flush(split)
    tokens = {}
    for split in (0, 1):
        flush(split)
        tokens[SPLITS[split]] = (np.concatenate(chunks[split]) if chunks[split]
                                 else np.empty(0, dtype=config.dtype))
    return tokens, counts


def concat_parts(parts: list[Path], out: Path, dtype: str, seq_len: int, chunk: int = 1 << 24) -> dict[str, Any]:
    """Concatenate token parts into `out`, cut to whole blocks; returns tokens, blocks, tail and sha256."""
    itemsize = np.dtype(dtype).itemsize
    total = sum(p.stat().st_size for p in parts) // itemsize
    blocks = total // seq_len
    remaining = blocks * seq_len * itemsize
    digest = hashlib.sha256()
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as sink:
            for part in parts:
                if remaining <= 0:
                    break
                with open(part, "rb") as source:
                    while remaining > 0 and (data := source.read(min(chunk, remaining))):
                        sink.write(data)
                        digest.update(data)
                        remaining -= len(data)
    return {"tokens": int(total), "blocks": int(blocks), "tail_tokens": int(total - blocks * seq_len),
            "sha256": digest.hexdigest()}
