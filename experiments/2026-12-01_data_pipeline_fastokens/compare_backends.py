"""fastokens against tokenizers on a whole corpus: identical ids? how many MB per CPU-second each?

    python experiments/2026-12-01_data_pipeline_fastokens/compare_backends.py \
        --corpus /work/shared/corpus/ro --tokenizer data/prepared/<...>/tokenizer/tokenizer.json

Every web document and every book (in pieces of 256k characters, as the packing step cuts them),
normalised as the scan does (NFC + cedilla fold), plus hand-written edge cases, go through both
backends of lab/data/encode.py in batches of 256; one thread each (RAYON_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import unicodedata
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from lab.data.encode import BatchEncoder  # noqa: E402
from lab.data.normalize import fold_cedilla  # noqa: E402

EDGE_CASES = ["", " ", "\n\n", "a<|endoftext|>b", "<|pad|>", "<|endoftext|>", "x <|endoftext|> y", "😀👍🏽 家族 مرحبا",
              "a" * 100000, " " * 5000 + "x", "1234567890" * 50, "don't I'll we've", "\t\t\r\n x", "ș" * 3000,
              "http://example.com/a?b=c&d=e", "'s's's", "\U0010ffff", "\u2028\u2029\x85"]


def texts(corpus: Path):
    def norm(text: str) -> str:
        return fold_cedilla(unicodedata.normalize("NFC", text))

    with open(corpus / "web.jsonl", encoding="utf-8") as handle:
        for line in handle:
            try:
                yield norm(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                continue
    for path in sorted((corpus / "books").rglob("*.txt")):
        text = norm(path.read_text(encoding="utf-8", errors="replace"))
        for start in range(0, len(text), 1 << 18):
            yield text[start:start + (1 << 18)]
    yield from (norm(t) for t in EDGE_CASES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    args = parser.parse_args()
    encoder = BatchEncoder(args.tokenizer, "fastokens")
    seconds = {"tokenizers": 0.0, "fastokens": 0.0}
    n_texts = mismatched = 0
    n_bytes = 0

    def compare(batch: list[str]) -> None:
        nonlocal n_texts, mismatched
        start = time.process_time()
        reference = encoder.reference_ids(batch, "uint32")
        seconds["tokenizers"] += time.process_time() - start
        start = time.process_time()
        fast = encoder.fast_ids(batch, "uint32")
        seconds["fastokens"] += time.process_time() - start
        for text, a, b in zip(batch, reference, fast):
            n_texts += 1
            if not np.array_equal(a, b):
                mismatched += 1
                print("mismatch:", repr(text[:80]))

    batch: list[str] = []
    for text in texts(args.corpus):
        batch.append(text)
        n_bytes += len(text.encode("utf-8"))
        if len(batch) == 256:
            compare(batch)
            batch = []
    compare(batch)
    mb = n_bytes / 2**20
    print(f"{n_texts} texts, {mb:.1f} MB, {mismatched} with different ids")
    for name, cpu in seconds.items():
        print(f"{name:<11} {cpu:7.2f} CPU s  {mb / cpu:6.2f} MB/s per core")


if __name__ == "__main__":
    main()
