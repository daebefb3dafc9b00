"""Meta-learning math against independent references: MAML's meta-gradient against finite
differences, FOMAML against the stopped-gradient formula, Reptile's update against its formula,
PLATIPUS's KL against hand-computed Gaussian KLs, the linear baseline against NumPy's least squares.

The tiny differentiable problem: a task is a target vector c; a "batch" is regression data
x ~ N(0, I), y = x c drawn from the key (it does not depend on the parameters, like trajectories
that carry no gradient); the loss is mean (x w - y)^2, so one inner step is linear in w.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from rlcx_jax.configs.meta import MetaHParams
from rlcx_jax.meta import MAML, Platipus, Reptile, gaussian_kl
from rlcx_jax.meta.adapt import MetaContext, adapt, adaptation_curve
from rlcx_jax.meta.platipus import PlatipusParams
from rlcx_jax.meta.policy_gradient import (
    Trajectories,
    baseline_features,
    first_episode_mask,
    fit_linear,
    vanilla_pg_loss,
)

DIM, N = 3, 8


@struct.dataclass
class Regression:
    x: jax.Array
    y: jax.Array


@dataclasses.dataclass(frozen=True)
class TinyLearner:
    def sample(self, params: Any, task: jax.Array, key: jax.Array, hparams: Any) -> Regression:
        x = jax.random.normal(key, (N, DIM))
        return Regression(x=x, y=x @ task)

    def loss(self, params: Any, batch: Regression) -> jax.Array:
        return jnp.mean((batch.x @ params["w"] - batch.y) ** 2)

    def batch_return(self, batch: Regression) -> jax.Array:
        return -jnp.mean(batch.y**2)


HP = MetaHParams(inner_lr=0.05, outer_lr=0.1, reptile_eps=0.5)
PHI = {"w": jnp.array([0.3, -0.2, 0.5], jnp.float32)}
TASKS = jnp.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], jnp.float32)
KEY = jax.random.key(3)


def _ctx(steps: int) -> MetaContext:
    return MetaContext(learner=TinyLearner(), inner_steps=steps, iterations=10)


def _np_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 2.0 * x.T @ (x @ w - y) / len(y)


def _data(key: jax.Array, task: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    batch = TinyLearner().sample(None, task, key, None)
    return np.asarray(batch.x, np.float64), np.asarray(batch.y, np.float64)


def _maml_keys(task_index: int, steps: int) -> tuple[list[jax.Array], jax.Array]:
    """The keys MAML.meta_gradient uses for one task: one per inner step, then the post-batch key."""
    task_key = jax.random.split(KEY, len(TASKS))[task_index]
    adapt_key, post_key = jax.random.split(task_key)
    return list(jax.random.split(adapt_key, steps)), post_key


def _np_objective(w0: np.ndarray, steps: int, step_weight: float = 0.0) -> float:
    """mean over tasks of L(theta_k, D'), all in float64 NumPy; with `step_weight` s the multi-step
    objective (L(theta_k, D') + s sum_{j=1}^{k-1} L(theta_j, D_j)) / (1 + s (k - 1))."""
    total = 0.0
    for i, task in enumerate(TASKS):
        inner_keys, post_key = _maml_keys(i, steps)
        w, intermediate = w0.copy(), 0.0
        for j, k in enumerate(inner_keys):
            x, y = _data(k, task)
            if j >= 1:
                intermediate += float(np.mean((x @ w - y) ** 2))
            w = w - HP.inner_lr * _np_grad(w, x, y)
        x, y = _data(post_key, task)
        final = float(np.mean((x @ w - y) ** 2))
        total += (final + step_weight * intermediate) / (1.0 + step_weight * max(steps - 1, 0))
    return total / len(TASKS)


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_matches_finite_differences(steps: int) -> None:
    grads, aux = jax.jit(lambda p: MAML().meta_gradient(p, TASKS, KEY, _ctx(steps), HP))(PHI)
    w0, eps = np.asarray(PHI["w"], np.float64), 1e-4
    fd = np.array(
        [(_np_objective(w0 + eps * e, steps) - _np_objective(w0 - eps * e, steps)) / (2 * eps) for e in np.eye(DIM)]
    )
    np.testing.assert_allclose(np.asarray(grads["w"]), fd, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux.loss), _np_objective(w0, steps), rtol=1e-5)
    # The second-order term matters here: the first-order gradient is measurably different.
    fo, _ = MAML(first_order=True).meta_gradient(PHI, TASKS, KEY, _ctx(steps), HP)
    assert np.max(np.abs(np.asarray(fo["w"]) - fd)) > 1e-2


@pytest.mark.parametrize("steps", [2, 3])
def test_multi_step_loss_gradient_matches_finite_differences(steps: int) -> None:
    """MAML++'s multi-step loss: (L_k + s sum_{j=1}^{k-1} L_j) / (1 + s (k - 1)), second order."""
    hp = HP.replace(step_loss_weight=0.5)
    grads, aux = jax.jit(lambda p: MAML().meta_gradient(p, TASKS, KEY, _ctx(steps), hp))(PHI)
    w0, eps = np.asarray(PHI["w"], np.float64), 1e-4
    objective = lambda w: _np_objective(w, steps, step_weight=0.5)
    fd = np.array([(objective(w0 + eps * e) - objective(w0 - eps * e)) / (2 * eps) for e in np.eye(DIM)])
    np.testing.assert_allclose(np.asarray(grads["w"]), fd, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux.loss), objective(w0), rtol=1e-5)
    assert abs(objective(w0) - _np_objective(w0, steps)) > 1e-3  # the weight changes the objective
    # Weight 0 is plain MAML, bit for bit.
    plain, _ = MAML().meta_gradient(PHI, TASKS, KEY, _ctx(steps), HP)
    zero, _ = MAML().meta_gradient(PHI, TASKS, KEY, _ctx(steps), HP.replace(step_loss_weight=0.0))
    np.testing.assert_array_equal(np.asarray(plain["w"]), np.asarray(zero["w"]))


def test_meta_gradient_is_finite_when_an_inner_gradient_is_zero() -> None:
    """A task the initialisation already solves has a zero inner gradient (as a sparse-reward task
    that no trajectory reached); the second-order meta-gradient through the clip must stay finite."""
    solved = jnp.stack([PHI["w"], TASKS[0]])
    for steps in (1, 2):
        grads, _ = MAML().meta_gradient(PHI, solved, KEY, _ctx(steps), HP)
        assert np.all(np.isfinite(np.asarray(grads["w"])))


def test_fomaml_gradient_is_the_post_update_gradient() -> None:
    """FOMAML: grad of L(theta', D') at the adapted parameters, the inner gradients held constant."""
    grads, _ = MAML(first_order=True).meta_gradient(PHI, TASKS, KEY, _ctx(2), HP)
    expected = np.zeros(DIM)
    for i, task in enumerate(TASKS):
        inner_keys, post_key = _maml_keys(i, 2)
        w = np.asarray(PHI["w"], np.float64)
        for k in inner_keys:
            w = w - HP.inner_lr * _np_grad(w, *_data(k, task))
        expected += _np_grad(w, *_data(post_key, task)) / len(TASKS)
    np.testing.assert_allclose(np.asarray(grads["w"]), expected, rtol=1e-4, atol=1e-6)


def test_reptile_update_is_its_formula() -> None:
    """phi <- phi + eps (mean adapted - phi) at iteration 0, eps decaying linearly to 0."""
    method, ctx = Reptile(), _ctx(3)
    direction, _ = method.meta_gradient(PHI, TASKS, KEY, ctx, HP)
    opt = method.optimizer(HP, ctx.iterations)
    updates, opt_state = opt.update(direction, opt.init(PHI), PHI)
    new_w = np.asarray(PHI["w"]) + np.asarray(updates["w"])
    adapted = []
    for i, task in enumerate(TASKS):
        task_key = jax.random.split(KEY, len(TASKS))[i]
        w = np.asarray(PHI["w"], np.float64)
        for k in jax.random.split(task_key, 3):
            w = w - HP.inner_lr * _np_grad(w, *_data(k, task))
        adapted.append(w)
    phi = np.asarray(PHI["w"], np.float64)
    np.testing.assert_allclose(new_w, phi + HP.reptile_eps * (np.mean(adapted, axis=0) - phi), rtol=1e-5, atol=1e-6)
    # Half way through, the step is half as large.
    for _ in range(4):
        updates, opt_state = opt.update(direction, opt_state, PHI)
    updates, _ = opt.update(direction, opt_state, PHI)
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.5 * HP.reptile_eps * np.asarray(direction["w"]), rtol=1e-5)


