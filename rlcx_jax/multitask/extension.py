"""The `MultiTask` extension's behaviour: one gradient per task, combined by weights or PCGrad, and
soft sharing of per-task heads (its config is `rlcx_jax.configs.multitask.MultiTask`).

Training data come from a task set (`envs.task_set.TaskSetEnv`): every observation ends with its
task's one-hot, so `extras` reads each sample's task t_b from the batch itself. With
`task_gradient="weighted"` or `"pcgrad"` the extension replaces how the loss becomes a gradient
(`Hooks.gradient`): task t's loss is the algorithm's own loss with the per-sample weights
w_b = 1[t_b = t] / n_t (the mean over the n_t samples of task t; `rl.losses.sample_mean`), its
gradient g_t is taken for every task at once under `vmap`, and with task weights lambda_t (normalised
over the tasks present in the batch) the optimizer receives

    weighted:  g = sum_t lambda_t g_t
    pcgrad:    g = sum_t PC(lambda_t g_t)          (Yu et al. 2020, `multitask.pcgrad`)

through its first gradient transformation (`sum_tasks` or `pcgrad`). The loss and aux values reported
are the lambda-weighted sums of the per-task ones. With `head_decay` > 0 and per-task heads, the loss
gains head_decay / 2 * sum_t ||theta_t - mean_s theta_s||^2 over every per-task output layer's kernel
and bias (soft parameter sharing, Duong et al. 2015): the heads are pulled towards their mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlcx_jax.configs.multitask import MultiTask, MultiTaskHParams
from rlcx_jax.envs.task_set import task_ids
from rlcx_jax.multitask.pcgrad import pcgrad, sum_tasks
from rlcx_jax.nets import layout_of
from rlcx_jax.nets.paths import flatten_with_paths
from rlcx_jax.seams import BuildContext, ExtrasFn, GradientFn, Hooks, LossTerm, Params

__all__ = ["num_tasks", "task_weights", "task_extras", "per_task_gradient", "multitask_hooks", "head_decay_term"]


def num_tasks(ctx: BuildContext) -> int:
    """T of the run's multi-task network; a one-line error when the network is not one."""
    t = int(getattr(ctx.network.config, "num_tasks", 0))
    if t < 2:
        raise ValueError(
            "The multitask extension needs a multi-task network: set NetConfig(num_tasks=T) "
            "(--net-num-tasks T) to the task set's size"
        )
    return t


def task_weights(hparams: MultiTaskHParams, present: jax.Array) -> jax.Array:
    """lambda [T]: the task weights (all 1 when empty) on the tasks `present` [T] in a batch, summing to 1."""
    t = present.shape[0]
    if len(hparams.task_weights) not in (0, t):
        raise ValueError(f"task_weights has {len(hparams.task_weights)} entries for {t} tasks")
    raw = jnp.stack([jnp.asarray(w, jnp.float32) for w in hparams.task_weights]) if hparams.task_weights else None
    lam = jnp.where(present, jnp.ones(t, jnp.float32) if raw is None else raw, 0.0)
    return lam / jnp.maximum(jnp.sum(lam), jnp.finfo(jnp.float32).tiny)


def task_extras(ext: MultiTask, ctx: BuildContext) -> ExtrasFn:
    """Each sample's task id, int32 [B], from its observation's one-hot."""
    t = num_tasks(ctx)

    def extras(ext_state: Any, hparams: MultiTaskHParams, batch: Any) -> jax.Array:
        return task_ids(batch.obs, t)

    return extras


def per_task_gradient(name: str, t: int) -> GradientFn:
    """`Hooks.gradient`: one gradient per task [T, ...] (scaled by lambda_t), the loss and aux
    lambda-weighted (see the module docstring)."""

    def gradient(loss_fn: Any, params: Params, batch: Any, ext_state: Any, ext_hparams: Any, *args: Any) -> Any:
        onehot = jax.nn.one_hot(batch.extras[name], t, dtype=jnp.float32)  # [B, T]
        counts = jnp.sum(onehot, axis=0)
        lam = task_weights(ext_hparams[name], counts > 0)
        sample_weights = (onehot / jnp.maximum(counts, 1.0)).T  # [T, B]: each task's mean

        def one_task(weight: jax.Array) -> Any:
            return jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch.replace(weight=weight), ext_state, ext_hparams, *args
            )

        (losses, aux), grads = jax.vmap(one_task)(sample_weights)
        weigh = lambda x: jnp.tensordot(lam, x.astype(jnp.float32), axes=1).astype(x.dtype)  # noqa: E731
        scaled = jax.tree.map(lambda g: g * jnp.reshape(lam, (t,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads)
        return (weigh(losses), jax.tree.map(weigh, aux)), scaled

    return gradient


def multitask_hooks(ext: MultiTask, ctx: BuildContext) -> Hooks:
    """Per-task gradients and the transformation that combines them (weighted / pcgrad); none for "batch"."""
    t = num_tasks(ctx)
    if not ext.per_task:
        return Hooks()
    combine = pcgrad("sum", ext.pcgrad_seed) if ext.task_gradient == "pcgrad" else sum_tasks()
    return Hooks(gradient=per_task_gradient(ext.name, t), extra_grad_transforms=(combine,))


def _per_task_leaves(params: Params, heads: tuple[str, ...], t: int) -> list[jax.Array]:
    """The per-task output layers' kernels and biases (leading axis T) among the `heads` groups."""
    leaves = []
    for path, leaf in flatten_with_paths(params).items():
        top, _, rest = path.partition("/")
        if top in heads and rest in ("kernel", "bias") and jnp.ndim(leaf) >= 2 and jnp.shape(leaf)[0] == t:
            leaves.append(leaf)
    return leaves


def head_decay_term(ext: MultiTask, ctx: BuildContext) -> LossTerm | None:
    """head_decay / 2 * sum_t ||theta_t - mean_s theta_s||^2 over the per-task heads (None without them)."""
    t = num_tasks(ctx)
    if ctx.network.config.task_mode != "heads":
        return None
    heads = layout_of(ctx.network).groups("head")

    def term(params: Params, batch: Any, ext_state: Any, hparams: MultiTaskHParams) -> tuple[jax.Array, Any]:
        spread = sum(
            (jnp.sum(jnp.square(leaf - jnp.mean(leaf, axis=0))) for leaf in _per_task_leaves(params, heads, t)),
            jnp.zeros((), jnp.float32),
        )
        return 0.5 * hparams.head_decay * spread, {"head_spread": spread}

    return term
