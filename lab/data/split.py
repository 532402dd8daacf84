"""Deterministic per-document keys: the train/val split and the tokenizer-training sample.

Both are functions of (source, document id) only, so a document lands in the same split whatever
the run, the worker count or the other documents; the split is fixed before anything is learned
from the data (the tokenizer trains on train documents only). Keyed BLAKE2b keeps the two keys
independent, so the tokenizer sample is not biased towards or away from the validation set.
"""

from __future__ import annotations

import hashlib

TRAIN, VAL = 0, 1
SPLITS = ("train", "val")
_SCALE = float(1 << 64)


def doc_key(source: str, doc_id: str, purpose: str) -> int:
    """A uniform 64-bit integer for (source, doc_id), independent for each `purpose`."""
    digest = hashlib.blake2b(f"{source}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8,
                             person=purpose.encode()[:16])
    return int.from_bytes(digest.digest(), "little")


def assign_split(source: str, doc_id: str, val_fraction: float, salt: str) -> int:
    """VAL for a `val_fraction` share of document ids, else TRAIN (salt: prepare.split.salt)."""
    return VAL if doc_key(source, doc_id, salt) / _SCALE < val_fraction else TRAIN


def sample_key(source: str, doc_id: str, salt: str = "tok-sample") -> int:
    """Rank of a document in the tokenizer-training sample (lower keys are taken first)."""
    return doc_key(source, doc_id, salt)
