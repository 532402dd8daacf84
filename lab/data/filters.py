"""Document quality filters: named heuristic rules in the spirit of Gopher (Rae et al. 2021) and C4.

Each rule has a name (its config key) and a threshold; `null` disables it. Rules are checked in a
fixed order and a dropped document records the first rule it failed, so the manifest can say how
many documents each rule removed. Thresholds are configured per source (`prepare.filters`), since a
300-page novel legitimately repeats lines and phrases that would mark a web page as spam.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from lab import LabError
from lab.config.checks import integer, number

# A word: letters/digits, possibly joined by hyphens or apostrophes ("într-un", "l-a", "d'Artagnan").
WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")
_NON_SPACE = re.compile(r"\S")
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_BULLET = tuple("•●○◦▪▫■□‣⁃*-–—·>")
_ELLIPSIS = ("...", "…")

# Frequent Romanian function words, with and without diacritics (reviews and chats often omit them).
# Words that are also frequent in English ("a", "in", "are", "care", "me") are left out so an
# English page cannot pass on them.
RO_STOPWORDS = frozenset("""
și si în cu de la pe că să sa nu un o al ale lui se este e sunt fost din care mai pentru iar sau
dar ce cum când cand nici doar foarte acest această aceasta acesta acum după dupa până pana între
intre fără fara prin spre sub tot toate toți toti lor el ea ei ele eu tu noi voi mă ma te ne vă va
își isi îi ii le am ai au avea era fi fie vom vor ar aș as dacă daca deci deja unde astfel acolo
aici atât atat atunci încă inca numai chiar cel cea cei cele acel acea acei unei unui unor despre
decât decat fiind poate pot mult multe mulți multi alte alt altă alta fiecare ca ci nimic cine
""".split())

# Coefficients of the polynomial hash that combines word hashes into n-gram hashes (odd, random).
_NGRAM_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                       0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9,
                       0x2545F4914F6CDD1D, 0x9FB21C651E98DF25], dtype=np.uint64)
MAX_NGRAM = len(_NGRAM_MIX)


class _once:
    """functools.cached_property without its per-access lock (Python 3.11 takes one on every first
    access: ~3% of the web scan). After the first access the instance attribute shadows it."""

    def __init__(self, compute: Callable[[Any], Any]):
        self.compute, self.name = compute, compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.compute(obj)
        return value


class DocStats:
    """Everything the rules measure about one (normalised, folded) document, computed lazily once."""

    def __init__(self, text: str):
        self.text = text

    @_once
    def lower_text(self) -> str:
        return self.text.lower()

    @_once
    def words(self) -> list[str]:
        """The document's words, lowercased (every rule and the MinHash shingles use them so)."""
        return WORD.findall(self.lower_text)

    @_once
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @_once
    def word_chars(self) -> int:
        """Characters in words (= word_lengths.sum(), without a numpy call per document)."""
        return sum(map(len, self.words))

    @_once
    def non_space_chars(self) -> int:
        return len(self.text) - self.text.count(" ") - self.text.count("\n") - self.text.count("\t")

    @_once
    def lines(self) -> list[str]:
        return [line for line in (raw.strip() for raw in self.text.split("\n")) if line]

    @_once
    def word_hashes(self) -> np.ndarray:
        """A stable 32-bit hash (crc32 of the UTF-8) per word, as uint64 for the n-gram arithmetic."""
        hashes = map(zlib.crc32, map(str.encode, self.words))  # C-level loops: no Python frame per word
        return np.fromiter(hashes, dtype=np.uint64, count=len(self.words))

    def ngram_hashes(self, n: int) -> np.ndarray:
        """64-bit hashes of every word n-gram (position i covers words i..i+n-1)."""
        h = self.word_hashes
        count = len(h) - n + 1
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        out = h[:count] * _NGRAM_MIX[0]
        for k in range(1, n):
            out = out + h[k:k + count] * _NGRAM_MIX[k]  # wraps mod 2^64: intended
        return out


