"""Multi-task learning: per-task gradient surgery and task weighting.

* `pcgrad`: PCGrad (Yu et al. 2020), projecting conflicting per-task gradients, as an optax
  transformation from stacked per-task gradients `[T, ...]` to one gradient tree; and
  `weighted_task_sum`, a weighted sum over the task axis without surgery.
"""

from rlcx_jax.multitask.pcgrad import (
    REDUCTIONS,
    PCGradState,
    pcgrad,
    project_conflicting,
    projection_order,
    weighted_task_sum,
)

__all__ = ["REDUCTIONS", "PCGradState", "pcgrad", "project_conflicting", "projection_order", "weighted_task_sum"]
