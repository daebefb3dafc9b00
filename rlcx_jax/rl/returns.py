"""Returns and advantages: the one home of every return estimator.

All functions take time-major arrays (axis 0 is time; any trailing batch axes) in rlax naming:
  r_t         reward received after acting at step t
  discount_t  gamma * (1 - terminated_t): zero where the episode terminated at step t
  v_tm1       value of the observation the action was taken from, V(s_t)
  v_t         value of the *next* observation for bootstrapping, V(s_{t+1}); on truncation this is the
              value of the true final (pre-reset) observation, never of the reset one
  truncated_t the episode was cut by a time limit at step t: bootstrap from v_t but do not carry the
              recursion across the boundary (Pardo et al. 2018, "Time Limits in RL")
On termination, `discount_t = 0` removes the bootstrap and also stops the recursion.

Shapes and dtypes are checked with chex at trace time (free under jit; AssertionError on a bad call):
r_t, discount_t, v_tm1 and v_t are float arrays of rank >= 1, all of one shape [T, ...]; truncated_t,
where given, has that shape too (any dtype: bool or 0/1, it is cast); lambda_ is a scalar or any
shape that broadcasts to r_t's (a traced scalar under vmap, for sweeps).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _check_time_major(
    fn: str,
    names: str,
    arrays: list[jax.Array],
    truncated_t: jax.Array | None = None,
    lambda_: float | jax.Array | None = None,
) -> None:
    """Trace-time checks shared by the estimators: `arrays` (named `names`, for the messages) are
    float, of one shape [T, ...] with rank >= 1; truncated_t has that shape; lambda_ broadcasts to it."""
    where = f"{fn}: {names}"
    chex.assert_shape(arrays, (None, ...), custom_message=f"{where} must be time-major, rank >= 1 [T, ...]")
    chex.assert_equal_shape(arrays, custom_message=f"{where} must all have the same shape")
    chex.assert_type(arrays, float, custom_message=f"{where} must be floating point")
    if truncated_t is not None:
        chex.assert_equal_shape([arrays[0], truncated_t], custom_message=f"{fn}: truncated_t must have r_t's shape")
    if lambda_ is not None:
        chex.assert_is_broadcastable(
            jnp.shape(lambda_),
            arrays[0].shape,
            custom_message=f"{fn}: lambda_ must be a scalar or broadcast to r_t's shape",
        )


def _continuation(discount_t: jax.Array, truncated_t: jax.Array | None) -> jax.Array:
    """Factor that carries a recursion from t+1 back to t: discount, cut at any episode end."""
    if truncated_t is None:
        return discount_t
    return discount_t * (1.0 - truncated_t.astype(discount_t.dtype))


def gae(
    r_t: jax.Array,
    discount_t: jax.Array,
    v_tm1: jax.Array,
    v_t: jax.Array,
    lambda_: float | jax.Array,
    truncated_t: jax.Array | None = None,
) -> jax.Array:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 16).

    delta_t = r_t + discount_t v_t - v_tm1
    A_t     = delta_t + discount_t * lambda * (1 - truncated_t) * A_{t+1},   A_T = 0.

    Shapes: r_t, discount_t, v_tm1, v_t: [T, ...] float, all the same shape (rank >= 1);
    lambda_: scalar (or broadcastable to [T, ...]); truncated_t: optional, [T, ...], any dtype.
    Returns the advantages, [T, ...].
    """
    _check_time_major("gae", "r_t, discount_t, v_tm1, v_t", [r_t, discount_t, v_tm1, v_t], truncated_t, lambda_)
    delta_t = r_t + discount_t * v_t - v_tm1
    carry_t = _continuation(discount_t, truncated_t) * lambda_

    def step(a_next: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        delta, carry = xs
        a = delta + carry * a_next
        return a, a

    _, adv = jax.lax.scan(step, jnp.zeros_like(delta_t[0]), (delta_t, carry_t), reverse=True)
    return adv


def lambda_returns(
    r_t: jax.Array,
    discount_t: jax.Array,
    v_t: jax.Array,
    lambda_: float | jax.Array,
    truncated_t: jax.Array | None = None,
) -> jax.Array:
    """TD(lambda) returns (Sutton & Barto 2018, eq. 12.3), truncated at the end of the sequence.

    G_t = r_t + discount_t [ (1 - l_t) v_t + l_t G_{t+1} ],  l_t = lambda (1 - truncated_t),
    and at the last step G_{T-1} = r_{T-1} + discount_{T-1} v_{T-1}.

    Shapes: r_t, discount_t, v_t: [T, ...] float, all the same shape (rank >= 1);
    lambda_: scalar (or broadcastable to [T, ...]); truncated_t: optional, [T, ...], any dtype.
    Returns the returns, [T, ...].
    """
    _check_time_major("lambda_returns", "r_t, discount_t, v_t", [r_t, discount_t, v_t], truncated_t, lambda_)
    lam_t = jnp.broadcast_to(jnp.asarray(lambda_, r_t.dtype), r_t.shape)
    if truncated_t is not None:
        lam_t = lam_t * (1.0 - truncated_t.astype(r_t.dtype))
    # Last step: no G_{t+1}, bootstrap fully from v.
    lam_t = lam_t.at[-1].set(0.0)

    def step(g_next: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        r, d, v, lam = xs
        g = r + d * ((1.0 - lam) * v + lam * g_next)
        return g, g

    _, g = jax.lax.scan(step, jnp.zeros_like(r_t[0]), (r_t, discount_t, v_t, lam_t), reverse=True)
    return g


def discounted_returns(
    r_t: jax.Array,
    discount_t: jax.Array,
    v_t: jax.Array | None = None,
    truncated_t: jax.Array | None = None,
) -> jax.Array:
    """Monte-Carlo returns G_t = r_t + discount_t G_{t+1} (lambda = 1).

    Where `v_t` is given it bootstraps at truncations and at the end of the sequence; without it
    the return is cut there (the REINFORCE estimator of Williams 1992 on partial episodes).

    Shapes: r_t, discount_t and (optional) v_t: [T, ...] float, all the same shape (rank >= 1);
    truncated_t: optional, [T, ...], any dtype. Returns the returns, [T, ...].
    """
    if v_t is None:
        _check_time_major("discounted_returns", "r_t, discount_t", [r_t, discount_t], truncated_t)
    else:
        _check_time_major("discounted_returns", "r_t, discount_t, v_t", [r_t, discount_t, v_t], truncated_t)
    if v_t is None:
        v_t = jnp.zeros_like(r_t)
    return lambda_returns(r_t, discount_t, v_t, 1.0, truncated_t)


def n_step_returns(
    r_t: jax.Array,
    discount_t: jax.Array,
    v_t: jax.Array,
    n: int,
    truncated_t: jax.Array | None = None,
) -> jax.Array:
    """n-step bootstrapped returns (Sutton & Barto 2018, eq. 7.1), cut at episode ends.

    G_t = r_t + d_t r_{t+1} + ... + d_t..d_{t+n-2} r_{t+n-1} + d_t..d_{t+n-1} v_{t+n-1},
    with the window shortened at the end of the sequence and at a truncation (where the final
    observation's value v_k is used). Computed with `n` vectorised passes, no per-step Python loop.

    Shapes: r_t, discount_t, v_t: [T, ...] float, all the same shape (rank >= 1); n: a static int
    >= 1; truncated_t: optional, [T, ...], any dtype. Returns the returns, [T, ...].
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_time_major("n_step_returns", "r_t, discount_t, v_t", [r_t, discount_t, v_t], truncated_t)
    # G^(1)_t = r_t + d_t v_t and G^(k)_t = r_t + d_t G^(k-1)_{t+1} where the window may continue
    # past t (t is not the last step and not truncated), else G^(k)_t = r_t + d_t v_t.
    ended_t = (1.0 - truncated_t.astype(r_t.dtype)) if truncated_t is not None else jnp.ones_like(r_t)
    not_last = jnp.concatenate([jnp.ones_like(r_t[:-1]), jnp.zeros_like(r_t[-1:])], axis=0)
    keep = not_last * ended_t
    g = r_t + discount_t * v_t
    for _ in range(n - 1):  # static n: a handful of whole-array ops, not a loop over steps
        g_next = jnp.concatenate([g[1:], jnp.zeros_like(g[-1:])], axis=0)
        g = r_t + discount_t * ((1.0 - keep) * v_t + keep * g_next)
    return g
