"""Unit tests of the data pipeline's parts (lab/data/*): small inputs built in each test."""

from __future__ import annotations

import dataclasses
import gzip
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lab import LabError
from lab.data import dedup as dd
from lab.data.filters import RULES, DocFilter, DocStats
from lab.data.io import RawRecord, SourceSpec, iter_source, parse_record
from lab.data.normalize import Normalizer, fold_cedilla
from lab.data.pack import concat_parts, pieces
from lab.data.pipeline import Settings
from lab.data.split import TRAIN, VAL, assign_split, sample_key
from lab.data.tokenizer import budget_thresholds, save_pretrained, token_dtype, train_bpe
from tests.conftest import compose_config, shipped_prepare_settings

# A paragraph of ordinary Romanian prose that passes every default web rule.
PROSE = ("Primăria a anunțat că lucrările de modernizare a străzii principale vor începe luna viitoare și vor "
         "dura aproximativ trei luni. Locuitorii din zonă au fost informați că traficul va fi deviat pe străzile "
         "laterale, iar autobuzele vor avea un traseu temporar. Reprezentanții administrației locale au spus că "
         "proiectul este finanțat din fonduri europene și că, după finalizare, strada va avea trotuare mai late, "
         "piste pentru biciclete și un sistem nou de iluminat public.")


# The parts below are built from the shipped conf/prepare.yaml, as the pipeline builds them (tests.conftest).

def web_filter() -> DocFilter:
    return DocFilter.from_cfg(shipped_prepare_settings().filters["web"])


def normalizer(source: str, **changes: object) -> Normalizer:
    """The shipped normalisation of `source` (web: prepare.normalize.default; books: with the book clean-up)."""
    return Normalizer.from_cfg({**shipped_prepare_settings().normalize[source], **changes})


def minhasher(**changes: object) -> dd.MinHasher:
    """The shipped prepare.dedup MinHash settings, with `changes`."""
    return dd.MinHasher(**{**shipped_prepare_settings().minhash, **changes})


def shipped_bpe(texts, vocab_size: int):
    """train_bpe as lab.prepare calls it (prepare.tokenizer_training.min_frequency, the cedilla fold of the default)."""
    settings = shipped_prepare_settings()
    return train_bpe(texts, vocab_size, min_frequency=settings.training["min_frequency"], fold=settings.tokenizer_fold)


# --- normalisation ---------------------------------------------------------------------------------

def test_nfc_and_cedilla_fold():
    nfd = unicodedata.normalize("NFD", "Ştiinţa şi ţara")  # s + U+0327 combining cedilla
    assert nfd != "Ştiinţa şi ţara"
    text = normalizer("web")(nfd)
    assert text == "Ştiinţa şi ţara"  # composed; the fold is applied on read
    assert normalizer("web").fold(text) == "Știința și țara"
    assert fold_cedilla("ŞŢşţ") == "ȘȚșț"
    assert normalizer("web", fold_cedilla=False).fold("ş") == "ş"


def test_control_characters_and_whitespace():
    raw = "\ufeffUnu\x07 doi\u200b trei\r\npatru\u00a0\u00a0cinci\t\tşase  \n\n\n\nșapte\x0cpagină\u00adnouă  "
    assert normalizer("web")(raw) == "Unu doi trei\npatru cinci şase\n\nșapte\npaginănouă"


def test_a_normalizer_states_its_base_options_and_leaves_the_book_cleanup_off_unless_asked():
    web = normalizer("web")
    assert not (web.book_cleanup or web.running_headers) and web.header_min_repeats is None
    assert normalizer("books").book_cleanup
    base = dict(shipped_prepare_settings().normalize["web"])
    del base["whitespace"]
    with pytest.raises(LabError, match="prepare.normalize.whitespace is missing from the config"):
        Normalizer.from_cfg(base)
    with pytest.raises(LabError, match="prepare.normalize.header_min_repeats is missing"):
        normalizer("web", running_headers=True)


