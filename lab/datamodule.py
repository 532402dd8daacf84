"""Packed token blocks and the curriculum that orders them (web first, then books).

A curriculum stage is one Lightning epoch: the stage's blocks, repeated for its epochs (or up to its
token budget), shuffled by (seed, stage, pass), cut so every rank gets the same whole number of
optimizer steps, then dealt out by rank. The order depends only on the data and the seed, so every
arch sees the same blocks in the same order, and a resumed run can skip exactly what was consumed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lab import LabError


class PackedBlocks(Dataset):
    """Fixed-length blocks of a flat token file, memory-mapped (nothing is read until indexed)."""

    def __init__(self, path: Path, seq_len: int, dtype: str, expected_blocks: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise LabError(f"packed token file not found: {self.path}")
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        n_tokens = self.path.stat().st_size // self.dtype.itemsize
        self.n_blocks = n_tokens // seq_len
        if expected_blocks is not None and (self.n_blocks != expected_blocks
                                            or self.path.stat().st_size != expected_blocks * seq_len * self.dtype.itemsize):
            # a cut or grown file must never train (or evaluate) silently on part of the data
            raise LabError(f"{self.path} holds {self.path.stat().st_size:,} bytes, not the {expected_blocks:,} blocks "
                           "its manifest records: the prepared data is damaged; re-run lab.prepare")

    @cached_property
    def _tokens(self) -> np.ndarray:
        # Opened lazily so a DataLoader worker maps the file itself instead of pickling a map.
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_blocks * self.seq_len,))

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(index) * self.seq_len
        block = self._tokens[start : start + self.seq_len]
        return torch.from_numpy(block.astype(np.int64))  # [seq_len]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_tokens", None)
        return state

log = logging.getLogger("lab.datamodule")


@dataclass(frozen=True)
class Manifest:
    """The parts of lab.prepare's manifest.json that training reads (docs/CONTRACTS.md)."""

    root: Path
    raw: dict[str, Any]

    @classmethod
    def load(cls, prepared_dir: str | Path) -> "Manifest":
        root = Path(prepared_dir)
        path = root / "manifest.json"
        if not path.is_file():
            raise LabError(
                f"no prepared data at {root} (missing manifest.json). Run `python -m lab.prepare` with the same "
                "data/tokenizer/seq_len overrides first (`make data-sample` for the embedded sample, "
                "`make data CORPUS=...` for a corpus)."
            )
        try:
            return cls(root, json.loads(path.read_text()))
        except (OSError, ValueError) as err:  # a cut or hand-edited manifest: one line, not a traceback
            raise LabError(f"{path} cannot be read as a manifest ({err}); re-run lab.prepare") from None

    @property
    def seq_len(self) -> int:
        return int(self.raw["seq_len"])

    @property
    def dtype(self) -> str:
        return str(self.raw["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.raw["vocab_size"])

    @property
    def sources(self) -> list[str]:
        return list(self.raw["sources"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.raw.get("tokenizer_sha256", ""))

    @property
    def data_sha256(self) -> str:
        return str(self.raw.get("data_sha256", ""))

    def split(self, source: str, split: str) -> dict[str, Any]:
        try:
            return self.raw["sources"][source]["splits"][split]
        except KeyError:
            raise LabError(f"prepared data at {self.root} has no {split!r} split for source {source!r}; "
                           f"sources there: {self.sources}") from None

    def blocks(self, source: str, split: str) -> PackedBlocks:
        info = self.split(source, split)
        return PackedBlocks(self.root / info["file"], self.seq_len, self.dtype, info.get("blocks"))

    def bytes_per_token(self, source: str, split: str = "val") -> float | None:
        info = self.split(source, split)
        tokens, text_bytes = info.get("tokens"), info.get("text_bytes")
        return text_bytes / tokens if tokens and text_bytes else None


@dataclass(frozen=True)
class Stage:
    name: str
    sources: tuple[str, ...]
    epochs: float | None = None
    tokens: int | None = None


def parse_stages(stages_cfg: Sequence[Any]) -> list[Stage]:
    stages = []
    for item in stages_cfg:
        item = dict(item)
        epochs, tokens = item.get("epochs"), item.get("tokens")
        if (epochs is None) == (tokens is None):
            raise LabError(f"curriculum stage {item.get('name')!r} needs exactly one of `epochs` or `tokens`")
        stages.append(Stage(str(item["name"]), tuple(item["sources"]), epochs, int(tokens) if tokens else None))
    if not stages:
        raise LabError("data.stages is empty: the curriculum needs at least one stage")
    return stages


class StageOrder:
    """The global sample order of one stage: indices into the concatenation of its sources' blocks."""

    def __init__(self, sizes: Sequence[int], stage: Stage, stage_index: int, seq_len: int, seed: int,
                 samples_per_step: int):
        total_blocks = int(sum(sizes))
        if total_blocks == 0:
            raise LabError(f"stage {stage.name!r} has no training blocks (sources {list(stage.sources)})")
        if stage.tokens is not None:
            wanted = math.ceil(stage.tokens / seq_len)
        else:
            wanted = int(round(stage.epochs * total_blocks))
        # Whole optimizer steps on every rank: drop the remainder (it is < one global step).
        self.num_samples = (wanted // samples_per_step) * samples_per_step
        if self.num_samples == 0:
            raise LabError(f"stage {stage.name!r} has {wanted} blocks, fewer than one optimizer step "
                           f"({samples_per_step} blocks): lower the batch size or raise its budget")
        self.total_blocks = total_blocks
        self.seed = (seed, stage_index)

    def index(self, position: int) -> int:
        """Block index at global position `position` (passes are independent permutations)."""
        block_pass, offset = divmod(position, self.total_blocks)
        return int(self._permutation(block_pass)[offset])

    def _permutation(self, block_pass: int) -> np.ndarray:
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != block_pass:
            rng = np.random.default_rng([*self.seed, block_pass])
            cache = (block_pass, rng.permutation(self.total_blocks))
            self._cache = cache
        return cache[1]


class RankSampler(Sampler[int]):
    """This rank's share of a stage order, from `start` (global samples already consumed)."""

    def __init__(self, order: StageOrder, rank: int, world_size: int, start: int = 0):
        self.order, self.rank, self.world_size, self.start = order, rank, world_size, start

    def __iter__(self) -> Iterator[int]:
        # position p goes to rank p % world_size: ranks interleave, never overlap, and cover the stage
        trace = os.environ.get("LAB_TRACE_BLOCKS_DIR")  # debugging aid: which blocks did each rank read?
        handle = open(Path(trace) / f"rank{self.rank}.txt", "a") if trace else None
        try:
            for position in range(self.start + self.rank, self.order.num_samples, self.world_size):
                index = self.order.index(position)
                if handle:
                    handle.write(f"{index}\n")
                yield index
        finally:
            if handle:
                handle.close()

    def __len__(self) -> int:
        # The whole stage's share, also when resuming: Lightning counts batches from the stage start
        # and restores how many it has seen, so the loader must report the full length (as
        # resumable loaders do) while iteration continues from `start`.
        return max(0, math.ceil((self.order.num_samples - self.rank) / self.world_size))


class CurriculumLoader(DataLoader):
    """A stage's DataLoader that Lightning treats as resumable (it has state_dict/load_state_dict).

    The position itself is derived from the restored global step when the loader is built; the saved
    state checks that the run resumes with the same blocks per optimizer step, without which the
    restored position would point at other blocks.
    """

    def __init__(self, *args: Any, stage: str, samples_per_step: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stage, self.samples_per_step = stage, samples_per_step

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "samples_per_step": self.samples_per_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("samples_per_step", self.samples_per_step) != self.samples_per_step:
            raise LabError(f"cannot resume exactly: the checkpoint consumed {state['samples_per_step']} blocks per "
                           f"optimizer step, this run {self.samples_per_step} (batch size x accumulation x devices)")


class CurriculumDataModule(L.LightningDataModule):
    """Training blocks stage by stage (one Lightning epoch each); validation blocks per source."""

    def __init__(self, prepared_dir: str | Path, stages: Sequence[Any], seq_len: int, batch_size: int,
                 val_batch_size: int | None = None, val_max_blocks: int | None = None, shuffle_seed: int = 0,
                 accumulate_grad_batches: int = 1, num_workers: int = 0):
        super().__init__()
        self.manifest = Manifest.load(prepared_dir)
        if self.manifest.seq_len != seq_len:
            raise LabError(f"data at {prepared_dir} is packed in blocks of {self.manifest.seq_len} tokens, "
                           f"but data.seq_len={seq_len}; prepare it again with data.seq_len={seq_len}")
        self.stages = parse_stages(stages)
        unknown = sorted({s for st in self.stages for s in st.sources} - set(self.manifest.sources))
        if unknown:
            raise LabError(f"curriculum names source(s) {unknown} not in the prepared data ({self.manifest.sources})")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_max_blocks = val_max_blocks
        self.shuffle_seed = shuffle_seed
        self.accumulate = accumulate_grad_batches
        self.num_workers = num_workers
        self.world_size, self.rank = 1, 0
        self._train_sets = {
            stage.name: torch.utils.data.ConcatDataset([self.manifest.blocks(s, "train") for s in stage.sources])
            for stage in self.stages
        }
        self.val_sources = [s for s in self.manifest.sources if self.manifest.split(s, "val").get("blocks", 1)]
        if not self.val_sources:
            raise LabError(f"the prepared data at {prepared_dir} has no validation blocks in any source, so nothing "
                           "can be evaluated; prepare it again with a larger data.sources.<name>.val_fraction or a "
                           "smaller data.seq_len")
        for source in sorted(set(self.manifest.sources) - set(self.val_sources)):
            log.warning("source %r has no validation blocks: it is trained on but not evaluated "
                        "(raise data.sources.%s.val_fraction or lower data.seq_len when preparing)", source, source)

    # -- the schedule, known before training starts ---------------------------------------------------
    def set_world(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank

    @property
    def samples_per_step(self) -> int:
        """Blocks consumed by one optimizer step across all ranks."""
        return self.batch_size * self.accumulate * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.seq_len

    def stage_order(self, index: int) -> StageOrder:
        stage = self.stages[index]
        sizes = [len(d) for d in self._train_sets[stage.name].datasets]
        return StageOrder(sizes, stage, index, self.seq_len, self.shuffle_seed, self.samples_per_step)

    def stage_steps(self) -> list[int]:
        """Optimizer steps in each stage."""
        return [self.stage_order(i).num_samples // self.samples_per_step for i in range(len(self.stages))]

    def stage_boundaries(self) -> list[int]:
        """Global step at which each stage starts (and, last, the total)."""
        return [0, *np.cumsum(self.stage_steps()).tolist()]

    def stage_at(self, global_step: int) -> int:
        bounds = self.stage_boundaries()
        for index in range(len(self.stages)):
            if global_step < bounds[index + 1]:
                return index
        return len(self.stages) - 1

    # -- Lightning hooks ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stage_index = min(trainer.current_epoch, len(self.stages) - 1)
        order = self.stage_order(stage_index)
        # Resume mid-stage: skip exactly the samples the restored optimizer steps consumed.
        steps_done = max(0, trainer.global_step - self.stage_boundaries()[stage_index])
        start = min(steps_done * self.samples_per_step, order.num_samples)
        sampler = RankSampler(order, self.rank, self.world_size, start)
        return CurriculumLoader(self._train_sets[self.stages[stage_index].name], batch_size=self.batch_size,
                                sampler=sampler, num_workers=self.num_workers, drop_last=False,
                                pin_memory=torch.cuda.is_available(), stage=self.stages[stage_index].name,
                                samples_per_step=self.samples_per_step)

    def val_dataloader(self) -> list[DataLoader]:
        loaders = []
        for source in self.val_sources:
            blocks = self.manifest.blocks(source, "val")
            indices = evenly_spaced(len(blocks), self.val_max_blocks)
            # every rank evaluates its own slice; losses are summed across ranks in the module
            subset = torch.utils.data.Subset(blocks, indices[self.rank :: self.world_size])
            loaders.append(DataLoader(subset, batch_size=self.val_batch_size, num_workers=self.num_workers))
        return loaders


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """Up to `limit` indices spread evenly over range(n): a fixed, representative val subset."""
    if not limit or limit >= n:
        return list(range(n))
    return np.linspace(0, n - 1, num=limit).round().astype(int).tolist()
