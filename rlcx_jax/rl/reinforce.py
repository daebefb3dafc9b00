"""REINFORCE (Williams 1992): Monte-Carlo policy gradient, with an optional learned baseline.

Rollouts have a fixed length (`num_steps`), so an episode can straddle two updates. Returns are the
discounted Monte-Carlo returns inside the rollout; with the baseline they are bootstrapped from the
critic at the rollout's end and at time-limit truncations, without it they are cut there.
"""

from __future__ import annotations

import jax

from rlcx_jax.configs.algorithms import ReinforceConfig, ReinforceHParams
from rlcx_jax.rl import onpolicy
from rlcx_jax.rl.common import Hooks, Trainer, TrainState
from rlcx_jax.rl.onpolicy import OnPolicyMetrics
from rlcx_jax.rl.returns import discounted_returns


def _make_estimator(use_baseline: bool) -> onpolicy.Estimator:
    def estimate(col: onpolicy.Collected, hp: ReinforceHParams) -> tuple[jax.Array, jax.Array, ReinforceHParams]:
        """Monte-Carlo returns; minus the baseline V(s) when it is used."""
        traj = col.traj
        if use_baseline:
            returns = discounted_returns(traj.reward, col.discount_t, col.v_t, traj.truncated)
            return returns - col.v_tm1, returns, hp
        returns = discounted_returns(traj.reward, col.discount_t, None, traj.truncated)
        return returns, returns, hp.replace(vf_coef=0.0)  # the critic is unused: no gradient

    return estimate


def _update(agent: onpolicy.Agent, state: TrainState) -> tuple[TrainState, OnPolicyMetrics]:
    config: ReinforceConfig = agent.config
    return onpolicy.single_step_update(agent, state, _make_estimator(config.use_baseline))


def make(config: ReinforceConfig = ReinforceConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    return onpolicy.make_trainer(config, hooks, _update)


def make_train(config: ReinforceConfig = ReinforceConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
