"""Schedule shapes, computed from the step budget and the curriculum's stage boundaries."""

import pytest

from lab import LabError
from lab.schedules import lr_multiplier


def test_cosine_warms_up_peaks_and_decays_to_the_floor():
    f = lr_multiplier({"name": "cosine", "warmup_fraction": 0.1, "min_lr_ratio": 0.1}, 100, 1000)
    values = [f(s) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # 10 warmup steps, linear
    assert all(a < b for a, b in zip(values[:9], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay after warmup
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert values[100] == pytest.approx(0.1)


def test_warmup_in_tokens_wins_over_the_fraction():
    f = lr_multiplier({"name": "cosine", "warmup_fraction": 0.5, "warmup_tokens": 4000}, 100, 1000)
    assert f(3) == pytest.approx(1.0) and f(2) == pytest.approx(0.75)


def test_wsd_decays_exactly_over_the_books_stage():
    cfg = {"name": "wsd", "warmup_fraction": 0.05, "decay_stage": "books", "min_lr_ratio": 0.0}
    f = lr_multiplier(cfg, 100, 1000, ["web", "books"], [0, 70, 100])
    assert f(0) < f(3) < 1.0 and f(4) == 1.0  # 5 warmup steps
    assert all(f(s) == 1.0 for s in range(5, 71))  # stable through the whole web stage
    assert f(85) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0)


def test_wsd_by_fraction_and_unknown_names():
    f = lr_multiplier({"name": "wsd", "warmup_fraction": 0.0, "decay_stage": None, "decay_fraction": 0.2,
                       "decay_shape": "cosine"}, 100, 1000)
    assert f(79) == 1.0 and f(90) == pytest.approx(0.5)
    with pytest.raises(LabError, match="decay_stage"):
        lr_multiplier({"name": "wsd", "decay_stage": "poems"}, 100, 1000, ["web", "books"], [0, 50, 100])
    with pytest.raises(LabError, match="scheduler.name"):
        lr_multiplier({"name": "linear"}, 100, 1000)
