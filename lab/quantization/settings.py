"""Typed, checked settings of lab.quantize, parsed once from the composed conf/quantize.yaml before any model
loads. As everywhere (lab/config/checks.py), defaults live in the YAML only."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lab.config.checks import field, optional, text
from lab.models.quant_formats import check_variant_list, check_variant_options
from lab.runs.selection import RunSelectionSettings


@dataclasses.dataclass(frozen=True)
class QuantizeSettings(RunSelectionSettings):
    config_name = "quantize"  # conf/quantize.yaml (settings_for)
    variants: Any = field(check_variant_list)
    output_dir: str | None = field(optional(text))
    # {variant: {knob: value}}, every knob of every variant stated (check_variant_options)
    variant_options: Mapping[str, Mapping[str, Any]] = field(check_variant_options)

    @classmethod
    def from_config(cls, cfg: Any) -> "QuantizeSettings":
        return cls.parse(cfg, "")
