"""python -m lab.prepare data=web_then_books tokenizer=bpe40k data.web_path=... data.books_dir=...

Raw corpus -> `data.prepared_dir` (format: docs/CONTRACTS.md) in resumable steps (scan, dedup, tokenizer,
report, pack, manifest); a re-run reuses every step whose inputs and settings are unchanged. The pipeline is
`lab.data.pipeline` (Python API: `lab.data.pipeline.prepare(cfg) -> Path`); this is its command.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from lab import run_or_exit
from lab.config import resolvers as _resolvers  # noqa: F401 - registers conf/hydra's resolvers
from lab.data.pipeline import prepare

log = logging.getLogger("lab.prepare")


def _main(cfg: DictConfig) -> None:
    # prepare() checks every setting first (lab.data.pipeline.Settings.from_cfg): a bad one is one line, exit 1
    run_or_exit(prepare, cfg, log)


def main() -> None:
    # Hydra is imported here, not at the top: every spawned worker re-imports this module (as
    # __mp_main__), and hydra's import cost each of them ~0.3 CPU-s.
    import hydra

    hydra.main(config_path="../conf", config_name="prepare")(_main)()


if __name__ == "__main__":
    main()
