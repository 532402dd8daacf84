"""Single-process rates of the scan and of the tokenizer per source, in MB per CPU-second.

    python experiments/2026-12-01_data_pipeline_speed/per_source.py --corpus /work/shared/corpus/ro

Runs `lab.data.scan.scan_shard` in this process on the first --web-mb of web.jsonl and the first
--books-mb of books/, then `lab.data.pack.pack_shard` on what the scan kept, with a tokenizer trained
here on that text (--vocab). Each measurement is repeated --repeat times and the fastest kept: the
machine is shared, and CPU time still grows when the other jobs contend for caches and cores.
To time another checkout of the code, put it first on the path: `PYTHONPATH=/other/checkout python ...`
(the settings are read with its lab.compose and lab.data.pipeline.Settings, so it needs those).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread, as in the pack workers

import numpy as np  # noqa: E402

import lab  # noqa: E402
from lab.compose import compose_config  # noqa: E402
from lab.data import pack as pk  # noqa: E402
from lab.data import scan as sc  # noqa: E402
from lab.data.dedup import MinHasher  # noqa: E402
from lab.data.io import SourceSpec, iter_source  # noqa: E402
from lab.data.pipeline import Settings  # noqa: E402
from lab.data.tokenizer import train_bpe  # noqa: E402

MB = 1 << 20


def records(spec: SourceSpec, limit_mb: float) -> list:
    out, size = [], 0
    for record in iter_source(spec, 64 * MB):
        out.append(record)
        size += len(record.payload or b"")
        if size >= limit_mb * MB:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--web-mb", type=float, default=4)
    parser.add_argument("--books-mb", type=float, default=8)
    parser.add_argument("--vocab", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # every setting as lab.prepare reads conf/prepare.yaml (the books' val_fraction as this run measured it)
    settings = Settings.from_cfg(compose_config("prepare", [
        f"data.web_path={args.corpus / 'web.jsonl'}", f"data.books_dir={args.corpus / 'books'}",
        "data.sources.books.val_fraction=0.02"]))
    minhash = MinHasher(**settings.minhash).portable()
    specs = settings.sources
    limits = {"web": args.web_mb, "books": args.books_mb}
    tmp = Path(tempfile.mkdtemp(prefix="per_source_"))
    results = {"code": str(Path(lab.__file__).parent)}
    try:
        for name, spec in specs.items():
            recs = records(spec, limits[name])
            mb_in = sum(len(r.payload or b"") for r in recs) / MB
            norm, filt = settings.normalize[name], settings.filters[name]
            best = None
            for k in range(args.repeat):
                config = sc.ScanConfig(tmp / f"scan{k}", {name: sc.SourceScanConfig(spec, norm, filt)}, minhash,
                                       settings.split_salt, settings.zstd_level)
                sc.init_worker(config)
                start = time.process_time()
                stats = sc.scan_shard(sc.ScanTask(name, 0, recs))
                cpu = time.process_time() - start
                best = cpu if best is None else min(best, cpu)
            prefix = sc.shard_prefix(tmp / "scan0", name, 0)
            texts = [doc["text"] for doc in sc.read_docs(prefix)]
            tokenizer = train_bpe(iter(texts), args.vocab, min_frequency=settings.training["min_frequency"],
                                  fold=settings.tokenizer_fold)
            tokenizer.save(str(tmp / f"{name}.json"))
            splits = np.load(f"{prefix}.meta.npz")["split"]
            pack_cfg = pk.PackConfig(tmp / f"{name}.json", tmp / "parts", "uint16", {name: norm}, settings.batch_docs,
                                     settings.encoder, settings.check_chars)
            pk.init_worker(pack_cfg)
            pack_best, text_mb = None, 0.0
            for k in range(args.repeat):
                shutil.rmtree(tmp / "parts", ignore_errors=True)
                task = pk.PackTask(name, k, prefix, np.zeros(len(splits), np.uint8).tobytes(),
                                   splits.astype(np.uint8).tobytes())
                start = time.process_time()
                part = pk.pack_shard(task)
                cpu = time.process_time() - start
                pack_best = cpu if pack_best is None else min(pack_best, cpu)
                text_mb = (part["train"]["text_bytes"] + part["val"]["text_bytes"]) / MB
            results[name] = {"input_mb": round(mb_in, 2), "docs": stats["docs_in"], "kept": stats["docs_passed"],
                             "scan_cpu_s": round(best, 3), "scan_mb_per_cpu_s": round(mb_in / best, 2),
                             "pack_text_mb": round(text_mb, 2), "pack_cpu_s": round(pack_best, 3),
                             "pack_mb_per_cpu_s": round(text_mb / pack_best, 2)}
            print(name, json.dumps(results[name]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
