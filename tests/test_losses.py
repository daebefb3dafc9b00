"""Losses as pure functions: hand cases, NumPy references, and the same answers under jit / vmap.

The losses call the network through `apply(params, obs)`; here `apply` reads the outputs straight from
`params` (or is a linear Q-function), so every number can be computed by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax.nets import ActionSpec
from rlcx_jax.nets.policy import distribution, greedy_action
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

DISCRETE2 = ActionSpec(discrete=True, num_actions=2)


def table_apply(params, obs):
    """A 'network' whose outputs are its parameters: one row of logits and one value per sample."""
    del obs
    return params["logits"], params["value"]


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# PPO clipped objective
# ----------------------------------------------------------------------------------------------
# (ratio, advantage) and whether the clipped term is the minimum (then the sample has no gradient):
#   A > 0, ratio > 1 + eps: clipped      A > 0, ratio < 1 - eps: not clipped (pessimistic bound)
#   A < 0, ratio < 1 - eps: clipped      A < 0, ratio > 1 + eps: not clipped
#   ratio inside [1 - eps, 1 + eps]: not clipped
RATIOS = np.array([1.5, 0.5, 0.5, 1.5, 1.1])
ADVANTAGES = np.array([1.0, 1.0, -1.0, -1.0, 2.0])
CLIPPED = np.array([True, False, True, False, False])
EPS = 0.2


def _ppo_case(ratios=RATIOS, advantages=ADVANTAGES):
    logits = np.array([[0.0, 0.3], [0.2, -0.1], [0.5, 0.5], [-1.0, 0.4], [0.1, 0.0]], np.float32)
    actions = np.array([1, 0, 1, 1, 0])
    new_logp = np_log_softmax(logits)[np.arange(5), actions]
    params = {"logits": jnp.asarray(logits), "value": jnp.asarray([0.5, -0.2, 1.0, 0.0, 2.0], jnp.float32)}
    batch = PolicyBatch(
        obs=jnp.zeros((5, 1)),
        action=jnp.asarray(actions),
        advantage=jnp.asarray(advantages, jnp.float32),
        target=jnp.asarray([1.0, 0.0, 0.8, 0.3, 2.5], jnp.float32),
        log_prob=jnp.asarray(new_logp - np.log(ratios), jnp.float32),  # so that pi / pi_old = ratio
        value=jnp.asarray([0.4, 0.3, 1.0, -0.5, 2.0], jnp.float32),
    )
    return params, batch, logits, actions


def test_ppo_policy_loss_clipping_hand_cases():
    params, batch, _, _ = _ppo_case()
    hp = PPOHParams(clip_eps=EPS, vf_coef=0.0, ent_coef=0.0)
    loss, aux = ppo_loss(params, batch, hp, table_apply, DISCRETE2)
    # min(r A, clip(r) A) = [1.2, 0.5, -0.8, -1.5, 2.2]
    surrogate = np.array([1.2, 0.5, -0.8, -1.5, 2.2])
    np.testing.assert_allclose(aux.policy_loss, -surrogate.mean(), rtol=1e-5)
    np.testing.assert_allclose(loss, -surrogate.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux.clip_fraction, 0.8, rtol=1e-6)
    np.testing.assert_allclose(aux.approx_kl, np.mean((RATIOS - 1) - np.log(RATIOS)), rtol=1e-4)


def test_ppo_clipped_samples_get_no_policy_gradient():
    params, batch, _, _ = _ppo_case()
    hp = PPOHParams(clip_eps=EPS, vf_coef=0.0, ent_coef=0.0)
    grads = jax.grad(lambda p: ppo_loss(p, batch, hp, table_apply, DISCRETE2)[0])(params)
    per_sample = np.abs(np.asarray(grads["logits"])).sum(-1)
    np.testing.assert_array_equal(per_sample[CLIPPED], 0.0)
    assert np.all(per_sample[~CLIPPED] > 1e-3)
    # Unclipped: d(-r A / n)/d logit = -(A r / n) (onehot - softmax); check one sample exactly.
    _, _, logits, actions = _ppo_case()
    i = 1
    p = np.exp(np_log_softmax(logits[i]))
    onehot = np.eye(2)[actions[i]]
    np.testing.assert_allclose(grads["logits"][i], -(ADVANTAGES[i] * RATIOS[i] / 5) * (onehot - p), rtol=1e-4)
    np.testing.assert_array_equal(grads["value"], 0.0)  # vf_coef = 0


def test_ppo_total_loss_terms():
    params, batch, logits, _ = _ppo_case()
    hp = PPOHParams(clip_eps=EPS, vf_coef=0.5, ent_coef=0.01)
    p = np.exp(np_log_softmax(logits))
    entropy = -(p * np.log(p)).sum(-1).mean()
    v, old_v, target = map(np.asarray, (params["value"], batch.value, batch.target))
    clipped_v = old_v + np.clip(v - old_v, -EPS, EPS)
    v_loss = 0.5 * np.maximum((v - target) ** 2, (clipped_v - target) ** 2).mean()
    policy = -np.array([1.2, 0.5, -0.8, -1.5, 2.2]).mean()
    loss, aux = ppo_loss(params, batch, hp, table_apply, DISCRETE2)
    np.testing.assert_allclose(aux.entropy, entropy, rtol=1e-5)
    np.testing.assert_allclose(aux.value_loss, v_loss, rtol=1e-5)
    np.testing.assert_allclose(loss, policy + 0.5 * v_loss - 0.01 * entropy, rtol=1e-5)
    # Without value clipping: the plain 0.5 MSE.
    _, aux_plain = ppo_loss(params, batch, hp, table_apply, DISCRETE2, clip_value=False)
    np.testing.assert_allclose(aux_plain.value_loss, 0.5 * ((v - target) ** 2).mean(), rtol=1e-5)


def test_clipped_value_loss_hand_case():
    # clipped = old + clip(v - old, +-0.2) = [1.2, 0.8]; (v - G)^2 = [1, 9]; (clipped - G)^2 = [3.24, 4.84]
    got = clipped_value_loss(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]), jnp.array([3.0, 3.0]), 0.2)
    np.testing.assert_allclose(got, 0.5 * (3.24 + 9.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(value_loss(jnp.array([2.0, 0.0]), jnp.array([3.0, 3.0])), 2.5, rtol=1e-6)


def test_ppo_loss_under_jit_and_vmap_over_clip_eps():
    params, batch, _, _ = _ppo_case()

    def loss_fn(p, b, eps):
        return ppo_loss(p, b, PPOHParams(clip_eps=eps, vf_coef=0.5, ent_coef=0.01), table_apply, DISCRETE2)

    epss = jnp.array([0.1, 0.2, 0.6])
    swept, swept_aux = jax.jit(jax.vmap(loss_fn, in_axes=(None, None, 0)))(params, batch, epss)
    for i, eps in enumerate([0.1, 0.2, 0.6]):
        eager, eager_aux = loss_fn(params, batch, eps)
        jitted, _ = jax.jit(loss_fn)(params, batch, eps)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)
        np.testing.assert_allclose(swept[i], eager, rtol=1e-6)
        np.testing.assert_allclose(swept_aux.clip_fraction[i], np.mean(np.abs(RATIOS - 1) > eps))
    # vmap over a leading axis of independent batches.
    batches = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), batch)
    ps = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), params)
    vm, _ = jax.vmap(loss_fn, in_axes=(0, 0, None))(ps, batches, 0.2)
    np.testing.assert_allclose(vm[0], loss_fn(params, batch, 0.2)[0], rtol=1e-6)
    rev = jax.tree.map(lambda x: x[::-1], (params, batch))
    np.testing.assert_allclose(vm[1], loss_fn(*rev, 0.2)[0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Policy gradient (A2C / REINFORCE)
# ----------------------------------------------------------------------------------------------
def _pg_case(seed=0, n=7, num_actions=3):
    rng = np.random.default_rng(seed)
    params = {
        "logits": jnp.asarray(rng.normal(size=(n, num_actions)), jnp.float32),
        "value": jnp.asarray(rng.normal(size=n), jnp.float32),
    }
    batch = PolicyBatch(
        obs=jnp.zeros((n, 1)),
        action=jnp.asarray(rng.integers(0, num_actions, n)),
        advantage=jnp.asarray(rng.normal(size=n), jnp.float32),
        target=jnp.asarray(rng.normal(size=n), jnp.float32),
    )
    return params, batch


def np_pg_loss(params, batch, vf_coef, ent_coef):
    logp = np_log_softmax(params["logits"])
    p = np.exp(logp)
    a = np.asarray(batch.action)
    taken = logp[np.arange(len(a)), a]
    policy = -(taken * np.asarray(batch.advantage)).mean()
    v_loss = 0.5 * ((np.asarray(params["value"]) - np.asarray(batch.target)) ** 2).mean()
    entropy = -(p * logp).sum(-1).mean()
    return policy + vf_coef * v_loss - ent_coef * entropy, policy, v_loss, entropy


def test_policy_gradient_loss_matches_numpy():
    params, batch = _pg_case()
    hp = PPOHParams(vf_coef=0.5, ent_coef=0.01)
    spec = ActionSpec(discrete=True, num_actions=3)
    loss, aux = policy_gradient_loss(params, batch, hp, table_apply, spec)
    want, policy, v_loss, entropy = np_pg_loss(params, batch, 0.5, 0.01)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux.policy_loss, policy, rtol=1e-5)
    np.testing.assert_allclose(aux.value_loss, v_loss, rtol=1e-5)
    np.testing.assert_allclose(aux.entropy, entropy, rtol=1e-5)
    # The advantage is a constant: no gradient flows into it (matters when it depends on params).
    g = jax.grad(lambda b: policy_gradient_loss(params, b, hp, table_apply, spec)[0], allow_int=True)(batch)
    np.testing.assert_array_equal(g.advantage, 0.0)
    # vf_coef = 0 (REINFORCE without baseline): the critic gets no gradient.
    g0 = jax.grad(lambda p: policy_gradient_loss(p, batch, hp.replace(vf_coef=0.0), table_apply, spec)[0])(params)
    np.testing.assert_array_equal(g0["value"], 0.0)


def test_policy_gradient_loss_jit_and_vmap():
    spec = ActionSpec(discrete=True, num_actions=3)
    hp = PPOHParams(vf_coef=0.5, ent_coef=0.01)
    cases = [_pg_case(seed) for seed in range(3)]
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[c[0] for c in cases])
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), *[c[1] for c in cases])
    fn = lambda p, b: policy_gradient_loss(p, b, hp, table_apply, spec)[0]  # noqa: E731
    vm = jax.jit(jax.vmap(fn))(params, batches)
    for i, (p, b) in enumerate(cases):
        np.testing.assert_allclose(vm[i], np_pg_loss(p, b, 0.5, 0.01)[0], rtol=1e-5)
        np.testing.assert_allclose(jax.jit(fn)(p, b), fn(p, b), rtol=1e-6)


def test_gaussian_policy_log_prob_and_mode():
    spec = ActionSpec(discrete=False, shape=(2,), low=-2.0, high=2.0)
    mean = np.array([[0.5, -1.0]], np.float32)
    log_std = np.array([[0.0, np.log(0.5)]], np.float32)
    out = jnp.asarray(np.concatenate([mean, log_std], -1))
    a = np.array([[1.0, -0.5]], np.float32)
    std = np.exp(log_std)
    want = (-0.5 * ((a - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)
    np.testing.assert_allclose(distribution(out, spec).log_prob(a), want, rtol=1e-5)
    np.testing.assert_allclose(greedy_action(out, spec), mean)
    assert int(greedy_action(jnp.array([0.1, 0.9, 0.3]), DISCRETE2)) == 1


# ----------------------------------------------------------------------------------------------
# Q-learning (DQN / double DQN)
# ----------------------------------------------------------------------------------------------
def linear_q(params, obs):
    return obs @ params["w"] + params["b"]


def _q_case(seed=0, n=16, obs_dim=3, num_actions=4):
    rng = np.random.default_rng(seed)

    def p():
        return {
            "w": jnp.asarray(rng.normal(size=(obs_dim, num_actions)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=num_actions), jnp.float32),
        }

    params, target_params = p(), p()
    terminated = rng.random(n) < 0.3
    batch = QBatch(
        obs=jnp.asarray(rng.normal(size=(n, obs_dim)), jnp.float32),
        action=jnp.asarray(rng.integers(0, num_actions, n), jnp.int32),
        reward=jnp.asarray(rng.normal(size=n), jnp.float32),
        discount=jnp.asarray(0.9 * (1.0 - terminated), jnp.float32),
        next_obs=jnp.asarray(rng.normal(size=(n, obs_dim)), jnp.float32),
    )
    return params, target_params, batch


def np_q_loss(params, target_params, batch, double, huber_delta=None):
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    q = lambda p, o: f64(o) @ f64(p["w"]) + f64(p["b"])  # noqa: E731
    n = len(batch.reward)
    q_next_target = q(target_params, batch.next_obs)
    selector = q(params, batch.next_obs) if double else q_next_target
    a_star = selector.argmax(-1)
    target = f64(batch.reward) + f64(batch.discount) * q_next_target[np.arange(n), a_star]
    td = q(params, batch.obs)[np.arange(n), np.asarray(batch.action)] - target
    if huber_delta is None:
        return 0.5 * np.mean(td**2), td
    abs_td = np.abs(td)
    per = np.where(abs_td <= huber_delta, 0.5 * td**2, huber_delta * (abs_td - 0.5 * huber_delta))
    return per.mean(), td


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("huber_delta", [None, 0.5])
def test_q_learning_loss_matches_numpy(double, huber_delta):
    params, target_params, batch = _q_case()
    loss, aux = q_learning_loss(params, target_params, batch, linear_q, double, huber_delta)
    want, td = np_q_loss(params, target_params, batch, double, huber_delta)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux.td_error, np.abs(td).mean(), rtol=1e-5)


def test_double_dqn_target_differs_from_dqn_on_this_case():
    params, target_params, batch = _q_case()
    single = q_learning_loss(params, target_params, batch, linear_q, False)[0]
    double = q_learning_loss(params, target_params, batch, linear_q, True)[0]
    assert abs(float(single) - float(double)) > 1e-3  # so the parametrized check above means something


def test_q_learning_is_a_semi_gradient():
    """With target_params = params the target still gets no gradient: dL/dq_a = td only."""
    params, _, batch = _q_case()
    grads = jax.grad(lambda p: q_learning_loss(p, p, batch, linear_q, True)[0])(params)
    _, td = np_q_loss(params, params, batch, True)
    n = len(td)
    onehot = np.eye(4)[np.asarray(batch.action)]
    want_w = np.asarray(batch.obs, np.float64).T @ (onehot * td[:, None]) / n
    np.testing.assert_allclose(grads["w"], want_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["b"], (onehot * td[:, None]).sum(0) / n, rtol=1e-4, atol=1e-6)


def test_q_learning_loss_jit_and_vmap():
    cases = [_q_case(seed) for seed in range(3)]
    stack = lambda xs: jax.tree.map(lambda *ys: jnp.stack(ys), *xs)  # noqa: E731
    params, targets, batches = (stack([c[i] for c in cases]) for i in range(3))
    fn = lambda p, t, b: q_learning_loss(p, t, b, linear_q, True, 1.0)[0]  # noqa: E731
    vm = jax.jit(jax.vmap(fn))(params, targets, batches)
    for i, (p, t, b) in enumerate(cases):
        np.testing.assert_allclose(vm[i], np_q_loss(p, t, b, True, 1.0)[0], rtol=1e-5)
        np.testing.assert_allclose(jax.jit(fn)(p, t, b), fn(p, t, b), rtol=1e-6)
