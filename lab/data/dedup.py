"""Exact and near-duplicate removal with MinHash LSH, in memory that grows by ~64 bytes per document.

Signatures: datasketch's `MinHash` scheme affine32 (its permutations, its MurmurHash3 pre-mix) over
word n-gram shingles, computed in the scan workers with numpy for a whole batch of documents at
once (a `MinHash` object per document cost ~300 µs, a fifth of the scan on web pages); (bands,
rows) are datasketch's optimum for the threshold (`MinHashLSH(threshold, num_perm, weights)`),
weighted towards recall: at 128 permutations and threshold 0.8 that is 16 bands of 8 rows, which misses a pair of Jaccard 0.9 with probability 1e-4 (0.07 with equal weights).

Index: datasketch's `MinHashLSH` keeps every band key as a Python bytes object in a dict of sets,
plus a second table of all keys per document: measured 5.2 KB per document with these 16 bands
(lab.bench_data), i.e. ~36 GB for the ~7M documents of a 20 GB web dump. Instead each band is
reduced to one uint64 per document, written by the scan into per-shard .npy files, and collisions
are found by sorting one band at a time: candidate pairs = documents that share a band key.
Candidates are verified on the full signatures (estimated Jaccard >= threshold, read back from
disk), connected into duplicate clusters, and each cluster keeps one document.

Resident memory per document while deduplicating (arrays over all documents, one band at a time):
exact keys 8 B + one band's keys 8 B + the non-duplicate index 8 B + its keys 8 B + sort order 8 B
+ sorted keys 8 B + rank 8 B ~= 60 B/doc; measured peak 64 B/doc (lab.bench_data), ~0.45 GB at 7M
documents. On disk: signatures 4 B x num_perm + band keys 8 B x bands per document (~4.5 GB at 7M).
The scan, tokenizer training and packing hold no per-document state: their memory is flat.

Keeping one document per cluster (instead of "drop a document if it matches an earlier one") is
what makes the split leak-free: a validation document and its training near-duplicate are in
the same cluster, so at most one of them survives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lab.data.filters import DocStats, NgramBatch

KEEP, EXACT, NEAR = 0, 1, 2
# Shingles per permutation block: bounds the (num_perm x shingles) uint32 temporary (2 MB at 128).
_SHINGLE_CHUNK = 4096
_UINT32 = np.uint64(0xFFFFFFFF)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix of every input hash in scheme affine32)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@dataclass
class MinHasher:
    """MinHash signatures and LSH band keys of documents (the settings: prepare.dedup in conf/prepare.yaml)."""

    num_perm: int
    threshold: float
    shingle_words: int
    seed: int
    # datasketch weighs missed pairs (false negatives) against extra candidates (false positives)
    # when it picks (bands, rows). Candidates are verified on the full signatures here, so an extra
    # one costs a comparison while a miss leaves a duplicate (maybe across train/val): favour recall.
    false_negative_weight: float
    # (bands, rows, a, b) from `portable()` of a MinHasher built in the main process: the scan workers
    # then never import datasketch, whose scipy import costs each of them ~0.5 CPU-s.
    precomputed: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.precomputed is None:
            from datasketch import MinHash, MinHashLSH

            # datasketch's (bands, rows) optimum for the threshold and the weights
            lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm,
                             weights=(1.0 - self.false_negative_weight, self.false_negative_weight))
            a, b = MinHash(num_perm=self.num_perm, seed=self.seed, scheme="affine32").permutations
            self.precomputed = (int(lsh.b), int(lsh.r), a.astype(np.uint32), b.astype(np.uint32))
        self.bands, self.rows, a, b = self.precomputed
        self._permutations = (a, b)
        rng = np.random.default_rng(self.seed)
        self._band_mix = rng.integers(1, 1 << 63, size=self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)

    def portable(self) -> dict:
        """Keyword arguments that rebuild this MinHasher without datasketch (for worker processes)."""
        return {"num_perm": self.num_perm, "threshold": self.threshold, "shingle_words": self.shingle_words,
                "seed": self.seed, "false_negative_weight": self.false_negative_weight,
                "precomputed": self.precomputed}

    def shingles(self, stats: DocStats) -> np.ndarray:
        """32-bit hashes of the word n-grams (a document shorter than n words is one shingle)."""
        n = min(self.shingle_words, max(1, len(stats.word_hashes)))
        grams = stats.ngram_hashes(n)
        if len(grams) == 0:  # no words at all: the text itself
            grams = np.array([hash_text(stats.text)], dtype=np.uint64)
        return _fold32(grams)

    def signature(self, stats: DocStats) -> np.ndarray:
        """[num_perm] uint32: the MinHash of one document (= datasketch's `MinHash.hashvalues`)."""
        return self._min_per_segment(self.shingles(stats), np.zeros(1, dtype=np.int64))[0]

    def batch_signatures(self, batch: NgramBatch, stats: list[DocStats]) -> np.ndarray:
        """[docs, num_perm] uint32: `signature` of every document of `batch` (built from `stats`)."""
        n = self.shingle_words
        counts = np.diff(batch.offsets)
        if batch.n_docs == 0 or counts.min() >= n:  # the usual case: every document has n words
            grams, starts = batch.grams(n)
            bounds = np.searchsorted(starts, batch.offsets[:-1])
            return self._min_per_segment(_fold32(grams), bounds)
        return np.stack([self.signature(s) for s in stats])

    def _min_per_segment(self, shingles: np.ndarray, bounds: np.ndarray) -> np.ndarray:
        """[segments, num_perm]: min over each segment's shingles of every permutation a*fmix(h)+b.

        Segment i is shingles[bounds[i]:bounds[i+1]] (non-empty); uint32 arithmetic wraps as
        datasketch's does.
        """
        a, b = self._permutations
        hv = _fmix32(shingles.astype(np.uint32))
        out = np.full((self.num_perm, len(bounds)), np.iinfo(np.uint32).max, dtype=np.uint32)
        for lo in range(0, len(hv), _SHINGLE_CHUNK):
            hi = min(len(hv), lo + _SHINGLE_CHUNK)
            first = int(np.searchsorted(bounds, lo, side="right")) - 1  # the segment holding row lo
            last = int(np.searchsorted(bounds, hi, side="left"))        # segments starting before hi
            local = np.maximum(bounds[first:last], lo) - lo
            # [num_perm, rows]: the reduction then runs along contiguous memory (~4x faster than rows-major)
            block = np.multiply.outer(a, hv[lo:hi])
            block += b[:, None]
            mins = np.minimum.reduceat(block, local, axis=1)
            np.minimum(out[:, first:last], mins, out=out[:, first:last])
        return np.ascontiguousarray(out.T)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """[bands, docs] uint64: one key per band (a polynomial hash of its `rows` values)."""
        n = signatures.shape[0]
        bands = signatures[:, : self.bands * self.rows].reshape(n, self.bands, self.rows).astype(np.uint64)
        return np.ascontiguousarray((bands * self._band_mix).sum(axis=2, dtype=np.uint64).T)


def _fold32(grams: np.ndarray) -> np.ndarray:
    """uint64 n-gram hashes -> the 32-bit shingle values (high half xor low half)."""
    return ((grams >> np.uint64(32)) ^ grams) & _UINT32


def hash_text(text: str) -> int:
    """64-bit exact-duplicate key of a normalised text."""
    import hashlib

    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class ShardArrays:
    """Where one scan shard's per-document arrays live (see lab.data.scan)."""

    prefix: Path  # <scan>/<source>/<index>; arrays at <prefix>.meta.npz, .bands.npy, .sig.npy
    n_docs: int

    def meta(self) -> dict[str, np.ndarray]:
        with np.load(f"{self.prefix}.meta.npz") as data:
            return {key: data[key] for key in data.files}

    def bands(self) -> np.ndarray:
        return np.load(f"{self.prefix}.bands.npy", mmap_mode="r")

    def signatures(self) -> np.ndarray:
        return np.load(f"{self.prefix}.sig.npy", mmap_mode="r")


@dataclass
class DedupResult:
    status: np.ndarray            # [docs] uint8: KEEP, EXACT or NEAR
    duplicate_of: dict[int, int]  # a few dropped doc -> kept doc, for examples
    candidate_pairs: int
    verified_pairs: int


def deduplicate(shards: Sequence[ShardArrays], doc_rank: np.ndarray, *, exact: bool, near: bool,
                threshold: float, n_bands: int, progress=None) -> DedupResult:
    """Cluster exact and near duplicates over all shards (global document order) and keep one each.

    `doc_rank[i]` orders the documents of a cluster: the lowest rank is kept (source priority, then
    position). Edges come from equal exact hashes and from equal LSH band keys verified on the
    signatures; clusters are the connected components.
    """
    n_total = int(sum(s.n_docs for s in shards))
    offsets = np.cumsum([0] + [s.n_docs for s in shards])
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    exact_keys = np.concatenate([s.meta()["exact"] for s in shards]) if shards else np.empty(0, np.uint64)
    first_of_exact = np.ones(n_total, dtype=bool)
    if exact and n_total:
        u, v = _equal_key_pairs(exact_keys)
        edges.append((u, v))
        first_of_exact[v] = False
    candidates = verified = 0
    if near and n_total:
        pairs = []
        for band in range(n_bands):
            keys = np.concatenate([np.asarray(s.bands()[band]) for s in shards])
            # Exact copies share every band with their first copy; leave them out of the sort.
            index = np.flatnonzero(first_of_exact)
            u, v = _equal_key_pairs(keys[index])
            pairs.append(np.stack([index[u], index[v]]))
            del keys, index
            if progress:
                progress.update(1)
        if pairs:
            both = np.unique(np.concatenate(pairs, axis=1), axis=1)
            candidates = both.shape[1]
            keep = _verify(shards, offsets, both[0], both[1], threshold)
            edges.append((both[0][keep], both[1][keep]))
            verified = int(keep.sum())
    status = np.zeros(n_total, dtype=np.uint8)
    duplicate_of: dict[int, int] = {}
    if edges:
        u = np.concatenate([e[0] for e in edges])
        v = np.concatenate([e[1] for e in edges])
        if len(u):
            members, keeper = _cluster_keepers(u, v, doc_rank, n_total)
            dropped = members[keeper != members]
            kept_for = keeper[keeper != members]
            status[dropped] = np.where(exact_keys[dropped] == exact_keys[kept_for], EXACT, NEAR)
            duplicate_of = dict(zip(dropped.tolist(), kept_for.tolist()))
    return DedupResult(status, duplicate_of, candidates, verified)


def _equal_key_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, other) index pairs for every run of equal keys (first = earliest position)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    if not same.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    run_start = np.flatnonzero(np.r_[True, ~same])
    run_of = np.cumsum(np.r_[True, ~same]) - 1  # run index of every sorted position
    others = np.flatnonzero(np.r_[False, same])
    return order[run_start[run_of[others]]].astype(np.int64), order[others].astype(np.int64)


