"""Action distributions (distrax) built from a network's policy output, in one place."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp

from rlcx_jax.nets import ActionSpec


def distribution(policy_out: jax.Array, spec: ActionSpec) -> distrax.Distribution:
    """Categorical over logits, or a diagonal Gaussian from `concat(mean, log_std)`."""
    if spec.discrete:
        return distrax.Categorical(logits=policy_out)
    mean, log_std = jnp.split(policy_out, 2, axis=-1)
    return distrax.MultivariateNormalDiag(loc=mean, scale_diag=jnp.exp(log_std))


def greedy_action(policy_out: jax.Array, spec: ActionSpec) -> jax.Array:
    """The mode: argmax of the logits, or the Gaussian mean."""
    if spec.discrete:
        return jnp.argmax(policy_out, axis=-1)
    return jnp.split(policy_out, 2, axis=-1)[0]
