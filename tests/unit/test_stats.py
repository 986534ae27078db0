"""experiments/stats.py: mean and spread over seeds, and the paired t-interval against the
target that `osmd compare` reports (PAIRED_TEST)."""

from __future__ import annotations

import math

import pytest

from osmd_ray.experiments.stats import (
    HEADLINE_SEEDS,
    PAIRED_TEST,
    Stat,
    paired_difference,
    paired_differences,
)


def test_stat_is_mean_and_sample_std():
    stat = Stat.of([0.6, 0.7, 0.8])
    assert stat.mean == pytest.approx(0.7)
    assert stat.std == pytest.approx(0.1)  # sample std (n - 1)
    assert stat.n == 3
    assert stat.fmt() == "0.7000 ± 0.1000"
    one = Stat.of([0.5])
    assert one.n == 1 and math.isnan(one.std) and one.fmt() == "0.5000 (1 seed)"
    assert Stat.of([]).fmt() == "n/a"


def test_paired_interval_matches_a_hand_computed_example():
    # Differences 1, 2, 3, 4, 5: mean 3, sample std sqrt(2.5), t(0.975, df 4) = 2.7764, so
    # the half-width is 2.7764 * sqrt(2.5) / sqrt(5) = 1.9632.
    target = {seed: 10.0 * seed for seed in range(5)}
    variant = {seed: 10.0 * seed + seed + 1 for seed in range(5)}
    diff = paired_difference(variant, target)
    assert diff.n == 5
    assert diff.mean == pytest.approx(3.0)
    assert diff.std == pytest.approx(math.sqrt(2.5))
    lo, hi = diff.interval
    assert lo == pytest.approx(3.0 - 1.9632, abs=1e-4)
    assert hi == pytest.approx(3.0 + 1.9632, abs=1e-4)
    assert diff.excludes_zero is True


def test_two_seeds_use_the_t_quantile_of_one_degree_of_freedom():
    # t(0.975, df 1) = 12.7062, far wider than the normal 1.96: two seeds say little.
    lo, hi = Stat.of([1.0, 2.0]).interval
    half = 12.7062 * math.sqrt(0.5) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((1.5 - half, 1.5 + half), abs=1e-4)


def test_an_interval_containing_zero_is_not_a_difference():
    diff = Stat.of([-0.02, 0.01, 0.03])
    lo, hi = diff.interval
    assert lo < 0 < hi and diff.excludes_zero is False
    assert Stat.of([-0.3, -0.29, -0.31]).excludes_zero is True  # wholly below 0


def test_pairing_is_by_seed_and_drops_unmatched_seeds():
    variant = {0: 0.7, 1: 0.8, 2: 0.9, 5: 0.5, 6: None}
    target = {1: 0.75, 0: 0.6, 2: 0.8, 3: 1.0, 6: 0.7, 5: math.nan}
    # Seeds 0, 1, 2 in seed order; 3 (target only) and 5, 6 (a value missing) left out.
    assert paired_differences(variant, target) == pytest.approx([0.1, 0.05, 0.1])
    diff = paired_difference(variant, target)
    assert diff.n == 3 and diff.mean == pytest.approx(0.25 / 3)


def test_fewer_than_two_paired_seeds_are_not_judged():
    one = paired_difference({0: 0.7, 1: 0.8}, {1: 0.6})
    assert one.n == 1 and one.mean == pytest.approx(0.2)
    assert all(math.isnan(v) for v in one.interval) and one.excludes_zero is None
    none = paired_difference({0: 0.7}, {1: 0.6})
    assert none.n == 0 and all(math.isnan(v) for v in none.interval)
    assert none.excludes_zero is None


def test_the_test_is_stated_once():
    assert "paired t-interval over seeds, 95%, two-sided" in PAIRED_TEST
    assert "not judged" in PAIRED_TEST and HEADLINE_SEEDS == 5
