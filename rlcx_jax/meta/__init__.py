"""Meta-learning over jittable task families: MAML, first-order MAML, Reptile and PLATIPUS.

* `rlcx_jax.envs.tasks`: a task is an `EnvParams` value; a family samples a batch of them from a key.
* `policy_gradient`: the inner learner (trajectories in a task, vanilla PG with a linear baseline).
* `adapt`: k differentiable inner steps (`adapt`), the adaptation curve, the method protocol.
* `maml`, `reptile`, `platipus`: one file per method.
* `loop`: the meta-training loop (`train(key, hparams)`, a `lax.scan` over meta-iterations, vmapped
  over tasks inside and over seeds outside) and the adaptation table of Finn et al. (2017).
* `compressed`: prune and fake-quantize a meta-learned initialisation, then adapt it.
"""

from rlcx_jax.configs.meta import METHODS, MetaConfig, MetaHParams
from rlcx_jax.meta.adapt import Adaptation, Learner, MetaAux, MetaContext, MetaMethod, adapt, adaptation_curve, sgd_step
from rlcx_jax.meta.loop import (
    METHOD_IMPLS,
    AdaptationTable,
    MetaMetrics,
    MetaState,
    MetaTrainer,
    eval_tasks,
    make_learner,
    make_trainer,
)
from rlcx_jax.meta.maml import MAML
from rlcx_jax.meta.platipus import Platipus, PlatipusParams, gaussian_kl
from rlcx_jax.meta.policy_gradient import PolicyGradientLearner, Trajectories, vanilla_pg_loss
from rlcx_jax.meta.reptile import Reptile

__all__ = [
    "METHODS",
    "METHOD_IMPLS",
    "MetaConfig",
    "MetaHParams",
    "Adaptation",
    "AdaptationTable",
    "Learner",
    "MetaAux",
    "MetaContext",
    "MetaMethod",
    "MetaMetrics",
    "MetaState",
    "MetaTrainer",
    "MAML",
    "Reptile",
    "Platipus",
    "PlatipusParams",
    "PolicyGradientLearner",
    "Trajectories",
    "adapt",
    "adaptation_curve",
    "eval_tasks",
    "gaussian_kl",
    "make_learner",
    "make_trainer",
    "sgd_step",
    "vanilla_pg_loss",
]