def _normalize_every_pass(norm: Normalizer, text: str) -> str:
    """The normalisation with every substitution run unconditionally (what the fast path must equal)."""
    from lab.data import normalize as nm

    if norm.nfc:
        text = unicodedata.normalize("NFC", text)
    text = nm._PARAGRAPH_SEP.sub("\n\n", nm._LINE_BREAKS.sub("\n", text))
    if norm.strip_control:
        text = nm._CONTROL.sub("", text)
    if norm.book_cleanup:
        text = norm.clean_book(text)
    if norm.whitespace:
        text = nm._SPACES.sub(" ", text)
        text = nm._MANY_NEWLINES.sub("\n\n", nm._SPACE_AROUND_NEWLINE.sub("\n", text)).strip()
    return text


@pytest.mark.parametrize("source, changes", [("web", {}), ("web", {"strip_control": False}),
                                             ("web", {"whitespace": False}), ("books", {})])
def test_normalisation_skips_only_passes_that_change_nothing(source, changes):
    import random

    norm = normalizer(source, **changes)
    rng = random.Random(7)
    alphabet = ["a", "ș", "Ş", "x y", " ", "  ", "\n", "\n\n\n", " \n", "\n ", "\t", "\r\n", "\r", "\x0c", "\x85",
                "\u2028", "\u2029", "\x07", "\u00ad", "\u200b", "\ufeff", "\u00a0", "\u3000", "12", "-", ".",
                "s\u0327", "Pagina 3", "TITLU"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert norm(text) == _normalize_every_pass(norm, text), repr(text)


def test_book_cleanup_page_numbers_headers_hyphenation_and_wraps():
    width_line = "Aceasta este o linie lungă de proză tipărită, tăiată la lățimea paginii"
    body = "\n".join([width_line] * 24)
    book = (f"TITLUL CĂRȚII\n\n{body}\nun bătrân din Bâr-\n\n12\n\nTITLUL CĂRȚII\n\nsana mi-a spus că pe vremuri\n"
            f"poarta era mândria casei. Am mers într-\nun sat frumos și am văzut frumu-\nsețea locului.\n\n"
            + "\n\n".join(f"- {n} -\n\nTITLUL CĂRȚII\n\nAlt paragraf {n}." for n in range(13, 17)))
    out = normalizer("books")(book)
    assert out.startswith("TITLUL CĂRȚII\n\n")  # the title page stays, the running headers go
    assert out.count("TITLUL CĂRȚII") == 1
    assert "12" not in out and "- 13 -" not in out
    assert "Bârsana mi-a spus că pe vremuri poarta era mândria casei." in out  # joined across the page break
    assert "într-un sat" in out  # a clitic hyphen is kept
    assert "frumusețea locului" in out  # a word hyphen is removed
    assert "\n" not in out.split("\n\n")[1]  # the hard-wrapped paragraph is one line


def test_book_cleanup_keeps_verse_and_dialogue():
    verse = "A fost odată ca-n povești,\nA fost ca niciodată,\nDin rude mari împărătești,\nO prea frumoasă fată."
    dialogue = "— Unde te duci?\n— La moară, răspunse el."
    norm = normalizer("books")
    assert norm(verse) == verse
    assert norm(dialogue) == dialogue


# --- filters -----------------------------------------------------------------------------------------

FAILING = {
    "min_words": "Prea scurt.",
    "max_words": None,
    "max_replacement_frac": PROSE + " \ufffd\ufffd\ufffd",
    "blocklist": PROSE + " Lorem ipsum dolor sit amet.",
    "mean_word_length": " ".join(["a b c d e f g h și în"] * 5),
    "max_symbol_frac": PROSE + " " + "#$%&*+=<>|~^" * 40,
    "max_digit_frac": PROSE + " " + " ".join(str(1000 + i) for i in range(80)),
    "max_url_frac": PROSE + " " + " ".join(f"https://exemplu.ro/pagina/{i}/articol" for i in range(15)),
    "min_alpha_word_frac": "Cod și preț: " + " ".join(str(i) for i in range(40)) + " " + PROSE[:80],
    "min_stopword_frac": ("The city council approved a new plan to expand the bike lane network by thirty kilometres "
                          "over the next two years. Officials said the project will connect schools and parks."),
    "max_bullet_line_frac": "\n".join(f"• produsul numărul {i} este disponibil în magazin și online" for i in range(12)),
    "max_ellipsis_line_frac": "\n".join(f"Citește mai mult despre subiectul {i} și despre alte noutăți..."
                                        for i in range(12)),
    "max_dup_line_frac": "\n".join([PROSE[:120]] * 6 + [PROSE[120:240]]),
    "max_dup_line_char_frac": None,
    "max_top_ngram_char_frac": PROSE + " " + "cazare ieftină " * 40,
    "max_dup_ngram_char_frac": PROSE[:200] + " " + PROSE[:200] + " " + PROSE[200:],
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_filter_rule_drops_what_it_names(rule):
    doc_filter = web_filter()
    assert doc_filter.first_failure(DocStats(PROSE)) is None
    text = FAILING[rule]
    if text is None:  # earlier rules catch any text that fails this one at the defaults: test it alone
        failing, threshold = {"max_words": (PROSE, 10),
                              "max_dup_line_char_frac": ("\n".join([PROSE[:200]] * 2 + [PROSE[200:]]), 0.2)}[rule]
        assert RULES[rule](DocStats(failing), threshold)
        assert not RULES[rule](DocStats(PROSE), doc_filter.thresholds[rule])
        return
    assert RULES[rule](DocStats(text), doc_filter.thresholds[rule]), rule


def _mixed_docs(n: int = 120) -> list[str]:
    """Documents of every kind the rules see: prose, each failing text, repeats, very short ones."""
    import random

    rng = random.Random(3)
    words = PROSE.replace(".", "").replace(",", "").split()
    docs = [PROSE, "", "!!! ???", "Unu doi.", "Unu doi trei patru"] + [t for t in FAILING.values() if t]
    while len(docs) < n:
        k = rng.randint(1, 300)
        body = [rng.choice(words[:rng.randint(2, len(words))]) for _ in range(k)]
        if rng.random() < 0.3:  # repeated passages: the n-gram rules' business
            body += body[: rng.randint(1, k)]
        docs.append(" ".join(body) + ".")
    return docs


def test_batched_rules_equal_the_per_document_rules():
    """The scan runs the n-gram rules over batches (NgramBatch): same verdict as one document at a time."""
    from lab.data.filters import NgramBatch

    doc_filter = web_filter()
    stats = [DocStats(t) for t in _mixed_docs()]
    expected = [doc_filter.first_failure(s) for s in stats]
    passed = [i for i, s in enumerate(stats) if doc_filter.first_document_failure(s) is None]
    batch_verdicts = doc_filter.batch_failures(NgramBatch.of([stats[i] for i in passed]))
    got = [doc_filter.first_document_failure(s) for s in stats]
    for i, verdict in zip(passed, batch_verdicts):
        got[i] = verdict
    assert got == expected
    assert {"max_top_ngram_char_frac", "max_dup_ngram_char_frac", None} <= set(expected)  # both paths ran
    # the shares themselves, for every document (not only the ones reaching the rules)
    batch = NgramBatch.of(stats)
    from lab.data.filters import _dup_ngram_char_frac, _top_ngram_char_frac
    for n in (2, 3, 5):
        assert batch.top_ngram_char_frac(n).tolist() == [_top_ngram_char_frac(s, n) for s in stats]
        assert batch.dup_ngram_char_frac(n).tolist() == [_dup_ngram_char_frac(s, n) for s in stats]


def test_batched_minhash_equals_datasketch():
    """Signatures computed with numpy over a batch equal datasketch's MinHash (scheme affine32)."""
    from datasketch import MinHash

    from lab.data.filters import NgramBatch

    hasher = minhasher(num_perm=64)
    stats = [DocStats(t) for t in _mixed_docs(60) + [PROSE * 60]]  # a long one spans several blocks
    for group in (stats, [s for s in stats if len(s.words) >= hasher.shingle_words]):  # with/without short docs
        got = hasher.batch_signatures(NgramBatch.of(group), group)
        for s, signature in zip(group, got):
            reference = MinHash(num_perm=hasher.num_perm, seed=hasher.seed, scheme="affine32", hashfunc=int)
            reference.update_batch(hasher.shingles(s))
            assert signature.tolist() == reference.hashvalues.tolist()
    # a worker rebuilds the hasher without datasketch from the main process' parameters
    rebuilt = dd.MinHasher(**hasher.portable())
    assert (rebuilt.bands, rebuilt.rows) == (hasher.bands, hasher.rows)
    assert rebuilt.signature(stats[0]).tolist() == hasher.signature(stats[0]).tolist()


def test_filter_config_errors_and_disabling():
    with pytest.raises(LabError, match="unknown filter rule"):
        DocFilter.from_cfg({"min_wrds": 3})
    assert DocFilter.from_cfg({"min_words": None, "max_words": 5}).rule_names == ["max_words"]


# --- splitting --------------------------------------------------------------------------------------

def test_split_is_deterministic_and_close_to_the_fraction():
    salt = shipped_prepare_settings().split_salt
    splits = [assign_split("web", f"doc-{i}", 0.1, salt) for i in range(5000)]
    assert splits == [assign_split("web", f"doc-{i}", 0.1, salt) for i in range(5000)]
    assert 0.08 < splits.count(VAL) / len(splits) < 0.12
    assert assign_split("web", "x", 0.0, salt) == TRAIN
    assert splits != [assign_split("web", f"doc-{i}", 0.1, salt + "-other") for i in range(5000)]  # salt re-draws
    # the sample key is independent of the split key
    assert sample_key("web", "doc-1") != sample_key("books", "doc-1")


# --- deduplication -----------------------------------------------------------------------------------

def _shard(tmp_path: Path, name: str, texts: list[str], hasher: dd.MinHasher) -> dd.ShardArrays:
    stats = [DocStats(t) for t in texts]
    sig = np.stack([hasher.signature(s) for s in stats])
    prefix = tmp_path / name
    np.savez(f"{prefix}.meta.npz", exact=np.array([dd.hash_text(t) for t in texts], dtype=np.uint64))
    np.save(f"{prefix}.bands.npy", hasher.band_keys(sig))
    np.save(f"{prefix}.sig.npy", sig)
    return dd.ShardArrays(prefix, len(texts))


def test_exact_and_near_duplicates_within_and_across_sources(tmp_path):
    hasher = minhasher()
    other = "Echipa națională de handbal a câștigat meciul de aseară după o repriză a doua foarte bună. " * 3
    near = PROSE.replace("trei luni", "patru luni")
    web = _shard(tmp_path, "web", [PROSE, other, PROSE, near], hasher)
    books = _shard(tmp_path, "books", [other + " Sfârșit."], hasher)
    # rank: books first (priority), then document order
    rank = np.array([10, 11, 12, 13, 0])
    found = dd.deduplicate([web, books], rank, exact=True, near=True, threshold=hasher.threshold,
                           n_bands=hasher.bands)
    assert found.status.tolist() == [dd.KEEP, dd.NEAR, dd.EXACT, dd.NEAR, dd.KEEP]
    assert found.duplicate_of == {1: 4, 2: 0, 3: 0}


def test_dedup_switches(tmp_path):
    hasher = minhasher(num_perm=64)
    shard = _shard(tmp_path, "w", [PROSE, PROSE, PROSE.replace("trei", "patru")], hasher)
    only_exact = dd.deduplicate([shard], np.arange(3), exact=True, near=False, threshold=hasher.threshold,
                                n_bands=hasher.bands)
    assert only_exact.status.tolist() == [dd.KEEP, dd.EXACT, dd.KEEP]
    none = dd.deduplicate([shard], np.arange(3), exact=False, near=False, threshold=hasher.threshold,
                          n_bands=hasher.bands)
    assert none.status.tolist() == [0, 0, 0]


# --- reading and bad input ---------------------------------------------------------------------------

def _spec(path: Path, kind: str = "jsonl") -> SourceSpec:
    """The shipped source of that kind (web: jsonl, books: txt_dir), reading `path`."""
    shipped = shipped_prepare_settings().sources
    return dataclasses.replace(next(spec for spec in shipped.values() if spec.kind == kind), path=path)


@pytest.mark.parametrize("line, reason", [
    (b"\n", "blank_line"),
    (b'{"id": 1, "text": "ok"', "invalid_json"),
    (b'["a list"]', "not_an_object"),
    (b'{"id": 1}', "missing_text_field"),
    (b'{"id": 1, "text": null}', "null_text"),
    (b'{"id": 1, "text": 42}', "text_not_string"),
    (b'{"id": 1, "text": "\\ud800 x"}', "lone_surrogate"),
    (b'{"id": 1, "text": "bad \xff byte"}', "invalid_utf8"),
])
def test_malformed_lines_get_a_reason(line, reason):
    assert parse_record(RawRecord("web.jsonl", 3, line), _spec(Path("x"))) == reason


def test_missing_id_falls_back_to_the_location():
    assert parse_record(RawRecord("web.jsonl", 7, b'{"text": "salut"}'), _spec(Path("x")))[:2] == ("web.jsonl:7", "salut")
    book = parse_record(RawRecord("carte.txt", 0, b"tar\xe3 \xff"), _spec(Path("x"), "txt_dir"))
    assert book.repaired and book.text == "tar\ufffd \ufffd"


def test_compressed_inputs_long_lines_and_truncation(tmp_path):
    lines = [json.dumps({"id": i, "text": f"document {i}"}).encode() + b"\n" for i in range(5)]
    lines[2] = json.dumps({"id": 2, "text": "x" * 5000}).encode() + b"\n"
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b"".join(lines)))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines)))
    (tmp_path / "c.jsonl").write_bytes(b"")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b"".join(lines))[:-30])  # cut short
    records = list(iter_source(_spec(tmp_path), max_bytes=1000))
    by_file: dict[str, list[RawRecord]] = {}
    for record in records:
        by_file.setdefault(record.file, []).append(record)
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        assert [r.error for r in by_file[name]] == [None, None, "line_too_long", None, None]
        assert [r.line for r in by_file[name]] == [1, 2, 3, 4, 5]
    assert [(r.error, r.is_doc) for r in by_file["c.jsonl"]] == [("empty_file", False)]
    assert by_file["d.jsonl.gz"][-1].error == "truncated_stream"