def test_gaussian_kl_hand_computed() -> None:
    # KL(N(1, 1) || N(0, 2)) = 0.5 [ln 2 - 0 + (1 + 1) / 2 - 1] = 0.5 ln 2
    kl = gaussian_kl({"a": jnp.ones(1)}, {"a": jnp.zeros(1)}, {"a": jnp.zeros(1)}, {"a": jnp.log(2.0 * jnp.ones(1))})
    np.testing.assert_allclose(float(kl), 0.5 * np.log(2.0), rtol=1e-6)
    # Identical Gaussians: 0. Two leaves sum: N(0, e^-2) || N(0.5, 1) = 0.5 [0 + 2 + (e^-2 + 0.25) - 1].
    same = gaussian_kl({"a": jnp.ones(3)}, {"a": jnp.ones(3)}, {"a": jnp.ones(3)}, {"a": jnp.ones(3)})
    assert abs(float(same)) < 1e-6
    two = gaussian_kl(
        {"a": jnp.zeros(1), "b": jnp.ones(2)},
        {"a": jnp.full(1, -2.0), "b": jnp.zeros(2)},
        {"a": jnp.full(1, 0.5), "b": jnp.ones(2)},
        {"a": jnp.zeros(1), "b": jnp.zeros(2)},
    )
    np.testing.assert_allclose(float(two), 0.5 * (2.0 + np.exp(-2.0) + 0.25 - 1.0), rtol=1e-6)