def _top_ngram_char_frac(stats: DocStats, n: int) -> float:
    """Share of word characters in the most frequent n-gram's occurrences (Gopher)."""
    grams = stats.ngram_hashes(n)
    if len(grams) < 2:
        return 0.0
    ordered = np.sort(grams)
    boundary = np.ones(len(ordered), dtype=bool)
    boundary[1:] = ordered[1:] != ordered[:-1]
    run_starts = np.flatnonzero(boundary)
    run_lengths = np.diff(np.append(run_starts, len(ordered)))
    top = int(np.argmax(run_lengths))
    if run_lengths[top] < 2:
        return 0.0
    start = int(np.flatnonzero(grams == ordered[run_starts[top]])[0])
    gram_chars = int(stats.word_lengths[start:start + n].sum())
    return gram_chars * int(run_lengths[top]) / max(1, int(stats.word_lengths.sum()))


def _dup_ngram_char_frac(stats: DocStats, n: int) -> float:
    """Share of word characters covered by n-grams that occur more than once (Gopher)."""
    grams = stats.ngram_hashes(n)
    if len(grams) < 2:
        return 0.0
    order = np.argsort(grams, kind="stable")
    ordered = grams[order]
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return 0.0
    dup_sorted = np.zeros(len(grams), dtype=bool)
    dup_sorted[:-1] |= same
    dup_sorted[1:] |= same
    dup_start = np.empty(len(grams), dtype=bool)
    dup_start[order] = dup_sorted
    # Mark the n words each duplicated n-gram covers, without double counting overlaps.
    delta = np.zeros(len(stats.word_hashes) + 1, dtype=np.int64)
    starts = np.flatnonzero(dup_start)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + n, -1)
    covered = np.cumsum(delta[:-1]) > 0
    return float(stats.word_lengths[covered].sum()) / max(1, int(stats.word_lengths.sum()))


def _dup_line_fracs(stats: DocStats) -> tuple[float, float]:
    lines = stats.lines
    if not lines:
        return 0.0, 0.0
    counts = Counter(lines)
    dup_lines = sum(n - 1 for n in counts.values() if n > 1)
    dup_chars = sum(len(line) * (n - 1) for line, n in counts.items() if n > 1)
    return dup_lines / len(lines), dup_chars / max(1, sum(map(len, lines)))


def _url_chars(stats: DocStats) -> int:
    if "http" not in stats.lower_text and "www." not in stats.lower_text:  # most documents: skip the regex
        return 0
    return sum(len(m) for m in _URL.findall(stats.text))


def _dup_ngram_fails(stats: DocStats, thresholds: dict[Any, float]) -> bool:
    # Characters covered by duplicated n-grams can only shrink as n grows (a repeated 6-gram
    # contains two repeated 5-grams), so when the smallest n stays under every threshold, all do.
    items = sorted((int(n), f) for n, f in thresholds.items())
    smallest = _dup_ngram_char_frac(stats, items[0][0])
    if smallest <= min(f for _, f in items):
        return False
    return smallest > items[0][1] or any(_dup_ngram_char_frac(stats, n) > f for n, f in items[1:])


# name -> (check(stats, threshold) -> True when the document FAILS). Order = evaluation order:
# cheapest and most decisive first.
def _mean_word_length_fails(s: DocStats, bounds: Any) -> bool:
    lo, hi = bounds
    # int / int is the correctly rounded mean, as numpy's (its float sum of integers is exact here)
    mean = s.word_chars / len(s.words) if s.words else 0.0
    return not lo <= mean <= hi


