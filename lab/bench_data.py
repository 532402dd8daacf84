"""Benchmark of the data pipeline: MiB/s per step, end-to-end MiB/s per core, peak memory, flat memory.

    python -m lab.bench_data --corpus /work/shared/corpus/ro [--replicate 10] [--workers N]

Runs `python -m lab.prepare` on the corpus (web.jsonl + books/) into a temporary folder, sampling the
resident memory of the whole process tree (main process + workers), and reads the per-step
timings the pipeline records. The flat-memory check then runs the corpus once and replicated
`--replicate` times (the JSONL re-written with fresh ids, the books as symlinks) with deduplication
off, so every copy flows through every step: peak memory should not grow with the input. Last, it
measures what the near-duplicate index costs per document, ours against datasketch's MinHashLSH.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from lab import PROJECT_ROOT, LabError, report_error
from lab.config.compose import compose_config
from lab.data.manifest import summary_table
from lab.data.parallel import resolve_workers
from lab.data.pipeline import Settings
from lab.data.tokenizer import format_report
from lab.config.units import GiB, MiB
from lab.data.dedup import MinHasher, ShardArrays, deduplicate

log = logging.getLogger("lab.bench_data")

STEPS = ("scan", "dedup", "tokenizer", "report", "pack")


class PeakRSS:
    """Samples the RSS of a process and its descendants every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.tree_peak = self.main_peak = self.worker_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            main = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                main_rss = main.memory_info().rss
                children = [c.memory_info().rss for c in main.children(recursive=True)]
            except psutil.Error:
                children, main_rss = [], 0
            self.main_peak = max(self.main_peak, main_rss)
            self.worker_peak = max([self.worker_peak, *children])
            self.tree_peak = max(self.tree_peak, main_rss + sum(children))
            self._stop.wait(self.interval)


