"""Advantage actor-critic, synchronous (A2C; Mnih et al. 2016): one gradient step per rollout on
GAE(lambda) advantages (lambda = 1 gives the n-step returns of the paper, n = num_steps)."""

from __future__ import annotations

from rlcx_jax.configs.algorithms import A2CConfig
from rlcx_jax.configs.algorithms import A2CHParams as A2CHParams
from rlcx_jax.rl import onpolicy
from rlcx_jax.rl.common import Hooks, Trainer, TrainState
from rlcx_jax.rl.onpolicy import OnPolicyMetrics


def _update(agent: onpolicy.Agent, state: TrainState) -> tuple[TrainState, OnPolicyMetrics]:
    return onpolicy.single_step_update(agent, state, onpolicy.gae_estimate)


def make(config: A2CConfig = A2CConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    return onpolicy.make_trainer(config, hooks, _update)


def make_train(config: A2CConfig = A2CConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
