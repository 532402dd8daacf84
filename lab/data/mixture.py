"""Mixtures of sources inside one curriculum stage: how many blocks each source gives, and where.

A mixture stage of N samples over sources with shares q_i gets exact integer counts c_i (largest
remainder of N * q_i, with UniMax-style epoch caps: a source capped at `max_epochs` passes gives its
surplus to the others in proportion to their shares). The counts are then interleaved with low
discrepancy: the k-th sample of source i sits at "time" (k + phase_i) / c_i, with a seeded phase per
source, and positions follow the times in order. So every window of w positions holds w * c_i / N
samples of source i within about one per source, the whole stage holds exactly c_i, and the source
at position p is a pure function of (seed, stage, p): an exact resume and every arch see the same.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lab import LabError

# Marks the random streams of mixture stages, apart from the [seed, stage, pass] streams of plain stages.
_MIX_STREAM = 0x6D6978


def source_shares(sizes: Sequence[int], weights: Sequence[float] | None = None,
                  temperature: float | None = None) -> np.ndarray:
    """Sampling probabilities: the given weights normalised, or size^(1/temperature) (1: by size)."""
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if weights is not None:
        raw = np.asarray(weights, dtype=np.float64)
    elif temperature is not None:
        raw = sizes_arr ** (1.0 / float(temperature))
    else:
        raw = sizes_arr
    return raw / raw.sum()


def largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, each within one of total * share (ties: earlier index first)."""
    ideal = total * np.asarray(shares, dtype=np.float64)
    counts = np.floor(ideal).astype(np.int64)
    missing = int(total - counts.sum())
    if missing > 0:
        order = np.argsort(-(ideal - counts), kind="stable")
        counts[order[:missing]] += 1
    return counts


def allocate(total: int, shares: np.ndarray, caps: Sequence[float]) -> np.ndarray:
    """Counts per source summing to `total`, in proportion to `shares`, none above its cap (UniMax).

    A source whose share would pass its cap gets the cap; the rest of the budget is shared again among
    the others. Raises ValueError when the caps together hold less than `total`.
    """
    shares = np.asarray(shares, dtype=np.float64)
    caps_arr = np.asarray([math.floor(c) if math.isfinite(c) else np.iinfo(np.int64).max for c in caps],
                          dtype=np.int64)
    counts = np.zeros(len(shares), dtype=np.int64)
    free = shares > 0
    remaining = int(total)
    while remaining > 0:
        if not free.any():
            raise ValueError(f"{int(total) - remaining} of {int(total)} blocks fit under the caps")
        part = np.where(free, shares, 0.0)
        ideal = remaining * part / part.sum()
        over = free & (ideal > caps_arr)
        if not over.any():
            counts += largest_remainder(remaining, part / part.sum())
            break
        counts[over] = caps_arr[over]
        remaining -= int(caps_arr[over].sum())
        free &= ~over
    return counts


def interleave(counts: Sequence[int], seed: int, stage_index: int) -> np.ndarray:
    """Flat slot ids in stage order: slot offsets[i] + k is the k-th sample of source i."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    phases = np.random.default_rng([seed, stage_index, _MIX_STREAM]).random(len(counts_arr))
    times = np.concatenate([(np.arange(c, dtype=np.float64) + phase) / c
                            for c, phase in zip(counts_arr, phases) if c > 0] or [np.zeros(0)])
    return np.argsort(times, kind="stable")  # equal times: the earlier source first


def source_permutation(seed: int, stage_index: int, source_index: int, block_pass: int, size: int) -> np.ndarray:
    """The order of one source's blocks in one pass of a mixture stage."""
    return np.random.default_rng([seed, stage_index, _MIX_STREAM, source_index, block_pass]).permutation(size)


def check_weights(weights: dict[str, object], where: str) -> dict[str, float]:
    """Finite non-negative numbers with a positive sum, or one LabError line saying which is wrong."""
    parsed = {}
    for source, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LabError(f"{where}: the weight of source {source!r} is {weight!r}, not a finite number")
        if weight < 0:
            raise LabError(f"{where}: the weight of source {source!r} is {weight}, below 0; weights are shares >= 0")
        parsed[str(source)] = float(weight)
    if not parsed or sum(parsed.values()) <= 0:
        raise LabError(f"{where}: the weights {parsed} do not sum to a positive number; give at least one source "
                       "a weight above 0")
    return parsed
