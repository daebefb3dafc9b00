"""`MultiTask`, the multi-task learning extension, and its traced hyperparameters (jax-free).

Its behaviour (per-task gradients, PCGrad, head decay) is in `rlcx_jax.multitask.extension`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from rlcx_jax import pytree
from rlcx_jax.configs.base import Extension, register_extension

if TYPE_CHECKING:
    from rlcx_jax.seams import BuildContext, ExtrasFn, Hooks, LossTerm

__all__ = ["TASK_GRADIENTS", "MultiTask", "MultiTaskHParams"]

TASK_GRADIENTS = ("batch", "weighted", "pcgrad")
"""batch: the gradient of the batch's mean loss; weighted: one gradient per task, summed with the task
weights; pcgrad: one gradient per task, conflicts projected away (Yu et al. 2020), then summed."""


@pytree.dataclass
class MultiTaskHParams:
    """Traced multi-task hyperparameters."""

    task_weights: tuple[float, ...] = ()
    """Loss weight of each task (weighted / pcgrad gradients), normalised over the tasks present in a
    batch; empty: all equal."""
    head_decay: float = 0.0
    """Soft sharing of per-task heads: head_decay / 2 * sum_t ||W_t - mean_s W_s||^2 over every per-task
    output layer (weight decay towards the heads' mean, Duong et al. 2015)."""


@register_extension
@dataclasses.dataclass(frozen=True)
class MultiTask(Extension):
    """Multi-task learning over a task set (`envs.task_set.TaskSetEnv`) with a multi-task network
    (`NetConfig(num_tasks=T)`): per-task gradients, their weighting or PCGrad, and head decay."""

    name = "multitask"

    task_gradient: str = "batch"
    """batch (the batch mean's gradient), weighted (per-task gradients, task-weighted sum) or pcgrad
    (per-task gradients with PCGrad's projection of conflicts, then the weighted sum)."""
    pcgrad_seed: int = 0
    """Seed of PCGrad's random order of projections (one stream, split every update)."""

    @property
    def per_task(self) -> bool:
        return self.task_gradient != "batch"

    def validate(self) -> None:
        if self.task_gradient not in TASK_GRADIENTS:
            raise ValueError(f"Unknown task gradient {self.task_gradient!r}; expected one of {TASK_GRADIENTS}")

    def default_hparams(self) -> MultiTaskHParams:
        return MultiTaskHParams()

    def validate_hparams(self, hparams: MultiTaskHParams) -> None:
        if not float(hparams.head_decay) >= 0:
            raise ValueError(f"head_decay must be >= 0, got {hparams.head_decay}")
        weights = [float(w) for w in hparams.task_weights]
        if any(not w >= 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ValueError(f"task_weights must be >= 0 and not all 0, got {tuple(weights)}")

    def check_run(self, config: Any, hparams: MultiTaskHParams) -> None:
        from rlcx_jax.configs.envs import TASK_SET_SIZES

        t = config.net.num_tasks
        if t < 2:
            raise ValueError("multitask needs a multi-task network: set --net-num-tasks to the number of tasks")
        size = TASK_SET_SIZES.get(config.env)
        if size is not None and size != t:
            raise ValueError(f"{config.env} has {size} tasks, but the network has num_tasks={t}")
        if hparams.task_weights and not self.per_task:
            raise ValueError("task_weights need task_gradient weighted or pcgrad (batch uses the batch mean)")
        if hparams.task_weights and len(hparams.task_weights) != t:
            raise ValueError(f"task_weights has {len(hparams.task_weights)} entries for {t} tasks")

    def hooks(self, ctx: BuildContext) -> Hooks:
        from rlcx_jax.multitask.extension import multitask_hooks

        return multitask_hooks(self, ctx)

    def extras(self, ctx: BuildContext) -> ExtrasFn | None:
        from rlcx_jax.multitask.extension import task_extras

        return task_extras(self, ctx)

    def loss_term(self, ctx: BuildContext) -> LossTerm | None:
        from rlcx_jax.multitask.extension import head_decay_term

        return head_decay_term(self, ctx)

    def init_state(self, key: Any, params: Any, hparams: Any) -> Any:
        return None
