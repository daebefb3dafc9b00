"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", algorithm 2,
batched version):

  phi <- phi + eps_i * mean_tasks (theta'_task - phi),   eps_i = eps * (1 - i / iterations)

with theta' the parameters after k inner policy-gradient steps (`adapt`, no meta-gradient through
them). Written as an optax step: the update direction handed to the optimizer is
g = phi - mean(theta'), and SGD with the annealed step eps_i gives exactly the formula above.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlcx_jax.meta.adapt import InitIsPolicy, MetaAux, MetaContext, adapt

__all__ = ["Reptile"]

Params = Any


@dataclasses.dataclass(frozen=True)
class Reptile(InitIsPolicy):
    """Reptile over policy-gradient adaptation."""

    def meta_gradient(
        self, meta_params: Params, tasks: Any, key: jax.Array, ctx: MetaContext, hparams: Any
    ) -> tuple[Params, MetaAux]:
        """g = phi - mean over tasks of the adapted parameters."""
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])
        adapted = jax.vmap(
            lambda task, k: adapt(ctx.learner, meta_params, task, k, ctx.inner_steps, hparams.inner_lr, hparams),
        )(tasks, keys)
        direction = jax.tree.map(lambda phi, theta: phi - jnp.mean(theta, axis=0), meta_params, adapted.params)
        returns = adapted.returns  # [tasks, k]
        aux = MetaAux(
            return_before=jnp.mean(returns[:, 0]),
            return_after=jnp.mean(returns[:, -1]),
            loss=optax.tree.norm(direction),
            kl=jnp.zeros(()),
        )
        return direction, aux

    def optimizer(self, hparams: Any, iterations: int) -> optax.GradientTransformation:
        return optax.sgd(optax.linear_schedule(hparams.reptile_eps, 0.0, iterations))
