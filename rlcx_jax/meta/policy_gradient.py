"""The inner learner of meta-learning: trajectories in one task and the vanilla policy-gradient loss
with a linear feature baseline refit per task (Finn et al. 2017, after Duan et al. 2016).

For each task the learner collects `num_trajectories` trajectories of `horizon` steps with the one
rollout (`rl.rollout.collect`, every trajectory an environment of a vmapped batch) and keeps the
first episode of each (the steps up to and including its first termination or truncation), then:

  G_t   = r_t + gamma G_{t+1}, cut at the episode's end               (GAE with lambda = 1)
  b_t   = w . f(s_t, t),  f = [s, s^2, t/100, (t/100)^2, (t/100)^3, 1],  w the ridge fit of G on f
  A_t   = (G_t - b_t - mean(G - b)) / std(G - b)                       (standardized)
  L(th) = - sum_t valid_t log pi_th(a_t | s_t) A_t / sum_t valid_t

Everything a trajectory holds is data: gradients flow only through log pi_th, so the same loss
differentiated twice gives MAML's second-order meta-gradient. The loss is an argument
(`PolicyLoss`), so a notebook can swap in e.g. a clipped PPO-style inner step that reads
`batch.log_prob` (the behaviour policy's log-probabilities).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax import nets
from rlcx_jax.nets.policy import distribution
from rlcx_jax.rl import returns, rollout

__all__ = [
    "Trajectories",
    "PolicyLoss",
    "PolicyGradientLearner",
    "vanilla_pg_loss",
    "baseline_features",
    "fit_linear",
    "first_episode_mask",
]

Params = Any
BASELINE_RIDGE = 1e-5
"""Ridge coefficient of the linear baseline's fit (relative to standardized features)."""
TIME_SCALE = 100.0
"""The baseline's time features use t / TIME_SCALE (rllab's convention)."""