def test_missing_path_is_a_lab_error(tmp_path):
    with pytest.raises(LabError, match="does-not-exist"):
        _spec(tmp_path / "does-not-exist").files()


# --- tokenizer and packing ----------------------------------------------------------------------------

def test_token_dtype_boundary():
    assert token_dtype(40_000) == "uint16"
    assert token_dtype(65_536) == "uint16"
    assert token_dtype(65_537) == "uint32"


def test_byte_level_bpe_round_trip_and_special_ids(tmp_path):
    corpus = [fold_cedilla(PROSE)] * 20
    tokenizer = shipped_bpe(iter(corpus), 400)
    assert tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.token_to_id("<|pad|>") == 1
    # nothing maps to an unknown token; the tokenizer folds cedillas itself
    for text in ["Știința și țara", "emoji 😀, 中文, ελληνικά, \t tab", "x" * 3]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode("şi ţara").ids) == "și țara"
    save_pretrained(tokenizer, tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 1
    assert loaded.decode(loaded("Știința")["input_ids"]) == "Știința"


def test_budget_thresholds_by_size_and_by_share():
    hist = {"web": np.ones(8) * 10, "books": np.ones(8) * 2}
    assert budget_thresholds(hist, 1e9, None) == {"web": 7, "books": 7}  # everything
    assert budget_thresholds(hist, 48, None) == {"web": 3, "books": 3}  # proportional: same key cut
    assert budget_thresholds(hist, 40, {"web": 0.5, "books": 0.5}) == {"web": 1, "books": 7}
    assert budget_thresholds(hist, 0, None) == {"web": -1, "books": -1}


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_concat_parts_cuts_whole_blocks(tmp_path, dtype):
    parts = []
    for i, n in enumerate([5, 7, 0, 3]):
        path = tmp_path / f"p{i}.bin"
        np.arange(n, dtype=dtype).tofile(path)
        parts.append(path)
    info = concat_parts(parts, tmp_path / "out.bin", dtype, seq_len=4)
    assert (info["tokens"], info["blocks"], info["tail_tokens"]) == (15, 3, 3)
    data = np.fromfile(tmp_path / "out.bin", dtype=dtype)
    assert data.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]


