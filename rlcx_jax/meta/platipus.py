"""PLATIPUS, probabilistic MAML (Finn, Xu & Levine 2018, "Probabilistic Model-Agnostic
Meta-Learning", algorithm 1), carried over from regression to reinforcement learning.

A learned Gaussian over the initial parameters, mean mu and per-weight log-variance:
  prior       p(phi | D_tr) = N(mu - gamma_p grad L(mu, D_tr), sigma^2)
  posterior   q(phi | D_te) = N(mu - gamma_q grad L(mu, D_te), v_q)
where D_tr and D_te are two independent batches of trajectories of the mean policy pi_mu in the task
(the paper's training and test sets of a task), and gamma_p, gamma_q, sigma^2, v_q are learned.
Meta-training samples phi ~ q by reparameterisation (phi = mean + sqrt(v_q) * eps), adapts it with
the usual inner steps to theta'(phi) and minimises

  E_task [ L(theta'(phi), D') + beta * KL(q(phi | D_te) || p(phi | D_tr)) ],

second order through the inner updates and through both inference gradients. At test time there is
no D_te: phi ~ p(phi | D_tr), with D_tr the task's first trajectories, then the inner steps. So
PLATIPUS spends one batch of trajectories (D_tr, from pi_mu) before its "step 0", and different
samples of phi explore differently where one initialisation cannot know which way to go.

No public RL implementation of PLATIPUS existed; the choices above (two batches of the mean policy as
training and test sets, plain inner PG steps after the sampled initialisation) are ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax.meta.adapt import MetaAux, MetaContext, adapt, outer_adam, sgd_step

__all__ = ["PlatipusParams", "Platipus", "gaussian_kl", "sample_gaussian"]

Params = Any


@struct.dataclass
class PlatipusParams:
    """The learned distribution over initial parameters.

    mean: mu (a policy parameter tree); log_var: log sigma^2 of the prior, per weight; q_log_var:
    log v_q of the posterior, per weight; log_gamma_p, log_gamma_q: log step sizes of the prior's and
    posterior's inference gradients (scalars)."""

    mean: Params
    log_var: Params
    q_log_var: Params
    log_gamma_p: jax.Array
    log_gamma_q: jax.Array


def gaussian_kl(mean_q: Params, log_var_q: Params, mean_p: Params, log_var_p: Params) -> jax.Array:
    """KL(N(m_q, v_q) || N(m_p, v_p)) of diagonal Gaussians, summed over every weight:
    sum 0.5 * [ log v_p - log v_q + (v_q + (m_q - m_p)^2) / v_p - 1 ]."""

    def one(mq: jax.Array, lq: jax.Array, mp: jax.Array, lp: jax.Array) -> jax.Array:
        return 0.5 * jnp.sum(lp - lq + (jnp.exp(lq) + (mq - mp) ** 2) / jnp.exp(lp) - 1.0)

    return sum(jax.tree.leaves(jax.tree.map(one, mean_q, log_var_q, mean_p, log_var_p)), jnp.zeros(()))


def sample_gaussian(mean: Params, log_var: Params, key: jax.Array) -> Params:
    """mean + exp(log_var / 2) * eps, eps ~ N(0, I) per weight (reparameterised)."""
    leaves, treedef = jax.tree.flatten(mean)
    keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
    return jax.tree.map(
        lambda m, lv, k: m + jnp.exp(0.5 * lv) * jax.random.normal(k, m.shape, m.dtype), mean, log_var, keys
    )


def _inferred_mean(ctx: MetaContext, meta: PlatipusParams, log_gamma: jax.Array, batch: Any) -> Params:
    """mu - gamma * grad L(mu, batch) (differentiable in mu and gamma)."""
    grads = jax.grad(ctx.learner.loss)(meta.mean, batch)
    return sgd_step(meta.mean, grads, jnp.exp(log_gamma))


@dataclasses.dataclass(frozen=True)
class Platipus:
    """PLATIPUS over policy-gradient adaptation."""

    def init(self, policy_params: Params, hparams: Any) -> PlatipusParams:
        log_var = jax.tree.map(lambda p: jnp.full_like(p, hparams.init_log_var), policy_params)
        log_gamma = jnp.log(jnp.asarray(hparams.inner_lr, jnp.float32))
        return PlatipusParams(policy_params, log_var, log_var, log_gamma, log_gamma)

    def initial_params(
        self, meta_params: PlatipusParams, task: Any, key: jax.Array, ctx: MetaContext, hparams: Any
    ) -> Params:
        """phi ~ p(phi | D_tr), D_tr the task's first trajectories from the mean policy."""
        data_key, noise_key = jax.random.split(key)
        d_tr = ctx.learner.sample(meta_params.mean, task, data_key, hparams)
        mean_p = _inferred_mean(ctx, meta_params, meta_params.log_gamma_p, d_tr)
        return sample_gaussian(mean_p, meta_params.log_var, noise_key)

    def task_objective(
        self, meta: PlatipusParams, task: Any, key: jax.Array, ctx: MetaContext, hparams: Any
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        """L(theta'(phi), D') + beta KL(q || p) for one task, with phi ~ q; and (return of pi_mu,
        return after adaptation, KL)."""
        k_tr, k_te, k_noise, k_adapt, k_post = jax.random.split(key, 5)
        d_tr = ctx.learner.sample(meta.mean, task, k_tr, hparams)
        d_te = ctx.learner.sample(meta.mean, task, k_te, hparams)
        mean_p = _inferred_mean(ctx, meta, meta.log_gamma_p, d_tr)
        mean_q = _inferred_mean(ctx, meta, meta.log_gamma_q, d_te)
        phi = sample_gaussian(mean_q, meta.q_log_var, k_noise)
        adapted = adapt(ctx.learner, phi, task, k_adapt, ctx.inner_steps, hparams.inner_lr, hparams)
        post = ctx.learner.sample(adapted.params, task, k_post, hparams)
        kl = gaussian_kl(mean_q, meta.q_log_var, mean_p, meta.log_var)
        loss = ctx.learner.loss(adapted.params, post) + hparams.kl_weight * kl
        before = ctx.learner.batch_return(d_tr)
        return loss, (before, ctx.learner.batch_return(post), kl)

    def meta_gradient(
        self, meta_params: PlatipusParams, tasks: Any, key: jax.Array, ctx: MetaContext, hparams: Any
    ) -> tuple[PlatipusParams, MetaAux]:
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])

        def mean_objective(meta: PlatipusParams) -> tuple[jax.Array, tuple[jax.Array, ...]]:
            losses, aux = jax.vmap(lambda task, k: self.task_objective(meta, task, k, ctx, hparams))(tasks, keys)
            return jnp.mean(losses), tuple(jnp.mean(a) for a in aux)

        (loss, (before, after, kl)), grads = jax.value_and_grad(mean_objective, has_aux=True)(meta_params)
        return grads, MetaAux(return_before=before, return_after=after, loss=loss, kl=kl)

    def optimizer(self, hparams: Any, iterations: int) -> optax.GradientTransformation:
        return outer_adam(hparams, iterations)
