"""The step budget of a run and the learning-rate schedule over it.

`StepSchedule` is the curriculum turned into optimizer steps (stage boundaries, total, tokens per step), known
once the world size is; `lr_multiplier` shapes the lr over it. Both come from the token budget
(curriculum.stages -> optimizer steps), never from hard-coded step counts: the same config trains a tiny demo
and the full 5.6B-token run.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from lab import LabError
from lab.training.settings import Scheduler, WsdScheduler


def warmup_steps(scheduler: Scheduler, total_steps: int, tokens_per_step: int) -> int:
    if scheduler.warmup_tokens:
        return max(1, math.ceil(scheduler.warmup_tokens / tokens_per_step))
    return max(1, math.ceil(scheduler.warmup_fraction * total_steps))


def lr_multiplier(scheduler: Scheduler, total_steps: int, tokens_per_step: int,
                  stage_names: Sequence[str] = (), stage_bounds: Sequence[int] = ()) -> Callable[[int], float]:
    """step -> lr / peak lr for the configured schedule (`cosine` or `wsd`)."""
    warmup = min(warmup_steps(scheduler, total_steps, tokens_per_step), max(1, total_steps - 1))
    floor = float(scheduler.min_lr_ratio)

    def ramp(step: int) -> float | None:
        return (step + 1) / warmup if step < warmup else None

    if scheduler.name == "cosine":
        def cosine(step: int) -> float:
            up = ramp(step)
            if up is not None:
                return up
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return cosine

    if scheduler.name == "wsd" and isinstance(scheduler, WsdScheduler):
        decay_start, decay_end = _decay_window(scheduler, total_steps, stage_names, stage_bounds)
        decay_start = max(decay_start, warmup)

        def wsd(step: int) -> float:
            up = ramp(step)
            if up is not None:
                return up
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, decay_end - decay_start))
            if scheduler.decay_shape == "cosine":
                fall = 0.5 * (1 + math.cos(math.pi * progress))
            elif scheduler.decay_shape == "sqrt":
                fall = 1 - math.sqrt(progress)
            else:
                fall = 1 - progress
            return floor + (1 - floor) * fall
        return wsd

    raise LabError(f"unknown scheduler.name {scheduler.name!r}: expected cosine or wsd (with its decay_* settings)")


def _decay_window(scheduler: WsdScheduler, total_steps: int, stage_names: Sequence[str],
                  stage_bounds: Sequence[int]) -> tuple[int, int]:
    stage = scheduler.decay_stage
    if stage:
        if stage not in stage_names:
            raise LabError(f"scheduler.decay_stage={stage!r} is not a curriculum stage ({list(stage_names)})")
        index = list(stage_names).index(stage)
        return int(stage_bounds[index]), int(stage_bounds[index + 1])
    return int(round(total_steps * (1 - scheduler.decay_fraction))), total_steps