def test_long_documents_are_encoded_in_pieces_with_identical_tokens():
    import random

    tokenizer = shipped_bpe(iter([fold_cedilla(PROSE)] * 5), 300)
    tokenizer.normalizer = None  # as in the pack workers
    rng = random.Random(0)
    alphabet = ["a", "b", "ș", " ", "  ", "\n", "\n\n", " \n", "\t", ".", ",", "'s", "1", "23", "😀", "—"]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        parts = pieces(text, 29)
        assert "".join(parts) == text
        whole = tokenizer.encode(text, add_special_tokens=False).ids
        assert [i for p in parts for i in tokenizer.encode(p, add_special_tokens=False).ids] == whole


EDGE_TEXTS = ["", " ", "\n\n\n", "a<|endoftext|>b", "<|pad|>", " <|endoftext|> ", "emoji 😀👍🏽, 中文, ελληνικά, مرحبا",
              "x" * 5000, " " * 700 + "x", "1234567890" * 40, "don't I'll we've 's", "\t\t\r\n x", "ș" * 999,
              "http://exemplu.ro/a?b=c&d=e", "\U0010ffff\u2028\u2029\x85", "Știința și țara. " * 30]


def _encoder_tokenizer(tmp_path: Path) -> Path:
    tokenizer = shipped_bpe(iter([fold_cedilla(PROSE)] * 5 + EDGE_TEXTS), 400)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_fast_encoder_gives_the_ids_of_tokenizers(tmp_path):
    pytest.importorskip("fastokens")
    from lab.data.encode import BatchEncoder

    encoder = BatchEncoder(_encoder_tokenizer(tmp_path), "auto")
    assert encoder.backend == "fastokens"
    texts = [fold_cedilla(PROSE)] * 3 + EDGE_TEXTS
    for dtype in ("uint16", "uint32"):
        fast = encoder.encode(texts, dtype, budget=[1 << 20])  # checked against tokenizers inside too
        reference = encoder.reference_ids(texts, dtype)
        assert all(f.dtype == dtype and np.array_equal(f, r) for f, r in zip(fast, reference, strict=True))
    assert encoder.reference_ids(["a<|endoftext|>b"], "uint32")[0].tolist().count(0) == 1  # the special token


