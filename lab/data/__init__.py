"""Data: corpus preparation (raw web JSONL + book .txt files -> cleaned, deduplicated, tokenized blocks), and the
blocks read back for training in the curriculum's order.

One module per concern; `pipeline` runs them as resumable steps (`python -m lab.prepare` is its command):

    pipeline   the steps in order, each reused when its inputs are unchanged, and the publish of the result
    io         read JSONL (.jsonl/.gz/.zst) and folders of .txt, streaming; count bad input
    normalize  NFC, cedilla -> comma-below, control chars, whitespace, PDF artefacts in books
    filters    named Gopher/C4-style document rules, configurable per source
    split      deterministic train/val assignment and sampling keys from document ids
    scan       the parallel per-document pass: parse -> normalise -> filter -> MinHash -> shard
    dedup      exact + near-duplicate removal (MinHash LSH bands, sorted on disk-backed arrays)
    tokenizer  byte-level BPE training, saving for AutoTokenizer, and the tokenizer report
    encode     token ids for many texts: fastokens when installed, else tokenizers (cross-checked)
    pack       parallel tokenization into fixed blocks of seq_len tokens
    packed     reading packed blocks back, memory-mapped (training, evaluation)
    mixture    how many blocks each source gives inside a curriculum stage's mixture, and where
    manifest   the accounting (docs_in == kept + filtered + duplicate + malformed) and hashes; its reader
    publish    building the prepared folder aside and swapping it in whole; verifying it before training
    steps      fingerprints, done-markers, atomic writes, the run lock, crash points for tests
    parallel   an ordered, bounded process pool (memory stays flat however long the input)
    progress   progress bars or log lines, and the wall/CPU clock of each step
    datamodule the packed blocks of a curriculum stage for training and validation (conf/curriculum)
    step_budget the curriculum turned into optimizer steps (stage boundaries, tokens per step)
"""
