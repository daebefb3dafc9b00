"""Return estimators against slow NumPy references, by hand, and under jit / vmap.

The references are written from the formulas (forward sums over each step's window), not from the
backward recursions in `rl.returns`, so the two implementations check each other:

  window end      K(t) = the first k >= t with truncated_k, else T - 1 (the sequence end)
  n-step          G^(n)_t = sum_{j=t}^{k} (prod_{i=t}^{j-1} d_i) r_j + (prod_{i=t}^{k} d_i) v_k,
                  k = min(t + n - 1, K(t))
  lambda-return   G^lambda_t = (1 - l) sum_{n=1}^{N-1} l^{n-1} G^(n)_t + l^{N-1} G^(N)_t,  N = K(t) - t + 1
  GAE             A_t = sum_{j=t}^{K(t)} (prod_{i=t}^{j-1} d_i l) delta_j,  delta_j = r_j + d_j v_j - V(s_j)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax.rl import returns

GAMMA = 0.9
T, B = 17, 4
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Slow references (one sequence, float64)
# ----------------------------------------------------------------------------------------------
def _window_end(trunc: np.ndarray, t: int) -> int:
    for k in range(t, len(trunc)):
        if trunc[k]:
            return k
    return len(trunc) - 1


def ref_n_step(r, d, v, n, trunc=None):
    trunc = np.zeros(len(r), bool) if trunc is None else trunc
    out = np.zeros(len(r))
    for t in range(len(r)):
        k = min(t + n - 1, _window_end(trunc, t))
        g, disc = 0.0, 1.0
        for j in range(t, k + 1):
            g += disc * r[j]
            disc *= d[j]
        out[t] = g + disc * v[k]
    return out


def ref_lambda_returns(r, d, v, lam, trunc=None):
    trunc = np.zeros(len(r), bool) if trunc is None else trunc
    out = np.zeros(len(r))
    for t in range(len(r)):
        big_n = _window_end(trunc, t) - t + 1
        g = 0.0
        for n in range(1, big_n):
            g += (1 - lam) * lam ** (n - 1) * ref_n_step(r, d, v, n, trunc)[t]
        g += lam ** (big_n - 1) * ref_n_step(r, d, v, big_n, trunc)[t]
        out[t] = g
    return out


def ref_discounted(r, d, v=None, trunc=None):
    v = np.zeros(len(r)) if v is None else v
    return ref_lambda_returns(r, d, v, 1.0, trunc)


def ref_gae(r, d, v_tm1, v_t, lam, trunc=None):
    trunc = np.zeros(len(r), bool) if trunc is None else trunc
    delta = r + d * v_t - v_tm1
    out = np.zeros(len(r))
    for t in range(len(r)):
        weight = 1.0
        for j in range(t, _window_end(trunc, t) + 1):
            out[t] += weight * delta[j]
            weight *= d[j] * lam
    return out


def per_column(ref, *arrays, trunc=None, **kwargs):
    """Apply a one-sequence reference to every column of time-major (T, B) arrays."""
    cols = []
    for b in range(arrays[0].shape[1]):
        args = [a[:, b] if a is not None else None for a in arrays]
        cols.append(ref(*args, trunc=None if trunc is None else trunc[:, b], **kwargs))
    return np.stack(cols, axis=1)


# ----------------------------------------------------------------------------------------------
# Random trajectories with terminations AND truncations
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traj():
    rng = np.random.default_rng(0)
    terminated = rng.random((T, B)) < 0.15
    truncated = (rng.random((T, B)) < 0.12) & ~terminated
    # Make sure each kind of episode end occurs, including at the last step and next to each other.
    terminated[3, 0] = True
    truncated[4, 0] = True
    truncated[-1, 1] = True
    terminated[-1, 2] = True
    truncated[-1, 2] = False
    data = dict(
        r=rng.normal(size=(T, B)).astype(np.float32),
        d=(GAMMA * (1.0 - terminated)).astype(np.float32),
        v_tm1=rng.normal(size=(T, B)).astype(np.float32),
        v_t=rng.normal(size=(T, B)).astype(np.float32),
        trunc=truncated,
    )
    assert data["trunc"].any() and (data["d"] == 0).any()
    return data


LAMBDAS = [0.0, 0.5, 0.95, 1.0]


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("with_trunc", [True, False])
def test_gae_matches_reference(traj, lam, with_trunc):
    trunc = traj["trunc"] if with_trunc else None
    got = returns.gae(traj["r"], traj["d"], traj["v_tm1"], traj["v_t"], lam, trunc)
    want = per_column(ref_gae, traj["r"], traj["d"], traj["v_tm1"], traj["v_t"], trunc=trunc, lam=lam)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("with_trunc", [True, False])
def test_lambda_returns_match_reference(traj, lam, with_trunc):
    trunc = traj["trunc"] if with_trunc else None
    got = returns.lambda_returns(traj["r"], traj["d"], traj["v_t"], lam, trunc)
    want = per_column(ref_lambda_returns, traj["r"], traj["d"], traj["v_t"], trunc=trunc, lam=lam)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("n", [1, 2, 3, 5, T + 3])
@pytest.mark.parametrize("with_trunc", [True, False])
def test_n_step_returns_match_reference(traj, n, with_trunc):
    trunc = traj["trunc"] if with_trunc else None
    got = returns.n_step_returns(traj["r"], traj["d"], traj["v_t"], n, trunc)
    want = per_column(ref_n_step, traj["r"], traj["d"], traj["v_t"], trunc=trunc, n=n)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("with_v", [True, False])
@pytest.mark.parametrize("with_trunc", [True, False])
def test_discounted_returns_match_reference(traj, with_v, with_trunc):
    trunc = traj["trunc"] if with_trunc else None
    v = traj["v_t"] if with_v else None
    got = returns.discounted_returns(traj["r"], traj["d"], v, trunc)
    want = per_column(ref_discounted, traj["r"], traj["d"], v, trunc=trunc)
    np.testing.assert_allclose(got, want, **TOL)


def test_reference_identities(traj):
    """Cross-checks between estimators: n >= T n-step = lambda 1 = Monte Carlo with bootstrap;
    n = 1 is the one-step TD target; GAE + V = lambda-return when v_t is the next step's V."""
    r, d, v, trunc = traj["r"], traj["d"], traj["v_t"], traj["trunc"]
    long = returns.n_step_returns(r, d, v, T + 1, trunc)
    np.testing.assert_allclose(long, returns.discounted_returns(r, d, v, trunc), **TOL)
    np.testing.assert_allclose(long, returns.lambda_returns(r, d, v, 1.0, trunc), **TOL)
    np.testing.assert_allclose(returns.n_step_returns(r, d, v, 1, trunc), r + d * v, **TOL)
    # Consistent values (no truncation): v_t[t] = v_tm1[t + 1].
    v_tm1 = traj["v_tm1"]
    v_t = np.concatenate([v_tm1[1:], traj["v_t"][-1:]], axis=0)
    adv = returns.gae(r, d, v_tm1, v_t, 0.7)
    np.testing.assert_allclose(adv + v_tm1, returns.lambda_returns(r, d, v_t, 0.7), **TOL)


