"""Byte-level BPE: training on a byte budget of training documents, saving, and the report.

Byte-level means the 256 byte symbols are in the vocabulary from the start, so any input encodes
without an unknown token and decodes back to the same bytes. The tokenizer carries the pipeline's
own Unicode normalisation (NFC and the cedilla fold) so text given to it at inference time (a
prompt, an evaluation set) is tokenized the way the training data was.

Training is deterministic: `tokenizers` counts words (order-independent sums) and breaks ties
between equally frequent merges by the pair itself, and the sample is chosen by document-id keys
and read in a fixed order; the same data and config give a byte-identical tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lab.data.filters import WORD
from lab.data.normalize import CEDILLA_TO_COMMA

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)  # ids 0 and 1 (docs/CONTRACTS.md)
# Sample keys are bucketed by their top bits to pick the byte budget in O(1) memory.
KEY_BITS = 20


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every token id."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _normalizer(fold: bool) -> normalizers.Normalizer:
    steps = [normalizers.NFC()]
    if fold:
        steps += [normalizers.Replace(cedilla, comma) for cedilla, comma in CEDILLA_TO_COMMA.items()]
    return normalizers.Sequence(steps)


def _skeleton(model: models.Model, fold: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(fold)
    # GPT-2's split (letters, digits, punctuation, whitespace runs) then bytes -> printable symbols.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int, fold: bool,
              length: int | None = None) -> Tokenizer:
    """A byte-level BPE (min_frequency: prepare.tokenizer_training; fold: its normalizer folds cedillas)."""
    tokenizer = _skeleton(models.BPE(), fold)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def train_unigram(texts: Iterable[str], vocab_size: int, *, fold: bool, length: int | None = None) -> Tokenizer:
    """A Unigram LM tokenizer (SentencePiece's algorithm) on the same byte-level pieces, for comparison."""
    tokenizer = _skeleton(models.Unigram(), fold)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def save_pretrained(tokenizer: Tokenizer, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) that AutoTokenizer loads."""
    from transformers import PreTrainedTokenizerFast  # heavy import: only when saving

    for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
            raise RuntimeError(f"special token {token} missing from the trained vocabulary")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    # Written by transformers < 5; kept for tools that still read it.
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --- the training sample ----------------------------------------------------------------------------

def key_bucket(keys: np.ndarray) -> np.ndarray:
    return (keys >> np.uint64(64 - KEY_BITS)).astype(np.int64)


def budget_thresholds(histograms: dict[str, np.ndarray], budget_bytes: float,
                      shares: dict[str, float] | None) -> dict[str, int]:
    """Per source, the highest key bucket taken into the sample (-1: none).

    `histograms[source][b]` = training-text bytes whose sample key falls in bucket b. Documents are
    taken in key order (a uniform random order fixed by their ids) until the budget is met, so
    every source contributes in proportion to its size, or by `shares` when given.
    """
    def cut(hist: np.ndarray, budget: float) -> int:
        if budget <= 0 or hist.sum() == 0:
            return -1
        filled = np.cumsum(hist)
        return int(min(np.searchsorted(filled, budget), len(hist) - 1))

    if shares:  # a source that `shares` leaves out contributes nothing (prepare.tokenizer_training.source_shares)
        return {name: cut(hist, budget_bytes * float(shares.get(name, 0.0))) for name, hist in histograms.items()}
    bucket = cut(sum(histograms.values()), budget_bytes) if histograms else -1
    return {name: bucket for name in histograms}


# --- the report ---------------------------------------------------------------------------------------

def count_tokens(tokenizer: Tokenizer, texts: list[str], batch: int = 256) -> int:
    total = 0
    for start in range(0, len(texts), batch):
        total += sum(len(e.ids) for e in tokenizer.encode_batch(texts[start:start + batch], add_special_tokens=False))
    return total


def comparison_table(rows: list[tuple[str, Tokenizer | None, dict[str, list[str]], int]]) -> list[dict[str, Any]]:
    """Tokens each tokenizer needs for the same held-out documents, per source.

    Each row is (name, tokenizer, held-out texts per source as that tokenizer is fed them, training
    bytes): the pipeline's tokenizers get the folded text, the one trained without the fold gets it
    as stored. A tokenizer of None counts UTF-8 bytes, the floor every byte-level BPE improves on.
    Words are counted on the first row's text, so tokens/word is comparable across rows.
    """
    words = {source: sum(len(WORD.findall(t)) for t in texts) for source, texts in rows[0][2].items()} if rows else {}
    table = []
    for name, tokenizer, texts_by_source, train_bytes in rows:
        row: dict[str, Any] = {"tokenizer": name, "vocab_size": tokenizer.get_vocab_size() if tokenizer else 256,
                               "train_bytes": int(train_bytes), "sources": {}}
        total_tokens = total_bytes = 0
        for source, texts in texts_by_source.items():
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            tokens = count_tokens(tokenizer, texts) if tokenizer else n_bytes
            row["sources"][source] = {"tokens": tokens, "bytes_per_token": round(n_bytes / max(1, tokens), 4),
                                      "tokens_per_word": round(tokens / max(1, words[source]), 4)}
            total_tokens, total_bytes = total_tokens + tokens, total_bytes + n_bytes
        row["tokens"] = total_tokens
        row["bytes_per_token"] = round(total_bytes / max(1, total_tokens), 4)
        table.append(row)
    for row in table:
        row["tokens_vs_this"] = round(row["tokens"] / max(1, table[0]["tokens"]), 4)
    return table


def format_report(report: dict[str, Any]) -> str:
    """The tokenizer report as plain-text tables (fertility per source, then the comparison)."""
    out = []
    fertility = report.get("fertility", {})
    if fertility:
        out.append(f"{'source':<10} {'split':<6} {'tokens':>12} {'words':>12} {'tokens/word':>12} {'bytes/token':>12}")
        for source, splits in fertility.items():
            for split, f in splits.items():
                out.append(f"{source:<10} {split:<6} {f['tokens']:>12,} {f['words']:>12,} "
                           f"{f['tokens_per_word']:>12.3f} {f['bytes_per_token']:>12.3f}")
    comparison = report.get("comparison", {})
    rows = comparison.get("rows", [])
    if rows:
        sources = list(rows[0]["sources"])
        out.append("")
        heldout = ", ".join(f"{source}: {kind}" for source, kind in comparison.get("heldout", {}).items())
        out.append(f"tokens needed for the same held-out text ({heldout})")
        header = f"{'tokenizer':<22} {'vocab':>7} {'train MB':>9} " + " ".join(
            f"{s + ' tok':>12} {s + ' tok/w':>10}" for s in sources) + f" {'total tok':>11} {'B/tok':>6} {'vs this':>8}"
        out.append(header)
        for row in rows:
            cells = " ".join(f"{row['sources'][s]['tokens']:>12,} {row['sources'][s]['tokens_per_word']:>10.3f}"
                             for s in sources)
            out.append(f"{row['tokenizer']:<22} {row['vocab_size']:>7} {row['train_bytes'] / 1e6:>9.2f} {cells} "
                       f"{row['tokens']:>11,} {row['bytes_per_token']:>6.2f} {row['tokens_vs_this']:>8.3f}")
    return "\n".join(out)

