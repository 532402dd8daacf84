"""The prepare pipeline: raw corpus -> `data.prepared_dir` (format: docs/CONTRACTS.md), in resumable steps:

    scan       parse, normalise, filter, split and MinHash every document (parallel, streaming)
    dedup      exact + near-duplicate clusters over all sources and splits; one copy each survives
    tokenizer  byte-level BPE on a byte budget of training documents -> tokenizer/
    report     fertility, and the tokens other tokenizers need for the same held-out text
    pack       tokenize (parallel) and cut into blocks of seq_len -> <source>/{train,val}.bin
    manifest   the accounting of every document, file hashes, config -> manifest.json

Each step records a fingerprint of its inputs and settings; a re-run reuses a step whose
fingerprint and outputs are intact ("reusing ...") and redoes the rest. `prepare(cfg) -> Path` runs
it all on a composed conf/prepare.yaml config (what `python -m lab.prepare` calls). Sizes in the
settings (`*_mb`) count MiB.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import zstandard
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from tqdm import tqdm

from lab import LabError
from lab.data import dedup as dd, manifest as mf, pack as pk, publish, scan as sc, tokenizer as tk
from lab.data.encode import BACKENDS
from lab.data.filters import RULES, DocFilter, check_rules
from lab.data.io import SourceSpec, clean_path
from lab.data.normalize import BASE_OPTIONS, HEADER_OPTIONS, Normalizer
from lab.data.parallel import ordered_map, resolve_workers
from lab.data.progress import cpu_clock, format_size, progress_bar
from lab.data.split import SPLITS, TRAIN, VAL
from lab.data.steps import (StepStore, atomic_path, crash_point, file_stamp, fingerprint, remove_stale_tmp,
                            run_lock, sha256_file, write_json_atomic)
from lab.config.checks import boolean, choice, integer, list_of, number, optional, required, resolved, text
from lab.config.units import MiB

# The lab.prepare command's log: its lines (and the tests that read them) keep that name wherever the code lives.
log = logging.getLogger("lab.prepare")



# --- reading the config: every knob checked once, each with its type and range ---------------------------------

Check = Callable[[Any, str], Any]
_MISSING = "is missing from the config (it has no default in code; restore it in conf/)"
_MIN_VOCAB = 256 + len(tk.SPECIAL_TOKENS)  # a byte-level BPE: every byte is a token, plus the special tokens


def _setting(cfg: DictConfig, key: str, check: Check) -> Any:
    """The checked value at the dotted `key` (plain containers): one LabError line for a bad or missing one."""
    return check(resolved(required(cfg, key)), key)


def _because(check: Check, why: str) -> Check:
    """`check`, with `why` added to its error line."""
    def checked(value: Any, key: str) -> Any:
        try:
            return check(value, key)
        except LabError as err:
            raise LabError(f"{err} ({why})") from None
    return checked


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise LabError(f"{key}={value!r} is not allowed: expected a mapping of settings")
    return dict(value)


def _shares(sources: dict[str, SourceSpec]) -> Check:
    """prepare.tokenizer_training.source_shares: null, or source -> share (a source left out gets none)."""
    def check(value: Any, key: str) -> dict[str, float] | None:
        if value is None:
            return None
        shares = {name: number(0)(share, f"{key}.{name}") for name, share in _mapping(value, key).items()}
        unknown = sorted(set(shares) - set(sources))
        if unknown:
            raise LabError(f"{key} names unknown source(s) {unknown}; the sources are {', '.join(sources)}")
        if not any(shares.values()):
            raise LabError(f"{key}={value!r} is not allowed: expected at least one share above 0 (or null: in "
                           "proportion to each source's size)")
        return shares
    return check


_VOCAB_SIZE = _because(integer(_MIN_VOCAB), f"a byte-level BPE needs 256 byte tokens + {len(tk.SPECIAL_TOKENS)} "
                                                        "special tokens")
_WORKERS = _because(optional(integer(1)), "or null: every core")
_DEDUP_CHECKS: dict[str, Check] = {  # (datasketch needs 2 permutations and a weight on false negatives)
    "exact": boolean, "near": boolean, "num_perm": integer(2),
    "threshold": number(0, 1, low_open=True, high_open=True), "shingle_words": integer(1), "seed": integer(0),
    "false_negative_weight": number(0, 1, low_open=True), "keep_priority": optional(list_of(text))}
_TRAINING_CHECKS: dict[str, Check] = {"byte_budget_mb": number(0, low_open=True), "min_frequency": integer(0)}
_REPORT_CHECKS: dict[str, Check] = {"variants": optional(list_of(choice("no_fold", "unigram"))),  # null: none
                                    "train_mb": number(0, low_open=True, optional=True),
                                    "eval_mb": number(0, low_open=True)}


def _zstd_level(value: Any, key: str) -> int:
    level = integer(1)(value, key)
    if level > zstandard.MAX_COMPRESSION_LEVEL:
        raise LabError(f"{key}={value!r} is not allowed: expected an integer in [1, {zstandard.MAX_COMPRESSION_LEVEL}]")
    return level


def _check_node(cfg: DictConfig, prefix: str, checks: dict[str, Check]) -> dict[str, Any]:
    """The node at `prefix` as plain containers (as the config holds it), once each of its `checks` passed."""
    _setting(cfg, prefix, _mapping)
    for key, check in checks.items():
        _setting(cfg, f"{prefix}.{key}", check)
    return resolved(OmegaConf.select(cfg, prefix))


def _per_source(cfg: DictConfig, group: str, sources: dict[str, SourceSpec], check_entry: Callable[[Any, str], None],
                base: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """prepare.<group> (normalize / filters): its `default`, which must state every option of `base`, and per
    source `default` merged with the source's own entry. Each entry is checked as the config spells it."""
    node = _setting(cfg, f"prepare.{group}", _mapping)
    default = _setting(cfg, f"prepare.{group}.default", _mapping)
    for option in base:
        required(cfg, f"prepare.{group}.default.{option}")
    for entry, options in node.items():
        if entry != "default" and entry not in sources:
            log.warning("prepare.%s.%s names no source of data.sources (%s): ignored", group, entry,
                        ", ".join(sources))
        if options is not None:  # null: the source adds nothing to the default
            check_entry(options, f"prepare.{group}.{entry}")
    # a source without an entry of its own gets the default alone
    return default, {name: {**default, **(node.get(name) or {})} for name in sources}


