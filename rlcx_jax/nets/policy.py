"""Action distributions (distrax) built from a network's policy output, and how far two policies'
actions agree, in one place."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from rlcx_jax.nets import ActionSpec

AGREEMENT_TOLERANCE = 0.01
"""Continuous agreement: two actions agree when every dimension differs by at most this fraction of
the action range (high - low)."""


def distribution(policy_out: jax.Array, spec: ActionSpec) -> distrax.Distribution:
    """Categorical over logits, or a diagonal Gaussian from `concat(mean, log_std)`."""
    if spec.discrete:
        return distrax.Categorical(logits=policy_out)
    mean, log_std = jnp.split(policy_out, 2, axis=-1)
    return distrax.MultivariateNormalDiag(loc=mean, scale_diag=jnp.exp(log_std))


def sample_action(policy_out: jax.Array, spec: ActionSpec, key: jax.Array) -> jax.Array:
    """A sample of `distribution(policy_out, spec)`. Discrete: the Gumbel-max draw
    argmax(logits + Gumbel noise) straight from the raw logits (`jax.random.categorical`), skipping the
    log-softmax that `distrax.Categorical` applies first: the argmax does not change when a constant is
    subtracted, and the rollout saves those kernels at every step."""
    if spec.discrete:
        return jax.random.categorical(key, policy_out, axis=-1)
    return distribution(policy_out, spec).sample(seed=key)


def greedy_action(policy_out: jax.Array, spec: ActionSpec) -> jax.Array:
    """The mode: argmax of the logits, or the Gaussian mean."""
    if spec.discrete:
        return jnp.argmax(policy_out, axis=-1)
    return jnp.split(policy_out, 2, axis=-1)[0]


def executed_action(action: ArrayLike, spec: ActionSpec) -> jax.Array:
    """The action the environment carries out: a discrete action as it is, a continuous one clipped
    to [low, high] (gymnax's continuous environments clip their input the same way)."""
    if spec.discrete:
        return jnp.asarray(action)
    return jnp.clip(action, spec.low, spec.high)


def _normalized_gap(actions: ArrayLike, reference: ArrayLike, spec: ActionSpec) -> jax.Array:
    """|clip(a) - clip(b)| / (high - low) per state and action dimension, [B, dim]."""
    a, b = executed_action(actions, spec), executed_action(reference, spec)
    return jnp.abs(a - b) / (spec.high - spec.low)


def action_agreement(
    actions: ArrayLike, reference: ArrayLike, spec: ActionSpec, tol: float = AGREEMENT_TOLERANCE
) -> jax.Array:
    """Fraction of states on which two policies take the same greedy action, a scalar in [0, 1].

    actions, reference: greedy actions (`greedy_action`) of the two policies on the same states,
    [*B] for discrete actions, [*B, *shape] for continuous ones (any number of batch axes).
    discrete:   mean_i [a_i == b_i]  (greedy-action agreement);
    continuous: mean_i [max_d |clip(a_id) - clip(b_id)| <= tol * (high - low)]: exact equality of
                float actions is no measure (a 1-ulp difference would count as disagreement), so two
                actions agree when the executed actions lie within `tol` of the action range.
    """
    if spec.discrete:
        return jnp.mean((jnp.asarray(actions) == jnp.asarray(reference)).astype(jnp.float32))
    gap = _normalized_gap(actions, reference, spec)
    action_axes = tuple(range(gap.ndim - len(spec.shape), gap.ndim))
    return jnp.mean((jnp.max(gap, axis=action_axes) <= tol).astype(jnp.float32))


def action_gap(actions: ArrayLike, reference: ArrayLike, spec: ActionSpec) -> jax.Array:
    """How far apart two policies' greedy actions are, a scalar in [0, 1].

    discrete:   the fraction of states where they differ, 1 - `action_agreement`;
    continuous: mean over states and dimensions of |clip(a) - clip(b)| / (high - low): the mean
                distance of the executed actions as a fraction of the action range.
    """
    if spec.discrete:
        return 1.0 - action_agreement(actions, reference, spec)
    return jnp.mean(_normalized_gap(actions, reference, spec))


def agreement_label(spec: ActionSpec, tol: float = AGREEMENT_TOLERANCE) -> str:
    """The column name of `action_agreement` for tables: what the figure counts."""
    if spec.discrete:
        return "greedy agreement"
    return f"action agreement (within {100 * tol:g}% of range)"