def test_gaussian_kl_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    mq, lq, mp, lp = 0.3, np.log(0.4), -0.2, np.log(0.9)
    z = mq + np.sqrt(np.exp(lq)) * rng.standard_normal(400_000)
    log_q = -0.5 * (lq + (z - mq) ** 2 / np.exp(lq))
    log_p = -0.5 * (lp + (z - mp) ** 2 / np.exp(lp))
    kl = gaussian_kl(*({"a": jnp.full(1, v, jnp.float32)} for v in (mq, lq, mp, lp)))
    np.testing.assert_allclose(float(kl), np.mean(log_q - log_p), rtol=2e-2)


def test_platipus_objective_adds_the_kl_term_and_trains_every_part() -> None:
    method, ctx = Platipus(), _ctx(1)
    meta = method.init(PHI, HP)
    assert isinstance(meta, PlatipusParams)
    np.testing.assert_allclose(float(jnp.exp(meta.log_gamma_p)), HP.inner_lr, rtol=1e-6)
    key = jax.random.key(5)
    loss_kl, (_, _, kl) = method.task_objective(meta, TASKS[0], key, ctx, HP)
    loss_0, _ = method.task_objective(meta, TASKS[0], key, ctx, HP.replace(kl_weight=0.0))
    assert float(kl) > 0
    np.testing.assert_allclose(float(loss_kl - loss_0), HP.kl_weight * float(kl), rtol=1e-4)
    grads, aux = jax.jit(lambda m: method.meta_gradient(m, TASKS, key, ctx, HP))(meta)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf))) and np.any(np.asarray(leaf) != 0)
    assert float(aux.kl) > 0


def test_platipus_prior_sample_is_an_inference_step_plus_learned_noise() -> None:
    """phi ~ N(mu - gamma_p grad L(mu, D_tr), sigma^2): subtracting the hand-computed mean leaves
    noise with the learned standard deviation."""
    method, ctx = Platipus(), _ctx(1)
    meta = method.init(PHI, HP.replace(init_log_var=float(np.log(0.01))))
    keys = jax.random.split(KEY, 4000)
    starts = np.asarray(jax.vmap(lambda k: method.initial_params(meta, TASKS[0], k, ctx, HP)["w"])(keys))
    mu = np.asarray(PHI["w"], np.float64)
    means = np.stack([mu - HP.inner_lr * _np_grad(mu, *_data(jax.random.split(k)[0], TASKS[0])) for k in keys[:50]])
    noise = starts[:50] - means
    assert np.max(np.abs(noise)) < 0.5
    full_noise = starts - np.mean(means, axis=0)
    np.testing.assert_allclose(np.std(noise, axis=0), 0.1, rtol=0.3)
    assert np.std(full_noise) > 0.1  # the inference step itself varies with the data


