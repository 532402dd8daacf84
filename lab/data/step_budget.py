"""The step budget of a run: the curriculum turned into optimizer steps (stage boundaries, total, tokens per step),
known once the world size is. It comes from the token budget (curriculum.stages -> optimizer steps), never from
hard-coded step counts: the same config trains a tiny demo and the full 5.6B-token run. The lr schedule over it:
lab/training/schedules.py."""

from __future__ import annotations

import dataclasses
from typing import Any

@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """Optimizer steps of a run: stage i covers the global steps [stage_bounds[i], stage_bounds[i + 1])."""

    total_steps: int                       # the curriculum's steps, or fewer when trainer.max_steps cuts it
    tokens_per_step: int
    stage_names: list[str]
    stage_bounds: list[int]                # [0, end of stage 0, ..., end of the curriculum]
    stage_sources: list[list[str]]         # the sources each stage trains on (val/<source>/forgetting)

    def stage_at(self, global_step: int) -> int:
        """The stage that trains at `global_step` (the last one from its end on)."""
        for index in range(len(self.stage_names)):
            if global_step < self.stage_bounds[index + 1]:
                return index
        return len(self.stage_names) - 1

    def stage_ending_at(self, global_step: int) -> int | None:
        """The stage whose last step is `global_step - 1`, if one ends there."""
        ends = self.stage_bounds[1:]
        return ends.index(global_step) if global_step in ends else None

    def record(self) -> dict[str, Any]:
        """Plain containers for the checkpoint's hyper-parameters (loadable with weights_only=True)."""
        return dataclasses.asdict(self)
