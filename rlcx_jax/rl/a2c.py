"""Advantage actor-critic, synchronous (A2C; Mnih et al. 2016): one gradient step per rollout on
GAE(lambda) advantages (lambda = 1 gives the n-step returns of the paper, n = num_steps)."""

from __future__ import annotations

import dataclasses

import jax
from flax import struct

from rlcx_jax.rl import onpolicy
from rlcx_jax.rl.common import Hooks, Trainer, TrainState
from rlcx_jax.rl.onpolicy import OnPolicyMetrics
from rlcx_jax.rl.returns import gae


@dataclasses.dataclass(frozen=True)
class A2CConfig(onpolicy.OnPolicyConfig):
    """Static A2C settings: short rollouts from many environments."""

    num_envs: int = 16
    num_steps: int = 8
    normalize_advantages: bool = False


@struct.dataclass
class A2CHParams(onpolicy.ActorCriticHParams):
    """Traced A2C hyperparameters; gae_lambda = 1 gives the paper's n-step returns."""

    lr: float = 2e-3
    gae_lambda: float = 1.0

    UNIT = onpolicy.ActorCriticHParams.UNIT + ("gae_lambda",)


def _advantages(col: onpolicy.Collected, hp: A2CHParams) -> tuple[jax.Array, jax.Array, A2CHParams]:
    """GAE(lambda) advantages and their lambda-return targets."""
    traj = col.traj
    advantage = gae(traj.reward, col.discount_t, col.v_tm1, col.v_t, hp.gae_lambda, traj.truncated)
    return advantage, advantage + col.v_tm1, hp


def _update(agent: onpolicy.Agent, state: TrainState) -> tuple[TrainState, OnPolicyMetrics]:
    return onpolicy.single_step_update(agent, state, _advantages)


def make(config: A2CConfig = A2CConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    return onpolicy.make_trainer(config, hooks, _update)


def make_train(config: A2CConfig = A2CConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