@struct.dataclass
class Trajectories:
    """A batch of trajectories in one task, time-major [T, N, ...]; every field is data (no gradient).

    valid: 1.0 on the steps of each trajectory's first episode, 0.0 after it.
    advantage: standardized advantages A_t (0 where not valid).
    log_prob: log-probability of each action under the policy that sampled it.
    episode_return: undiscounted return of each trajectory's first episode, [N].
    end_obs: the observation each first episode ended in (before any reset), [N, *obs_shape].
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    valid: jax.Array
    advantage: jax.Array
    log_prob: jax.Array
    episode_return: jax.Array
    end_obs: jax.Array


# loss(log_prob of batch.action under the policy being trained [T, N], batch) -> scalar
PolicyLoss = Callable[[jax.Array, Trajectories], jax.Array]


def vanilla_pg_loss(log_prob: jax.Array, batch: Trajectories) -> jax.Array:
    """REINFORCE with a baseline (Williams 1992): -sum valid * log pi(a|s) * A / sum valid."""
    return -jnp.sum(batch.valid * log_prob * batch.advantage) / jnp.maximum(jnp.sum(batch.valid), 1.0)


def first_episode_mask(terminated: jax.Array, truncated: jax.Array) -> jax.Array:
    """1.0 on the steps up to and including the first episode end of each column, [T, N] float.

    valid_t = [number of episode ends strictly before t == 0]."""
    done = jnp.logical_or(terminated, truncated).astype(jnp.int32)
    ended_before = jnp.cumsum(done, axis=0) - done
    return (ended_before == 0).astype(jnp.float32)


def baseline_features(obs: jax.Array) -> jax.Array:
    """Linear-baseline features of time-major observations [T, N, ...] -> [T, N, 2 * obs_dim + 4]:
    f = [o, o^2, t/100, (t/100)^2, (t/100)^3, 1] with o = clip(obs, -10, 10) (Duan et al. 2016)."""
    num_steps, num_traj = obs.shape[:2]
    o = jnp.clip(jnp.reshape(obs, (num_steps, num_traj, -1)).astype(jnp.float32), -10.0, 10.0)
    t = jnp.broadcast_to(
        (jnp.arange(num_steps, dtype=jnp.float32) / TIME_SCALE)[:, None, None], (num_steps, num_traj, 1)
    )
    return jnp.concatenate([o, o * o, t, t**2, t**3, jnp.ones_like(t)], axis=-1)


def _conjugate_gradient(a: jax.Array, b: jax.Array, iterations: int) -> jax.Array:
    """x with a x = b for a symmetric positive definite `a`, by `iterations` conjugate-gradient steps
    (Hestenes & Stiefel 1952). Plain matrix products: no LAPACK call, so it vmaps freely."""

    def body(_: int, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        x, r, p, rs = carry
        ap = a @ p
        pap = p @ ap
        alpha = jnp.where(pap > 0, rs / jnp.where(pap > 0, pap, 1.0), 0.0)
        x, r = x + alpha * p, r - alpha * ap
        rs_new = r @ r
        beta = jnp.where(rs > 0, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
        return x, r, r + beta * p, rs_new

    x0 = jnp.zeros_like(b)
    x, *_ = jax.lax.fori_loop(0, iterations, body, (x0, b, b, b @ b))
    return x


def fit_linear(features: jax.Array, targets: jax.Array, weights: jax.Array, ridge: float = BASELINE_RIDGE) -> jax.Array:
    """Fitted values of the weighted ridge regression of `targets` on `features`.

    features [M, d], targets [M], weights [M] >= 0. Features are scaled to unit weighted RMS per
    column, then w = argmin sum_i weights_i (f_i . w - y_i)^2 / sum weights + ridge |w|^2, solved by
    conjugate gradients on the normal equations. Returns f . w, [M]."""
    total = jnp.maximum(jnp.sum(weights), 1.0)
    rms = jnp.sqrt(jnp.sum(weights[:, None] * features**2, axis=0) / total)
    scaled = features / jnp.where(rms > 0, rms, 1.0)
    weighted = scaled * weights[:, None]
    gram = weighted.T @ scaled / total + ridge * jnp.eye(features.shape[1], dtype=features.dtype)
    rhs = weighted.T @ targets / total
    coef = _conjugate_gradient(gram, rhs, 2 * features.shape[1])
    return scaled @ coef


def _standardize(x: jax.Array, valid: jax.Array) -> jax.Array:
    count = jnp.maximum(jnp.sum(valid), 1.0)
    mean = jnp.sum(x * valid) / count
    std = jnp.sqrt(jnp.sum(valid * (x - mean) ** 2) / count)
    return valid * (x - mean) / (std + 1e-8)


@dataclasses.dataclass(frozen=True)
class PolicyGradientLearner:
    """Samples trajectories of a policy in a task and scores them with a policy loss.

    env: a training env (`envs.make_training_env`: episode statistics, action clipping) whose
    `env_params` is the task. network: a built network with a `policy` method (e.g. nets head
    "policy"). param_transform: applied to the parameters in every forward pass (a pruning mask,
    fake quantization with its straight-through gradient), identity when None.
    """

    env: Any
    network: Any
    spec: nets.ActionSpec
    num_trajectories: int
    horizon: int
    policy_loss: PolicyLoss = vanilla_pg_loss
    param_transform: Callable[[Params], Params] | None = None

    def policy_out(self, params: Params, obs: jax.Array) -> jax.Array:
        """The policy head's output (logits, or Gaussian mean and log std)."""
        if self.param_transform is not None:
            params = self.param_transform(params)
        return self.network.apply({"params": params}, obs, method="policy")

    def log_prob(self, params: Params, obs: jax.Array, action: jax.Array) -> jax.Array:
        return distribution(self.policy_out(params, obs), self.spec).log_prob(action)

    def sample(self, params: Params, task: Any, key: jax.Array, hparams: Any) -> Trajectories:
        """`num_trajectories` trajectories of `horizon` steps in `task` (data only: no gradients)."""
        params = jax.lax.stop_gradient(params)
        reset_key, run_key = jax.random.split(key)

        def policy_fn(k: jax.Array, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
            return distribution(self.policy_out(params, obs), self.spec).sample_and_log_prob(seed=k)

        runner = rollout.reset(self.env, task, reset_key, self.num_trajectories)
        _, tr = rollout.collect(self.env, task, policy_fn, runner, run_key, self.horizon)
        return jax.lax.stop_gradient(self._process(tr, hparams.gamma))

    def _process(self, tr: rollout.Transition, gamma: jax.Array) -> Trajectories:
        valid = first_episode_mask(tr.terminated, tr.truncated)
        discount = gamma * (1.0 - tr.terminated.astype(jnp.float32))
        g = returns.discounted_returns(tr.reward, discount, truncated_t=tr.truncated)
        features = baseline_features(tr.obs)
        fitted = fit_linear(jnp.reshape(features, (-1, features.shape[-1])), g.reshape(-1), valid.reshape(-1))
        advantage = _standardize(g - jnp.reshape(fitted, g.shape), valid)
        last = jnp.maximum(jnp.sum(valid, axis=0).astype(jnp.int32) - 1, 0)
        end_obs = jax.vmap(lambda column, i: column[i], in_axes=(1, 0))(tr.next_obs, last)
        return Trajectories(
            obs=tr.obs,
            action=tr.action,
            reward=tr.reward,
            valid=valid,
            advantage=advantage,
            log_prob=tr.extras,
            episode_return=jnp.sum(valid * tr.reward, axis=0),
            end_obs=end_obs,
        )

    def loss(self, params: Params, batch: Trajectories) -> jax.Array:
        """The policy loss of `params` on `batch` (differentiable in `params` only)."""
        return self.policy_loss(self.log_prob(params, batch.obs, batch.action), batch)

    def batch_return(self, batch: Trajectories) -> jax.Array:
        """Mean first-episode return of the batch's trajectories."""
        return jnp.mean(batch.episode_return)
