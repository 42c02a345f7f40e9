"""vsink.evaluate.stats against scipy's own bootstrap and binomial test, and against hand computation."""

import math

import numpy as np
import pytest
import scipy.stats

from vsink.errors import VsinkError
from vsink.evaluate.stats import (Bootstrap, binomial_cdf, bootstrap, excludes_zero, mcnemar, mcnemar_exact,
                                  paired_bootstrap, ratio)


def mean_of(t):
    return ratio(t[..., 0], t[..., 1])[..., None]


def as_units(x):
    return np.c_[x, np.ones_like(x)]


@pytest.mark.parametrize("level,resamples,seed", [(0.95, 1000, 0), (0.9, 250, 7), (0.8, 333, 123)])
def test_interval_equals_scipy_percentile_bootstrap(level, resamples, seed):
    # scipy.stats.bootstrap(method="percentile") draws rng.integers(0, n, (resamples, n)) from the
    # same generator and takes numpy percentiles: a mean over continuous values must agree to float
    # rounding (333 resamples also crosses the 100-resample chunks of vsink's draw)
    x = np.random.default_rng(99).normal(size=37)
    iv = bootstrap(as_units(x), mean_of, Bootstrap(level, resamples, seed))
    ref = scipy.stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                                rng=np.random.default_rng(seed), vectorized=True, axis=-1)
    assert iv.value[0] == pytest.approx(x.mean())
    assert iv.low[0] == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert iv.high[0] == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    assert iv.n == 37


def test_paired_interval_equals_scipy_paired_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.normal(size=41)
    b = a + 0.3 + rng.normal(scale=0.5, size=41)
    iv = paired_bootstrap(as_units(a), as_units(b), mean_of, Bootstrap(0.95, 500, 11))
    ref = scipy.stats.bootstrap((a, b), lambda u, v, axis=-1: v.mean(axis) - u.mean(axis), paired=True,
                                n_resamples=500, confidence_level=0.95, method="percentile",
                                rng=np.random.default_rng(11), vectorized=True)
    assert iv.value[0] == pytest.approx(b.mean() - a.mean())
    assert iv.low[0] == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert iv.high[0] == pytest.approx(ref.confidence_interval.high, abs=1e-12)


def test_ratio_of_sums_resamples_whole_units():
    # CHAIR_i-like: each unit (image) has mentions and hallucinated mentions; the statistic is the
    # ratio of the sums. Equal to scipy's bootstrap of the same ratio over unit indices.
    halluc = np.array([0, 1, 0, 2, 0, 0, 1, 0, 3, 0, 0, 1])
    mentions = np.array([2, 3, 1, 4, 2, 1, 2, 3, 5, 1, 2, 2])
    iv = bootstrap(np.c_[halluc, mentions], mean_of, Bootstrap(0.95, 400, 5))
    ref = scipy.stats.bootstrap((np.arange(12),), lambda i, axis=-1: halluc[i].sum(axis) / mentions[i].sum(axis),
                                n_resamples=400, method="percentile", rng=np.random.default_rng(5), vectorized=True)
    assert iv.value[0] == pytest.approx(8 / 28)
    assert (iv.low[0], iv.high[0]) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_constant_data_has_a_zero_width_interval():
    # every resample of identical units gives the same value
    iv = bootstrap(as_units(np.ones(9)), mean_of)
    assert (iv.value[0], iv.low[0], iv.high[0]) == (1.0, 1.0, 1.0)
    same = paired_bootstrap(as_units(np.arange(9.0)), as_units(np.arange(9.0)), mean_of)
    assert (same.value[0], same.low[0], same.high[0]) == (0.0, 0.0, 0.0)


