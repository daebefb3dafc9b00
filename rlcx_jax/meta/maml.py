"""MAML and first-order MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks", algorithm 3), and the pretrained baseline (the same with no inner step).

  min_phi  E_task [ L(theta'(phi), D') ],   theta'(phi) = adapt(phi, task)   (k inner PG steps)

with D' fresh trajectories of the adapted policy. With k > 1 inner steps and `step_loss_weight` w > 0
the objective also scores the intermediate policies, MAML++'s multi-step loss (Antoniou, Edwards &
Storkey 2019, "How to train your MAML", section 4):

  ( L(theta_k, D') + w * sum_{j=1}^{k-1} L(theta_j, D_j) ) / (1 + w (k - 1))

with D_j the batch inner step j+1 sampled from theta_j (w = 0 is MAML). It keeps every step of
adaptation useful, where plain MAML with two steps learned a first step that overshoots and a second
that undoes it on point navigation. MAML differentiates through the inner updates
(second order: the meta-gradient contains Hessian-vector products of the inner loss); first-order
MAML treats each inner gradient as a constant, so the meta-gradient is grad L(theta') evaluated at the
adapted parameters. The outer step is Adam on the clipped meta-gradient (the paper used TRPO).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlcx_jax.meta.adapt import InitIsPolicy, MetaAux, MetaContext, adapt, outer_adam

__all__ = ["MAML", "task_objective"]

Params = Any


def task_objective(
    params: Params, task: Any, key: jax.Array, ctx: MetaContext, hparams: Any, first_order: bool
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The meta-objective of one task (L(theta'(phi), D'), with the intermediate steps' losses when
    `hparams.step_loss_weight` > 0), and (return before adaptation, return after it)."""
    adapt_key, post_key = jax.random.split(key)
    adapted = adapt(ctx.learner, params, task, adapt_key, ctx.inner_steps, hparams.inner_lr, hparams, first_order)
    post = ctx.learner.sample(adapted.params, task, post_key, hparams)
    after = ctx.learner.batch_return(post)
    before = adapted.returns[0] if ctx.inner_steps > 0 else after
    final_loss = ctx.learner.loss(adapted.params, post)
    if ctx.inner_steps < 2:
        return final_loss, (before, after)
    w = hparams.step_loss_weight
    objective = (final_loss + w * jnp.sum(adapted.losses[1:])) / (1.0 + w * (ctx.inner_steps - 1))
    return objective, (before, after)


@dataclasses.dataclass(frozen=True)
class MAML(InitIsPolicy):
    """MAML (`first_order=False`) or first-order MAML; with `ctx.inner_steps == 0` it trains one
    policy on the task mixture (the "pretrained" baseline)."""

    first_order: bool = False

    def meta_gradient(
        self, meta_params: Params, tasks: Any, key: jax.Array, ctx: MetaContext, hparams: Any
    ) -> tuple[Params, MetaAux]:
        """grad_phi of the mean over the meta-batch of `task_objective` (tasks vmapped)."""
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])

        def mean_objective(phi: Params) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            losses, (before, after) = jax.vmap(
                lambda task, k: task_objective(phi, task, k, ctx, hparams, self.first_order)
            )(tasks, keys)
            return jnp.mean(losses), (jnp.mean(before), jnp.mean(after))

        (loss, (before, after)), grads = jax.value_and_grad(mean_objective, has_aux=True)(meta_params)
        return grads, MetaAux(return_before=before, return_after=after, loss=loss, kl=jnp.zeros(()))

    def optimizer(self, hparams: Any, iterations: int) -> optax.GradientTransformation:
        return outer_adam(hparams, iterations)
