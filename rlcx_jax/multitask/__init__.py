"""Multi-task learning: per-task gradients, their weighting or surgery, and soft sharing of heads.

* `pcgrad`: PCGrad (Yu et al. 2020), projecting conflicting per-task gradients, as an optax
  transformation from stacked per-task gradients `[T, ...]` to one gradient tree; `sum_tasks`, the
  same without surgery; `weighted_task_sum`, a weighted sum over the task axis.
* `MultiTask` (an extension; `multitask.extension` holds its behaviour): per-task gradients of any
  algorithm's loss on a task set (`envs.task_set.TaskSetEnv`) with a multi-task network
  (`NetConfig(num_tasks=T)`), combined by task weights or PCGrad; decay of per-task heads towards
  their mean.
"""

from rlcx_jax.configs.multitask import TASK_GRADIENTS, MultiTask, MultiTaskHParams
from rlcx_jax.multitask.pcgrad import (
    REDUCTIONS,
    PCGradState,
    pcgrad,
    project_conflicting,
    projection_order,
    sum_tasks,
    weighted_task_sum,
)

__all__ = [
    "REDUCTIONS",
    "TASK_GRADIENTS",
    "MultiTask",
    "MultiTaskHParams",
    "PCGradState",
    "pcgrad",
    "project_conflicting",
    "projection_order",
    "sum_tasks",
    "weighted_task_sum",
]