RULES: dict[str, Callable[[DocStats, Any], bool]] = {
    "min_words": lambda s, t: len(s.words) < t,
    "max_words": lambda s, t: len(s.words) > t,
    "max_replacement_frac": lambda s, t: s.text.count("\ufffd") > t * max(1, len(s.text)),
    "blocklist": lambda s, t: any(phrase.lower() in s.lower_text for phrase in t),
    "mean_word_length": _mean_word_length_fails,
    # symbols: non-space characters outside words (punctuation, markup, emoji)
    "max_symbol_frac": lambda s, t: s.non_space_chars - s.word_chars > t * max(1, s.non_space_chars),
    "max_digit_frac": lambda s, t: sum(map(s.text.count, "0123456789")) > t * max(1, s.non_space_chars),
    "max_url_frac": lambda s, t: _url_chars(s) > t * max(1, len(s.text)),
    "min_alpha_word_frac": lambda s, t: sum(map(str.isdigit, s.words)) > (1 - t) * max(1, len(s.words)),
    "min_stopword_frac": lambda s, t: sum(map(RO_STOPWORDS.__contains__, s.words)) < t * max(1, len(s.words)),
    "max_bullet_line_frac": lambda s, t: sum(line.startswith(_BULLET) for line in s.lines) > t * max(1, len(s.lines)),
    "max_ellipsis_line_frac": lambda s, t: sum(line.endswith(_ELLIPSIS) for line in s.lines) > t * max(1, len(s.lines)),
    "max_dup_line_frac": lambda s, t: _dup_line_fracs(s)[0] > t,
    "max_dup_line_char_frac": lambda s, t: _dup_line_fracs(s)[1] > t,
    "max_top_ngram_char_frac": lambda s, t: any(_top_ngram_char_frac(s, int(n)) > f for n, f in t.items()),
    "max_dup_ngram_char_frac": _dup_ngram_fails,
}


# --- many documents at once -----------------------------------------------------------------------

class NgramBatch:
    """The word n-grams of many documents at once, for the n-gram rules and the MinHash.

    Per document, these take a dozen numpy calls of ~1 µs each on arrays of a few hundred words:
    on web pages the call overhead outweighs the arithmetic (it was ~45% of the scan). Over a batch
    each step is one call on ~10^5 words. Results equal the per-document functions exactly: the same
    hashes, the same integer sums and divisions, the same tie-breaks (lowest hash, first position).
    """

    def __init__(self, hashes: np.ndarray, lengths: np.ndarray, counts: np.ndarray):
        self.hashes, self.lengths = hashes, lengths  # [words] uint64 crc32, int64 characters
        self.n_docs = len(counts)
        self.offsets = np.zeros(self.n_docs + 1, dtype=np.int64)  # doc d = words offsets[d]:offsets[d+1]
        np.cumsum(counts, out=self.offsets[1:])
        self.word_doc = np.repeat(np.arange(self.n_docs, dtype=np.int64), counts)
        self.cum_chars = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.cum_chars[1:])
        self.doc_chars = self.cum_chars[self.offsets[1:]] - self.cum_chars[self.offsets[:-1]]
        self._grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def of(cls, stats: list[DocStats]) -> "NgramBatch":
        counts = np.fromiter((len(s.words) for s in stats), dtype=np.int64, count=len(stats))
        total = int(counts.sum())
        words = itertools.chain.from_iterable(s.words for s in stats)
        hashes = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=total)
        lengths = np.fromiter(map(len, itertools.chain.from_iterable(s.words for s in stats)),
                              dtype=np.int64, count=total)
        return cls(hashes, lengths, counts)

    def subset(self, docs: np.ndarray) -> "NgramBatch":
        """The batch of documents `docs` (sorted indices) only."""
        mask = np.isin(self.word_doc, docs)
        return NgramBatch(self.hashes[mask], self.lengths[mask], np.diff(self.offsets)[docs])

    def grams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(hash, first word index) of every n-gram inside one document, in word order."""
        if n not in self._grams:
            h = self.hashes
            count = len(h) - n + 1
            if count <= 0:
                empty = np.empty(0, dtype=np.int64)
                self._grams[n] = (empty.astype(np.uint64), empty)
            else:
                out = h[:count] * _NGRAM_MIX[0]
                for k in range(1, n):
                    out += h[k:k + count] * _NGRAM_MIX[k]  # wraps mod 2^64, as DocStats.ngram_hashes
                starts = np.flatnonzero(np.arange(n, count + n) <= self.offsets[1:][self.word_doc[:count]])
                self._grams[n] = (out[starts], starts)
        return self._grams[n]

    def _sorted_grams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The n-grams ordered by (document, hash): hashes, documents, first word index."""
        grams, starts = self.grams(n)
        docs = self.word_doc[starts]
        # By hash (any order among equal hashes: they form one run), then stably by document: a
        # radix sort when the document index fits 16 bits. ~10x faster than np.lexsort.
        by_hash = np.argsort(grams)
        doc_key = docs[by_hash].astype(np.uint16) if self.n_docs <= 1 << 16 else docs[by_hash]
        order = by_hash[np.argsort(doc_key, kind="stable")]
        return grams[order], docs[order], starts[order]

    def top_ngram_char_frac(self, n: int) -> np.ndarray:
        """[docs] `_top_ngram_char_frac` of every document."""
        frac = np.zeros(self.n_docs)
        g, d, starts = self._sorted_grams(n)
        if len(g) < 2:
            return frac
        new_run = np.ones(len(g), dtype=bool)
        new_run[1:] = (g[1:] != g[:-1]) | (d[1:] != d[:-1])
        run_starts = np.flatnonzero(new_run)
        run_len = np.diff(np.append(run_starts, len(g)))
        run_doc = d[run_starts]
        doc_first_run = np.flatnonzero(np.r_[True, run_doc[1:] != run_doc[:-1]])
        best = np.maximum.reduceat(run_len, doc_first_run)
        best_of_run = np.repeat(best, np.diff(np.append(doc_first_run, len(run_len))))
        # Per document, the first run (lowest hash, as np.argmax) among the most frequent grams.
        top = np.flatnonzero(run_len == best_of_run)
        top = top[np.r_[True, run_doc[top][1:] != run_doc[top][:-1]]]
        top = top[run_len[top] >= 2]
        first = np.minimum.reduceat(starts, run_starts)[top]  # the gram's first occurrence
        chars = self.cum_chars[first + n] - self.cum_chars[first]
        doc = run_doc[top]
        frac[doc] = chars * run_len[top] / np.maximum(1, self.doc_chars[doc])
        return frac

    def dup_ngram_char_frac(self, n: int) -> np.ndarray:
        """[docs] `_dup_ngram_char_frac` of every document."""
        g, d, starts = self._sorted_grams(n)
        if len(g) < 2:
            return np.zeros(self.n_docs)
        same = (g[1:] == g[:-1]) & (d[1:] == d[:-1])
        dup = np.zeros(len(g), dtype=bool)
        dup[:-1] |= same
        dup[1:] |= same
        dup_starts = starts[dup]
        # Words covered by a duplicated n-gram (an n-gram never crosses its document's end).
        size = len(self.hashes) + 1
        delta = np.bincount(dup_starts, minlength=size) - np.bincount(dup_starts + n, minlength=size)
        covered = np.cumsum(delta[:-1]) > 0
        chars = np.bincount(self.word_doc[covered], weights=self.lengths[covered], minlength=self.n_docs)
        return chars / np.maximum(1, self.doc_chars)


