"""Advantage actor-critic, synchronous (A2C; Mnih et al. 2016): one gradient step per rollout on
GAE(lambda) advantages (lambda = 1 gives the n-step returns of the paper, n = num_steps)."""

from __future__ import annotations

import dataclasses

from flax import struct

from rlcx_jax.rl import onpolicy
from rlcx_jax.rl.common import Hooks, Trainer, TrainState
from rlcx_jax.rl.onpolicy import OnPolicyMetrics


@dataclasses.dataclass(frozen=True)
class A2CConfig(onpolicy.OnPolicyConfig):
    """Static A2C settings: short rollouts from many environments."""

    num_envs: int = 16
    """Parallel environments (the paper runs 16 actor-learner threads)."""
    num_steps: int = 8
    """Steps per environment per update: the n of the n-step returns (the paper uses 5)."""
    normalize_advantages: bool = False
    """Off as in the paper; on often helps with few environments."""


@struct.dataclass
class A2CHParams(onpolicy.GAEHParams):
    """Traced A2C hyperparameters."""

    lr: float = 2e-3
    gae_lambda: float = 1.0
    """1 gives the paper's n-step returns (n = num_steps)."""


def _update(agent: onpolicy.Agent, state: TrainState) -> tuple[TrainState, OnPolicyMetrics]:
    return onpolicy.single_step_update(agent, state, onpolicy.gae_estimate)


def make(config: A2CConfig = A2CConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    return onpolicy.make_trainer(config, hooks, _update)


def make_train(config: A2CConfig = A2CConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
