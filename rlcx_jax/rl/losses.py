"""Losses as standalone pure functions: `loss(params, batch, hparams, apply, ...) -> (loss, aux)`.

`apply` is the forward-pass wrapper from `rl.common.make_apply`, so a distillation term or a
meta-learning inner step can call these directly with any (masked, quantized) parameters.

Batches are flat: every per-sample field has the batch as its one leading axis [B, ...]. Ranks,
dtypes and matching batch sizes are checked with chex at trace time (free under jit; AssertionError on
a bad call); `extras` is any pytree of the extensions and is not checked. A batch's optional
`weight` [B] turns every mean over samples into the weighted sum `sample_mean(x, w) = sum_b w_b x_b`
(None: the plain mean, bit for bit as without it); the multi-task gradient takes one task's loss at
a time this way.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax.nets import ActionSpec
from rlcx_jax.nets.policy import distribution
from rlcx_jax.seams import ApplyFn, Params


def sample_mean(x: jax.Array, weight: jax.Array | None) -> jax.Array:
    """mean_b x_b, or sum_b w_b x_b with per-sample weights `weight` [B] (x: [B] or [B, ...], where a
    sample's entries are averaged first)."""
    if weight is None:
        return jnp.mean(x)
    per_sample = jnp.reshape(x, (x.shape[0], -1)).mean(axis=1) if x.ndim > 1 else x
    return jnp.sum(weight * per_sample)


# ----------------------------------------------------------------------------------------------
# Actor-critic losses
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class PolicyBatch:
    """A flat batch for actor-critic losses.

    log_prob and value are those of the behaviour policy at collection time (PPO only); extras
    holds per-sample data of extensions ({name: pytree with the batch as leading axis})."""

    obs: jax.Array
    action: jax.Array
    advantage: jax.Array
    target: jax.Array
    log_prob: jax.Array | None = None
    value: jax.Array | None = None
    extras: Any = None
    weight: jax.Array | None = None
    """Per-sample loss weights [B] (`sample_mean`); None: the plain mean."""


@struct.dataclass
class ActorCriticAux:
    policy_loss: jax.Array
    value_loss: jax.Array
    entropy: jax.Array
    approx_kl: jax.Array
    clip_fraction: jax.Array


def value_loss(value: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """0.5 * mean squared error (weighted by `weight` [B] when given, `sample_mean`).

    Shapes: value, target: float, one shape, usually [B] (any rank: the mean is over all elements,
    but the shapes must match, so a [B, 1] value head against a [B] target is rejected, not broadcast).
    """
    chex.assert_equal_shape([value, target], custom_message="value_loss: value, target must have one shape")
    chex.assert_type([value, target], float, custom_message="value_loss: value, target must be floating point")
    return 0.5 * sample_mean(jnp.square(value - target), weight)


def clipped_value_loss(
    value: jax.Array, old_value: jax.Array, target: jax.Array, clip_eps: jax.Array, weight: jax.Array | None = None
) -> jax.Array:
    """PPO2's value clipping: 0.5 * mean(max((v - G)^2, (v_old + clip(v - v_old) - G)^2)).

    Shapes: value, old_value, target: float, one shape, usually [B] (any rank, as in `value_loss`);
    clip_eps: scalar.
    """
    where = "clipped_value_loss: value, old_value, target"
    chex.assert_rank(clip_eps, 0, custom_message="clipped_value_loss: clip_eps must be a scalar")
    chex.assert_equal_shape([value, old_value, target], custom_message=f"{where} must have one shape")
    chex.assert_type([value, old_value, target], float, custom_message=f"{where} must be floating point")
    clipped = old_value + jnp.clip(value - old_value, -clip_eps, clip_eps)
    return 0.5 * sample_mean(jnp.maximum(jnp.square(value - target), jnp.square(clipped - target)), weight)


def _check_policy_batch(fn: str, batch: PolicyBatch, spec: ActionSpec, floats: dict[str, jax.Array]) -> None:
    """Trace-time checks of a flat actor-critic batch: the named float fields are [B] float; obs is
    [B, ...]; action is [B] (discrete, any integer-valued dtype) or [B, A] float (continuous)."""
    names = ", ".join(floats)
    arrays = list(floats.values())
    chex.assert_rank(arrays, 1, custom_message=f"{fn}: batch.{{{names}}} must be flat [B]")
    chex.assert_type(arrays, float, custom_message=f"{fn}: batch.{{{names}}} must be floating point")
    if spec.discrete:
        chex.assert_rank(batch.action, 1, custom_message=f"{fn}: discrete batch.action must be [B]")
    else:
        chex.assert_rank(batch.action, 2, custom_message=f"{fn}: continuous batch.action must be [B, A]")
        chex.assert_type(batch.action, float, custom_message=f"{fn}: continuous batch.action must be float")
    chex.assert_shape(batch.obs, (None, ...), custom_message=f"{fn}: batch.obs must be [B, ...]")
    chex.assert_equal_shape_prefix(
        [batch.obs, batch.action, *arrays],
        1,
        custom_message=f"{fn}: batch.{{obs, action, {names}}} must have one batch size B",
    )


def _check_coefs(fn: str, hparams: Any, names: tuple[str, ...]) -> None:
    coefs = [getattr(hparams, n) for n in names]
    chex.assert_rank(coefs, 0, custom_message=f"{fn}: hparams.{{{', '.join(names)}}} must be scalars")


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

    Shapes (flat batch of B samples): batch.obs [B, ...]; batch.action [B] (discrete) or [B, A]
    float (continuous); batch.advantage, target, log_prob: [B] float; batch.value: [B] float (the
    behaviour values; needed only with `clip_value`); batch.extras: unchecked. hparams.clip_eps,
    vf_coef, ent_coef: scalars. `apply` must return a value of the target's shape, [B].
    """
    if batch.log_prob is None or (clip_value and batch.value is None):
        raise ValueError("ppo_loss needs batch.log_prob (and batch.value, with clip_value) of the behaviour policy")
    floats = {"advantage": batch.advantage, "target": batch.target, "log_prob": batch.log_prob}
    if batch.value is not None:
        floats["value"] = batch.value
    _check_policy_batch("ppo_loss", batch, spec, floats)
    _check_coefs("ppo_loss", hparams, ("clip_eps", "vf_coef", "ent_coef"))
    policy_out, value = apply(params, batch.obs)
    dist = distribution(policy_out, spec)
    log_prob = dist.log_prob(batch.action)
    log_ratio = log_prob - batch.log_prob
    ratio = jnp.exp(log_ratio)
    eps = hparams.clip_eps
    surrogate = jnp.minimum(ratio * batch.advantage, jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * batch.advantage)
    policy_loss = -sample_mean(surrogate, batch.weight)
    if clip_value and batch.value is not None:  # checked above: present whenever clip_value
        v_loss = clipped_value_loss(value, batch.value, batch.target, eps, batch.weight)
    else:
        v_loss = value_loss(value, batch.target, batch.weight)
    entropy = sample_mean(dist.entropy(), batch.weight)
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

    Shapes (flat batch of B samples): batch.obs [B, ...]; batch.action [B] (discrete) or [B, A]
    float (continuous); batch.advantage, target: [B] float; batch.log_prob, value, extras: unused,
    unchecked. hparams.vf_coef, ent_coef: scalars. `apply` must return a value of shape [B].
    """
    _check_policy_batch("policy_gradient_loss", batch, spec, {"advantage": batch.advantage, "target": batch.target})
    _check_coefs("policy_gradient_loss", hparams, ("vf_coef", "ent_coef"))
    policy_out, value = apply(params, batch.obs)
    dist = distribution(policy_out, spec)
    log_prob = dist.log_prob(batch.action)
    policy_loss = -sample_mean(log_prob * jax.lax.stop_gradient(batch.advantage), batch.weight)
    v_loss = value_loss(value, batch.target, batch.weight)
    entropy = sample_mean(dist.entropy(), batch.weight)
    loss = policy_loss + hparams.vf_coef * v_loss - hparams.ent_coef * entropy
    zero = jnp.zeros((), jnp.float32)
    return loss, ActorCriticAux(policy_loss, v_loss, entropy, zero, zero)


# ----------------------------------------------------------------------------------------------
# Q-learning loss
# ----------------------------------------------------------------------------------------------
@struct.dataclass
class QBatch:
    """Transitions for Q-learning; next_obs is pre-reset, discount_t = gamma * (1 - terminated);
    extras: per-sample data of extensions, as in `PolicyBatch`."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    discount: jax.Array
    next_obs: jax.Array
    extras: Any = None
    weight: jax.Array | None = None
    """Per-sample loss weights [B] (`sample_mean`); None: the plain mean."""


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

    Shapes (flat batch of B transitions): batch.obs, next_obs: [B, ...], one shape; batch.action:
    [B] (integer-valued, any dtype: it is cast); batch.reward, discount: [B] float; batch.extras:
    unchecked. `apply` must return Q-values [B, num_actions].
    """
    fn = "q_learning_loss"
    chex.assert_rank(
        [batch.action, batch.reward, batch.discount],
        1,
        custom_message=f"{fn}: batch.{{action, reward, discount}} must be flat [B]",
    )
    chex.assert_type(
        [batch.reward, batch.discount], float, custom_message=f"{fn}: batch.{{reward, discount}} must be floating point"
    )
    chex.assert_shape(batch.obs, (None, ...), custom_message=f"{fn}: batch.obs must be [B, ...]")
    chex.assert_equal_shape(
        [batch.obs, batch.next_obs], custom_message=f"{fn}: batch.obs, next_obs must have one shape"
    )
    chex.assert_equal_shape_prefix(
        [batch.obs, batch.action, batch.reward, batch.discount],
        1,
        custom_message=f"{fn}: batch.{{obs, action, reward, discount}} must have one batch size B",
    )
    q_tm1 = apply(params, batch.obs)
    q_t_target = apply(target_params, batch.next_obs)
    chex.assert_rank(q_tm1, 2, custom_message=f"{fn}: apply must return Q-values [B, num_actions]")
    chex.assert_equal_shape_prefix([q_tm1, batch.reward], 1, custom_message=f"{fn}: Q-values must be [B, num_actions]")
    chex.assert_equal_shape([q_tm1, q_t_target], custom_message=f"{fn}: online and target Q-values must have one shape")
    if double:
        a_t = jnp.argmax(apply(params, batch.next_obs), axis=-1)
    else:
        a_t = jnp.argmax(q_t_target, axis=-1)
    v_t = jnp.take_along_axis(q_t_target, a_t[..., None], axis=-1)[..., 0]
    target = jax.lax.stop_gradient(batch.reward + batch.discount * v_t)
    q_a = jnp.take_along_axis(q_tm1, batch.action[..., None].astype(jnp.int32), axis=-1)[..., 0]
    td = q_a - target
    if huber_delta is None:
        loss = 0.5 * sample_mean(jnp.square(td), batch.weight)
    else:
        abs_td = jnp.abs(td)
        quad = jnp.minimum(abs_td, huber_delta)
        loss = sample_mean(0.5 * quad**2 + huber_delta * (abs_td - quad), batch.weight)
    return loss, QAux(td_error=jnp.mean(jnp.abs(td)), q_mean=jnp.mean(q_a))