# ----------------------------------------------------------------------------------------------
# Hand-computed cases
# ----------------------------------------------------------------------------------------------
def test_hand_computed_discounted_and_n_step():
    r = np.array([1.0, 2.0, 3.0], np.float32)
    d = np.array([0.9, 0.0, 0.9], np.float32)  # terminated at t = 1
    v = np.array([10.0, 20.0, 30.0], np.float32)
    # G_2 = 3 + 0.9 * 30 = 30; G_1 = 2 (terminated); G_0 = 1 + 0.9 * 2 = 2.8
    np.testing.assert_allclose(returns.discounted_returns(r, d, v), [2.8, 2.0, 30.0], rtol=1e-6)
    # Without v the return is cut at the sequence end: G_2 = 3.
    np.testing.assert_allclose(returns.discounted_returns(r, d), [2.8, 2.0, 3.0], rtol=1e-6)
    # Truncated at t = 0: bootstrap from the final observation's value v_0 = 10 and stop there.
    trunc = np.array([True, False, False])
    np.testing.assert_allclose(returns.discounted_returns(r, d, v, trunc), [10.0, 2.0, 30.0], rtol=1e-6)
    # 1-step: r + d v = [10, 2, 30]; 2-step: G_0 = 1 + 0.9 * (2 + 0 * 20) = 2.8
    np.testing.assert_allclose(returns.n_step_returns(r, d, v, 1), [10.0, 2.0, 30.0], rtol=1e-6)
    np.testing.assert_allclose(returns.n_step_returns(r, d, v, 2), [2.8, 2.0, 30.0], rtol=1e-6)