def _check_running_headers(normalize: dict[str, dict[str, Any]]) -> None:
    for name, options in normalize.items():
        if options.get("running_headers"):  # absent: off, as for every source whose entry does not turn it on
            for option in HEADER_OPTIONS:
                if option not in options:
                    raise LabError(f"prepare.normalize.{name}.{option} {_MISSING} (running_headers needs it)")


@dataclass
class Settings:
    """The composed config, validated and resolved into plain values."""

    prepared_dir: Path
    work_dir: Path
    sources: dict[str, SourceSpec]
    normalize: dict[str, dict[str, Any]]
    filters: dict[str, dict[str, Any]]
    dedup: dict[str, Any]
    split_salt: str
    vocab_size: int
    seq_len: int
    tokenizer_name: str
    training: dict[str, Any]
    report: dict[str, Any]
    workers: int
    batch_bytes: int
    max_pending: int
    max_doc_bytes: int
    progress: bool
    zstd_level: int
    batch_docs: int
    encoder: str
    check_chars: int
    overwrite: bool
    normalize_default: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # the config written into the manifest

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "Settings":
        """Check every knob of the composed conf/prepare.yaml config once (type and range; a key the YAML lost
        is an error, never a default from code); raises one LabError line naming the first bad one."""
        for key in ("data", "tokenizer", "prepare"):
            if key not in cfg:
                raise LabError(f"config has no `{key}` node: run lab.prepare with conf/prepare.yaml")
        try:  # the config as the manifest records it; resolving it first names a lost key that others refer to
            record = {"data": resolved(cfg.data), "tokenizer": resolved(cfg.tokenizer), "prepare": resolved(cfg.prepare)}
        except InterpolationResolutionError as err:
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise LabError(f"{err.full_key} does not resolve: {reason} (restore the key it refers to in conf/)"
                           ) from None
        source_nodes = _setting(cfg, "data.sources", optional(_mapping))
        if not source_nodes:
            raise LabError("data.sources is empty: nothing to prepare")
        sources = {name: SourceSpec.from_cfg(name, node) for name, node in source_nodes.items()}
        normalize_default, normalize = _per_source(cfg, "normalize", sources, Normalizer.check_options, BASE_OPTIONS)
        _check_running_headers(normalize)
        _, filters = _per_source(cfg, "filters", sources, check_rules, tuple(RULES))
        dedup = _check_node(cfg, "prepare.dedup", _DEDUP_CHECKS)
        unknown = set(dedup["keep_priority"] or []) - set(sources)
        if unknown:
            log.warning("prepare.dedup.keep_priority names unknown source(s) %s", sorted(unknown))
        training = _check_node(cfg, "prepare.tokenizer_training",
                               {**_TRAINING_CHECKS, "source_shares": _shares(sources)})
        return cls(
            prepared_dir=clean_path(_setting(cfg, "data.prepared_dir", text)),
            work_dir=clean_path(_setting(cfg, "prepare.work_dir", text)),
            sources=sources, normalize=normalize, filters=filters, dedup=dedup,
            split_salt=_setting(cfg, "prepare.split.salt", text),
            vocab_size=_setting(cfg, "tokenizer.vocab_size", _VOCAB_SIZE),
            seq_len=_setting(cfg, "data.seq_len", integer(2)),
            tokenizer_name=_setting(cfg, "tokenizer.name", text),
            training=training, report=_check_node(cfg, "prepare.report", _REPORT_CHECKS),
            workers=resolve_workers(_setting(cfg, "prepare.workers", _WORKERS)),
            batch_bytes=max(1, int(_setting(cfg, "prepare.batch_mb", number(0, low_open=True)) * MiB)),
            max_pending=_setting(cfg, "prepare.max_pending", integer(1)),
            max_doc_bytes=int(_setting(cfg, "prepare.max_doc_mb", number(0, low_open=True)) * MiB),
            progress=_setting(cfg, "prepare.progress", boolean),
            zstd_level=_setting(cfg, "prepare.zstd_level", _zstd_level),
            batch_docs=_setting(cfg, "prepare.pack.batch_docs", integer(1)),
            encoder=_setting(cfg, "prepare.pack.encoder", choice(*BACKENDS)),  # a typo fails now, not in a worker
            check_chars=int(_setting(cfg, "prepare.pack.check_kb", number(0)) * 1024),
            overwrite=_setting(cfg, "prepare.overwrite", boolean),
            normalize_default=normalize_default, record=record)

    @property
    def minhash(self) -> dict[str, Any]:
        return {k: self.dedup[k] for k in ("num_perm", "threshold", "shingle_words", "seed", "false_negative_weight")}

    @property
    def tokenizer_fold(self) -> bool:
        """Whether the saved tokenizer's own normalizer folds cedillas (prepare.normalize.default)."""
        return bool(self.normalize_default["fold_cedilla"])


