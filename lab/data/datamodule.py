"""Packed token blocks and the curriculum that orders them (conf/curriculum: web first, then books, ...).

A curriculum stage is one Lightning epoch: the stage's blocks, repeated for its epochs (or up to its
token budget, or its share of curriculum.total_tokens), shuffled by (seed, stage, pass) or mixed by
weights (lab/data/mixture.py), cut so every rank gets the same whole number of optimizer steps, then
dealt out by rank. The order depends only on the data and the seed, so every
arch sees the same blocks in the same order, and a resumed run can skip exactly what was consumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler

from lab import LabError
from lab.data.mixture import (allocate, check_weights, interleave, largest_remainder, source_permutation,
                              source_shares)
from lab.data.manifest import Manifest
from lab.data.publish import verify_prepared
from lab.data.step_budget import StepSchedule


log = logging.getLogger("lab.data.datamodule")


# -- the curriculum: stages, their budgets and mixtures (conf/curriculum/*.yaml) ------------------------------------

_CURRICULUM_KEYS = {"name", "stages", "total_tokens"}
_STAGE_KEYS = {"name", "sources", "epochs", "tokens", "share", "temperature", "max_epochs"}


@dataclass(frozen=True)
class Stage:
    """One curriculum stage (one Lightning epoch).

    `sources` as a list: the union of their blocks, shuffled (each source in proportion to its size).
    `weights` (from `sources` written as a mapping) or `temperature`: a mixture (lab/data/mixture.py).
    """

    name: str
    sources: tuple[str, ...]
    epochs: float | None = None
    tokens: int | None = None
    share: float | None = None            # of curriculum.total_tokens, when that is set
    weights: tuple[float, ...] | None = None
    temperature: float | None = None
    max_epochs: float | None = None       # no source passes more often than this (null: no cap)

    @property
    def is_mixture(self) -> bool:
        return self.weights is not None or self.temperature is not None


@dataclass(frozen=True)
class Curriculum:
    name: str
    stages: tuple[Stage, ...]
    total_tokens: int | None = None       # set: every stage's budget is its share of this (equal-token studies)

    @property
    def fingerprint(self) -> str:
        """What a checkpoint records, so a resume under another curriculum is refused."""
        text = json.dumps([self.name, self.total_tokens, [dataclasses.asdict(s) for s in self.stages]], sort_keys=True)
        return f"{self.name}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _positive(value: Any, where: str, integral: bool = False) -> float | int | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and integral:
        ok = float(value).is_integer()
    if not ok:
        kind = "a positive whole number" if integral else "a positive number"
        raise LabError(f"{where}={value!r} is not {kind}")
    return int(value) if integral else float(value)


def parse_stage(item: Any, where: str, total_tokens: int | None) -> Stage:
    if not isinstance(item, Mapping):
        raise LabError(f"{where} is {item!r}, not a mapping with name, sources and a budget")
    item = dict(item)
    unknown = sorted(set(map(str, item)) - _STAGE_KEYS)
    if unknown:
        raise LabError(f"{where} has unknown key(s) {unknown}; a stage takes {sorted(_STAGE_KEYS)}")
    name = item.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise LabError(f"{where}.name={name!r}: a stage needs a name (text without '/')")
    where = f"{where} ({name})"
    raw_sources, weights = item.get("sources"), None
    if isinstance(raw_sources, Mapping):  # {source: weight}: a mixture with fixed weights
        weights = check_weights(dict(raw_sources), f"{where}.sources")
        raw_sources = list(weights)
    if (not isinstance(raw_sources, Sequence) or isinstance(raw_sources, str) or not raw_sources
            or not all(isinstance(s, str) and s for s in raw_sources)):
        raise LabError(f"{where}.sources={raw_sources!r}: expected a list of source names, or a mapping "
                       "source: weight for a mixture")
    if len(set(raw_sources)) != len(raw_sources):
        raise LabError(f"{where}.sources names a source twice: {list(raw_sources)}")
    temperature = _positive(item.get("temperature"), f"{where}.temperature")
    if weights is not None and temperature is not None:
        raise LabError(f"{where}: give weights (sources as a mapping) or a temperature, not both")
    epochs = _positive(item.get("epochs"), f"{where}.epochs")
    tokens = _positive(item.get("tokens"), f"{where}.tokens", integral=True)
    share = _positive(item.get("share"), f"{where}.share")
    if total_tokens is not None and share is None:
        raise LabError(f"{where} has no `share`, but curriculum.total_tokens={total_tokens} splits the budget by "
                       "shares; give every stage a share (or set curriculum.total_tokens=null)")
    if total_tokens is None and (epochs is None) == (tokens is None):
        raise LabError(f"curriculum stage {name!r} needs exactly one of `epochs` or `tokens` (or a `share` "
                       "with curriculum.total_tokens)")
    return Stage(name, tuple(raw_sources), epochs, tokens, share,
                 tuple(weights.values()) if weights is not None else None, temperature,
                 _positive(item.get("max_epochs"), f"{where}.max_epochs"))


def parse_curriculum(cfg: Any) -> Curriculum:
    """conf/curriculum/<name>.yaml (name, stages, total_tokens), or a bare list of stages."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Sequence) and not isinstance(cfg, str):
        cfg = {"name": "custom", "stages": list(cfg)}
    if not isinstance(cfg, Mapping):
        raise LabError(f"curriculum is {cfg!r}, not a mapping with name and stages (conf/curriculum/*.yaml)")
    unknown = sorted(set(map(str, cfg)) - _CURRICULUM_KEYS)
    if unknown:
        raise LabError(f"curriculum has unknown key(s) {unknown}; it takes {sorted(_CURRICULUM_KEYS)}")
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise LabError(f"curriculum.name={name!r}: a curriculum needs a name")
    total_tokens = _positive(cfg.get("total_tokens"), "curriculum.total_tokens", integral=True)
    items = cfg.get("stages")
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise LabError(f"curriculum.stages of {name!r} is empty: the curriculum needs at least one stage")
    stages = tuple(parse_stage(item, f"curriculum.stages[{i}]", total_tokens) for i, item in enumerate(items))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise LabError(f"curriculum {name!r} names a stage twice: {names}; stage names key checkpoints and metrics")
    return Curriculum(name, stages, total_tokens)