def run_prepare(web: Path, books: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One `lab.prepare` run in a subprocess: wall time, peak memory and the step timings."""
    cmd = [sys.executable, "-m", "lab.prepare", f"data.web_path={web}", f"data.books_dir={books}",
           f"data.prepared_dir={out}", f"hydra.run.dir={out}.hydra", "prepare.progress=false", *overrides]
    start = time.perf_counter()
    cpu_before = _children_cpu()
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakRSS(proc.pid) as peak:
        output, _ = proc.communicate()
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    if proc.returncode != 0:
        print(output[-4000:], file=sys.stderr)  # prepare's own lines say why
        raise LabError(f"lab.prepare failed with status {proc.returncode} (its output is above): {shlex.join(cmd)}")
    timings = json.loads((out / ".work" / "timings.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "tree_peak": peak.tree_peak, "main_peak": peak.main_peak,
            "worker_peak": peak.worker_peak, "timings": timings, "manifest": manifest, "log": output}


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every reaped descendant, workers included
    return usage.ru_utime + usage.ru_stime


def replicate_corpus(corpus: Path, target: Path, copies: int) -> tuple[Path, Path]:
    """`copies` x the corpus: the JSONL rewritten line by line with new ids, books as symlinks."""
    target.mkdir(parents=True, exist_ok=True)
    web = target / "web.jsonl"
    with open(corpus / "web.jsonl", "rb") as source, open(web, "wb") as sink:
        for copy in range(copies):
            source.seek(0)
            for line in source:
                try:
                    doc = json.loads(line)
                    doc["id"] = f"{doc.get('id')}#{copy}"
                    sink.write(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
                except (ValueError, AttributeError, TypeError, RecursionError):  # bad input stays bad input
                    sink.write(line)
    books = target / "books"
    for copy in range(copies):
        folder = books / f"copy{copy}"
        folder.mkdir(parents=True, exist_ok=True)
        for book in sorted((corpus / "books").rglob("*.txt")):
            link = folder / book.relative_to(corpus / "books")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(book.resolve())
    return web, books


def corpus_bytes(web: Path, books: Path) -> int:
    return web.stat().st_size + sum(p.stat().st_size for p in books.rglob("*.txt"))


def index_cost_per_doc(minhash: dict[str, Any], n_docs: int = 20_000) -> dict[str, float]:
    """Bytes per document of the near-duplicate index at the `minhash` settings (prepare.dedup): datasketch
    MinHashLSH vs our band arrays."""
    import tracemalloc

    from datasketch import LeanMinHash, MinHashLSH


    hasher = MinHasher(**minhash)
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 1 << 32, size=(n_docs, hasher.num_perm), dtype=np.uint64).astype(np.uint32)
    # datasketch: the index as it would be held for the whole corpus
    lsh = MinHashLSH(threshold=hasher.threshold, num_perm=hasher.num_perm,
                     weights=(1 - hasher.false_negative_weight, hasher.false_negative_weight))
    sketches = [LeanMinHash(seed=hasher.seed, hashvalues=s, scheme="affine32") for s in signatures[:n_docs]]
    tracemalloc.start()
    for i, sketch in enumerate(sketches):
        lsh.insert(i, sketch)
    datasketch_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del lsh, sketches
    # ours: the peak of the dedup step over on-disk shards (signatures and bands stay on disk)
    with tempfile.TemporaryDirectory() as tmp:
        shards = []
        for k, part in enumerate(np.array_split(signatures, 8)):
            prefix = Path(tmp) / f"{k:06d}"
            np.savez(f"{prefix}.meta.npz", exact=rng.integers(0, 1 << 63, size=len(part), dtype=np.uint64))
            np.save(f"{prefix}.bands.npy", hasher.band_keys(part))
            np.save(f"{prefix}.sig.npy", part)
            shards.append(ShardArrays(prefix, len(part)))
        rank = np.arange(n_docs, dtype=np.int64)
        tracemalloc.start()
        deduplicate(shards, rank, exact=True, near=True, threshold=hasher.threshold, n_bands=hasher.bands)
        ours_peak = tracemalloc.get_traced_memory()[1] + rank.nbytes
        tracemalloc.stop()
    return {"datasketch_B_per_doc": datasketch_bytes / n_docs, "ours_B_per_doc": ours_peak / n_docs,
            "bands": hasher.bands, "rows": hasher.rows, "num_perm": hasher.num_perm}


def step_table(result: dict[str, Any], total_bytes: int) -> list[str]:
    """MiB/s per step, wall clock and per core. Per core = MiB per CPU-second of the step's processes,
    which a machine shared with other jobs does not distort (wall clock does)."""
    lines = [f"{'step':<10} {'MiB':>8} {'wall s':>8} {'CPU s':>8} {'procs':>5} {'MiB/s':>7} {'MiB/s/core':>10}"]
    for step in STEPS:
        t = result["timings"].get(step)
        if not t:
            continue
        mib = t["bytes"] / MiB
        rate = f"{mib / t['seconds']:>7.2f}" if mib and t["seconds"] else f"{'-':>7}"
        per_core = f"{mib / t['cpu_seconds']:>10.2f}" if mib and t["cpu_seconds"] else f"{'-':>10}"
        lines.append(f"{step:<10} {mib:>8.1f} {t['seconds']:>8.2f} {t['cpu_seconds']:>8.2f} {t['workers']:>5} "
                     f"{rate} {per_core}")
    mib = total_bytes / MiB
    wall = sum(t["seconds"] for t in result["timings"].values())
    cpu = sum(t["cpu_seconds"] for t in result["timings"].values())
    lines.append(f"{'all steps':<10} {mib:>8.1f} {wall:>8.2f} {cpu:>8.2f} {'':>5} {mib / wall:>7.2f} {mib / cpu:>10.2f}")
    lines.append(f"{'process':<10} {mib:>8.1f} {result['wall_s']:>8.2f} {result['cpu_s']:>8.2f} {'':>5} "
                 f"{mib / result['wall_s']:>7.2f} {mib / result['cpu_s']:>10.2f}   (incl. start-up, imports)")
    return lines


def target_lines(result: dict[str, Any], total_bytes: int) -> list[str]:
    """Issue #3's targets: end to end (the steps that scale with the corpus) and the tokenize step."""
    t = result["timings"]
    streaming_cpu = sum(t[s]["cpu_seconds"] for s in ("scan", "dedup", "pack"))
    end_to_end = total_bytes / MiB / max(1e-9, streaming_cpu)
    tokenize = t["pack"]["bytes"] / MiB / max(1e-9, t["pack"]["cpu_seconds"])
    encoder = result["manifest"].get("pack_encoder", {})

    def verdict(value: float, target: float) -> str:
        return f"{value:.2f} MiB/s/core (target >= {target:g}: {'met' if value >= target else 'NOT met'})"

    return [f"end to end (scan + dedup + pack, per input MiB): {verdict(end_to_end, 2)}",
            f"tokenize (pack, per kept text MiB): {verdict(tokenize, 3)}; backend {encoder.get('backends', '?')}, "
            f"{encoder.get('checked_chars', 0) / 1e6:.1f} M characters cross-checked against tokenizers, "
            f"{encoder.get('mismatched_shards', 0)} shard(s) disagreed"]


def main(argv: list[str] | None = None) -> int:
    """The command line: the benchmark, or one `error: ...` line and exit status 1 (lab.report_error)."""
    try:
        benchmark(argv)
    except Exception as err:  # noqa: BLE001 - the one exit path of every command
        return report_error(err, log)
    return 0


def benchmark(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    corpus = args.corpus.resolve()
    web, books = corpus / "web.jsonl", corpus / "books"
    if not web.is_file() or not books.is_dir():
        raise LabError(f"{corpus} must hold web.jsonl and books/ (--corpus names the corpus folder)")
    workers = resolve_workers(args.workers)
    # --vocab / --seq-len left out: the config's own tokenizer.vocab_size and data.seq_len
    sizes = [*([f"tokenizer.vocab_size={args.vocab}"] if args.vocab is not None else []),
             *([f"data.seq_len={args.seq_len}"] if args.seq_len is not None else [])]
    base = [f"prepare.workers={workers}", f"prepare.batch_mb={args.batch_mb}", *sizes, *args.overrides]
    settings = Settings.from_cfg(compose_config("prepare", base))  # what every run reads: a bad override fails here
    report: dict[str, Any] = {"corpus": str(corpus), "workers": workers, "cpu_count": os.cpu_count(),
                              "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp_dir:
        tmp = Path(tmp_dir)
        total = corpus_bytes(web, books)
        print(f"corpus {corpus}: {total / MiB:.1f} MiB, {workers} worker(s) on {os.cpu_count()} cores, load average "
              f"{_load()} before", flush=True)
        main_run = run_prepare(web, books, tmp / "full", base)
        # Other jobs on the machine inflate CPU seconds too (shared caches, hyper-threads): say how busy it was.
        print(f"load average {_load()} after the main run")
        report["load_average"] = {"before": report.get("load_before"), "after": os.getloadavg()}
        report["main"] = print_main_run(main_run, total)
        report["projection_20GB_16cores_min"] = print_projection(main_run["timings"], total,  # key kept: 20 GiB
                                                                 settings)
        if not args.skip_flat:
            report["flat"] = flat_memory(args, corpus, tmp, base)
        cost = index_cost_per_doc(settings.minhash)
        print(f"\nnear-duplicate index, bytes per document ({cost['bands']} bands x {cost['rows']} rows, "
              f"{cost['num_perm']} perms): datasketch MinHashLSH {cost['datasketch_B_per_doc']:.0f} B, ours (dedup "
              f"step peak) {cost['ours_B_per_doc']:.0f} B")
        report["index_cost"] = cost
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="folder with web.jsonl and books/")
    parser.add_argument("--replicate", type=int, default=10, help="copies of the corpus for the flat-memory check")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: every core)")
    parser.add_argument("--vocab", type=int, help="tokenizer.vocab_size (default: the config's)")
    parser.add_argument("--batch-mb", type=float, default=4, help="scan shard size in MiB (small corpora need "
                        "small shards to use every worker)")
    parser.add_argument("--seq-len", type=int, help="data.seq_len (default: the config's)")
    parser.add_argument("--flat-budget-mb", type=float, default=16,
                        help="tokenizer sample in MiB in the flat-memory runs (fixed, so its memory is too)")
    parser.add_argument("--skip-flat", action="store_true", help="only the main run")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("overrides", nargs="*", help="extra lab.prepare overrides for every run")
    return parser.parse_args(argv)


def print_main_run(main_run: dict[str, Any], total: int) -> dict[str, Any]:
    """The main run's step table, targets, memory and data summary; returns its JSON record."""
    manifest = main_run["manifest"]
    print("\n".join(step_table(main_run, total)))
    print("\n".join(target_lines(main_run, total)))
    print(f"peak RSS: {main_run['tree_peak'] / MiB:.0f} MiB process tree "
          f"(main {main_run['main_peak'] / MiB:.0f} MiB, largest worker {main_run['worker_peak'] / MiB:.0f} MiB)")
    print(summary_table(manifest))
    print(format_report(manifest["tokenizer_report"]))
    tokens = sum(s["tokens"] for s in manifest["sources"].values())
    print(f"tokens: {tokens:,}  ({total / max(1, tokens):.2f} input bytes per token)")
    record = {k: v for k, v in main_run.items() if k not in ("manifest", "log")}
    return {**record, "tokens": tokens, "bytes": total}


def print_projection(t: dict[str, Any], total: int, settings: Settings) -> dict[str, Any]:
    """Minutes for 20 GiB on 16 cores. The streaming steps scale with cores (per-core rate from CPU time);
    tokenizer training is the configured byte budget (Rust threads; its rate here is per core as well)."""
    streaming_cpu = sum(t[s]["cpu_seconds"] for s in ("scan", "dedup", "pack"))
    per_core = total / MiB / streaming_cpu
    target_mib, target_cores = 20 * GiB / MiB, 16
    budget_mib = settings.training["byte_budget_mb"]
    # each report variant, and this config retrained on the variants' sample, trains on train_mb (null: the budget)
    variant_mib = min(budget_mib, settings.report["train_mb"] or budget_mib)
    tok_rate = t["tokenizer"]["bytes"] / MiB / max(1e-9, t["tokenizer"]["cpu_seconds"])
    streaming_min = target_mib / (per_core * target_cores) / 60
    tok_min = budget_mib / (tok_rate * target_cores) / 60
    tok_one_core = budget_mib / tok_rate / 60
    print(f"projection, 20 GiB on 16 cores: scan+dedup+pack at {per_core:.2f} MiB/s/core -> {streaming_min:.0f} min; "
          f"tokenizer training on the configured {budget_mib:g} MiB budget at {tok_rate:.2f} MiB/s/core -> between "
          f"{tok_min:.0f} min (16 cores) and {tok_one_core:.0f} min (1 core: its merge loop is serial); the "
          f"report's variants ({variant_mib:g} MiB each) add ~{2 * variant_mib / tok_rate / 60:.0f} min at most")
    return {"streaming": streaming_min, "tokenizer": [tok_min, tok_one_core]}


def flat_memory(args: argparse.Namespace, corpus: Path, tmp: Path, base: list[str]) -> dict[str, Any]:
    """The corpus once and `--replicate` times, dedup off: the peak memory should not grow with the input."""
    web, books = corpus / "web.jsonl", corpus / "books"
    flat = [*base, "prepare.dedup.exact=false", "prepare.dedup.near=false",
            f"prepare.tokenizer_training.byte_budget_mb={args.flat_budget_mb}", "prepare.report.variants=[]"]
    one = run_prepare(web, books, tmp / "x1", flat)
    rweb, rbooks = replicate_corpus(corpus, tmp / f"corpus_x{args.replicate}", args.replicate)
    many = run_prepare(rweb, rbooks, tmp / f"x{args.replicate}", flat)
    print(f"\nflat memory (dedup off, tokenizer budget {args.flat_budget_mb} MiB):")
    print(f"{'input':<10} {'MiB':>9} {'docs':>10} {'tree peak MiB':>13} {'main MiB':>8} {'worker MiB':>10}")
    for label, res, (w, b) in (("1x", one, (web, books)), (f"{args.replicate}x", many, (rweb, rbooks))):
        docs = sum(s["docs_in"] for s in res["manifest"]["sources"].values())
        print(f"{label:<10} {corpus_bytes(w, b) / MiB:>9.1f} {docs:>10,} {res['tree_peak'] / MiB:>13.0f} "
              f"{res['main_peak'] / MiB:>8.0f} {res['worker_peak'] / MiB:>10.0f}")
    ratio = many["tree_peak"] / max(1, one["tree_peak"])
    print(f"peak ratio {args.replicate}x / 1x: {ratio:.2f}")
    return {"x1_peak": one["tree_peak"], f"x{args.replicate}_peak": many["tree_peak"], "ratio": ratio}


if __name__ == "__main__":
    raise SystemExit(main())
