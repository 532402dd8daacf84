"""Typed, checked settings of lab.generate, lab.quantize and lab.evaluate (lab.bench_eval reads lab.evaluate's),
parsed once from the composed conf/generate.yaml, conf/quantize.yaml, conf/evaluate.yaml before any model loads.

As for lab.train (lab/settings.py), defaults live in the YAML only: every field here has a type and a range and no
default, so a key the YAML lost is one LabError line naming it. `settings_for(command, **values)` composes the
command's config from conf/ with `values` set and parses it: what lab.study and the tests run with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from omegaconf import OmegaConf

from lab import LabError
from lab.settings import (Node, boolean, choice, field, integer, list_of, number, optional, text, text_map)

_MISSING = "???"  # Hydra's mandatory value: model_path not given


def _model_path(value: Any, key: str) -> str | None:
    if value in (None, "", _MISSING):
        return None  # checked with runs= by lab.run_selection.selection_from_config
    return text(str(value) if not isinstance(value, (Mapping, list, tuple, bool)) else value, key)


def _variants(value: Any, key: str) -> str | tuple[str, ...]:
    """`auto` or a list of names; the names themselves are checked against this device's variants later."""
    if value == "auto" or value is None:
        return "auto"
    if isinstance(value, str):
        return (text(value, key),)
    return list_of(text)(value, key)


def _path_or_auto(value: Any, key: str) -> str | None:
    return None if value in (None, "", "none") else text(str(value), key)


def _variant_options(value: Any, key: str) -> dict[str, dict[str, Any]]:
    from lab.quantization import check_variant_options  # lazily: it imports torch and transformers

    return check_variant_options(value, key)


def _runs(value: Any, key: str) -> Any:
    return value  # lab.run_selection.parse_runs checks runs / run_tags / run_latest together, with their forms


@dataclasses.dataclass(frozen=True)
class ModelSettings(Node):
    """Which model, on which device: the settings every model tool shares."""

    model_path: str | None = field(_model_path)
    device: str = field(text)
    dtype: str = field(text)
    tokenizer_path: str | None = field(optional(text))


@dataclasses.dataclass(frozen=True)
class RunSelectionSettings(ModelSettings):
    """`runs=experiment:<name>` instead of model_path (lab/run_selection.py)."""

    runs: Any = field(_runs)
    run_tags: Any = field(_runs)
    run_latest: Any = field(_runs)


# -- lab.generate ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerateSettings(ModelSettings):
    prompt: str | None = field(lambda value, key: None if value is None else str(value))
    prompt_file: str | None = field(optional(text))
    prepend_eos: bool = field(boolean)
    seed: int = field(integer(0))
    # lab.sampling.Sampling from the root's decoding keys (max_new_tokens, temperature, ...), set by from_config
    sampling: Any = dataclasses.field(default=None, metadata={"derived": True})

    @classmethod
    def from_config(cls, cfg: Any) -> "GenerateSettings":
        from lab.sampling import Sampling

        parsed = cls.parse(cfg, "")
        return dataclasses.replace(parsed, sampling=Sampling.from_config(cfg))


# -- lab.quantize ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizeSettings(RunSelectionSettings):
    variants: Any = field(_variants)
    output_dir: str | None = field(optional(text))
    # {variant: {knob: value}}, every knob of every variant stated (lab.quantization.check_variant_options)
    variant_options: Mapping[str, Mapping[str, Any]] = field(_variant_options)

    @classmethod
    def from_config(cls, cfg: Any) -> "QuantizeSettings":
        return cls.parse(cfg, "")


# -- lab.evaluate (and lab.bench_eval) --------------------------------------------------------------------------------


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
    variants: Any = field(_variants)
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


SETTINGS: dict[str, Any] = {"generate": GenerateSettings, "quantize": QuantizeSettings, "evaluate": EvaluateSettings}


def parse_settings(command: str, cfg: Any) -> Any:
    """The typed settings of `command` from its composed config (already parsed settings pass through)."""
    kind = SETTINGS[command]
    return cfg if isinstance(cfg, kind) else kind.from_config(cfg)


def settings_for(command: str, overrides: list[str] | tuple[str, ...] = (), **values: Any) -> Any:
    """conf/<command>.yaml composed with Hydra `overrides`, then `values` merged on top (nested mappings merge;
    a key the YAML does not have is refused), parsed. Inside a running Hydra job (lab.bench_eval) the job's own
    HydraConfig is put back afterwards."""
    from hydra.core.hydra_config import HydraConfig

    from lab.compose import compose_config

    job = HydraConfig.instance().cfg
    try:
        try:
            cfg = compose_config(command, list(overrides))
        except Exception as err:  # noqa: BLE001 - Hydra's own message names the bad override
            raise LabError(f"cannot compose conf/{command}.yaml with {list(overrides)}: "
                           f"{str(err).strip().splitlines()[0]}") from None
        if values:
            try:
                cfg = OmegaConf.merge(cfg, values)
            except Exception as err:  # noqa: BLE001 - omegaconf's key/validation errors, as one line
                raise LabError(f"{command} settings {sorted(values)}: {str(err).splitlines()[0]}") from None
        return parse_settings(command, cfg)
    finally:
        if job is not None:
            HydraConfig.instance().cfg = job
