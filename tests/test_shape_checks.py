"""Trace-time chex checks at the public pure functions of `rl.returns` and `rl.losses`.

For each function: a wrong rank and a wrong dtype raise AssertionError naming the function and the
problem, and legal calls (every legal rank) still work eagerly, under jit and under vmap. Tiny arrays,
no training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax.nets import ActionSpec
from rlcx_jax.rl import returns
from rlcx_jax.rl.losses import (
    PolicyBatch,
    QBatch,
    clipped_value_loss,
    policy_gradient_loss,
    ppo_loss,
    q_learning_loss,
    value_loss,
)
from rlcx_jax.rl.ppo import PPOHParams

T, N = 5, 3
DISCRETE = ActionSpec(discrete=True, num_actions=2)
CONTINUOUS = ActionSpec(discrete=False, shape=(2,))
HP = PPOHParams(clip_eps=0.2, vf_coef=0.5, ent_coef=0.01)


def _f(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Returns: time-major [T, ...] float arrays of one shape
# ----------------------------------------------------------------------------------------------
# name -> fn(r, d, v_tm1, v_t, trunc), calling the estimator with the arrays it takes.
ESTIMATORS = {
    "gae": lambda r, d, vm, v, tr=None: returns.gae(r, d, vm, v, 0.9, tr),
    "lambda_returns": lambda r, d, vm, v, tr=None: returns.lambda_returns(r, d, v, 0.9, tr),
    "discounted_returns": lambda r, d, vm, v, tr=None: returns.discounted_returns(r, d, v, tr),
    "discounted_returns_no_v": lambda r, d, vm, v, tr=None: returns.discounted_returns(r, d, None, tr),
    "n_step_returns": lambda r, d, vm, v, tr=None: returns.n_step_returns(r, d, v, 2, tr),
}
FN_NAME = {k: k.removesuffix("_no_v") for k in ESTIMATORS}


def _traj(*shape):
    r, vm, v = (_f(*shape, seed=i) for i in range(3))
    d = jnp.full(shape, 0.9, jnp.float32)
    trunc = jnp.zeros(shape, bool).at[1].set(True)
    return r, d, vm, v, trunc


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("shape", [(T,), (T, N), (T, 2, N)])
def test_returns_accept_every_legal_rank(name, shape):
    fn = ESTIMATORS[name]
    args = _traj(*shape)
    for out in (fn(*args), jax.jit(fn)(*args), fn(*args[:4])):
        assert out.shape == shape and out.dtype == jnp.float32


@pytest.mark.parametrize("name", ESTIMATORS)
def test_returns_under_jit_and_vmap(name):
    fn = ESTIMATORS[name]
    args = _traj(T, N)
    eager = fn(*args)
    vmapped = jax.jit(jax.vmap(fn, in_axes=1, out_axes=1))(*args)  # each column is a [T] sequence
    np.testing.assert_allclose(vmapped, eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fn)(*args), eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_returns_reject_a_scalar_sequence(name):
    x = jnp.float32(1.0)
    with pytest.raises(AssertionError, match=rf"{FN_NAME[name]}: .* must be time-major"):
        ESTIMATORS[name](x, x, x, x)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_returns_reject_mismatched_ranks(name):
    """A [T] discount against [T, N] rewards would broadcast along the wrong axis."""
    r, d, vm, v, _ = _traj(T, N)
    with pytest.raises(AssertionError, match=rf"{FN_NAME[name]}: .* must all have the same shape"):
        ESTIMATORS[name](r, d[:, 0], vm, v)
    if name == "gae":  # the only estimator that takes v_tm1
        with pytest.raises(AssertionError, match="same shape"):
            ESTIMATORS[name](r, d, vm[..., None], v)
    if name != "discounted_returns_no_v":
        with pytest.raises(AssertionError, match="same shape"):
            ESTIMATORS[name](r, d, vm, v[:, :, None])


@pytest.mark.parametrize("name", ESTIMATORS)
def test_returns_reject_integer_rewards(name):
    r, d, vm, v, _ = _traj(T, N)
    with pytest.raises(AssertionError, match=rf"{FN_NAME[name]}: .* must be floating point"):
        ESTIMATORS[name](r.astype(jnp.int32), d, vm, v)
    with pytest.raises(AssertionError, match="input 1 has type int32"):  # discount_t is input 1
        ESTIMATORS[name](r, jnp.ones((T, N), jnp.int32), vm, v)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_returns_check_truncation_shape_not_dtype(name):
    r, d, vm, v, trunc = _traj(T, N)
    want = ESTIMATORS[name](r, d, vm, v, trunc)
    for legal in (trunc.astype(jnp.int32), trunc.astype(jnp.float32), np.asarray(trunc)):
        np.testing.assert_allclose(ESTIMATORS[name](r, d, vm, v, legal), want, rtol=1e-6)
    with pytest.raises(AssertionError, match=rf"{FN_NAME[name]}: truncated_t must have r_t's shape"):
        ESTIMATORS[name](r, d, vm, v, trunc[:, 0])


@pytest.mark.parametrize("fn", [returns.gae, returns.lambda_returns])
def test_lambda_scalar_int_broadcastable_or_vmapped(fn):
    r, d, vm, v, trunc = _traj(T, N)
    args = (r, d, vm, v) if fn is returns.gae else (r, d, v)
    want = fn(*args, 1.0, trunc)
    np.testing.assert_allclose(fn(*args, 1, trunc), want, rtol=1e-6)  # an int lambda is legal
    np.testing.assert_allclose(fn(*args, jnp.ones((1, N)), trunc), want, rtol=1e-6)
    swept = jax.jit(jax.vmap(lambda lam: fn(*args, lam, trunc)))(jnp.array([0.5, 1.0]))
    np.testing.assert_allclose(swept[1], want, rtol=1e-6)
    with pytest.raises(AssertionError, match=rf"{fn.__name__}: lambda_ must be a scalar or broadcast"):
        fn(*args, jnp.ones(N + 1), trunc)


# ----------------------------------------------------------------------------------------------
# value_loss / clipped_value_loss
# ----------------------------------------------------------------------------------------------
def test_value_losses_legal_calls_under_jit_and_vmap():
    v, old, g = _f(4, seed=0), _f(4, seed=1), _f(4, seed=2)
    np.testing.assert_allclose(jax.jit(value_loss)(v, g), value_loss(v, g), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(clipped_value_loss)(v, old, g, 0.2), clipped_value_loss(v, old, g, 0.2))
    # Per-sample losses via vmap (rank-0 inputs) and [T, N] batches are legal too.
    per = jax.vmap(value_loss)(v, g)
    np.testing.assert_allclose(per.mean(), value_loss(v, g), rtol=1e-6)
    per = jax.vmap(clipped_value_loss, in_axes=(0, 0, 0, None))(v, old, g, 0.2)
    np.testing.assert_allclose(per.mean(), clipped_value_loss(v, old, g, 0.2), rtol=1e-6)
    np.testing.assert_allclose(value_loss(v.reshape(2, 2), g.reshape(2, 2)), value_loss(v, g), rtol=1e-6)
    # clip_eps swept under vmap is a scalar inside.
    swept = jax.vmap(clipped_value_loss, in_axes=(None, None, None, 0))(v, old, g, jnp.array([0.1, 0.2]))
    np.testing.assert_allclose(swept[1], clipped_value_loss(v, old, g, 0.2), rtol=1e-6)


def test_value_losses_reject_wrong_rank():
    v, old, g = _f(4, seed=0), _f(4, seed=1), _f(4, seed=2)
    # A [B, 1] value head against a [B] target would silently broadcast to [B, B].
    with pytest.raises(AssertionError, match="value_loss: value, target must have one shape"):
        value_loss(v[:, None], g)
    with pytest.raises(AssertionError, match="clipped_value_loss: value, old_value, target must have one shape"):
        clipped_value_loss(v[:, None], old, g, 0.2)
    with pytest.raises(AssertionError, match="clipped_value_loss: clip_eps must be a scalar"):
        clipped_value_loss(v, old, g, jnp.full(4, 0.2))


def test_value_losses_reject_wrong_dtype():
    v, old, g = _f(4, seed=0), _f(4, seed=1), _f(4, seed=2)
    with pytest.raises(AssertionError, match="value_loss: value, target must be floating point"):
        value_loss(v, jnp.ones(4, jnp.int32))
    with pytest.raises(AssertionError, match="clipped_value_loss: .* must be floating point"):
        clipped_value_loss(v, old.astype(jnp.int32), g, 0.2)


# ----------------------------------------------------------------------------------------------
# ppo_loss / policy_gradient_loss
# ----------------------------------------------------------------------------------------------
B = 4


def table_apply(params, obs):
    del obs
    return params["policy"], params["value"]


def _policy_case(spec=DISCRETE, seed=0):
    width = spec.num_actions if spec.discrete else 2 * spec.dim
    params = {"policy": _f(B, width, seed=seed), "value": _f(B, seed=seed + 1)}
    if spec.discrete:
        action = jnp.asarray(np.arange(B) % spec.num_actions, jnp.int32)
    else:
        action = _f(B, spec.dim, seed=seed + 2)
    batch = PolicyBatch(
        obs=jnp.zeros((B, 3)),
        action=action,
        advantage=_f(B, seed=seed + 3),
        target=_f(B, seed=seed + 4),
        log_prob=_f(B, seed=seed + 5) - 1.0,
        value=_f(B, seed=seed + 6),
        # Extensions' data: any pytree, never checked (here deliberately not [B]-shaped).
        extras={"ext": {"w": jnp.ones((7, 2)), "k": jnp.int32(3)}},
    )
    return params, batch


LOSSES = {
    "ppo_loss": lambda p, b, spec, hp=HP: ppo_loss(p, b, hp, table_apply, spec),
    "policy_gradient_loss": lambda p, b, spec, hp=HP: policy_gradient_loss(p, b, hp, table_apply, spec),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("spec", [DISCRETE, CONTINUOUS], ids=["discrete", "continuous"])
def test_policy_losses_legal_calls_under_jit_and_vmap(name, spec):
    fn = LOSSES[name]
    params, batch = _policy_case(spec)
    eager, _ = fn(params, batch, spec)
    assert np.isfinite(eager)
    np.testing.assert_allclose(jax.jit(fn, static_argnums=2)(params, batch, spec)[0], eager, rtol=1e-6)
    # vmap over a leading axis of independent batches (extras included) and over a swept clip_eps.
    stack = lambda *xs: jax.tree.map(lambda *ys: jnp.stack(ys), *xs)  # noqa: E731
    cases = [_policy_case(spec, seed) for seed in (0, 10)]
    ps, bs = stack(*[c[0] for c in cases]), stack(*[c[1] for c in cases])
    vm, _ = jax.jit(jax.vmap(lambda p, b: fn(p, b, spec)))(ps, bs)
    np.testing.assert_allclose(vm[0], eager, rtol=1e-5)
    swept, _ = jax.vmap(lambda eps: fn(params, batch, spec, HP.replace(clip_eps=eps)))(jnp.array([0.1, 0.2]))
    np.testing.assert_allclose(swept[1], eager, rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_policy_losses_reject_wrong_rank(name):
    fn = LOSSES[name]
    params, batch = _policy_case()
    with pytest.raises(AssertionError, match=rf"{name}: batch.{{advantage, target.*}} must be flat \[B\]"):
        fn(params, batch.replace(advantage=batch.advantage[:, None]), DISCRETE)
    with pytest.raises(AssertionError, match=rf"{name}: discrete batch.action must be \[B\]"):
        fn(params, batch.replace(action=batch.action[:, None]), DISCRETE)
    cparams, cbatch = _policy_case(CONTINUOUS)
    with pytest.raises(AssertionError, match=rf"{name}: continuous batch.action must be \[B, A\]"):
        fn(cparams, cbatch.replace(action=cbatch.action[:, 0]), CONTINUOUS)
    with pytest.raises(AssertionError, match=rf"{name}: .* must have one batch size B"):
        fn(params, batch.replace(obs=jnp.zeros((B + 1, 3))), DISCRETE)
    with pytest.raises(AssertionError, match=rf"{name}: hparams.{{.*vf_coef, ent_coef}} must be scalars"):
        fn(params, batch, DISCRETE, HP.replace(vf_coef=jnp.ones(2)))
    # A [B, 1] value head is caught by the value loss instead of broadcasting against the [B] target.
    with pytest.raises(AssertionError, match="value_loss: value.* must have one shape"):
        fn({**params, "value": params["value"][:, None]}, batch, DISCRETE)


@pytest.mark.parametrize("name", LOSSES)
def test_policy_losses_reject_wrong_dtype(name):
    fn = LOSSES[name]
    params, batch = _policy_case()
    with pytest.raises(AssertionError, match=rf"{name}: batch.{{advantage, target.*}} must be floating point"):
        fn(params, batch.replace(target=jnp.ones(B, jnp.int32)), DISCRETE)
    cparams, cbatch = _policy_case(CONTINUOUS)
    with pytest.raises(AssertionError, match=rf"{name}: continuous batch.action must be float"):
        fn(cparams, cbatch.replace(action=jnp.ones((B, 2), jnp.int32)), CONTINUOUS)


def test_ppo_loss_checks_behaviour_fields():
    params, batch = _policy_case()
    with pytest.raises(AssertionError, match=r"ppo_loss: batch.{advantage, target, log_prob, value} must be flat"):
        ppo_loss(params, batch.replace(log_prob=batch.log_prob[:, None]), HP, table_apply, DISCRETE)
    with pytest.raises(AssertionError, match="ppo_loss: .* must be floating point"):
        ppo_loss(params, batch.replace(value=jnp.ones(B, jnp.int32)), HP, table_apply, DISCRETE)
    with pytest.raises(AssertionError, match="ppo_loss: hparams.{clip_eps, vf_coef, ent_coef} must be scalars"):
        ppo_loss(params, batch, HP.replace(clip_eps=jnp.full(B, 0.2)), table_apply, DISCRETE)
    with pytest.raises(ValueError, match="needs batch.log_prob"):
        ppo_loss(params, batch.replace(log_prob=None), HP, table_apply, DISCRETE)
    # Without value clipping the behaviour values are not needed.
    loss, _ = ppo_loss(params, batch.replace(value=None), HP, table_apply, DISCRETE, clip_value=False)
    assert np.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# q_learning_loss
# ----------------------------------------------------------------------------------------------
def linear_q(params, obs):
    return obs @ params["w"] + params["b"]


def _q_case(seed=0, obs_dim=3, num_actions=2):
    params = {"w": _f(obs_dim, num_actions, seed=seed), "b": _f(num_actions, seed=seed + 1)}
    batch = QBatch(
        obs=_f(B, obs_dim, seed=seed + 2),
        action=jnp.asarray(np.arange(B) % num_actions, jnp.int32),
        reward=_f(B, seed=seed + 3),
        discount=jnp.full((B,), 0.9, jnp.float32),
        next_obs=_f(B, obs_dim, seed=seed + 4),
        extras={"ext": (jnp.ones(5), None)},  # any pytree, never checked
    )
    return params, batch


def _q(p, b, double=True):
    return q_learning_loss(p, p, b, linear_q, double, 1.0)[0]


def test_q_learning_loss_legal_calls_under_jit_and_vmap():
    params, batch = _q_case()
    eager = _q(params, batch)
    np.testing.assert_allclose(jax.jit(_q)(params, batch), eager, rtol=1e-6)
    # Integer-valued float actions are cast, as before the checks.
    np.testing.assert_allclose(_q(params, batch.replace(action=batch.action.astype(jnp.float32))), eager, rtol=1e-6)
    stack = lambda *xs: jax.tree.map(lambda *ys: jnp.stack(ys), *xs)  # noqa: E731
    cases = [_q_case(seed) for seed in (0, 10)]
    vm = jax.jit(jax.vmap(_q))(stack(*[c[0] for c in cases]), stack(*[c[1] for c in cases]))
    np.testing.assert_allclose(vm[0], eager, rtol=1e-5)


def test_q_learning_loss_rejects_wrong_rank():
    params, batch = _q_case()
    with pytest.raises(AssertionError, match=r"q_learning_loss: batch.{action, reward, discount} must be flat \[B\]"):
        _q(params, batch.replace(reward=batch.reward[:, None]))
    with pytest.raises(AssertionError, match=r"q_learning_loss: batch.{action, reward, discount} must be flat \[B\]"):
        _q(params, batch.replace(action=batch.action[:, None]))
    with pytest.raises(AssertionError, match="q_learning_loss: batch.obs, next_obs must have one shape"):
        _q(params, batch.replace(next_obs=batch.next_obs[:-1]))
    with pytest.raises(AssertionError, match="q_learning_loss: .* must have one batch size B"):
        _q(params, batch.replace(reward=batch.reward[:-1], discount=batch.discount[:-1]))
    with pytest.raises(AssertionError, match=r"q_learning_loss: apply must return Q-values \[B, num_actions\]"):
        q_learning_loss(params, params, batch, lambda p, o: linear_q(p, o)[:, 0], False)


def test_q_learning_loss_rejects_wrong_dtype():
    params, batch = _q_case()
    with pytest.raises(AssertionError, match="q_learning_loss: batch.{reward, discount} must be floating point"):
        _q(params, batch.replace(reward=jnp.ones(B, jnp.int32)))
    with pytest.raises(AssertionError, match="input 1 has type int32"):
        _q(params, batch.replace(discount=jnp.ones(B, jnp.int32)))


# ----------------------------------------------------------------------------------------------
# The checks are static: they run once, at trace time, and fire under jit too
# ----------------------------------------------------------------------------------------------
def test_checks_fire_at_trace_time_under_jit():
    r, d, vm, v, trunc = _traj(T, N)
    with pytest.raises(AssertionError, match="gae: .* must be floating point"):
        jax.jit(lambda r: returns.gae(r, d, vm, v, 0.9, trunc))(r.astype(jnp.int32))
    params, batch = _q_case()
    with pytest.raises(AssertionError, match="q_learning_loss"):
        jax.jit(_q)(params, batch.replace(reward=batch.reward[:, None]))
    traces = []

    def f(r):
        traces.append(1)
        return returns.gae(r, d, vm, v, 0.9, trunc)

    jitted = jax.jit(f)
    jitted(r)
    jitted(r + 1.0)
    assert len(traces) == 1  # same shapes: one trace, and the compiled call runs no checks
