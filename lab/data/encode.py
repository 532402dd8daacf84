"""Token ids for many texts: fastokens when it is installed, else Hugging Face `tokenizers`.

fastokens (Rust, loads the same `tokenizer.json`) encodes byte-level BPE ~20x faster per core than
`tokenizers` and is meant to give identical ids. The pipeline does not take that on trust: the
packing step also encodes a sample of every shard with `tokenizers` (`check_chars`) and compares;
a shard with any difference is re-encoded by `tokenizers` and counted in the manifest. The saved
tokenizer, and therefore training, evaluation and generation, stay on `tokenizers`.

Both backends get the tokenizer without its normalizer: the text arrives already normalised the
way the normalizer would (NFC in the scan, the cedilla fold in the packing step).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lab import LabError

BACKENDS = ("auto", "fastokens", "tokenizers")
_SPACE_AFTER_WORD = re.compile(r"\S\s")
PIECE_CHARS = 1 << 18  # the longest piece of a document encoded at once (see `pieces`)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise LabError(f"prepare.pack.encoder={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def _fastokens_module():
    try:
        import fastokens
    except ImportError:
        return None
    return fastokens


class BatchEncoder:
    """Encodes lists of texts (no special tokens added) to one id array per text."""

    def __init__(self, tokenizer_file: Path, backend: str):
        check_backend(backend)
        spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
        spec["normalizer"] = None
        spec_text = json.dumps(spec)
        self.reference = Tokenizer.from_str(spec_text)
        self.fast = None
        if backend != "tokenizers":
            module = _fastokens_module()
            if module is None and backend == "fastokens":
                raise LabError("prepare.pack.encoder=fastokens but fastokens is not installed "
                               "(pip install fastokens; or use encoder=auto)")
            if module is not None:
                try:
                    self.fast = module.Tokenizer.from_json_str(spec_text)
                except Exception as err:  # a tokenizer.json it cannot express: auto falls back
                    if backend == "fastokens":
                        raise LabError(f"fastokens cannot load {tokenizer_file}: {err}") from err
        self.backend = "fastokens" if self.fast is not None else "tokenizers"

    def reference_ids(self, texts: list[str], dtype: str) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=dtype)
                for e in self.reference.encode_batch_fast(texts, add_special_tokens=False)]

    def fast_ids(self, texts: list[str], dtype: str) -> list[np.ndarray]:
        flat, offsets = self.fast.encode_batch_flat(texts, add_special_tokens=False)
        ids = np.frombuffer(flat, dtype=np.uint32).astype(dtype)  # ids < vocab size: the cast is exact
        bounds = np.frombuffer(offsets, dtype=np.uint64).astype(np.int64)  # [len(texts) + 1]
        return [ids[bounds[i]:bounds[i + 1]] for i in range(len(texts))]

    def encode(self, texts: list[str], dtype: str, budget: list[int] | None = None) -> list[np.ndarray]:
        """Ids per text. With the fast backend, texts are also encoded by `tokenizers` while
        `budget[0]` (characters, decremented in place) lasts; any difference raises `Mismatch`."""
        if self.fast is None:
            return self.reference_ids(texts, dtype)
        out = self.fast_ids(texts, dtype)
        if budget is not None and budget[0] > 0:
            self._check(texts, out, dtype, budget)
        return out

    def _check(self, texts: list[str], fast: list[np.ndarray], dtype: str, budget: list[int]) -> None:
        """Compare with `tokenizers` on whole texts while they fit the budget, then on the head of
        the next one (a piece cut where the pre-tokenizer has a boundary, see `pieces`)."""
        count = 0
        while count < len(texts) and len(texts[count]) <= budget[0]:
            budget[0] -= len(texts[count])
            count += 1
        pairs = list(zip(fast[:count], self.reference_ids(texts[:count], dtype)))
        if count < len(texts) and budget[0] > 0:
            head = pieces(texts[count], max(budget[0], 4096))[0]
            budget[0] -= len(head)
            pairs.append((self.fast_ids([head], dtype)[0], self.reference_ids([head], dtype)[0]))
        if not all(np.array_equal(a, b) for a, b in pairs):
            raise Mismatch()


class Mismatch(Exception):
    """fastokens and tokenizers gave different ids for the same text."""


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
