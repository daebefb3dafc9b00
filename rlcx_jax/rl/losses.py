"""Losses as standalone pure functions: `loss(params, batch, hparams, apply, ...) -> (loss, aux)`.

`apply` is the forward-pass wrapper from `rl.common.make_apply`, so a distillation term or a
meta-learning inner step can call these directly with any (masked, quantized) parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax.nets import ActionSpec
from rlcx_jax.rl.common import ApplyFn, Params
from rlcx_jax.rl.policy import distribution


# ----------------------------------------------------------------------------------------------
# Actor-critic losses
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class PolicyBatch:
    """A flat batch for actor-critic losses.

    log_prob and value are those of the behaviour policy at collection time (PPO only)."""

    obs: jax.Array
    action: jax.Array
    advantage: jax.Array
    target: jax.Array
    log_prob: jax.Array | None = None
    value: jax.Array | None = None


@struct.dataclass
class ActorCriticAux:
    policy_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array


def value_loss(value: jax.Array, target: jax.Array) -> jax.Array:
    """0.5 * mean squared error."""
    return 0.5 * jnp.mean(jnp.square(value - target))


def clipped_value_loss(
    value: jax.Array, old_value: jax.Array, target: jax.Array, clip_eps: jax.Array
) -> jax.Array:
    """PPO2's value clipping: 0.5 * mean(max((v - G)^2, (v_old + clip(v - v_old) - G)^2))."""
    clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
    return 0.5 * jnp.mean(jnp.maximum(jnp.square(value - target), jnp.square(clipped - target)))


def ppo_loss(
    params: Params,
    batch: PolicyBatch,
    hparams: Any,
    apply: ApplyFn,
    spec: ActionSpec,
    clip_value: bool = True,
) -> tuple[jax.Array, ActorCriticAux]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7) + value loss - entropy bonus.

    ratio = pi(a|s) / pi_old(a|s);  L_clip = -E[min(ratio A, clip(ratio, 1-eps, 1+eps) A)].
    Uses hparams.clip_eps, vf_coef and ent_coef.
    """
    policy_out, value = apply(params, batch.obs)
    dist = distribution(policy_out, spec)
    log_prob = dist.log_prob(batch.action)
    log_ratio = log_prob - batch.log_prob
    ratio = jnp.exp(log_ratio)
    eps = hparams.clip_eps
    surrogate = jnp.minimum(
        ratio * batch.advantage, jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * batch.advantage
    )
    policy_loss = -jnp.mean(surrogate)
    if clip_value:
        v_loss = clipped_value_loss(value, batch.value, batch.target, eps)
    else:
        v_loss = value_loss(value, batch.target)
    entropy = jnp.mean(dist.entropy())
    loss = policy_loss + hparams.vf_coef * v_loss - hparams.ent_coef * entropy
    aux = ActorCriticAux(
        policy_loss=policy_loss,
        value_loss=v_loss,
        entropy=entropy,
        # Schulman's low-variance estimator of KL(old || new): E[(r - 1) - log r].
        approx_kl=jax.lax.stop_gradient(jnp.mean((ratio - 1.0) - log_ratio)),
        clip_fraction=jax.lax.stop_gradient(jnp.mean(jnp.abs(ratio - 1.0) > eps)),
    )
    return loss, aux


def policy_gradient_loss(
    params: Params,
    batch: PolicyBatch,
    hparams: Any,
    apply: ApplyFn,
    spec: ActionSpec,
) -> tuple[jax.Array, ActorCriticAux]:
    """Advantage actor-critic / REINFORCE loss (Williams 1992; Mnih et al. 2016):

    -E[log pi(a|s) A] + vf_coef * 0.5 E[(V(s) - G)^2] - ent_coef * E[H(pi(.|s))].
    The advantage is treated as a constant. With vf_coef = 0 the critic receives no gradient.
    """
    policy_out, value = apply(params, batch.obs)
    dist = distribution(policy_out, spec)
    log_prob = dist.log_prob(batch.action)
    policy_loss = -jnp.mean(log_prob * jax.lax.stop_gradient(batch.advantage))
    v_loss = value_loss(value, batch.target)
    entropy = jnp.mean(dist.entropy())
    loss = policy_loss + hparams.vf_coef * v_loss - hparams.ent_coef * entropy
    zero = jnp.zeros((), jnp.float32)
    return loss, ActorCriticAux(policy_loss, v_loss, entropy, zero, zero)


# ----------------------------------------------------------------------------------------------
# Q-learning loss
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class QBatch:
    """Transitions for Q-learning; next_obs is pre-reset, discount_t = gamma * (1 - terminated)."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    discount: jax.Array
    next_obs: jax.Array


@struct.dataclass
class QAux:
    td_error: jax.Array
    q_mean: jax.Array


def q_learning_loss(
    params: Params,
    target_params: Params,
    batch: QBatch,
    apply: ApplyFn,
    double: bool = False,
    huber_delta: float | None = None,
) -> tuple[jax.Array, QAux]:
    """One-step TD loss of DQN (Mnih et al. 2015) or double DQN (van Hasselt et al. 2016).

    target = r_t + discount_t * Q_target(s', argmax_a Q_(online if double else target)(s', a)).
    Squared error, or the Huber loss with `huber_delta`.
    """
    q_tm1 = apply(params, batch.obs)
    q_t_target = apply(target_params, batch.next_obs)
    if double:
        a_t = jnp.argmax(apply(params, batch.next_obs), axis=-1)
    else:
        a_t = jnp.argmax(q_t_target, axis=-1)
    v_t = jnp.take_along_axis(q_t_target, a_t[..., None], axis=-1)[..., 0]
    target = jax.lax.stop_gradient(batch.reward + batch.discount * v_t)
    q_a = jnp.take_along_axis(q_tm1, batch.action[..., None].astype(jnp.int32), axis=-1)[..., 0]
    td = q_a - target
    if huber_delta is None:
        loss = 0.5 * jnp.mean(jnp.square(td))
    else:
        abs_td = jnp.abs(td)
        quad = jnp.minimum(abs_td, huber_delta)
        loss = jnp.mean(0.5 * quad**2 + huber_delta * (abs_td - quad))
    return loss, QAux(td_error=jnp.mean(jnp.abs(td)), q_mean=jnp.mean(q_a))