def stage_budget(stage: Stage, sizes: Sequence[int], seq_len: int, samples_per_step: int) -> int:
    """Blocks of a stage budgeted in `epochs` or `tokens`, cut to whole optimizer steps."""
    total_blocks = int(sum(sizes))
    if stage.tokens is not None:
        wanted = math.ceil(stage.tokens / seq_len)
    elif stage.is_mixture:
        # epochs of a mixture count passes over its main source (the largest share): books 2 epochs + 10% web
        shares = source_shares(sizes, stage.weights, stage.temperature)
        main = int(np.argmax(shares))
        wanted = int(round(stage.epochs * sizes[main] / shares[main]))
    else:
        wanted = int(round(stage.epochs * total_blocks))
    # Whole optimizer steps on every rank: drop the remainder (it is < one global step).
    num_samples = (wanted // samples_per_step) * samples_per_step
    if num_samples == 0:
        raise LabError(f"stage {stage.name!r} has {wanted} blocks, fewer than one optimizer step "
                       f"({samples_per_step} blocks): lower the batch size or raise its budget")
    return num_samples


def shared_budgets(stages: Sequence[Stage], total_tokens: int, tokens_per_step: int) -> list[int]:
    """Optimizer steps per stage under curriculum.total_tokens: the same total for every curriculum,
    split by the stages' shares (largest remainder), each stage at least one step."""
    total_steps = total_tokens // tokens_per_step
    steps = largest_remainder(total_steps, np.array([s.share for s in stages]) / sum(s.share for s in stages))
    for stage, n in zip(stages, steps):
        if n == 0:
            raise LabError(f"curriculum.total_tokens={total_tokens} is {total_steps} optimizer steps of "
                           f"{tokens_per_step} tokens; stage {stage.name!r} (share {stage.share}) gets none: "
                           "raise total_tokens or lower the batch size")
    return [int(n) for n in steps]


class StageOrder:
    """The global sample order of one stage: indices into the concatenation of its sources' blocks.

    A plain stage permutes the whole concatenation per pass by (seed, stage, pass); a mixture stage
    places each source's samples by lab/data/mixture.py and permutes each source per pass.
    """

    def __init__(self, sizes: Sequence[int], stage: Stage, stage_index: int, seed: int, num_samples: int):
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total_blocks = int(self.offsets[-1])
        self.num_samples = int(num_samples)
        self.stage_name = stage.name
        self.seed = (seed, stage_index)
        caps = [stage.max_epochs * n if stage.max_epochs else math.inf for n in self.sizes]
        self.counts: np.ndarray | None = None  # blocks per source over the stage (mixtures: exact by construction)
        if stage.is_mixture:
            shares = source_shares(self.sizes, stage.weights, stage.temperature)
            empty = [s for s, n, q in zip(stage.sources, self.sizes, shares) if q > 0 and n == 0]
            if empty:
                raise LabError(f"stage {stage.name!r} mixes in source(s) {empty}, which have no training blocks")
            try:
                self.counts = allocate(self.num_samples, shares, caps)
            except ValueError:
                raise LabError(self._over_cap(stage, sum(c for c, q in zip(caps, shares) if q > 0))) from None
        elif stage.max_epochs and self.num_samples > stage.max_epochs * self.total_blocks:
            raise LabError(self._over_cap(stage, stage.max_epochs * self.total_blocks))

    def _over_cap(self, stage: Stage, room: float) -> str:
        return (f"stage {stage.name!r} wants {self.num_samples} blocks, but max_epochs={stage.max_epochs} passes over "
                f"its sources {dict(zip(stage.sources, self.sizes))} hold only {int(room)}: lower its budget or raise "
                "max_epochs")

    def index(self, position: int) -> int:
        """Block index at global position `position` (a pure function of seed, stage and position)."""
        if self.counts is None:
            block_pass, offset = divmod(position, self.total_blocks)
            return int(self._permutation(block_pass)[offset])
        source = int(self._source_at[position])
        k = int(self._slots[position] - self._slot_offsets[source])  # the k-th sample of this source
        block_pass, offset = divmod(k, self.sizes[source])
        return int(self.offsets[source] + self._source_permutation(source, block_pass)[offset])

    def source_counts(self, upto: int) -> np.ndarray:
        """Samples of each source among the positions [0, upto)."""
        upto = max(0, min(int(upto), self.num_samples))
        if self.counts is not None:
            return np.bincount(self._source_at[:upto], minlength=len(self.sizes)).astype(np.int64)
        full, rest = divmod(upto, self.total_blocks)
        counts = full * np.asarray(self.sizes, dtype=np.int64)
        if rest:
            head = self._permutation(full)[:rest]
            counts += np.bincount(np.searchsorted(self.offsets, head, side="right") - 1, minlength=len(self.sizes))
        return counts

    def _permutation(self, block_pass: int) -> np.ndarray:
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != block_pass:
            rng = np.random.default_rng([*self.seed, block_pass])
            cache = (block_pass, rng.permutation(self.total_blocks))
            self._cache = cache
        return cache[1]

    def _source_permutation(self, source: int, block_pass: int) -> np.ndarray:
        caches = self.__dict__.setdefault("_source_cache", {})
        if source not in caches or caches[source][0] != block_pass:
            caches[source] = (block_pass, source_permutation(*self.seed, source, block_pass, self.sizes[source]))
        return caches[source][1]

    @cached_property
    def _slots(self) -> np.ndarray:
        return interleave(self.counts, *self.seed)

    @cached_property
    def _slot_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @cached_property
    def _source_at(self) -> np.ndarray:
        return (np.searchsorted(self._slot_offsets, self._slots, side="right") - 1).astype(np.int32)


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
    state checks that the run resumes with the same blocks per optimizer step and the same curriculum,
    without which the restored position would point at other blocks.
    """

    def __init__(self, *args: Any, stage: str, samples_per_step: int, curriculum: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stage, self.samples_per_step, self.curriculum = stage, samples_per_step, curriculum

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "samples_per_step": self.samples_per_step, "curriculum": self.curriculum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("samples_per_step", self.samples_per_step) != self.samples_per_step:
            raise LabError(f"cannot resume exactly: the checkpoint consumed {state['samples_per_step']} blocks per "
                           f"optimizer step, this run {self.samples_per_step} (batch size x accumulation x devices)")
        if state.get("curriculum") and self.curriculum and state["curriculum"] != self.curriculum:
            raise LabError(f"cannot resume: the checkpoint was trained under curriculum {state['curriculum']}, this "
                           f"run asks for {self.curriculum}; resume with curriculum={state['curriculum'].split(':')[0]} "
                           "and its settings, or start a new run")


@dataclass(frozen=True)
class DataInfo:
    """What the module needs to know of the prepared data: block length, val sources and their bytes per token
    (bits per byte), and the hashes a resume must match."""

    seq_len: int
    val_sources: list[str]
    val_bytes_per_token: dict[str, float | None]
    data_sha256: str
    tokenizer_sha256: str

    def record(self) -> dict[str, Any]:
        """Plain containers for the checkpoint's hyper-parameters (loadable with weights_only=True)."""
        return dataclasses.asdict(self)


class CurriculumDataModule(L.LightningDataModule):
    """Training blocks stage by stage (one Lightning epoch each); validation blocks per source."""

    def __init__(self, prepared_dir: str | Path, curriculum: Any, seq_len: int, batch_size: int,
                 *, shuffle_seed: int, val_batch_size: int | None = None, val_max_blocks: int | None = None,
                 accumulate_grad_batches: int = 1, num_workers: int = 0):
        """curriculum: conf/curriculum/<name>.yaml (name, stages, total_tokens) or a bare list of stages.
        The keywords' defaults are neutral (validation batch = training batch, every val block, no accumulation,
        no workers); lab.train passes every one from the config (lab.train.open_data)."""
        super().__init__()
        self.curriculum = parse_curriculum(curriculum)  # checked before the data is even opened
        self.manifest = Manifest.load(prepared_dir)
        if self.manifest.seq_len != seq_len:
            raise LabError(f"data at {prepared_dir} is packed in blocks of {self.manifest.seq_len} tokens, "
                           f"but data.seq_len={seq_len}; prepare it again with data.seq_len={seq_len}")
        self.stages = list(self.curriculum.stages)
        unknown = sorted({s for st in self.stages for s in st.sources} - set(self.manifest.sources))
        if unknown:
            raise LabError(f"curriculum {self.curriculum.name!r} names source(s) {unknown} not in the prepared data "
                           f"at {prepared_dir} ({self.manifest.sources}); use a curriculum over those sources, or "
                           "prepare data that has them")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.val_max_blocks = val_max_blocks
        self.shuffle_seed = shuffle_seed
        self.accumulate = accumulate_grad_batches
        self.num_workers = num_workers
        self.world_size, self.rank = 1, 0
        self._orders: dict[int, StageOrder] = {}
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
        log.info("curriculum %s: %s", self.curriculum.name, self.describe())  # plans every stage: errors come now

    # -- the schedule, known before training starts ---------------------------------------------------
    def set_world(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank
        self._orders.clear()  # budgets are whole global steps, which depend on the world size

    @property
    def samples_per_step(self) -> int:
        """Blocks consumed by one optimizer step across all ranks."""
        return self.batch_size * self.accumulate * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.seq_len

    def _sizes(self, index: int) -> list[int]:
        return [len(d) for d in self._train_sets[self.stages[index].name].datasets]

    def stage_order(self, index: int) -> StageOrder:
        if index not in self._orders:
            stage = self.stages[index]
            if sum(self._sizes(index)) == 0:
                raise LabError(f"stage {stage.name!r} has no training blocks (sources {list(stage.sources)})")
            if self.curriculum.total_tokens is not None:
                steps = shared_budgets(self.stages, self.curriculum.total_tokens, self.tokens_per_step)[index]
                num_samples = steps * self.samples_per_step
            else:
                num_samples = stage_budget(stage, self._sizes(index), self.seq_len, self.samples_per_step)
            self._orders[index] = StageOrder(self._sizes(index), stage, index, self.shuffle_seed, num_samples)
        return self._orders[index]

    def stage_steps(self) -> list[int]:
        """Optimizer steps in each stage."""
        return [self.stage_order(i).num_samples // self.samples_per_step for i in range(len(self.stages))]

    def stage_boundaries(self) -> list[int]:
        """Global step at which each stage starts (and, last, the total)."""
        return [0, *np.cumsum(self.stage_steps()).tolist()]

    def step_schedule(self, max_steps: int) -> StepSchedule:
        """The run's optimizer steps: the curriculum's, cut at trainer.max_steps (-1: no cut). Call after set_world."""
        bounds = self.stage_boundaries()
        schedule = StepSchedule(total_steps=bounds[-1] if max_steps <= 0 else min(bounds[-1], max_steps),
                                tokens_per_step=self.tokens_per_step, stage_names=[s.name for s in self.stages],
                                stage_bounds=bounds,
                                stage_sources=[self.main_sources(i) for i in range(len(self.stages))])
        if schedule.total_steps < bounds[-2]:
            cut = schedule.stage_at(schedule.total_steps)
            log.warning("trainer.max_steps=%d ends inside stage %r: the later stage(s) %s will not run",
                        schedule.total_steps, schedule.stage_names[cut], schedule.stage_names[cut + 1:])
        return schedule

    def data_info(self) -> DataInfo:
        manifest = self.manifest
        return DataInfo(seq_len=self.seq_len, val_sources=list(self.val_sources),
                        val_bytes_per_token={s: manifest.bytes_per_token(s, "val") for s in self.val_sources},
                        data_sha256=manifest.data_sha256, tokenizer_sha256=manifest.tokenizer_sha256)

    def main_sources(self, index: int) -> list[str]:
        """The sources a stage trains on for `val/<source>/forgetting`: all of a plain stage, the largest
        share(s) of a mixture (a books stage replaying 10% web trains books; web forgets from the web stage)."""
        stage = self.stages[index]
        if not stage.is_mixture:
            return list(stage.sources)
        counts = self.stage_order(index).counts
        return [s for s, c in zip(stage.sources, counts) if c == counts.max()]

    def source_tokens(self, global_step: int) -> dict[str, float]:
        """Tokens of each source trained up to `global_step`: `tokens/<stage>/<source>` and `tokens/<source>`."""
        bounds, result = self.stage_boundaries(), {}
        totals: dict[str, float] = {}
        for index, stage in enumerate(self.stages):
            steps = min(max(global_step - bounds[index], 0), bounds[index + 1] - bounds[index])
            counts = self.stage_order(index).source_counts(steps * self.samples_per_step)
            for source, count in zip(stage.sources, counts):
                tokens = float(count * self.seq_len)
                result[f"tokens/{stage.name}/{source}"] = tokens
                totals[source] = totals.get(source, 0.0) + tokens
        result.update({f"tokens/{source}": tokens for source, tokens in totals.items()})
        return result

    def describe(self) -> str:
        """Blocks per source in each stage, with the passes over that source: `web: web 666 (1.00 ep)`."""
        parts = []
        for index, stage in enumerate(self.stages):
            order = self.stage_order(index)
            counts = order.source_counts(order.num_samples)
            detail = ", ".join(f"{s} {int(c)} ({c / n:.2f} ep)" if n else f"{s} 0"
                               for s, c, n in zip(stage.sources, counts, order.sizes))
            parts.append(f"{stage.name}: {detail}")
        return "; ".join(parts)

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
                                samples_per_step=self.samples_per_step, curriculum=self.curriculum.fingerprint)

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


# -- the prepared folder a training config reads ---------------------------------------------------------------------

def prepare_command(cfg: DictConfig) -> str:
    """The lab.prepare command that writes the data this training config reads (its data and tokenizer choices,
    and every data./tokenizer./prepare. override it was composed with)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_on = HydraConfig.initialized()
    choices = HydraConfig.get().runtime.choices if hydra_on else {}
    words = ["python -m lab.prepare"] + [f"{group}={choices[group]}" for group in ("data", "tokenizer")
                                         if choices.get(group)]
    words += [f"paths.corpus_dir={cfg.paths.corpus_dir}", f"data.seq_len={cfg.data.seq_len}"]
    for override in (HydraConfig.get().overrides.task if hydra_on else []):
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(("data.", "tokenizer.", "prepare.")) and key != "data.seq_len":
            words.append(override)
    return " ".join(words)


def check_prepared(cfg: DictConfig) -> str:
    """The prepared folder of `cfg` exists and is what was prepared: sizes always, hashes when data.verify asks or
    the folder changed. Returns what was checked; a missing or damaged folder is one line naming the command."""
    folder = Path(str(cfg.data.prepared_dir))
    if not (folder / "manifest.json").is_file():
        raise LabError(f"no prepared data at {folder}; prepare it first with: {prepare_command(cfg)}")
    return verify_prepared(folder, str(cfg.data.verify),
                           f"re-prepare it (intact steps are reused) with: {prepare_command(cfg)}")
