"""Which model, on which device: the settings every model tool (lab.generate, lab.quantize, lab.evaluate) shares.
As everywhere (lab/config/checks.py), defaults live in the YAML only."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lab.config.checks import Node, field, optional, text

_MISSING = "???"  # Hydra's mandatory value: model_path not given


def _model_path(value: Any, key: str) -> str | None:
    if value in (None, "", _MISSING):
        return None  # checked with runs= by lab.runs.selection.selection_from_config
    return text(str(value) if not isinstance(value, (Mapping, list, tuple, bool)) else value, key)


@dataclasses.dataclass(frozen=True)
class ModelSettings(Node):
    """Which model, on which device: the settings every model tool shares."""

    model_path: str | None = field(_model_path)
    device: str = field(text)
    dtype: str = field(text)
    tokenizer_path: str | None = field(optional(text))
