"""Bootstrap confidence intervals of the IQM / mean (rlcx_jax.logging.bootstrap_ci)."""

import numpy as np
import pytest
from scipy import stats

from rlcx_jax.logging import bootstrap_ci, iqm


def _iqm_reference(x: np.ndarray) -> float:
    """rliable's IQM: scipy's 25%-trimmed mean (cuts floor(n / 4) values from each end)."""
    return float(stats.trim_mean(np.ravel(x), proportiontocut=0.25))


def _reference(x, statistic, num_resamples, confidence, seed):
    """Plain loop over resamples with the same random draws as the vectorised version."""
    x = np.asarray(x, np.float64)
    x = x[:, None] if x.ndim == 1 else x
    runs, tasks = x.shape
    stat = _iqm_reference if statistic == "iqm" else np.mean
    idx = np.random.default_rng(seed).integers(0, runs, size=(num_resamples, runs, tasks))
    values = []
    for b in range(num_resamples):
        sample = np.stack([x[idx[b, :, t], t] for t in range(tasks)], axis=1)
        values.append(stat(sample.ravel()))
    alpha = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [alpha, 100 - alpha])
    return stat(x.ravel()), lo, hi


@pytest.mark.parametrize("statistic", ["iqm", "mean"])
@pytest.mark.parametrize("shape", [(8,), (10, 3)])
def test_matches_loop_reference(statistic, shape):
    x = np.random.default_rng(1).normal(size=shape) * 50 + 400
    got = bootstrap_ci(x, statistic, num_resamples=300, confidence=0.9, seed=7)
    want = _reference(x, statistic, 300, 0.9, 7)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("n", [4, 5, 6, 7, 8, 9, 10, 31, 32, 33])
def test_iqm_is_the_25_percent_trimmed_mean(n):
    x = np.random.default_rng(n).normal(size=n) ** 3  # skewed, so trimming the wrong count shows
    assert iqm(x) == pytest.approx(_iqm_reference(x), rel=1e-12)


def test_hand_cases():
    point, lo, hi = bootstrap_ci(np.full(8, 500.0))
    assert (point, lo, hi) == (500.0, 500.0, 500.0)
    # IQM of 8 values = mean of the middle 4 (indices 2..5 after sorting).
    x = np.array([0.0, 1, 2, 3, 4, 5, 6, 100])
    point, lo, hi = bootstrap_ci(x, "iqm", seed=0)
    assert point == pytest.approx(3.5)
    assert lo <= point <= hi and 0.0 <= lo and hi <= 100.0
    assert bootstrap_ci(x, "mean")[0] == pytest.approx(x.mean())


def test_reproducible_and_validated():
    x = np.random.default_rng(2).normal(size=8)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    wide = bootstrap_ci(x, confidence=0.99, seed=3)
    narrow = bootstrap_ci(x, confidence=0.5, seed=3)
    assert wide[1] <= narrow[1] and narrow[2] <= wide[2]
    with pytest.raises(ValueError):
        bootstrap_ci(x, statistic="median")
    with pytest.raises(ValueError):
        bootstrap_ci(np.zeros((0,)))
