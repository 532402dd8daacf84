"""Text normalisation: Unicode, Romanian diacritics, control characters, whitespace, book artefacts.

The scan stores text after every step but the cedilla fold, which `Normalizer.fold` applies when
text is read for filtering, deduplication, tokenizer training and packing. Keeping the unfolded
text lets the tokenizer report train a comparison tokenizer "without the diacritics
normalisation" on exactly the same documents; the fold itself is one `str.translate`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from lab import LabError
from lab.config.checks import boolean, integer

# Romanian s/t take a comma below (ș ț, U+0219/U+021B); the cedilla forms (ş ţ, U+015F/U+0163) are
# a legacy of pre-Unicode-5 fonts and still common in web text. Folding them makes one word one
# spelling, for the tokenizer, the deduplicator and the model.
CEDILLA_TO_COMMA = {"ş": "ș", "ţ": "ț", "Ş": "Ș", "Ţ": "Ț"}

# C0/C1 controls except tab and newline, plus invisible format characters that only break words:
# soft hyphen, zero-width space, word joiner, BOM.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff]")
_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028]")
_PARAGRAPH_SEP = re.compile("\u2029")
# Runs of horizontal space that need rewriting to one " ": two or more spaces, or any tab/exotic
# space (a lone " " is left alone: matching every space would cost a replacement per word).
_OTHER_SPACE = "\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_SPACES = re.compile(f"(?=[ {_OTHER_SPACE}])(?:[ {_OTHER_SPACE}]{{2,}}|[{_OTHER_SPACE}])")  # lookahead: fast scan
_SPACE_AROUND_NEWLINE = re.compile(" \n ?|\n ")
_MANY_NEWLINES = re.compile("\n{3,}")
# Any character the line-break, control or space rules rewrite. Most documents have none, and one
# character-class search (plus `in` tests for "  ", " \n", "\n " and "\n\n\n") lets them skip the
# regex substitutions, which cost a full pass each even when they replace nothing.
_SPECIAL = re.compile("[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff"
                      f"{_OTHER_SPACE}]")

# Books: a line that is only a page number ("12", "- 12 -", "Pagina 12", "pag. 12").
_PAGE_NUMBER = re.compile(r"^[-–—]?\s*(?:(?:pagina|pag\.?|p\.)\s*)?\d{1,4}\s*[-–—]?$", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")
_LETTER = re.compile(r"[^\W\d_]")
_SENTENCE_END = ".!?…"
_HEADER_END = ".!?…:;,\"'»”)"
_DASHES = "-–—"
_HYPHENS = "-\u2010"
# Hard-wrapped prose: 90% of lines are at most 50-120 characters and most run near that width.
_WRAP_MIN_WIDTH, _WRAP_MAX_WIDTH, _FULL_LINE = 50, 120, 0.75
_TITLE_LINES = 3  # a running header among the book's first non-blank lines is its title: kept
# A line-final hyphen that is a Romanian clitic hyphen ("într-|un", "s-|a", "dintr-|o") is kept;
# any other one splits a word across lines and is removed ("frumu-|seţe" -> "frumuseţe").
_CLITIC_LEFT = frozenset("într dintr printr prin s n l m v c i ne să nu mi ți ţi și şi te le vă dă de la pe".split())
_CLITIC_RIGHT = frozenset("un o a ai am au ați aţi ar i l le lea mi ți ţi și şi ne vă se s e n o-n".split())

# The options every source's normalisation states (prepare.normalize.default); the book clean-up options are off
# for a source whose entry does not turn them on.
BASE_OPTIONS = ("nfc", "fold_cedilla", "strip_control", "whitespace")
BOOK_OPTIONS = ("page_numbers", "running_headers", "dehyphenate", "unwrap_lines")
# What running_headers needs to know (the other options are true or false); unused while it is off.
HEADER_OPTIONS = ("header_min_repeats", "header_max_chars")
_OPTION_CHECKS = {"header_min_repeats": integer(2), "header_max_chars": integer(1)}


def fold_cedilla(text: str) -> str:
    # str.replace is a C loop; str.translate with a dict costs a lookup per character.
    for cedilla, comma in CEDILLA_TO_COMMA.items():
        if cedilla in text:
            text = text.replace(cedilla, comma)
    return text


@dataclass(frozen=True)
class Normalizer:
    """The normalisation of one source (`prepare.normalize.default` merged with the source's entry): built by
    `from_cfg`, so every setting comes from conf/prepare.yaml."""

    nfc: bool
    fold_cedilla: bool
    strip_control: bool
    whitespace: bool
    # Book (PDF/OCR) clean-up (prepare.normalize.books turns it on).
    page_numbers: bool
    running_headers: bool
    header_min_repeats: int | None  # None: running_headers is off and needs none
    header_max_chars: int | None
    dehyphenate: bool
    unwrap_lines: bool

    @classmethod
    def check_options(cls, node: Any, prefix: str) -> None:
        """One entry of prepare.normalize (`prefix` names it): known options of the right types, else one LabError
        line naming the first bad one."""
        if not isinstance(node, Mapping):
            raise LabError(f"{prefix} must be a mapping of normalisation options, not {node!r}")
        unknown = set(node) - set(cls.__dataclass_fields__)
        if unknown:
            raise LabError(f"unknown prepare.normalize option(s) {sorted(unknown)} in {prefix}; known: "
                           f"{sorted(cls.__dataclass_fields__)}")
        for name, value in node.items():
            _OPTION_CHECKS.get(name, boolean)(value, f"{prefix}.{name}")

    @classmethod
    def from_cfg(cls, node: dict) -> "Normalizer":
        """A merged prepare.normalize entry: the BASE_OPTIONS stated, a book option it leaves out is off."""
        cls.check_options(node, "prepare.normalize")
        needed = BASE_OPTIONS + (HEADER_OPTIONS if node.get("running_headers") else ())
        missing = [option for option in needed if option not in node]
        if missing:
            raise LabError(f"prepare.normalize.{missing[0]} is missing from the config (it has no default in code; "
                           "restore it in conf/prepare.yaml)")
        return cls(**{**dict.fromkeys(BOOK_OPTIONS, False), **dict.fromkeys(HEADER_OPTIONS), **node})

    @property
    def book_cleanup(self) -> bool:
        return self.page_numbers or self.running_headers or self.dehyphenate or self.unwrap_lines

    def __call__(self, text: str) -> str:
        """Normalised text, except for the cedilla fold (see `fold`)."""
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        # The substitutions below run only where they can change something (same result, faster).
        special = _SPECIAL.search(text) is not None
        if special:
            text = _LINE_BREAKS.sub("\n", text)
            text = _PARAGRAPH_SEP.sub("\n\n", text)
            if self.strip_control:
                text = _CONTROL.sub("", text)
        if self.book_cleanup:
            text = self.clean_book(text)
        if self.whitespace:
            if special or "  " in text:
                text = _SPACES.sub(" ", text)
            if " \n" in text or "\n " in text:
                text = _SPACE_AROUND_NEWLINE.sub("\n", text)
            if "\n\n\n" in text:
                text = _MANY_NEWLINES.sub("\n\n", text)
            text = text.strip()
        return text

    def fold(self, text: str) -> str:
        return fold_cedilla(text) if self.fold_cedilla else text

    # --- books -----------------------------------------------------------------------------------

    def clean_book(self, text: str) -> str:
        """Undo PDF/OCR layout: page-number lines, running headers, hyphenation and hard wraps.

        Removed page furniture becomes a page break (None) that the line joiner can join across,
        so a word or sentence cut by a page ("Bâr-", "1", "HEADER", "sana") is put back together.
        """
        raw = text.split("\n")
        lines: list[str | None] = [line.strip() for line in raw]
        # An indented line starts a paragraph (books that mark paragraphs by indentation, not blank lines).
        indented = [bool(line) and raw_line[:1] in (" ", "\t") for line, raw_line in zip(lines, raw)]
        if self.page_numbers:
            lines = [None if line and _PAGE_NUMBER.match(line) else line for line in lines]
        if self.running_headers:
            lines = self._mark_running_headers(lines)
        lines, indented = _collapse_page_breaks(lines, indented)
        if self.dehyphenate or self.unwrap_lines:
            lines = self._join_wrapped(lines, indented)
        return "\n".join("" if line is None else line for line in lines)

    def _header_key(self, line: str | None) -> str | None:
        """The key a running header repeats under ("Ion Creangă 12" and "13" match), or None."""
        if not line or len(line) > self.header_max_chars or line[0] in _DASHES or line[-1] in _HEADER_END:
            return None
        if len(_LETTER.findall(line)) < 3:
            return None
        return " ".join(_DIGITS.sub("", line).lower().split())

    def _mark_running_headers(self, lines: list[str | None]) -> list[str | None]:
        # A short line without final punctuation that recurs across the book is a page header or
        # footer (title, author, chapter); dialogue and verse end in punctuation or start with a dash.
        # Its first occurrence among the book's first lines is the title page and stays.
        keys = [self._header_key(line) for line in lines]
        counts = Counter(key for key in keys if key)
        repeated = {key for key, n in counts.items() if n >= self.header_min_repeats}
        if not repeated:
            return lines
        first_text = [i for i, line in enumerate(lines) if line][:_TITLE_LINES]
        keep = {i for i in first_text if keys[i] in repeated}
        return [None if key in repeated and i not in keep else line
                for i, (line, key) in enumerate(zip(lines, keys))]

    def _join_wrapped(self, lines: list[str | None], indented: list[bool]) -> list[str | None]:
        full = _wrap_width(lines)  # a hard-wrapped book's lines run to ~this length, else None
        out: list[str | None] = []
        for line, indent in zip(lines, indented):
            if line and not indent and line[0] not in _DASHES:
                across_break = bool(out) and out[-1] is None
                prev_at = len(out) - 2 if across_break else len(out) - 1
                prev = out[prev_at] if prev_at >= 0 else None
                if prev:
                    joined = self._join(prev, line, full)
                    if joined is not None:
                        out[prev_at] = joined
                        if across_break:
                            out.pop()
                        continue
            out.append(line)
        # A page break that joined nothing separates paragraphs.
        return ["" if line is None else line for line in out]

    def _join(self, prev: str, line: str, full: int | None) -> str | None:
        """`prev` and its continuation `line` as one line, or None if they stay apart."""
        if self.dehyphenate and prev[-1] in _HYPHENS and len(prev) > 1 and prev[-2].isalpha() and line[0].islower():
            left = prev[:-1].rsplit(" ", 1)[-1].lstrip("„\"«('").lower()
            right = line.split(" ", 1)[0].rstrip(_SENTENCE_END + ",;:").lower()
            keep_hyphen = left in _CLITIC_LEFT or right in _CLITIC_RIGHT
            return (prev if keep_hyphen else prev[:-1]) + line
        if not self.unwrap_lines or prev[-1] in _HYPHENS:
            return None
        # A lowercase line continuing an unfinished one is a wrap anywhere; in a hard-wrapped book
        # so is any line after one that ran to the full width. Verse (short lines, capitals) stays.
        if (line[0].islower() and prev[-1] not in _SENTENCE_END) or (full and len(prev) >= _FULL_LINE * full):
            return prev + " " + line
        return None


assert set(BASE_OPTIONS + BOOK_OPTIONS + HEADER_OPTIONS) == set(Normalizer.__dataclass_fields__), \
    "every normalisation option is a base, book or header option"


def _wrap_width(lines: list[str | None]) -> int | None:
    """The line width of a hard-wrapped text (most lines end near it), or None if not wrapped."""
    lengths = sorted(len(line) for line in lines if line)
    if len(lengths) < 20:
        return None
    width = lengths[int(0.9 * (len(lengths) - 1))]
    near_full = sum(n >= _FULL_LINE * width for n in lengths) / len(lengths)
    return width if _WRAP_MIN_WIDTH <= width <= _WRAP_MAX_WIDTH and near_full >= 0.6 else None


def _collapse_page_breaks(lines: list[str | None], indented: list[bool]) -> tuple[list[str | None], list[bool]]:
    """Each run of blank lines and page breaks (None) that holds a page break becomes one break."""
    out: list[str | None] = []
    out_indented: list[bool] = []
    run: list[str | None] = []
    for line, indent in zip(lines, indented):
        if not line:
            run.append(line)
            continue
        if run:  # (a check per line, not a call: this loop runs once per line of every book)
            items = [None] if None in run else run
            out.extend(items)
            out_indented.extend([False] * len(items))
            run = []
        out.append(line)
        out_indented.append(indent)
    if run:
        items = [None] if None in run else run
        out.extend(items)
        out_indented.extend([False] * len(items))
    return out, out_indented