def test_two_units_bootstrap_distribution_by_hand():
    # units 1 and 0: a resample is {1,1} (1/4), {1,0} or {0,1} (1/2), {0,0} (1/4), so the mean is
    # 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4; the 95 % interval's ends are the 2.5 % and 97.5 %
    # quantiles of that distribution: 0 and 1. An 80 % interval (10 % and 90 %) is again 0 and 1,
    # a 40 % one (30 % and 70 %) is 0.5 and 0.5.
    units = as_units(np.array([1.0, 0.0]))
    wide = bootstrap(units, mean_of, Bootstrap(0.95, 20000, 1))
    assert (wide.low[0], wide.high[0]) == (0.0, 1.0)
    narrow = bootstrap(units, mean_of, Bootstrap(0.4, 20000, 1))
    assert (narrow.low[0], narrow.high[0]) == (0.5, 0.5)


def test_seed_fixes_the_interval():
    x = as_units(np.random.default_rng(0).normal(size=30))
    a, b = bootstrap(x, mean_of, Bootstrap(seed=4)), bootstrap(x, mean_of, Bootstrap(seed=4))
    c = bootstrap(x, mean_of, Bootstrap(seed=5))
    assert (a.low[0], a.high[0]) == (b.low[0], b.high[0])
    assert (a.low[0], a.high[0]) != (c.low[0], c.high[0])


def test_interval_width_near_the_normal_approximation():
    # 400 coin flips with 200 heads: the 95 % interval of the proportion is about
    # 0.5 ± 1.96 * sqrt(0.25 / 400) = 0.5 ± 0.049
    x = np.array([1.0, 0.0] * 200)
    iv = bootstrap(as_units(x), mean_of, Bootstrap(resamples=4000))
    assert iv.low[0] == pytest.approx(0.451, abs=0.01)
    assert iv.high[0] == pytest.approx(0.549, abs=0.01)


@pytest.mark.parametrize("b,c", [(1, 6), (6, 1), (3, 3), (10, 2), (0, 7), (25, 40), (0, 1), (120, 95)])
def test_mcnemar_equals_scipy_binomtest(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-12)


def test_mcnemar_by_hand():
    # b = 1, c = 6: n = 7, P[X <= 1] = (C(7,0) + C(7,1)) / 2^7 = 8/128, p = 2 * 8/128 = 0.125
    assert binomial_cdf(1, 7) == 8 / 128
    assert mcnemar_exact(1, 6) == 0.125
    # b = c: the cdf at the middle is at least 1/2, p is capped at 1; no discordant pair: p = 1
    assert mcnemar_exact(2, 2) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    # b = 0, c = 5: p = 2 / 32
    assert mcnemar_exact(0, 5) == 2 / 32
    with pytest.raises(VsinkError):
        mcnemar_exact(-1, 2)


def test_mcnemar_counts_discordant_pairs():
    base = [True, True, False, False, True, False, True]
    mitigated = [True, False, True, True, True, True, False]
    # b: right then wrong at 1 and 6; c: wrong then right at 2, 3, 5
    assert mcnemar(base, mitigated) == {"n": 7, "b": 2, "c": 3, "p": 1.0}
    with pytest.raises(VsinkError):
        mcnemar([True], [True, False])


def test_excludes_zero():
    assert excludes_zero(0.1, 0.3) and excludes_zero(-0.3, -0.01)
    assert not excludes_zero(-0.1, 0.2) and not excludes_zero(0.0, 0.2) and not excludes_zero(None, 1.0)


def test_bad_settings_and_units_are_one_line_errors():
    with pytest.raises(VsinkError, match="confidence level"):
        Bootstrap(level=1.0)
    with pytest.raises(VsinkError, match="resamples"):
        Bootstrap(resamples=1)
    with pytest.raises(VsinkError, match="at least one unit"):
        bootstrap(np.zeros((0, 2)), mean_of)
    with pytest.raises(VsinkError, match="do not pair"):
        paired_bootstrap(np.zeros((3, 2)), np.zeros((4, 2)), mean_of)


def test_ratio_is_zero_on_a_zero_denominator():
    assert ratio(np.array([1.0, 0.0]), np.array([4.0, 0.0])).tolist() == [0.25, 0.0]
    assert math.isclose(float(ratio(3, 4)), 0.75)
