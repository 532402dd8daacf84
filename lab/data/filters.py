"""Document quality filters: named heuristic rules in the spirit of Gopher (Rae et al. 2021) and C4.

Each rule has a name (its config key) and a threshold; `null` disables it. Rules are checked in a
fixed order and a dropped document records the first rule it failed, so the manifest can say how
many documents each rule removed. Thresholds are configured per source (`prepare.filters`), since a
300-page novel legitimately repeats lines and phrases that would mark a web page as spam.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import numpy as np

from lab import LabError

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


class DocStats:
    """Everything the rules measure about one (normalised, folded) document, computed lazily once."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def lower_text(self) -> str:
        return self.text.lower()

    @cached_property
    def words(self) -> list[str]:
        """The document's words, lowercased (every rule and the MinHash shingles use them so)."""
        return WORD.findall(self.lower_text)

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.words), dtype=np.int64, count=len(self.words))

    @cached_property
    def non_space_chars(self) -> int:
        return len(self.text) - self.text.count(" ") - self.text.count("\n") - self.text.count("\t")

    @cached_property
    def lines(self) -> list[str]:
        return [line for line in (raw.strip() for raw in self.text.split("\n")) if line]

    @cached_property
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
    mean = float(s.word_lengths.mean()) if len(s.words) else 0.0
    return not lo <= mean <= hi


RULES: dict[str, Callable[[DocStats, Any], bool]] = {
    "min_words": lambda s, t: len(s.words) < t,
    "max_words": lambda s, t: len(s.words) > t,
    "max_replacement_frac": lambda s, t: s.text.count("\ufffd") > t * max(1, len(s.text)),
    "blocklist": lambda s, t: any(phrase.lower() in s.lower_text for phrase in t),
    "mean_word_length": _mean_word_length_fails,
    # symbols: non-space characters outside words (punctuation, markup, emoji)
    "max_symbol_frac": lambda s, t: s.non_space_chars - int(s.word_lengths.sum()) > t * max(1, s.non_space_chars),
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


@dataclass(frozen=True)
class DocFilter:
    """The enabled rules of one source, with their thresholds."""

    thresholds: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, node: dict[str, Any]) -> "DocFilter":
        unknown = set(node) - set(RULES)
        if unknown:
            raise LabError(f"unknown filter rule(s) {sorted(unknown)} in prepare.filters; known: {list(RULES)}")
        for name, value in node.items():
            if name in ("max_top_ngram_char_frac", "max_dup_ngram_char_frac") and value is not None:
                if not isinstance(value, dict) or not all(1 <= int(n) <= MAX_NGRAM for n in value):
                    raise LabError(f"prepare.filters {name}: expected a mapping n -> fraction with 1 <= n <= {MAX_NGRAM}")
            if name == "mean_word_length" and value is not None and len(value) != 2:
                raise LabError("prepare.filters mean_word_length: expected [min, max]")
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