def _verify(shards: Sequence[ShardArrays], offsets: np.ndarray, u: np.ndarray, v: np.ndarray,
            threshold: float, chunk: int = 1 << 16) -> np.ndarray:
    """Which candidate pairs have estimated Jaccard similarity >= threshold (signatures from disk)."""
    load = functools.lru_cache(maxsize=64)(lambda i: shards[i].signatures())

    def gather(index: np.ndarray) -> np.ndarray:
        shard_of = np.searchsorted(offsets, index, side="right") - 1
        out = np.empty((len(index), load(int(shard_of[0])).shape[1]), dtype=np.uint32)
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            out[rows] = load(int(shard))[index[rows] - offsets[shard]]
        return out

    keep = np.zeros(len(u), dtype=bool)
    for start in range(0, len(u), chunk):
        a, b = gather(u[start:start + chunk]), gather(v[start:start + chunk])
        keep[start:start + chunk] = (a == b).mean(axis=1) >= threshold
    return keep


def _cluster_keepers(u: np.ndarray, v: np.ndarray, rank: np.ndarray, n_total: int) -> tuple[np.ndarray, np.ndarray]:
    """For every document in a duplicate cluster: the cluster member with the lowest rank.

    Connected components by min-label propagation with pointer jumping (vectorised; clusters are
    small and star-shaped, so it converges in a few rounds).
    """
    members = np.unique(np.concatenate([u, v]))
    local_u, local_v = np.searchsorted(members, u), np.searchsorted(members, v)
    labels = np.arange(len(members))
    while True:
        low = np.minimum(labels[local_u], labels[local_v])
        new = labels.copy()
        np.minimum.at(new, local_u, low)
        np.minimum.at(new, local_v, low)
        new = new[new]
        if np.array_equal(new, labels):
            break
        labels = new
    member_rank = rank[members]
    best = np.full(len(members), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, labels, member_rank)
    # The keeper of each component: the member whose rank equals the component's best rank.
    winner = np.empty(len(members), dtype=np.int64)
    is_best = member_rank == best[labels]
    winner[labels[is_best]] = members[is_best]
    return members, winner[labels]