def _batch_top_ngram_fails(batch: NgramBatch, thresholds: dict[Any, float]) -> np.ndarray:
    fails = np.zeros(batch.n_docs, dtype=bool)
    for n, f in thresholds.items():
        fails |= batch.top_ngram_char_frac(int(n)) > f
    return fails


def _batch_dup_ngram_fails(batch: NgramBatch, thresholds: dict[Any, float]) -> np.ndarray:
    # As _dup_ngram_fails: the larger n only for documents whose smallest-n share is high enough.
    items = sorted((int(n), f) for n, f in thresholds.items())
    smallest = batch.dup_ngram_char_frac(items[0][0])
    fails = smallest > items[0][1]
    maybe = np.flatnonzero((smallest > min(f for _, f in items)) & ~fails)
    if len(maybe) and len(items) > 1:
        sub = batch.subset(maybe)
        sub_fails = np.zeros(len(maybe), dtype=bool)
        for n, f in items[1:]:
            sub_fails |= sub.dup_ngram_char_frac(n) > f
        fails[maybe] = sub_fails
    return fails


# Rules computed over a batch of documents (NgramBatch), name -> (batch, threshold) -> [docs] fails.
# They come last in RULES, so a document reaches them only after passing every other rule.
BATCH_RULES: dict[str, Callable[[NgramBatch, Any], np.ndarray]] = {
    "max_top_ngram_char_frac": _batch_top_ngram_fails,
    "max_dup_ngram_char_frac": _batch_dup_ngram_fails,
}
assert list(RULES)[-len(BATCH_RULES):] == list(BATCH_RULES), "batch rules must be the last in RULES"


_FRACTION = number(0, 1)


def _phrases(value: Any, key: str) -> Any:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise LabError(f"{key}={value!r} is not allowed: expected a list of non-empty phrases")
    return value