def test_adapt_under_jit_and_vmap_over_tasks_and_seeds() -> None:
    def run(task: jax.Array, key: jax.Array) -> jax.Array:
        return adapt(TinyLearner(), PHI, task, key, 2, HP.inner_lr, HP).params["w"]

    one = np.stack([np.asarray(run(t, KEY)) for t in TASKS])
    tasks_vmapped = jax.jit(jax.vmap(run, in_axes=(0, None)))(TASKS, KEY)
    np.testing.assert_allclose(np.asarray(tasks_vmapped), one, rtol=1e-6, atol=1e-7)
    seeds = jax.random.split(KEY, 3)
    both = jax.jit(jax.vmap(jax.vmap(run, in_axes=(0, None)), in_axes=(None, 0)))(TASKS, seeds)
    assert both.shape == (3, len(TASKS), DIM)
    np.testing.assert_allclose(np.asarray(both[1]), np.stack([np.asarray(run(t, seeds[1])) for t in TASKS]), rtol=1e-6)


def test_adaptation_curve_has_a_return_per_step() -> None:
    curve = adaptation_curve(TinyLearner(), PHI, TASKS[0], KEY, 3, HP.inner_lr, HP)
    assert curve.returns.shape == (4,)
    zero = adaptation_curve(TinyLearner(), PHI, TASKS[0], KEY, 0, HP.inner_lr, HP)
    assert zero.returns.shape == (1,)


def test_first_episode_mask_hand_case() -> None:
    terminated = jnp.array([[0, 0], [1, 0], [0, 0], [0, 1]], bool)
    truncated = jnp.array([[0, 0], [0, 0], [0, 1], [0, 0]], bool)
    expected = np.array([[1, 1], [1, 1], [0, 1], [0, 0]], np.float32)
    np.testing.assert_array_equal(np.asarray(first_episode_mask(terminated, truncated)), expected)


def test_baseline_fit_matches_numpy_least_squares() -> None:
    rng = np.random.default_rng(1)
    obs = rng.uniform(-1, 1, (20, 6, 2)).astype(np.float32)
    feats = np.asarray(baseline_features(jnp.asarray(obs))).reshape(-1, 8)
    # columns: o (2), o^2 (2), t/100, (t/100)^2, (t/100)^3, 1
    np.testing.assert_allclose(feats[6 * 7 + 1, 4], 7 / 100, rtol=1e-6)
    np.testing.assert_allclose(feats[:, :2] ** 2, feats[:, 2:4], rtol=1e-6)
    targets = feats @ rng.normal(size=8) + 0.01 * rng.normal(size=len(feats))
    weights = (rng.uniform(size=len(feats)) > 0.2).astype(np.float32)
    fitted = np.asarray(
        fit_linear(jnp.asarray(feats), jnp.asarray(targets, jnp.float32), jnp.asarray(weights), ridge=0.0)
    )
    sw = np.sqrt(weights)[:, None]
    coef, *_ = np.linalg.lstsq(feats * sw, targets * sw[:, 0], rcond=None)
    kept = weights > 0
    np.testing.assert_allclose(fitted[kept], (feats @ coef)[kept], atol=2e-3)


def test_vanilla_pg_loss_hand_case() -> None:
    valid = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    batch = Trajectories(
        obs=jnp.zeros((2, 2, 1)),
        action=jnp.zeros((2, 2)),
        reward=jnp.zeros((2, 2)),
        valid=valid,
        advantage=jnp.array([[1.0, -2.0], [0.5, 9.0]]),
        log_prob=jnp.zeros((2, 2)),
        episode_return=jnp.zeros(2),
        end_obs=jnp.zeros((2, 1)),
    )
    log_prob = jnp.array([[-1.0, -0.5], [-2.0, -3.0]])
    # -(1 * -1 + -2 * -0.5 + 0.5 * -2) / 3 = -(-1 + 1 - 1) / 3 = 1/3; the invalid step is ignored
    np.testing.assert_allclose(float(vanilla_pg_loss(log_prob, batch)), 1.0 / 3.0, rtol=1e-6)
