"""Typed, checked settings of lab.evaluate (lab.bench_eval reads them too), parsed once from the composed
conf/evaluate.yaml before any model loads. As everywhere (lab/config/checks.py), defaults live in the YAML only."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lab.config.checks import Node, boolean, choice, field, integer, list_of, number, optional, text, text_map
from lab.models.quant_formats import check_variant_list
from lab.runs.selection import RunSelectionSettings


def _path_or_auto(value: Any, key: str) -> str | None:
    return None if value in (None, "", "none") else text(str(value), key)


@dataclasses.dataclass(frozen=True)
class Efficiency(Node):
    closed = True
    enabled: bool = field(boolean)
    prompt_lengths: tuple[int, ...] = field(list_of(integer(1)))
    decode_prompt_length: int = field(integer(1))
    decode_tokens: int = field(integer(1))
    batch_sizes: tuple[int, ...] = field(list_of(integer(1)))
    repeats: int = field(integer(1))
    warmup: int = field(integer(0))
    compile: Any = field(choice("auto", True, False))


@dataclasses.dataclass(frozen=True)
class EvalTracking(Node):
    closed = True
    enabled: bool = field(boolean)
    tracking_uri: str | None = field(optional(text))
    experiment_name: str | None = field(optional(text))
    eval_of: str | None = field(optional(text))
    tags: Mapping[str, str] = field(text_map)


@dataclasses.dataclass(frozen=True)
class LmEval(Node):
    closed = True
    task_dirs: tuple[str, ...] = field(list_of(text))
    num_fewshot: int | None = field(optional(integer(0)))
    limit: int | None = field(optional(integer(1)))
    bootstrap_iters: int = field(integer(0))


@dataclasses.dataclass(frozen=True)
class Bench(Node):
    closed = True
    variant: str = field(text)
    quantize: tuple[str, ...] = field(list_of(text))
    max_ppl_increase: float = field(number(0))
    min_decode_speedup: float = field(number(0, low_open=True))
    max_weight_memory_ratio: float = field(number(0, low_open=True))


@dataclasses.dataclass(frozen=True)
class EvaluateSettings(RunSelectionSettings):
    config_name = "evaluate"  # conf/evaluate.yaml (settings_for)
    variants: Any = field(check_variant_list)
    quantized_dir: str | None = field(optional(text))
    seed: int = field(integer(0))
    threads: int | None = field(optional(integer(1)))
    output_dir: str | None = field(optional(text))
    prepared_dir: str | None = field(_path_or_auto)
    sources: tuple[str, ...] | None = field(optional(list_of(text)))
    max_blocks: Any = field(optional(integer(1, allow=("auto",))))
    batch_size: int = field(integer(1))
    texts: tuple[str, ...] = field(list_of(text))
    text_max_length: int | None = field(optional(integer(2)))
    stride: int | None = field(optional(integer(1)))
    tasks: tuple[str, ...] = field(list_of(text))
    lm_eval_tasks: tuple[str, ...] = field(list_of(text))
    lm_eval: LmEval = field(lambda node, key: LmEval.parse(node, key))
    efficiency: Efficiency = field(lambda node, key: Efficiency.parse(node, key))
    mlflow: EvalTracking = field(lambda node, key: EvalTracking.parse(node, key))
    bench: Bench = field(lambda node, key: Bench.parse(node, key))

    @classmethod
    def from_config(cls, cfg: Any) -> "EvaluateSettings":
        return cls.parse(cfg, "")

    @classmethod
    def in_run_folder(cls, cfg: Any) -> "EvaluateSettings":
        """Parsed inside a Hydra job (lab.evaluate, lab.bench_eval): output_dir=null means the job's run folder."""
        from hydra.core.hydra_config import HydraConfig

        settings = cls.from_config(cfg)
        if settings.output_dir is None:
            settings = dataclasses.replace(settings, output_dir=HydraConfig.get().runtime.output_dir)
        return settings