def test_hand_computed_gae_and_lambda_returns():
    r = np.array([1.0, 1.0, 1.0], np.float32)
    d = np.array([0.5, 0.5, 0.5], np.float32)
    v_tm1 = np.array([0.0, 1.0, 2.0], np.float32)
    v_t = np.array([1.0, 2.0, 4.0], np.float32)  # consistent with v_tm1, plus V(s_3) = 4
    # delta = r + d v_t - v_tm1 = [1.5, 1.0, 1.0]
    # lambda = 1: A_2 = 1, A_1 = 1 + 0.5 * 1 = 1.5, A_0 = 1.5 + 0.5 * 1.5 = 2.25
    np.testing.assert_allclose(returns.gae(r, d, v_tm1, v_t, 1.0), [2.25, 1.5, 1.0], rtol=1e-6)
    # lambda = 0.5: A_1 = 1 + 0.25 * 1 = 1.25, A_0 = 1.5 + 0.25 * 1.25 = 1.8125
    np.testing.assert_allclose(returns.gae(r, d, v_tm1, v_t, 0.5), [1.8125, 1.25, 1.0], rtol=1e-6)
    # Truncated at t = 1: A_1 = delta_1 = 1 and A_0 = 1.5 + 0.25 * 1 = 1.75; A_2 unaffected.
    trunc = np.array([False, True, False])
    np.testing.assert_allclose(returns.gae(r, d, v_tm1, v_t, 0.5, trunc), [1.75, 1.0, 1.0], rtol=1e-6)
    # lambda-returns: G_2 = 1 + 0.5 * 4 = 3; G_1 = 1 + 0.5 (0.5 * 2 + 0.5 * 3) = 2.25;
    # G_0 = 1 + 0.5 (0.5 * 1 + 0.5 * 2.25) = 1.8125 (= A + V, since the values are consistent)
    np.testing.assert_allclose(returns.lambda_returns(r, d, v_t, 0.5), [1.8125, 2.25, 3.0], rtol=1e-6)


def test_n_step_rejects_n_below_one():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        returns.n_step_returns(x, x, x, 0)


# ----------------------------------------------------------------------------------------------
# jit and vmap give the same answers
# ----------------------------------------------------------------------------------------------
def _estimators():
    """name -> (function of (r, d, v_tm1, v_t, trunc), reference per sequence)."""
    lam = 0.8
    return {
        "gae": (
            lambda r, d, vm, v, tr: returns.gae(r, d, vm, v, lam, tr),
            lambda r, d, vm, v, tr: ref_gae(r, d, vm, v, lam, tr),
        ),
        "lambda": (
            lambda r, d, vm, v, tr: returns.lambda_returns(r, d, v, lam, tr),
            lambda r, d, vm, v, tr: ref_lambda_returns(r, d, v, lam, tr),
        ),
        "n_step": (
            lambda r, d, vm, v, tr: returns.n_step_returns(r, d, v, 3, tr),
            lambda r, d, vm, v, tr: ref_n_step(r, d, v, 3, tr),
        ),
        "discounted": (
            lambda r, d, vm, v, tr: returns.discounted_returns(r, d, v, tr),
            lambda r, d, vm, v, tr: ref_discounted(r, d, v, tr),
        ),
    }


@pytest.mark.parametrize("name", ["gae", "lambda", "n_step", "discounted"])
def test_jit_and_vmap_agree(traj, name):
    fn, ref = _estimators()[name]
    args = (traj["r"], traj["d"], traj["v_tm1"], traj["v_t"], traj["trunc"])
    want = np.stack([ref(*(a[:, b] for a in args)) for b in range(B)], axis=1)
    eager = fn(*args)
    jitted = jax.jit(fn)(*args)
    # vmap over the batch axis: each column is a (T,) sequence.
    vmapped = jax.vmap(fn, in_axes=1, out_axes=1)(*args)
    jit_vmapped = jax.jit(jax.vmap(fn, in_axes=1, out_axes=1))(*args)
    for got in (eager, jitted, vmapped, jit_vmapped):
        assert got.shape == (T, B)
        np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


def test_vmap_over_lambda_and_extra_batch_axes(traj):
    """lambda is a traced hyperparameter (vmappable for sweeps); extra trailing axes are batch axes."""
    lams = jnp.array([0.0, 0.5, 1.0])
    args = (traj["r"], traj["d"], traj["v_tm1"], traj["v_t"])
    swept = jax.jit(jax.vmap(lambda lam: returns.gae(*args, lam, traj["trunc"])))(lams)
    for i, lam in enumerate([0.0, 0.5, 1.0]):
        np.testing.assert_allclose(swept[i], returns.gae(*args, lam, traj["trunc"]), rtol=1e-6, atol=1e-6)
    # (T, B) -> (T, 2, B // 2): same numbers.
    split = [a.reshape(T, 2, B // 2) for a in (*args, traj["trunc"])]
    np.testing.assert_allclose(
        returns.gae(*split[:4], 0.5, split[4]).reshape(T, B),
        returns.gae(*args, 0.5, traj["trunc"]),
        rtol=1e-6,
        atol=1e-6,
    )
