"""Learning-rate schedules as multipliers of the peak lr, computed from the step budget.

Both shapes are derived from the token budget (curriculum.stages -> optimizer steps), never from
hard-coded step counts: the same config trains a tiny demo and the full 5.6B-token run.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from lab import LabError


def warmup_steps(cfg: Mapping[str, Any], total_steps: int, tokens_per_step: int) -> int:
    if cfg.get("warmup_tokens"):
        return max(1, math.ceil(cfg["warmup_tokens"] / tokens_per_step))
    return max(1, math.ceil(cfg.get("warmup_fraction", 0.0) * total_steps))


def lr_multiplier(cfg: Mapping[str, Any], total_steps: int, tokens_per_step: int,
                  stage_names: Sequence[str] = (), stage_bounds: Sequence[int] = ()) -> Callable[[int], float]:
    """step -> lr / peak lr for the configured schedule (`cosine` or `wsd`)."""
    name = cfg.get("name", "cosine")
    warmup = min(warmup_steps(cfg, total_steps, tokens_per_step), max(1, total_steps - 1))
    floor = float(cfg.get("min_lr_ratio", 0.0))

    def ramp(step: int) -> float | None:
        return (step + 1) / warmup if step < warmup else None

    if name == "cosine":
        def cosine(step: int) -> float:
            up = ramp(step)
            if up is not None:
                return up
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return cosine

    if name == "wsd":
        decay_start, decay_end = _decay_window(cfg, total_steps, stage_names, stage_bounds)
        decay_start = max(decay_start, warmup)
        shape = cfg.get("decay_shape", "linear")

        def wsd(step: int) -> float:
            up = ramp(step)
            if up is not None:
                return up
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, decay_end - decay_start))
            if shape == "cosine":
                fall = 0.5 * (1 + math.cos(math.pi * progress))
            elif shape == "sqrt":
                fall = 1 - math.sqrt(progress)
            else:
                fall = 1 - progress
            return floor + (1 - floor) * fall
        return wsd

    raise LabError(f"unknown scheduler.name {name!r}: expected cosine or wsd")


def _decay_window(cfg: Mapping[str, Any], total_steps: int, stage_names: Sequence[str],
                  stage_bounds: Sequence[int]) -> tuple[int, int]:
    stage = cfg.get("decay_stage")
    if stage:
        if stage not in stage_names:
            raise LabError(f"scheduler.decay_stage={stage!r} is not a curriculum stage ({list(stage_names)})")
        index = list(stage_names).index(stage)
        return int(stage_bounds[index]), int(stage_bounds[index + 1])
    fraction = float(cfg.get("decay_fraction", 0.2))
    return int(round(total_steps * (1 - fraction))), total_steps