def test_encoder_choice_and_errors(tmp_path, monkeypatch):
    from lab.data import encode

    path = _encoder_tokenizer(tmp_path)
    plain = encode.BatchEncoder(path, "tokenizers")
    assert plain.backend == "tokenizers" and plain.fast is None
    assert plain.encode(["Știința"], "uint16", budget=[100])[0].tolist() == plain.reference_ids(["Știința"], "uint16")[0].tolist()
    with pytest.raises(LabError, match="expected one of"):
        encode.BatchEncoder(path, "tiktoken")
    monkeypatch.setattr(encode, "_fastokens_module", lambda: None)
    assert encode.BatchEncoder(path, "auto").backend == "tokenizers"  # falls back where no wheel exists
    with pytest.raises(LabError, match="fastokens is not installed"):
        encode.BatchEncoder(path, "fastokens")

    class Refuses:  # a fastokens that cannot express this tokenizer.json
        class Tokenizer:
            @staticmethod
            def from_json_str(text):
                raise ValueError("unsupported model")

    monkeypatch.setattr(encode, "_fastokens_module", lambda: Refuses)
    assert encode.BatchEncoder(path, "auto").backend == "tokenizers"
    with pytest.raises(LabError, match="cannot load"):
        encode.BatchEncoder(path, "fastokens")


