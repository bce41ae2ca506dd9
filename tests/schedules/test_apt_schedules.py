"""APT schedules: cadence, cubic density, growth and distillation weight."""

import numpy as np
import pytest

from jaxprune.schedules import _apt


def test_pruning_steps_matches_reference():
    assert _apt.pruning_steps(100, num_pruning_steps=10, end_fraction=0.7) == tuple(range(7, 71, 7))
    assert _apt.pruning_steps(50, num_pruning_steps=2, start_fraction=0.2, end_fraction=0.6) == (
        20,
        30,
    )


@pytest.mark.parametrize(
    'kwargs', [{'num_pruning_steps': 0}, {'end_fraction': 0.0}, {'num_pruning_steps': 90}]
)
def test_pruning_steps_rejects_bad_windows(kwargs):
    with pytest.raises(ValueError):
        _apt.pruning_steps(100, **kwargs)


def test_cubic_density_matches_reference():
    sched = _apt.cubic_density(0.4, begin_step=10, end_step=110)
    for t in [0, 10, 35, 60, 110, 200]:
        frac = min(max((t - 10) / 100, 0.0), 1.0)
        want = 0.4 + 0.6 * (1 - frac) ** 3
        np.testing.assert_allclose(sched(t), want, rtol=1e-6)
    with pytest.raises(ValueError):
        _apt.cubic_density(0.0, begin_step=0, end_step=1)


def test_stepwise_density_is_monotone_and_hits_target():
    steps = _apt.pruning_steps(100, num_pruning_steps=5)
    sched = _apt.stepwise_density(0.7, steps)
    cubic = _apt.cubic_density(0.7, begin_step=2 * steps[0] - steps[1], end_step=steps[-1])
    values = np.array([float(sched(t)) for t in range(101)])
    assert np.all(np.diff(values) <= 1e-7)
    for s in steps:
        # At a pruning step the target is the cubic value there (float32: rtol 1e-6).
        np.testing.assert_allclose(values[s], cubic(s), rtol=1e-6)
        np.testing.assert_allclose(values[s - 1], cubic(s), rtol=1e-6)
    np.testing.assert_allclose(values[steps[-1] :], 0.7, rtol=1e-6)
    assert values[0] < 1.0  # the first interval already moves towards the first budget


def test_tuning_growth_and_distill_weight():
    steps = (10, 20, 30)
    grow = _apt.tuning_growth(8.0, steps)
    np.testing.assert_allclose(
        [grow(0), grow(10), grow(20), grow(30), grow(99)], [8, 8, 20, 32, 32], rtol=1e-6
    )
    mu = _apt.distill_weight(steps)
    np.testing.assert_allclose([mu(0), mu(15), mu(30), mu(99)], [0, 0.5, 1, 1], rtol=1e-6)
