"""Schedule shapes, computed from the step budget and the curriculum's stage boundaries."""

import dataclasses

import pytest

from lab import LabError
from lab.config.compose import compose_config
from lab.data.step_budget import StepSchedule
from lab.training.schedules import lr_multiplier
from lab.training.settings import Scheduler, WsdScheduler


def cosine(**fields) -> Scheduler:
    """The shipped conf/scheduler/cosine.yaml, parsed as lab.train parses it, with `fields` replaced."""
    shipped = Scheduler.parse(compose_config("train", ["scheduler=cosine"]).scheduler, "scheduler")
    return dataclasses.replace(shipped, **fields)


def wsd(**fields) -> WsdScheduler:
    shipped = WsdScheduler.parse(compose_config("train", ["scheduler=wsd"]).scheduler, "scheduler")
    return dataclasses.replace(shipped, **fields)


def test_cosine_warms_up_peaks_and_decays_to_the_floor():
    f = lr_multiplier(cosine(warmup_fraction=0.1, min_lr_ratio=0.1), 100, 1000)
    values = [f(s) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # 10 warmup steps, linear
    assert all(a < b for a, b in zip(values[:9], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay after warmup
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert values[100] == pytest.approx(0.1)


def test_warmup_in_tokens_wins_over_the_fraction():
    f = lr_multiplier(cosine(warmup_fraction=0.5, warmup_tokens=4000.0), 100, 1000)
    assert f(3) == pytest.approx(1.0) and f(2) == pytest.approx(0.75)


def test_wsd_decays_exactly_over_the_books_stage():
    f = lr_multiplier(wsd(warmup_fraction=0.05, decay_stage="books", min_lr_ratio=0.0), 100, 1000,
                      ["web", "books"], [0, 70, 100])
    assert f(0) < f(3) < 1.0 and f(4) == 1.0  # 5 warmup steps
    assert all(f(s) == 1.0 for s in range(5, 71))  # stable through the whole web stage
    assert f(85) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)


def test_wsd_by_fraction_and_unknown_names():
    f = lr_multiplier(wsd(warmup_fraction=0.0, decay_stage=None, decay_fraction=0.2, decay_shape="cosine"), 100, 1000)
    assert f(79) == 1.0 and f(90) == pytest.approx(0.5)
    with pytest.raises(LabError, match="decay_stage"):
        lr_multiplier(wsd(decay_stage="poems"), 100, 1000, ["web", "books"], [0, 50, 100])
    with pytest.raises(LabError, match="scheduler.name"):
        lr_multiplier(cosine(name="linear"), 100, 1000)
    with pytest.raises(LabError, match="scheduler.name"):  # wsd without its decay settings
        lr_multiplier(cosine(name="wsd"), 100, 1000)


def test_the_config_picks_the_schedule_class_and_refuses_bad_values():
    from lab.training.settings import TrainSettings

    assert type(TrainSettings.from_config(compose_config("train", ["scheduler=wsd"])).scheduler) is WsdScheduler
    assert type(TrainSettings.from_config(compose_config("train", [])).scheduler) is Scheduler
    for override, message in [("scheduler.decay_shape=cubic", "scheduler.decay_shape='cubic'"),
                              ("scheduler.warmup_fraction=1.5", "scheduler.warmup_fraction=1.5"),
                              ("~scheduler.decay_fraction", "scheduler.decay_fraction is missing")]:
        with pytest.raises(LabError, match=message):
            TrainSettings.from_config(compose_config("train", ["scheduler=wsd", override]))


def test_stage_lookup_by_step():
    plan = StepSchedule(total_steps=100, tokens_per_step=512, stage_names=["web", "books"], stage_bounds=[0, 70, 100],
                        stage_sources=[["web"], ["books"]])
    assert [plan.stage_at(s) for s in (0, 69, 70, 99, 100, 500)] == [0, 0, 1, 1, 1, 1]
    assert [plan.stage_ending_at(s) for s in (0, 69, 70, 99, 100)] == [None, None, 0, None, 1]
    assert plan.record() == {"total_steps": 100, "tokens_per_step": 512, "stage_names": ["web", "books"],
                             "stage_bounds": [0, 70, 100], "stage_sources": [["web"], ["books"]]}