def test_encoder_check_covers_the_head_of_a_long_text(tmp_path, monkeypatch):
    pytest.importorskip("fastokens")
    from lab.data.encode import BatchEncoder, Mismatch

    encoder = BatchEncoder(_encoder_tokenizer(tmp_path), "fastokens")
    long_text = " ".join([fold_cedilla(PROSE)] * 40)  # ~20k characters, more than the budget
    budget = [8192]
    encoder.encode(["scurt", long_text], "uint16", budget)
    assert budget[0] <= 0  # the whole short text and a head of the long one were compared
    honest = BatchEncoder.fast_ids

    def wrong_on_long_texts(self, texts, dtype):
        return [ids[::-1] if len(text) > 1000 else ids for text, ids in zip(texts, honest(self, texts, dtype))]

    monkeypatch.setattr(BatchEncoder, "fast_ids", wrong_on_long_texts)
    with pytest.raises(Mismatch):
        encoder.encode(["scurt", long_text], "uint16", [8192])
    encoder.encode(["scurt", long_text], "uint16", [0])  # no budget left: not compared, no error


def test_source_paths_are_normalised_so_spellings_share_fingerprints(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    fields = {"kind": "jsonl", "text_field": "text", "id_field": "id", "val_fraction": 0.01}
    spelled = SourceSpec.from_cfg("web", OmegaConf.create({**fields, "path": "x/../corpus/./web.jsonl"}))
    plain = SourceSpec.from_cfg("web", {**fields, "path": str(tmp_path / "corpus" / "web.jsonl")})
    assert spelled.path == plain.path == tmp_path / "corpus" / "web.jsonl"


# --- the settings: every knob checked once, before anything runs -------------------------------------------------

def _settings_error(*overrides: str) -> str:
    """The one LabError line Settings.from_cfg gives for the real conf/prepare.yaml with `overrides`."""
    with pytest.raises(LabError) as caught:
        Settings.from_cfg(compose_config("prepare", list(overrides)))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_shipped_prepare_config_passes_as_it_is():
    settings = Settings.from_cfg(compose_config("prepare", ["prepare.workers=3"]))
    assert (settings.workers, settings.encoder, settings.overwrite) == (3, "auto", False)
    assert settings.check_chars == 64 * 1024  # prepare.pack.check_kb counts KiB
    assert settings.normalize["books"]["running_headers"] and not settings.normalize["web"].get("running_headers")
    assert Settings.from_cfg(compose_config("prepare", [])).workers >= 1  # null: every core


@pytest.mark.parametrize("override, message", [
    ("prepare.batch_mb=abc", "prepare.batch_mb='abc' is not allowed: expected a positive number"),
    ("prepare.workers=true", "prepare.workers=True is not allowed: expected an integer >= 1 (or null: every core)"),
    ("prepare.workers=0", "prepare.workers=0 is not allowed: expected an integer >= 1"),
    ("prepare.max_pending=-1", "prepare.max_pending=-1 is not allowed: expected an integer >= 1"),
    ("prepare.max_doc_mb=0", "prepare.max_doc_mb=0 is not allowed: expected a positive number"),
    ("prepare.progress=sometimes", "prepare.progress='sometimes' is not allowed: expected true or false"),
    ("prepare.zstd_level=30", "prepare.zstd_level=30 is not allowed: expected an integer in [1, 22]"),
    ("prepare.split.salt=null", "prepare.split.salt=None is not allowed: expected a non-empty string"),
    ("data.seq_len=1", "data.seq_len=1 is not allowed: expected an integer >= 2"),
    ("data.seq_len=2.5", "data.seq_len=2.5 is not allowed"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size=100 is not allowed: expected an integer >= 258 (a byte-level"),
    ("prepare.pack.encoder=tiktoken", "prepare.pack.encoder='tiktoken' is not allowed: expected one of auto, "
                                      "fastokens, tokenizers"),
    ("prepare.pack.batch_docs=0", "prepare.pack.batch_docs=0 is not allowed"),
    ("prepare.pack.check_kb=-1", "prepare.pack.check_kb=-1 is not allowed: expected a number >= 0"),
    ("prepare.dedup.num_perm=1", "prepare.dedup.num_perm=1 is not allowed: expected an integer >= 2"),
    ("prepare.dedup.threshold=1.0", "prepare.dedup.threshold=1.0 is not allowed: expected a number in (0, 1)"),
    ("prepare.dedup.near=maybe", "prepare.dedup.near='maybe' is not allowed: expected true or false"),
    ("prepare.dedup.keep_priority=books", "prepare.dedup.keep_priority='books' is not allowed: expected a list"),
    ("prepare.tokenizer_training.min_frequency=-1", "prepare.tokenizer_training.min_frequency=-1 is not allowed"),
    ("prepare.tokenizer_training.source_shares={web:0.7,book:0.3}",
     "prepare.tokenizer_training.source_shares names unknown source(s) ['book']"),
    ("prepare.tokenizer_training.source_shares={web:0,books:0}", "expected at least one share above 0"),
    ("prepare.report.variants=[no_fold,bpe]",
     "prepare.report.variants[1]='bpe' is not allowed: expected one of no_fold, unigram"),
    ("prepare.report.train_mb=0", "prepare.report.train_mb=0 is not allowed: expected a positive number or null"),
    ("prepare.filters.books.max_words=-5",
     "prepare.filters.books.max_words=-5 is not allowed: expected an integer >= 0"),
    ("prepare.filters.default.min_stopword_frac=2", "prepare.filters.default.min_stopword_frac=2 is not allowed"),
    ("prepare.filters.default.mean_word_length=[10,3]", "prepare.filters.default.mean_word_length=[10, 3] is not "
                                                        "allowed: expected [min, max]"),
    ("prepare.filters.default.max_top_ngram_char_frac={2:1.5}",
     "prepare.filters.default.max_top_ngram_char_frac.2=1.5 is not allowed: expected a number in [0, 1]"),
    ("prepare.filters.books.max_dup_ngram_char_frac={11:0.1}",
     "prepare.filters.books.max_dup_ngram_char_frac has n=11: expected n-gram lengths 1 <= n <= 10"),
    ("prepare.filters.books.max_dup_ngram_char_frac=0.1",
     "prepare.filters.books.max_dup_ngram_char_frac=0.1 is not allowed: expected a mapping n -> fraction"),
    ("+prepare.filters.web.min_wrds=3", "unknown filter rule(s) ['min_wrds'] in prepare.filters.web"),
    ("prepare.normalize.default.nfc=1", "prepare.normalize.default.nfc=1 is not allowed: expected true or false"),
    ("prepare.normalize.books.header_min_repeats=1",
     "prepare.normalize.books.header_min_repeats=1 is not allowed: expected an integer >= 2"),
    ("+prepare.normalize.web.lowercase=true",
     "unknown prepare.normalize option(s) ['lowercase'] in prepare.normalize.web"),
    ("data.sources.web.val_fraction=1", "data.sources.web.val_fraction=1 is not allowed: expected a number in [0, 1)"),
    ("data.sources.web.kind=csv", "data.sources.web.kind='csv' is not allowed: expected one of jsonl, txt_dir"),
    ("data.sources.web.id_field=7", "data.sources.web.id_field=7 is not allowed: expected a non-empty string"),
    ("+data.sources.books.text_field=body", "data.sources.books.text_field applies to jsonl sources only"),
])
def test_a_bad_setting_is_one_line_naming_the_key_and_what_is_allowed(override, message):
    assert message in _settings_error(override)


@pytest.mark.parametrize("key", [
    "prepare.pack.encoder", "prepare.pack.check_kb", "prepare.overwrite", "prepare.workers", "prepare.batch_mb",
    "prepare.dedup.keep_priority", "prepare.report.train_mb", "prepare.split.salt",
    "prepare.tokenizer_training.source_shares", "prepare.normalize.default.fold_cedilla",
    "prepare.filters.default.min_words", "data.sources.web.text_field", "data.sources.books.val_fraction",
])
def test_a_key_the_yaml_lost_is_an_error_not_a_default_from_code(key):
    assert _settings_error(f"~{key}").startswith(f"{key} is missing from the config")


def test_a_lost_key_that_other_settings_refer_to_is_named():
    message = _settings_error("~tokenizer.name")  # data.prepared_dir is named after it
    assert message.startswith("data.prepared_dir does not resolve: Interpolation key 'tokenizer.name' not found")


def test_running_headers_needs_its_thresholds():
    message = _settings_error("~prepare.normalize.books.header_max_chars")
    assert message.startswith("prepare.normalize.books.header_max_chars is missing from the config")
    assert "running_headers needs it" in message
    off = compose_config("prepare", ["~prepare.normalize.books.header_max_chars",
                                     "prepare.normalize.books.running_headers=false"])
    assert not Settings.from_cfg(off).normalize["books"]["running_headers"]  # off: the thresholds are not needed


def test_an_entry_for_no_source_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="lab.prepare"):
        Settings.from_cfg(compose_config("prepare", ["+prepare.filters.bookz={min_words: 5}"]))
    assert "prepare.filters.bookz names no source of data.sources (web, books): ignored" in caplog.text
