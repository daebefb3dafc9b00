"""Adaptation: k differentiable inner policy-gradient steps in one task, and what every method shares.

  theta_0 = phi,   theta_{j+1} = theta_j - alpha * clip(grad L(theta_j, D_j)),   D_j ~ pi_{theta_j} in the task

with fresh trajectories D_j for every step (Finn et al. 2017, section 5.3) and clip(g) = g * min(1, c / |g|)
(`inner_max_grad_norm` c, off by default: standardized advantages give every step a gradient of about the
same size however close the policy already is). `adapt` is a
`lax.scan` over the k steps, so `jax.grad` of anything computed from its result differentiates
through every inner update (MAML's second-order meta-gradient); `first_order=True` makes each inner
gradient a constant (first-order MAML). The learner (what a trajectory is, which loss) and the
policy network are arguments: any object with `sample`, `loss` and `batch_return` will do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = [
    "Learner",
    "Adaptation",
    "MetaContext",
    "MetaAux",
    "MetaMethod",
    "InitIsPolicy",
    "clip_by_global_norm",
    "outer_adam",
    "sgd_step",
    "adapt",
    "adaptation_curve",
]

Params = Any


class Learner(Protocol):
    """What adaptation needs from the inner problem."""

    def sample(self, params: Params, task: Any, key: jax.Array, hparams: Any) -> Any:
        """A batch of data in `task` from the policy `params` (no gradient flows through it)."""
        ...

    def loss(self, params: Params, batch: Any) -> jax.Array:
        """The inner loss, differentiable in `params`."""
        ...

    def batch_return(self, batch: Any) -> jax.Array:
        """The score of a batch (mean episode return)."""
        ...


@struct.dataclass
class Adaptation:
    """The result of `adapt`: the adapted parameters and, per inner step j, the mean return of the
    batch D_j (the return before update j+1, [k]), its episodes' end observations [k, N, ...] and
    the inner loss L(theta_j, D_j) that step descended ([k], differentiable in the initial params)."""

    params: Params
    returns: jax.Array
    end_obs: jax.Array
    losses: jax.Array


@dataclasses.dataclass(frozen=True)
class MetaContext:
    """The static build a meta-method works with."""

    learner: Any
    inner_steps: int
    iterations: int


@struct.dataclass
class MetaAux:
    """Per-iteration scalars of a meta-update, means over the meta-batch of tasks.

    return_before: return of the first batch of each task (before adaptation); return_after: return
    of the batch after adaptation (Reptile: of its last inner batch); loss: the meta-objective;
    kl: PLATIPUS's KL term (0 for the other methods)."""

    return_before: jax.Array
    return_after: jax.Array
    loss: jax.Array
    kl: jax.Array


class MetaMethod(Protocol):
    """A meta-training method: what it learns, how a task's initial parameters come from it, and the
    direction of its meta-update (a gradient for optax)."""

    def init(self, policy_params: Params, hparams: Any) -> Any:
        """The meta-parameters, from freshly initialised policy parameters."""
        ...

    def initial_params(self, meta_params: Any, task: Any, key: jax.Array, ctx: MetaContext, hparams: Any) -> Params:
        """The policy parameters adaptation starts from in `task`."""
        ...

    def meta_gradient(
        self, meta_params: Any, tasks: Any, key: jax.Array, ctx: MetaContext, hparams: Any
    ) -> tuple[Any, MetaAux]:
        """The update direction (same tree as `meta_params`; the optimizer descends it) and metrics."""
        ...

    def optimizer(self, hparams: Any, iterations: int) -> optax.GradientTransformation:
        """The outer optimizer, built from traced hyperparameters."""
        ...


class InitIsPolicy:
    """For methods whose meta-parameters are the policy's initial parameters themselves (MAML,
    FOMAML, Reptile, pretrained): every task starts adaptation from them."""

    def init(self, policy_params: Params, hparams: Any) -> Params:
        return policy_params

    def initial_params(self, meta_params: Params, task: Any, key: jax.Array, ctx: MetaContext, hparams: Any) -> Params:
        return meta_params


def outer_adam(hparams: Any, iterations: int) -> optax.GradientTransformation:
    """The outer optimizer of the gradient-based methods: the meta-gradient clipped to a global norm of
    `max_grad_norm`, then Adam whose step decays linearly from `outer_lr` to 0 over the iterations
    (meta-training with a constant step drifted away from its best adaptation on point navigation)."""
    schedule = optax.linear_schedule(hparams.outer_lr, 0.0, iterations)
    return optax.chain(optax.clip_by_global_norm(hparams.max_grad_norm), optax.adam(schedule))


def sgd_step(params: Params, grads: Params, lr: jax.Array | float) -> Params:
    """theta - lr * grad, leaf by leaf."""
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def clip_by_global_norm(grads: Params, max_norm: jax.Array | float) -> Params:
    """grads * min(1, max_norm / |grads|_2), differentiable (the meta-gradient flows through it).

    The norm is sqrt(max(sum g^2, 1e-24)): at a zero gradient (a task whose trajectories all earned the
    same return, e.g. none reached a sparse reward) sqrt's derivative would be infinite and the
    second-order meta-gradient NaN."""
    norm = jnp.sqrt(jnp.maximum(optax.tree.norm(grads, squared=True), 1e-24))
    scale = jnp.minimum(1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale, grads)


def _end_obs(batch: Any) -> jax.Array:
    """Where the batch's episodes ended, if its learner records it (a scalar 0 otherwise)."""
    return getattr(batch, "end_obs", jnp.zeros((), jnp.float32))


def adapt(
    learner: Learner,
    params: Params,
    task: Any,
    key: jax.Array,
    steps: int,
    inner_lr: jax.Array | float,
    hparams: Any,
    first_order: bool = False,
) -> Adaptation:
    """`steps` inner policy-gradient steps from `params` in `task`, each on fresh trajectories.

    Differentiable in `params` (and `inner_lr`): the meta-gradient flows through every update
    unless `first_order`, where each inner gradient is `stop_gradient`-ed (FOMAML)."""

    def step(theta: Params, k: jax.Array) -> tuple[Params, tuple[jax.Array, jax.Array, jax.Array]]:
        batch = learner.sample(theta, task, k, hparams)
        loss, grads = jax.value_and_grad(learner.loss)(theta, batch)
        grads = clip_by_global_norm(grads, hparams.inner_max_grad_norm)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        return sgd_step(theta, grads, inner_lr), (learner.batch_return(batch), _end_obs(batch), loss)

    adapted, (rets, ends, losses) = jax.lax.scan(step, params, jax.random.split(key, steps))
    return Adaptation(params=adapted, returns=rets, end_obs=ends, losses=losses)


def adaptation_curve(
    learner: Learner, params: Params, task: Any, key: jax.Array, steps: int, inner_lr: jax.Array | float, hparams: Any
) -> Adaptation:
    """Returns after 0, 1, ..., `steps` adaptation steps, each measured on fresh trajectories that
    then serve the next step (Finn et al.'s protocol): `returns` and `end_obs` have `steps + 1` rows,
    `losses` the `steps` inner losses."""
    adapt_key, last_key = jax.random.split(key)
    adapted = adapt(learner, params, task, adapt_key, steps, inner_lr, hparams, first_order=True)
    last = learner.sample(adapted.params, task, last_key, hparams)
    return Adaptation(
        params=adapted.params,
        returns=jnp.concatenate([adapted.returns, learner.batch_return(last)[None]]),
        end_obs=jnp.concatenate([adapted.end_obs, _end_obs(last)[None]]),
        losses=adapted.losses,
    )
