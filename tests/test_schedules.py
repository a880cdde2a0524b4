"""KL-weight schedules: the value of beta (and C) at the steps that define each schedule."""
from __future__ import annotations

import pytest

from vae import Schedule, TrainConfig, make_schedule


def test_constant():
    s = Schedule("constant", beta_max=2.5)
    assert [s.beta(t) for t in (0, 1, 10**6)] == [2.5, 2.5, 2.5]
    assert s.capacity(10) is None


def test_linear_warmup():
    """Bowman et al. 2016: beta * min(1, step / warmup)."""
    s = Schedule("linear", beta_max=2.0, warmup_steps=100)
    assert s.beta(0) == 0.0
    assert s.beta(25) == pytest.approx(0.5)
    assert s.beta(50) == pytest.approx(1.0)
    assert s.beta(100) == 2.0
    assert s.beta(1000) == 2.0


def test_logistic_warmup():
    """1 / (1 + exp(-k (step - warmup / 2))): beta/2 at the midpoint, near 0 at the start, near beta at the end."""
    s = Schedule("logistic", beta_max=4.0, warmup_steps=200)
    assert s.beta(100) == pytest.approx(2.0)
    assert s.beta(0) < 0.05 * 4.0
    assert s.beta(200) > 0.95 * 4.0
    values = [s.beta(t) for t in range(0, 401, 10)]
    assert values == sorted(values)  # monotone
    assert s.beta(10**6) == pytest.approx(4.0)


def test_cyclical_fu_et_al():
    """Fu et al. 2019 with M = 4 cycles and R = 0.5 over 400 steps: each 100-step cycle rises linearly from 0 to
    beta over its first 50 steps, then holds beta."""
    s = Schedule("cyclical", beta_max=1.0, total_steps=400, cycles=4, ratio=0.5)
    for start in (0, 100, 200, 300):
        assert s.beta(start) == 0.0  # every cycle restarts at 0
        assert s.beta(start + 25) == pytest.approx(0.5)
        assert s.beta(start + 50) == pytest.approx(1.0)
        assert s.beta(start + 75) == 1.0
        assert s.beta(start + 99) == 1.0
    beta_max = Schedule("cyclical", beta_max=3.0, total_steps=400, cycles=4, ratio=0.5)
    assert beta_max.beta(125) == pytest.approx(1.5)


def test_capacity_ramp():
    """Burgess et al. 2018: C rises linearly from 0 to C_max over the warm-up; beta plays gamma and is constant."""
    s = Schedule("capacity", beta_max=1000.0, warmup_steps=100, capacity_max=25.0)
    assert s.capacity(0) == 0.0
    assert s.capacity(50) == pytest.approx(12.5)
    assert s.capacity(100) == 25.0
    assert s.capacity(500) == 25.0
    assert all(s.beta(t) == 1000.0 for t in (0, 50, 100, 500))


def test_only_capacity_has_a_capacity():
    for kind in ("constant", "linear", "logistic", "cyclical"):
        assert Schedule(kind).capacity(5) is None


def test_make_schedule_converts_epochs_to_steps():
    cfg = TrainConfig(epochs=10, beta=2.0, beta_schedule="linear", warmup_epochs=2.5, cycles=5, cycle_ratio=0.25,
                      capacity_max=7.0)
    s = make_schedule(cfg, steps_per_epoch=12)
    assert (s.kind, s.beta_max, s.warmup_steps, s.total_steps) == ("linear", 2.0, 30, 120)
    assert (s.cycles, s.ratio, s.capacity_max) == (5, 0.25, 7.0)
    assert s.beta(15) == pytest.approx(1.0)  # half-way through 2.5 epochs of 12 steps

    cyc = make_schedule(TrainConfig(epochs=4, beta_schedule="cyclical", cycles=4, cycle_ratio=0.5), 10)
    assert cyc.total_steps == 40
    assert [cyc.beta(t) for t in (0, 5, 9, 10, 15)] == pytest.approx([0.0, 1.0, 1.0, 0.0, 1.0])

    # very short warm-ups still give at least one step
    assert make_schedule(TrainConfig(warmup_epochs=0.01), 3).warmup_steps == 1


def test_invalid_schedules():
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedule("linear", warmup_steps=0)
    with pytest.raises(ValueError, match="beta_schedule"):
        Schedule("exponential").beta(0)


@pytest.mark.parametrize("kind", ["constant", "linear", "logistic", "cyclical", "capacity"])
def test_describe_mentions_beta(kind):
    s = Schedule(kind, beta_max=3.0)
    assert "3" in s.describe()
