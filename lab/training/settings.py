"""Typed, validated views of the config nodes lab.train reads, parsed once before anything starts.

Defaults live in the YAML only (conf/): a field here has a type and a range, never a default, so a key the
YAML lost is an error, not a silent fallback. `TrainSettings.from_config(cfg)` checks every value and raises
one LabError line naming the dotted key, the value and what is allowed — before the MLflow run is created.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

from omegaconf import DictConfig

from lab import LabError
from lab.config.checks import Node, boolean, choice, field, integer, not_allowed, number, optional, required, text
from lab.generation.stage_samples import GenerationSpec


def betas(value: Any, key: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise not_allowed(key, value, "two numbers in [0, 1), e.g. [0.9, 0.95]")
    return tuple(number(0, 1, high_open=True)(v, f"{key}[{i}]") for i, v in enumerate(value))  # type: ignore


def devices(value: Any, key: str) -> Any:
    if value == "auto" or (isinstance(value, (list, tuple)) and value
                           and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        return value
    return integer(1, allow=(-1,))(value, key)


def _precisions() -> tuple[str, ...]:
    """Lightning's own list of precision values (Literal types nested in a Union), as strings."""
    from lightning.fabric.connector import _PRECISION_INPUT

    def flat(tp: Any) -> list[Any]:
        args = get_args(tp)
        return [leaf for arg in args for leaf in flat(arg)] if args else [tp]

    return ("auto", *dict.fromkeys(str(v) for v in flat(_PRECISION_INPUT)))


@dataclasses.dataclass(frozen=True)
class Optim(Node):
    lr: float = field(number(0))  # 0 is allowed: a run that only evaluates (or checks init_from) trains nothing
    betas: tuple[float, float] = field(betas)
    eps: float = field(number(0, low_open=True))
    weight_decay: float = field(number(0))
    fused: Any = field(choice("auto", True, False))


@dataclasses.dataclass(frozen=True)
class Scheduler(Node):
    name: str = field(choice("cosine", "wsd"))
    warmup_fraction: float = field(number(0, 1))
    warmup_tokens: float | None = field(number(0, low_open=True, optional=True))
    min_lr_ratio: float = field(number(0, 1))


@dataclasses.dataclass(frozen=True)
class WsdScheduler(Scheduler):
    decay_stage: str | None = field(optional(text))
    decay_fraction: float = field(number(0, 1))
    decay_shape: str = field(choice("linear", "cosine", "sqrt"))


@dataclasses.dataclass(frozen=True)
class Guard(Node):
    action: str = field(choice("skip", "stop"))
    spike_factor: float = field(number(0, low_open=True))
    warmup_steps: int = field(integer(0))
    max_skips: int = field(integer(0))


@dataclasses.dataclass(frozen=True)
class Train(Node):
    batch_size: int = field(integer(1))
    val_batch_size: int = field(integer(1))
    eval_every_steps: int = field(integer(1))
    val_max_blocks: int | None = field(optional(integer(1)))
    compile: bool = field(boolean)
    attention: str = field(choice("auto", "sdpa", "eager", "flex_attention"))
    activation_checkpointing: bool = field(boolean)
    loss_chunk_size: int | None = field(optional(integer(1)))
    guard: Guard = field(lambda node, key: Guard.parse(node, key))
    export_hf: bool = field(boolean)
    num_workers: int = field(integer(0))


@dataclasses.dataclass(frozen=True)
class Trainer(Node):
    accelerator: str = field(text)
    devices: Any = field(devices)
    num_nodes: int = field(integer(1))
    precision: str = field(lambda value, key: choice(*_precisions())(str(value), key))
    max_steps: int = field(integer(1, allow=(-1,)))
    accumulate_grad_batches: int = field(integer(1))
    gradient_clip_val: float | None = field(number(0, optional=True))
    log_every_n_steps: int = field(integer(1))


@dataclasses.dataclass(frozen=True)
class Checkpointing(Node):
    every_n_steps: int = field(integer(1))
    keep_last: int = field(integer(-1))


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    seed: int
    seq_len: int
    shuffle_seed: int
    optim: Optim
    scheduler: Scheduler
    train: Train
    trainer: Trainer
    checkpoint: Checkpointing

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "TrainSettings":
        """Check the composed lab.train config; raises one LabError line for the first bad value."""
        scheduler_cls = WsdScheduler if required(cfg, "scheduler.name") == "wsd" else Scheduler
        check_export_callbacks(cfg)
        return cls(seed=integer(0)(cfg.seed, "seed"),
                   seq_len=integer(2)(cfg.data.seq_len, "data.seq_len"),
                   shuffle_seed=integer(0)(required(cfg, "data.shuffle_seed"), "data.shuffle_seed"),
                   optim=Optim.parse(cfg.optim, "optim"),
                   scheduler=scheduler_cls.parse(cfg.scheduler, "scheduler"),
                   train=Train.parse(cfg.train, "train"),
                   trainer=Trainer.parse(cfg.trainer, "trainer"),
                   checkpoint=Checkpointing.parse(cfg.callbacks.checkpoint, "callbacks.checkpoint"))


def check_export_callbacks(cfg: DictConfig) -> None:
    """The generations and model-registry settings, checked before the MLflow run exists (they act at stage ends)."""

    generations = required(cfg, "callbacks.generations")
    if generations is not None:  # null: no generations
        GenerationSpec.from_config(generations)
    register = boolean(required(cfg, "callbacks.register_model"), "callbacks.register_model")
    if register and not boolean(required(cfg, "train.export_hf"), "train.export_hf"):
        raise LabError("callbacks.register_model=true registers the final hf/ export, but train.export_hf=false "
                       "writes none; set train.export_hf=true or callbacks.register_model=false")