def _word_length_bounds(value: Any, key: str) -> Any:
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers or not 0 <= value[0] <= value[1]:
        raise LabError(f"{key}={value!r} is not allowed: expected [min, max] mean word lengths, 0 <= min <= max")
    return value


def _ngram_fractions(value: Any, key: str) -> Any:
    if not isinstance(value, Mapping) or not value:
        raise LabError(f"{key}={value!r} is not allowed: expected a mapping n -> fraction, e.g. {{2: 0.2, 3: 0.18}}")
    for n, fraction in value.items():
        if isinstance(n, bool) or not str(n).isdigit() or not 1 <= int(n) <= MAX_NGRAM:
            raise LabError(f"{key} has n={n!r}: expected n-gram lengths 1 <= n <= {MAX_NGRAM}")
        _FRACTION(fraction, f"{key}.{n}")
    return value


# Rule -> the check of its threshold (null always disables a rule).
_THRESHOLD_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "min_words": integer(0), "max_words": integer(0), "max_replacement_frac": _FRACTION, "blocklist": _phrases,
    "mean_word_length": _word_length_bounds, "max_symbol_frac": _FRACTION, "max_digit_frac": _FRACTION,
    "max_url_frac": _FRACTION, "min_alpha_word_frac": _FRACTION, "min_stopword_frac": _FRACTION,
    "max_bullet_line_frac": _FRACTION, "max_ellipsis_line_frac": _FRACTION, "max_dup_line_frac": _FRACTION,
    "max_dup_line_char_frac": _FRACTION, "max_top_ngram_char_frac": _ngram_fractions,
    "max_dup_ngram_char_frac": _ngram_fractions,
}
assert set(_THRESHOLD_CHECKS) == set(RULES), "every filter rule needs the check of its threshold"


def check_rules(node: Any, prefix: str) -> None:
    """One entry of prepare.filters (`prefix` names it): known rules with thresholds of the right type and range,
    else one LabError line naming the first bad one."""
    if not isinstance(node, Mapping):
        raise LabError(f"{prefix} must be a mapping of filter rules, not {node!r}")
    unknown = set(node) - set(RULES)
    if unknown:
        raise LabError(f"unknown filter rule(s) {sorted(unknown)} in {prefix}; known: {list(RULES)}")
    for name, value in node.items():
        if value is not None:
            _THRESHOLD_CHECKS[name](value, f"{prefix}.{name}")


@dataclass(frozen=True)
class DocFilter:
    """The enabled rules of one source, with their thresholds."""

    thresholds: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, node: dict[str, Any]) -> "DocFilter":
        """The rules of a merged prepare.filters entry; a rule that is absent or null is off."""
        check_rules(node, "prepare.filters")
        enabled = {name: node[name] for name in RULES if node.get(name) is not None}
        return cls(enabled)

    @property
    def rule_names(self) -> list[str]:
        return list(self.thresholds)

    def first_failure(self, stats: DocStats) -> str | None:
        """Name of the first rule the document fails, or None if it passes them all."""
        for name, threshold in self.thresholds.items():
            if RULES[name](stats, threshold):
                return name
        return None

    @property
    def has_batch_rules(self) -> bool:
        return any(name in BATCH_RULES for name in self.thresholds)

    def first_document_failure(self, stats: DocStats) -> str | None:
        """`first_failure` over the rules that are not BATCH_RULES (these come after all of them)."""
        for name, threshold in self.thresholds.items():
            if name not in BATCH_RULES and RULES[name](stats, threshold):
                return name
        return None

    def batch_failures(self, batch: NgramBatch) -> list[str | None]:
        """Per document of `batch` (which passed `first_document_failure`): the first of the
        BATCH_RULES it fails, or None. Together the two equal `first_failure`."""
        result: list[str | None] = [None] * batch.n_docs
        alive = np.ones(batch.n_docs, dtype=bool)
        for name, threshold in self.thresholds.items():
            if name in BATCH_RULES and alive.any():
                fails = BATCH_RULES[name](batch, threshold) & alive
                for index in np.flatnonzero(fails).tolist():
                    result[index] = name
                alive &= ~fails
        return result