class Pipeline:
    """The steps of one `lab.prepare` run over one prepared folder."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.store = StepStore(settings.work_dir)
        self.scan_dir = settings.work_dir / "scan"
        self.timings: dict[str, dict[str, Any]] = {}

    # --- helpers ------------------------------------------------------------------------------------

    def _bar(self, desc: str, total: float | None, unit: str = "B") -> Any:
        return progress_bar(desc, total, unit, enabled=self.s.progress, logger=log)

    def _time(self, step: str, start: tuple[float, float], nbytes: int, reused: bool, workers: int = 1) -> None:
        """Record a step's wall and CPU seconds (this process + its reaped workers) for lab.bench_data."""
        wall, cpu = cpu_clock()
        seconds, cpu_seconds = wall - start[0], cpu - start[1]
        self.timings[step] = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
                              "bytes": int(nbytes), "workers": workers, "reused": reused}
        if not reused:
            rates = (f" ({nbytes / MiB / max(seconds, 1e-9):.1f} MiB/s, "
                     f"{nbytes / MiB / max(cpu_seconds, 1e-9):.2f} MiB/s per core)" if nbytes else "")
            log.info("%s: %s in %.1f s, %d process%s%s", step, format_size(nbytes) if nbytes else "done", seconds,
                     workers, "" if workers == 1 else "es", rates)

    def _reuse(self, step: str, fp: str, outputs_ok) -> dict[str, Any] | None:
        done = self.store.load(step, fp)
        if done is not None and outputs_ok(done):
            log.info("reusing %s (fingerprint %s)", step, fp)
            return done
        self.store.invalidate(step)  # about to rewrite its outputs: never leave a stale marker
        return None

    def shards(self, scan: dict[str, Any]) -> Iterator[tuple[str, int, int, Path]]:
        """(source, shard index, documents, prefix) of every scan shard in global document order."""
        for name in self.s.sources:
            for index, n_docs in scan["sources"][name]["shards"]:
                yield name, index, n_docs, sc.shard_prefix(self.scan_dir, name, index)

    def shard_meta(self, scan: dict[str, Any], dedup: dict[str, Any]
                   ) -> Iterator[tuple[str, int, Path, dict, np.ndarray]]:
        """Per shard: source, index, prefix, meta arrays and dedup status."""
        status = np.load(self.s.work_dir / "dedup" / "status.npy", mmap_mode="r")
        offset = 0
        for name, index, n_docs, prefix in self.shards(scan):
            meta = dd.ShardArrays(prefix, n_docs).meta()
            yield name, index, prefix, meta, np.asarray(status[offset:offset + n_docs])
            offset += n_docs

    # --- steps ----------------------------------------------------------------------------------------

    def scan(self) -> dict[str, Any]:
        start = cpu_clock()
        files = {name: spec.files() for name, spec in self.s.sources.items()}  # a missing path fails here
        fp = fingerprint("scan", {name: [file_stamp(f) for f in fs] for name, fs in files.items()},
                         {name: [spec.kind, spec.text_field, spec.id_field, spec.val_fraction]
                          for name, spec in self.s.sources.items()},
                         self.s.normalize, self.s.filters, self.s.minhash, self.s.split_salt,
                         self.s.batch_bytes, self.s.max_doc_bytes, self.s.zstd_level)

        def outputs_ok(done: dict[str, Any]) -> bool:
            return all(Path(f"{prefix}.stats.json").is_file() for *_, prefix in self.shards(done))

        total = sum(f.stat().st_size for fs in files.values() for f in fs)
        if (done := self._reuse("scan", fp, outputs_ok)) is not None:
            self._time("scan", start, total, True)
            return done
        sc.reset_dir(self.scan_dir, fp)
        config = sc.ScanConfig(self.scan_dir, {name: sc.SourceScanConfig(spec, self.s.normalize[name],
                                                                         self.s.filters[name])
                                               for name, spec in self.s.sources.items()},
                               dd.MinHasher(**self.s.minhash).portable(), self.s.split_salt, self.s.zstd_level)
        per_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        workers = min(self.s.workers, max(1, math.ceil(total / self.s.batch_bytes)))
        with self._bar("scan", total) as bar:
            tasks = sc.iter_tasks(config, self.s.batch_bytes, self.s.max_doc_bytes, on_bytes=bar.update)
            for shard in ordered_map(sc.scan_shard, tasks, workers, initializer=sc.init_worker,
                                     initargs=(config,), max_pending=self.s.max_pending):
                per_source[shard["source"]].append(shard)
                crash_point("scan.shard")
        result = {"sources": {name: sc.summarize(per_source[name]) for name in self.s.sources}}
        for name, summary in result["sources"].items():
            for note in summary["notes"]:
                log.warning("source %s: %s line %s: %s", name, note["file"], note["line"], note["reason"])
        self.store.save("scan", fp, result)
        crash_point("scan.done")
        self._time("scan", start, total, False, workers)
        return result

    def dedup(self, scan: dict[str, Any]) -> dict[str, Any]:
        start = cpu_clock()
        cfg = self.s.dedup
        fp = fingerprint("dedup", self.store.fingerprint_of("scan"), cfg["exact"], cfg["near"], cfg["keep_priority"])
        status_path = self.s.work_dir / "dedup" / "status.npy"
        if (done := self._reuse("dedup", fp, lambda _: status_path.is_file())) is not None:
            self._time("dedup", start, 0, True)
            return done
        shards = list(self.shards(scan))
        arrays = [dd.ShardArrays(prefix, n) for _, _, n, prefix in shards]
        n_total = sum(a.n_docs for a in arrays)
        # Which copy of a cluster survives: keep_priority order of sources, then document order.
        priority = list(cfg["keep_priority"] or [])
        order = priority + [n for n in self.s.sources if n not in priority]
        source_rank = np.concatenate([np.full(n, order.index(name), dtype=np.int64) for name, _, n, _ in shards]
                                     ) if shards else np.empty(0, np.int64)
        doc_rank = source_rank * max(1, n_total) + np.arange(n_total, dtype=np.int64)
        del source_rank
        minhasher = dd.MinHasher(**self.s.minhash)
        with self._bar("dedup", minhasher.bands if cfg["near"] else 0, unit="band") as bar:
            found = dd.deduplicate(arrays, doc_rank, exact=cfg["exact"], near=cfg["near"],
                                   threshold=float(cfg["threshold"]), n_bands=minhasher.bands, progress=bar)
        del doc_rank
        with atomic_path(status_path) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, found.status)
        result: dict[str, Any] = {"docs": n_total, "bands": minhasher.bands, "rows": minhasher.rows,
                                  "candidate_pairs": found.candidate_pairs, "verified_pairs": found.verified_pairs,
                                  "sources": self._duplicates_per_source(shards, found)}
        self.store.save("dedup", fp, result)
        crash_point("dedup.done")
        self._time("dedup", start, 0, False)
        return result

    def _duplicates_per_source(self, shards: list[tuple[str, int, int, Path]], found: Any) -> dict[str, Any]:
        """Per source: how many copies were dropped as exact and as near duplicates, with a few examples."""
        bounds = self._source_bounds(shards)
        examples_wanted: dict[str, list[tuple[int, int]]] = {name: [] for name in self.s.sources}
        for dropped, kept in sorted(found.duplicate_of.items()):
            name = self._source_at(bounds, dropped)
            if len(examples_wanted[name]) < sc.EXAMPLES:
                examples_wanted[name].append((dropped, kept))
        locate = self._doc_locator(shards)
        per_source: dict[str, Any] = {}
        for name, (lo, hi) in bounds.items():
            part = found.status[lo:hi]
            per_source[name] = {
                "exact": int((part == dd.EXACT).sum()), "near": int((part == dd.NEAR).sum()),
                "examples": [{"doc": locate(d), "duplicate_of": locate(k),
                              "kind": "exact" if found.status[d] == dd.EXACT else "near"}
                             for d, k in examples_wanted[name]]}
        return per_source

    @staticmethod
    def _source_bounds(shards: list[tuple[str, int, int, Path]]) -> dict[str, tuple[int, int]]:
        bounds: dict[str, list[int]] = {}
        offset = 0
        for name, _, n, _ in shards:
            lo_hi = bounds.setdefault(name, [offset, offset])
            lo_hi[1] = offset + n
            offset += n
        return {name: (lo, hi) for name, (lo, hi) in bounds.items()}

    @staticmethod
    def _source_at(bounds: dict[str, tuple[int, int]], index: int) -> str:
        return next(name for name, (lo, hi) in bounds.items() if lo <= index < hi)

    @staticmethod
    def _doc_locator(shards: list[tuple[str, int, int, Path]]):
        offsets = np.cumsum([0] + [n for _, _, n, _ in shards])

        def locate(index: int) -> str:
            shard = int(np.searchsorted(offsets, index, side="right") - 1)
            name, _, _, prefix = shards[shard]
            for position, doc in enumerate(sc.read_docs(prefix)):
                if position == index - offsets[shard]:
                    return f"{name}:{doc['id']}"
            return f"{name}:#{index}"
        return locate

    def _sample_selection(self, scan, dedup) -> tuple[dict[str, int], dict[str, float]]:
        """Key-bucket thresholds of the tokenizer sample per source, and the sample's bytes per source."""
        histograms = {name: np.zeros(1 << tk.KEY_BITS, dtype=np.float64) for name in self.s.sources}
        for name, _, _, meta, status in self.shard_meta(scan, dedup):
            train = (status == dd.KEEP) & (meta["split"] == TRAIN)
            histograms[name] += np.bincount(tk.key_bucket(meta["sample"][train]),
                                            weights=meta["text_bytes"][train], minlength=1 << tk.KEY_BITS)
        budget = float(self.s.training["byte_budget_mb"]) * MiB
        thresholds = tk.budget_thresholds(histograms, budget, self.s.training["source_shares"])
        taken = {name: float(h[: thresholds[name] + 1].sum()) for name, h in histograms.items()}
        return thresholds, taken

    def _sample_texts(self, scan, dedup, thresholds: dict[str, int], fold: bool, limit_bytes: float | None = None,
                      bar: tqdm | None = None) -> Iterator[str]:
        """The tokenizer sample, in document order: folded (as trained) or as stored."""
        taken = 0
        for name, _, prefix, meta, status in self.shard_meta(scan, dedup):
            chosen = ((status == dd.KEEP) & (meta["split"] == TRAIN)
                      & (tk.key_bucket(meta["sample"]) <= thresholds[name]))
            if not chosen.any():
                continue
            normalizer = Normalizer.from_cfg(self.s.normalize[name])
            for position, doc in enumerate(sc.read_docs(prefix)):
                if not chosen[position]:
                    continue
                text = normalizer.fold(doc["text"]) if fold else doc["text"]
                size = int(meta["text_bytes"][position])
                if limit_bytes is not None and taken + size > limit_bytes and taken > 0:
                    return
                taken += size
                if bar is not None:
                    bar.update(size)
                yield text

    def tokenizer(self, scan, dedup) -> dict[str, Any]:
        start = cpu_clock()
        fp = fingerprint("tokenizer", self.store.fingerprint_of("dedup"), self.s.vocab_size, self.s.training,
                         self.s.tokenizer_fold)
        folder = self.s.prepared_dir / "tokenizer"

        def outputs_ok(done: dict[str, Any]) -> bool:
            path = folder / "tokenizer.json"
            return path.is_file() and sha256_file(path) == done["sha256"]

        if (done := self._reuse("tokenizer", fp, outputs_ok)) is not None:
            self._time("tokenizer", start, 0, True)
            return done
        thresholds, taken = self._sample_selection(scan, dedup)
        total = sum(taken.values())
        if total == 0:
            raise LabError("no training documents left to train the tokenizer on: every document was "
                           "malformed, filtered or a duplicate (see the counts above and prepare.filters)")
        fold = self.s.tokenizer_fold
        with self._bar("tokenizer", total) as bar:
            tokenizer = tk.train_bpe(self._sample_texts(scan, dedup, thresholds, True, bar=bar), self.s.vocab_size,
                                     min_frequency=int(self.s.training["min_frequency"]), fold=fold)
        with atomic_path(folder) as tmp:
            tk.save_pretrained(tokenizer, tmp)
        saved = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
        vocab = saved.get_vocab_size(with_added_tokens=True)
        result = {"sha256": sha256_file(folder / "tokenizer.json"), "vocab_size": vocab,
                  "dtype": tk.token_dtype(vocab), "eos_token_id": saved.token_to_id(tk.EOS),
                  "pad_token_id": saved.token_to_id(tk.PAD), "sample_bytes": {k: int(v) for k, v in taken.items()},
                  "sample_thresholds": thresholds}
        if vocab < self.s.vocab_size:
            log.warning("the tokenizer has %d tokens, fewer than tokenizer.vocab_size=%d: the sample ran out "
                        "of pairs to merge", vocab, self.s.vocab_size)
        self.store.save("tokenizer", fp, result)
        crash_point("tokenizer.done")
        self._time("tokenizer", start, int(total), False)
        return result

    def report(self, scan, dedup, tok: dict[str, Any]) -> dict[str, Any]:
        start = cpu_clock()
        fp = fingerprint("report", self.store.fingerprint_of("tokenizer"), self.s.report)
        if (done := self._reuse("report", fp, lambda _: True)) is not None:
            self._time("report", start, 0, True)
            return done
        heldout, heldout_kind = self._heldout(scan, dedup, tok)
        folded = {name: [Normalizer.from_cfg(self.s.normalize[name]).fold(t) for t in texts]
                  for name, texts in heldout.items()}
        thresholds = tok["sample_thresholds"]
        limit = float(self.s.report["train_mb"]) * MiB if self.s.report["train_mb"] is not None else None
        vocab, min_freq = self.s.vocab_size, int(self.s.training["min_frequency"])
        this = tk.Tokenizer.from_file(str(self.s.prepared_dir / "tokenizer" / "tokenizer.json"))
        # (name, tokenizer, held-out text as that tokenizer is fed it, bytes it was trained on)
        sample_bytes = sum(tok["sample_bytes"].values())
        rows: list[tuple[str, Any, dict[str, list[str]], int]] = [
            (f"{self.s.tokenizer_name} (this)", this, folded, sample_bytes)]
        if limit is not None and limit < sample_bytes:
            # The variants train on a smaller sample: add this config trained on it too, so the
            # comparison is like for like.
            sizes_ref: list[int] = []
            sample = (sizes_ref.append(len(t.encode("utf-8"))) or t
                      for t in self._sample_texts(scan, dedup, thresholds, fold=True, limit_bytes=limit))
            same = tk.train_bpe(sample, vocab, min_frequency=min_freq, fold=self.s.tokenizer_fold)
            rows.append((f"{self.s.tokenizer_name}, same sample", same, folded, sum(sizes_ref)))
        for variant in self.s.report["variants"] or []:  # null: no variants
            fold = variant != "no_fold"
            sizes: list[int] = []
            with self._bar(f"report: {variant}", min(limit or sample_bytes, sample_bytes)) as bar:
                sample = (sizes.append(len(t.encode("utf-8"))) or t for t in
                          self._sample_texts(scan, dedup, thresholds, fold=fold, limit_bytes=limit, bar=bar))
                if variant == "no_fold":
                    trained = tk.train_bpe(sample, vocab, min_frequency=min_freq, fold=False)
                    rows.append(("bpe, no cedilla fold", trained, heldout, sum(sizes)))
                else:
                    rows.append(("unigram", tk.train_unigram(sample, vocab, fold=fold), folded, sum(sizes)))
        rows.append(("utf-8 bytes", None, folded, 0))
        result = {"comparison": {"heldout": heldout_kind,
                                 "heldout_bytes": {s: sum(len(t.encode("utf-8")) for t in ts)
                                                   for s, ts in folded.items()},
                                 "rows": tk.comparison_table(rows)}}
        self.store.save("report", fp, result)
        crash_point("report.done")
        self._time("report", start, 0, False)
        return result

    def _heldout(self, scan, dedup, tok) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Up to eval_mb MiB of validation text per source (training text the tokenizer never saw if a
        source has no validation documents), as stored (before the fold)."""
        limit = float(self.s.report["eval_mb"]) * MiB
        texts: dict[str, list[str]] = {name: [] for name in self.s.sources}
        kinds: dict[str, str] = {}
        for want in ("val", "train-unsampled"):
            sizes = {name: 0 for name in self.s.sources}
            for name, _, prefix, meta, status in self.shard_meta(scan, dedup):
                if kinds.get(name, want) != want or sizes[name] >= limit:
                    continue
                if want == "val":
                    chosen = (status == dd.KEEP) & (meta["split"] == VAL)
                else:
                    chosen = ((status == dd.KEEP) & (meta["split"] == TRAIN)
                              & (tk.key_bucket(meta["sample"]) > tok["sample_thresholds"][name]))
                if not chosen.any():
                    continue
                for position, doc in enumerate(sc.read_docs(prefix)):
                    if chosen[position] and sizes[name] < limit:
                        texts[name].append(doc["text"])
                        sizes[name] += int(meta["text_bytes"][position])
            for name in self.s.sources:
                if texts[name] and name not in kinds:
                    kinds[name] = want
        return {name: t for name, t in texts.items() if t}, kinds

    def pack(self, scan, dedup, tok) -> dict[str, Any]:
        start = cpu_clock()
        dtype, seq_len = tok["dtype"], self.s.seq_len
        parts_fp = fingerprint("pack-parts", self.store.fingerprint_of("dedup"), tok["sha256"], dtype,
                               {n: self.s.normalize[n]["fold_cedilla"] for n in self.s.sources})
        fp = fingerprint("pack", parts_fp, seq_len)

        def outputs_ok(done: dict[str, Any]) -> bool:
            # content, not just size: a damaged file is rebuilt by re-running, never carried into the new data
            itemsize = np.dtype(dtype).itemsize
            return all((self.s.prepared_dir / info["file"]).is_file()
                       and (self.s.prepared_dir / info["file"]).stat().st_size == info["blocks"] * seq_len * itemsize
                       and sha256_file(self.s.prepared_dir / info["file"]) == info["sha256"]
                       for splits in done["sources"].values() for info in splits.values())

        if (done := self._reuse("pack", fp, outputs_ok)) is not None:
            self._time("pack", start, 0, True)
            return done
        parts_dir = self.s.work_dir / "pack"
        sc.reset_dir(parts_dir, parts_fp)
        config = pk.PackConfig(self.s.prepared_dir / "tokenizer" / "tokenizer.json", parts_dir, dtype,
                               {name: self.s.normalize[name] for name in self.s.sources}, self.s.batch_docs,
                               self.s.encoder, self.s.check_chars)
        tasks, words, kept_bytes = self._pack_tasks(scan, dedup)
        # Spawning a worker costs ~1 s of imports: only worth it for a few MiB of text each.
        workers = min(self.s.workers, len(tasks), max(1, kept_bytes // (4 * MiB)))
        totals, parts, encoder = self._pack_parts(config, tasks, kept_bytes, workers)
        result: dict[str, Any] = {"sources": {}, "encoder": encoder}
        for name in self.s.sources:
            result["sources"][name] = {}
            for split in SPLITS:
                files = [Path(f"{pk.part_prefix(parts_dir, name, i)}.{split}.bin") for i in parts[name]]
                rel = f"{name}/{split}.bin"
                packed = pk.concat_parts(files, self.s.prepared_dir / rel, dtype, seq_len)
                result["sources"][name][split] = {"file": rel, **totals[name][split], "words": words[name][split],
                                                  **packed}
        self.store.save("pack", fp, result)
        crash_point("pack.done")
        self._time("pack", start, kept_bytes, False, workers)
        return result

    def _pack_tasks(self, scan, dedup) -> tuple[list[pk.PackTask], dict[str, dict[str, int]], int]:
        """One task per scan shard (which documents survive, in which split), the kept words per source and
        split, and the kept text bytes in all."""
        words: dict[str, dict[str, int]] = {name: {split: 0 for split in SPLITS} for name in self.s.sources}
        kept_bytes = 0
        tasks = []
        for name, index, prefix, meta, status in self.shard_meta(scan, dedup):
            kept = status == dd.KEEP
            for split_id, split in enumerate(SPLITS):
                words[name][split] += int(meta["words"][kept & (meta["split"] == split_id)].sum())
            kept_bytes += int(meta["text_bytes"][kept].sum())
            tasks.append(pk.PackTask(name, index, prefix, status.astype(np.uint8).tobytes(),
                                     meta["split"].astype(np.uint8).tobytes()))
        return tasks, words, kept_bytes

    def _pack_parts(self, config: pk.PackConfig, tasks: list[pk.PackTask], kept_bytes: int, workers: int
                    ) -> tuple[dict[str, dict[str, dict[str, int]]], dict[str, list[int]], dict[str, Any]]:
        """Tokenize every shard into its part files: (docs and text bytes per source and split, the part
        indices per source, which tokenize backend encoded how many shards)."""
        totals = {name: {split: {"docs": 0, "text_bytes": 0} for split in SPLITS} for name in self.s.sources}
        parts: dict[str, list[int]] = defaultdict(list)
        encoder = {"backends": defaultdict(int), "checked_chars": 0, "mismatched_shards": 0}
        with self._bar("pack", kept_bytes) as bar:
            for part in ordered_map(pk.pack_shard, iter(tasks), workers, initializer=pk.init_worker,
                                    initargs=(config,), max_pending=self.s.max_pending):
                for split in SPLITS:
                    totals[part["source"]][split]["docs"] += part[split]["docs"]
                    totals[part["source"]][split]["text_bytes"] += part[split]["text_bytes"]
                    bar.update(part[split]["text_bytes"])
                parts[part["source"]].append(part["index"])
                check = part["encoder"]
                encoder["backends"][check["backend"]] += 1
                encoder["checked_chars"] += check["checked_chars"]
                encoder["mismatched_shards"] += check["mismatched_shards"]
                crash_point("pack.part")
        if encoder["mismatched_shards"]:
            log.warning("pack: fastokens and tokenizers disagreed on %d shard(s); those were encoded by "
                        "tokenizers (outputs are exact). Please report the tokenizer.json to fastokens.",
                        encoder["mismatched_shards"])
        encoder["backends"] = dict(encoder["backends"])
        return totals, parts, encoder

    # --- manifest ----------------------------------------------------------------------------------------

    def manifest(self, scan, dedup, tok, report, packed) -> dict[str, Any]:
        sources: dict[str, Any] = {}
        # the whole tokenizer folder (AutoTokenizer reads its config and special tokens too), checked before training
        files = {f"tokenizer/{path.name}": sha256_file(path)
                 for path in sorted((self.s.prepared_dir / "tokenizer").iterdir()) if path.is_file()}
        files["tokenizer/tokenizer.json"] = tok["sha256"]
        fertility: dict[str, Any] = {}
        for name in self.s.sources:
            sources[name] = self._source_record(name, scan["sources"][name], dedup["sources"][name],
                                                packed["sources"][name])
            splits = sources[name]["splits"]
            for split in SPLITS:
                files[splits[split]["file"]] = splits[split]["sha256"]
            fertility[name] = {split: {"tokens": s["tokens"], "words": s["words"], "text_bytes": s["text_bytes"],
                                       "tokens_per_word": round(s["tokens"] / max(1, s["words"]), 4),
                                       "bytes_per_token": round(s["text_bytes"] / max(1, s["tokens"]), 4)}
                               for split, s in splits.items()}
            mf.check_accounting(name, sources[name])
        manifest = {
            "version": mf.VERSION, "seq_len": self.s.seq_len, "dtype": tok["dtype"], "vocab_size": tok["vocab_size"],
            "eos_token_id": tok["eos_token_id"], "pad_token_id": tok["pad_token_id"],
            "tokenizer_sha256": tok["sha256"], "data_sha256": mf.data_sha256(files),
            "sources": sources, "files": files,
            "tokenizer_report": {"fertility": fertility, "comparison": report["comparison"],
                                 "sample_bytes": tok["sample_bytes"]},
            "dedup": {k: dedup[k] for k in ("docs", "bands", "rows", "candidate_pairs", "verified_pairs")},
            # Shards per tokenize backend (lab/data/encode.py) and its check against `tokenizers` (a pack step
            # reused from a version that did not record it has none).
            "pack_encoder": packed.get("encoder", {}),
            "steps": {step: self.store.fingerprint_of(step)
                      for step in ("scan", "dedup", "tokenizer", "report", "pack")},
            "config": self.s.record,
        }
        path = self.s.prepared_dir / "manifest.json"
        write_json_atomic(path, manifest)
        crash_point("manifest.done")
        return manifest

    def _source_record(self, name: str, scanned: dict[str, Any], deduped: dict[str, Any],
                       packed: dict[str, Any]) -> dict[str, Any]:
        """A source's entry in the manifest: where every document went, and its packed files per split."""
        spec = self.s.sources[name]
        rules = DocFilter.from_cfg(self.s.filters[name]).rule_names
        splits = {split: {k: packed[split][k] for k in ("file", "docs", "text_bytes", "tokens", "blocks",
                                                        "tail_tokens", "sha256", "words")} for split in SPLITS}
        return {
            "kind": spec.kind, "path": str(spec.path),
            "docs_in": scanned["docs_in"],
            "docs_kept": sum(s["docs"] for s in splits.values()),
            "docs_filtered": {rule: scanned["filtered"].get(rule, 0) for rule in rules},
            "docs_duplicate": deduped["exact"] + deduped["near"],
            "docs_malformed": sum(scanned["malformed"].values()),
            "docs_duplicate_exact": deduped["exact"], "docs_duplicate_near": deduped["near"],
            "malformed_reasons": scanned["malformed"], "malformed_examples": scanned["malformed_examples"],
            "filtered_examples": scanned["filtered_examples"], "duplicate_examples": deduped["examples"],
            "file_notes": scanned["notes"], "docs_utf8_repaired": scanned["utf8_repaired"],
            "bytes_in": scanned["bytes_in"], "text_bytes": sum(s["text_bytes"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
            "blocks": sum(s["blocks"] for s in splits.values()),
            "tail_tokens": sum(s["tail_tokens"] for s in splits.values()),
            "splits": splits,
        }

    def run(self) -> dict[str, Any]:
        scan = self.scan()
        dedup = self.dedup(scan)
        tok = self.tokenizer(scan, dedup)
        report = self.report(scan, dedup, tok)
        packed = self.pack(scan, dedup, tok)
        manifest = self.manifest(scan, dedup, tok, report, packed)
        write_json_atomic(self.s.work_dir / "timings.json", self.timings)
        return manifest


def prepare(cfg: DictConfig) -> Path:
    """Prepare the data of a composed conf/prepare.yaml config; returns data.prepared_dir."""
    settings = Settings.from_cfg(cfg)
    _refuse_other_corpus(settings)
    published = settings.prepared_dir
    try:
        with run_lock(publish.lock_path(published), published):
            # built aside and swapped in whole: until then the folder is entirely the old data (lab/data/publish.py)
            staging = publish.begin_staging(published, settings.work_dir)
            staged = dataclasses.replace(settings, prepared_dir=staging,
                                         work_dir=publish.staged_path(settings.work_dir, published, staging))
            remove_stale_tmp(staging)
            remove_stale_tmp(staged.work_dir)
            manifest = Pipeline(staged).run()
            # checked before the swap (never publish data that contradicts its own manifest); the verified.json
            # this writes moves along, so the first training run only checks sizes
            publish.verify_prepared(staging, "full", "re-run lab.prepare with the same overrides")
            publish.publish(staging, published)
    except OSError as err:  # the OS refusing to write (full disk, read-only folder): one line, old data untouched
        raise LabError(f"cannot write {err.filename or published}: {err.strerror or err}; {published} still holds "
                       "its previous data (if any): free space or fix the permissions and re-run lab.prepare "
                       "(finished steps are reused)") from None
    _report_outcome(settings, manifest)
    return settings.prepared_dir


def _report_outcome(settings: Settings, manifest: dict[str, Any]) -> None:
    """The summary and the tokenizer report in the log (and MLflow), warnings about sources training cannot use,
    and an error for a source that kept nothing (its data is published, so the counts can be read)."""
    log.info("prepared %s\n%s", settings.prepared_dir, mf.summary_table(manifest))
    log.info("tokenizer report\n%s", tk.format_report(manifest["tokenizer_report"]))
    mf.log_to_mlflow(manifest)
    for name, info in manifest["sources"].items():
        if not info.get("docs_in"):
            log.warning("source %r has no documents at %s", name, settings.sources[name].path)
        val = info["splits"]["val"]
        if settings.sources[name].val_fraction > 0 and val["blocks"] == 0:
            log.warning("source %s: its validation split (%d tokens) fills no block of %d tokens, so training "
                        "cannot measure it; raise data.sources.%s.val_fraction or lower data.seq_len",
                        name, val["tokens"], settings.seq_len, name)
    # documents there, none kept: a wrong text field or filters that do not fit this corpus
    empty = [name for name, info in manifest["sources"].items() if info.get("docs_in") and not info.get("docs_kept")]
    if empty:
        hints = ", ".join(f"data.sources.{n}.text_field (now {settings.sources[n].text_field!r})"
                          for n in empty if settings.sources[n].kind == "jsonl")
        raise LabError(f"source(s) {empty} kept no documents (see the counts above)"
                       f"{'; check ' + hints if hints else ''}")


def _refuse_other_corpus(settings: Settings) -> None:
    """Prepared data named for one corpus must not be silently replaced by another's."""
    existing = settings.prepared_dir / "manifest.json"
    if settings.overwrite or not existing.is_file():
        return
    try:
        recorded = json.loads(existing.read_text()).get("sources", {})
    except (OSError, ValueError):
        return  # unreadable: the pipeline rebuilds it
    moved = {name: (info.get("path"), str(settings.sources[name].path)) for name, info in recorded.items()
             if name in settings.sources and info.get("path")
             and Path(info["path"]).resolve() != Path(settings.sources[name].path).resolve()}
    if moved:
        detail = "; ".join(f"{n}: {old} -> {new}" for n, (old, new) in moved.items())
        raise LabError(f"{settings.prepared_dir} holds data prepared from other files ({detail}); choose another "
                       "data.prepared_dir, or replace it with prepare.overwrite=true")
