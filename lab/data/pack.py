"""Tokenize the kept documents and pack them into fixed blocks of seq_len tokens.

Workers tokenize one scan shard each (batch encoding, one thread per process) and write its token
stream per split: every document followed by the end-of-text token. The main process then
concatenates the parts in shard order into `<source>/<split>.bin`, cut to a whole number of blocks
(no padding; the leftover tail is counted, not written). Parts are written atomically with their
counts last, so a killed packing run resumes at shard granularity.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lab.data.dedup import KEEP
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
    batch_docs: int = 256


# Memory bounds of one encode_batch call: a long document is encoded in pieces of PIECE_CHARS, and
# a batch is flushed at BATCH_CHARS characters (or `batch_docs` documents).
PIECE_CHARS = 1 << 18
BATCH_CHARS = 1 << 21
_SPACE_AFTER_WORD = re.compile(r"\S\s")


def part_prefix(parts_dir: Path, source: str, index: int) -> Path:
    return parts_dir / source / f"{index:06d}"


_worker: dict[str, Any] = {}


def init_worker(config: PackConfig) -> None:
    tokenizer = Tokenizer.from_file(str(config.tokenizer_file))
    # The text is already normalised the way the tokenizer's normalizer would (NFC in the scan, the
    # fold below); skipping it saves its per-character alignment bookkeeping.
    tokenizer.normalizer = None
    _worker.update(config=config, tokenizer=tokenizer, eos=tokenizer.token_to_id("<|endoftext|>"),
                   normalizers={s: Normalizer.from_cfg(n) for s, n in config.normalize.items()})


def pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most ~max_chars whose tokens, concatenated, equal the text's.

    A cut falls just before a whitespace character that follows a non-space one: the byte-level
    pre-tokenizer always has a boundary there (a word never absorbs the whitespace after it), so
    encoding the pieces separately gives the same tokens. This bounds the memory of encoding a
    long book (`tokenizers` keeps ~100 bytes per token of bookkeeping until the batch returns).
    """
    out = []
    while len(text) > max_chars:
        cut = _cut_point(text, max_chars)
        out.append(text[:cut])
        text = text[cut:]
    if text or not out:
        out.append(text)
    return out


def _cut_point(text: str, max_chars: int) -> int:
    """The last cut position in (max_chars/2, max_chars]; else the first later one; else the end."""
    lo, hi = max_chars // 2, max_chars
    while hi > lo:  # rfind is a C loop: no Python work per word of a long book
        cut = max(text.rfind(" ", lo, hi + 1), text.rfind("\n", lo, hi + 1))
        if cut <= lo:
            break
        if not text[cut - 1].isspace():
            return cut
        hi = cut - 1
    match = _SPACE_AFTER_WORD.search(text, max_chars)
    return match.start() + 1 if match else len(text)


def pack_shard(task: PackTask) -> dict[str, Any]:
    config: PackConfig = _worker["config"]
    prefix = part_prefix(config.parts_dir, task.source, task.index)
    stats_path = Path(f"{prefix}.stats.json")
    if stats_path.is_file():
        return json.loads(stats_path.read_text())
    tokenizer: Tokenizer = _worker["tokenizer"]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
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
        for encoding, last in zip(encode(batch[split], add_special_tokens=False), ends[split]):
            chunks[split].append(np.asarray(encoding.ids, dtype=config.dtype))
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
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for split in (0, 1):
        flush(split)
        tokens = np.concatenate(chunks[split]) if chunks[split] else np.empty(0, dtype=config.dtype)
        counts[SPLITS[split]]["tokens"] = int(len(tokens))
        with atomic_path(Path(f"{prefix}.{SPLITS[split]}.bin")) as tmp:
            tokens.tofile(tmp)
    result = {"source": task.source, "index": task.index, **counts}
    write_json_atomic(stats_path, result)
    return result


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
