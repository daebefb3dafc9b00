"""PCGrad: projecting conflicting gradients, as an optax transformation over per-task gradients.

Yu, Kumar, Gupta, Levine, Hausman & Finn (2020), "Gradient Surgery for Multi-Task Learning"
(NeurIPS), Algorithm 1. With one gradient g_i per task (all of them over the same parameters), each
task's gradient starts as g_i^PC = g_i and visits every other task j in a random order; where the two
conflict (g_i^PC . g_j < 0), the part of g_i^PC along g_j is removed:

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j

always projecting onto the ORIGINAL g_j. The update is the sum (or mean) of the projected gradients.
Each projection only removes a component, so ||g_i^PC|| <= ||g_i||; with two tasks the projected
gradients no longer conflict with the other task's original gradient.

`pcgrad()` is a transformation whose input has a leading task axis on every leaf and whose output
has not, so it goes first in a chain (or on `Hooks.extra_grad_transforms`) and the optimizer after it
sees an ordinary gradient tree shaped like the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from rlcx_jax import prng

__all__ = [
    "REDUCTIONS",
    "PCGradState",
    "pcgrad",
    "project_conflicting",
    "projection_order",
    "sum_tasks",
    "weighted_task_sum",
]

REDUCTIONS = ("sum", "mean")
"""How `pcgrad` combines the projected per-task gradients."""


class PCGradState(NamedTuple):
    """`pcgrad`'s optimizer state: the PRNG key of the next update's visiting order (raw uint32
    key data, split every update), or None when the order is fixed."""

    key: jax.Array | None


def _num_tasks(tree: Any) -> int:
    """The common leading (task) axis length of every leaf of `tree`."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"per-task gradients need one leading task axis on every leaf; got leading sizes {sizes}")
    return int(sizes.pop())  # type: ignore[arg-type]


def projection_order(key: jax.Array | None, num_tasks: int) -> jax.Array:
    """The order in which each task visits the others: int32 `[T, T-1]`, row i holding the tasks
    j != i. With a key, each row is an independent uniformly random order (Algorithm 1 draws one per
    task); with None, the fixed order 0..T-1 skipping i."""
    others = jnp.arange(num_tasks - 1, dtype=jnp.int32)
    if key is None or num_tasks <= 1:
        ranks = jnp.broadcast_to(others, (num_tasks, num_tasks - 1))
    else:
        ranks = prng.permutations(key, num_tasks - 1, num_tasks)
    # rank r among the other tasks of task i is task r, or r + 1 from i on
    return ranks + (ranks >= jnp.arange(num_tasks, dtype=jnp.int32)[:, None]).astype(jnp.int32)


def project_conflicting(grads: jax.Array, key: jax.Array | None) -> jax.Array:
    """PCGrad's projections (Yu et al. 2020, Algorithm 1) of `grads`, `[T, D]` (one flattened
    gradient per task), in the order `projection_order(key, T)`.

    For each task i, starting at g_i^PC = g_i and for each other task j in that order:
    if g_i^PC . g_j < 0, g_i^PC <- g_i^PC - (g_i^PC . g_j) / ||g_j||^2 * g_j (onto the original
    g_j). A g_j whose squared norm is 0 (or underflows to 0) is never projected onto. Returns the
    `[T, D]` projected gradients; a task that conflicts with none of the others keeps its gradient
    bit for bit. Runs as a `vmap` over tasks of a `lax.scan` over the visiting order.
    """
    if grads.ndim != 2:
        raise ValueError(f"project_conflicting takes [tasks, dim] gradients; got shape {grads.shape}")
    order = projection_order(key, grads.shape[0])
    sq_norms = jnp.sum(grads * grads, axis=1)

    def one_task(g_i: jax.Array, visits: jax.Array) -> jax.Array:
        def step(g: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            g_j, sq = grads[j], sq_norms[j]
            dot = jnp.dot(g, g_j, precision=lax.Precision.HIGHEST)
            conflict = (dot < 0) & (sq > 0)
            coef = dot / jnp.where(sq > 0, sq, 1)
            return jnp.where(conflict, g - coef * g_j, g), None

        return lax.scan(step, g_i, visits)[0]

    return jax.vmap(one_task)(grads, order)


def pcgrad(reduction: str = "sum", seed: int | None = 0) -> optax.GradientTransformation:
    """PCGrad (Yu et al. 2020) as an optax transformation: per-task gradients in, one gradient out.

    `update(updates, state, params=None)` takes `updates` whose every leaf has a leading task axis
    `[T, ...]`, flattens each task's tree to one vector, projects them with `project_conflicting` and
    returns the tree of their sum over tasks ("sum") or mean ("mean") WITHOUT the task axis. The
    transformation thus changes the leading axis: put it first, e.g.
    `optax.chain(pcgrad(), optax.adam(1e-3))`, whose `init` takes the ordinary (un-stacked)
    parameters and whose `update` takes the stacked per-task gradients.

    seed: the visiting orders are random, from a PRNG key in the state (`PRNGKey(seed)`, split every
    update); None visits the other tasks in the fixed order 0..T-1.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"Unknown PCGrad reduction {reduction!r}; expected one of {REDUCTIONS}")

    def init(params: optax.Params) -> PCGradState:
        del params
        return PCGradState(key=None if seed is None else jax.random.PRNGKey(seed))

    def update(
        updates: optax.Updates, state: PCGradState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, PCGradState]:
        del params
        num_tasks = _num_tasks(updates)
        order_key = None
        if state.key is not None:
            next_key, order_key = jax.random.split(state.key)
            state = PCGradState(key=next_key)
        flat = jax.vmap(lambda task: ravel_pytree(task)[0])(updates)
        _, unravel = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], updates))
        combined = jnp.sum(project_conflicting(flat, order_key), axis=0)
        if reduction == "mean":
            combined = combined / num_tasks
        return unravel(combined), state

    return optax.GradientTransformation(init, update)


def weighted_task_sum(per_task: Any, weights: jax.Array) -> Any:
    """sum_i w_i g_i over the leading task axis of every leaf of `per_task` (weights `[T]`): per-task
    loss weighting without surgery. Leaves keep their dtype."""
    num_tasks = _num_tasks(per_task)
    weights = jnp.asarray(weights)
    if weights.shape != (num_tasks,):
        raise ValueError(f"weights need shape ({num_tasks},), one per task; got {weights.shape}")

    def one(leaf: jax.Array) -> jax.Array:
        w = weights.astype(leaf.dtype).reshape((num_tasks,) + (1,) * (leaf.ndim - 1))
        return jnp.sum(w * leaf, axis=0)

    return jax.tree.map(one, per_task)


def sum_tasks() -> optax.GradientTransformation:
    """The stateless transformation sum_t g_t over the leading task axis of every leaf (per-task
    gradients in, one gradient out, like `pcgrad` without the projection)."""

    def init(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        _num_tasks(updates)
        return jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), updates), state

    return optax.GradientTransformation(init, update)
