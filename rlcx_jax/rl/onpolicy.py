"""Machinery shared by the on-policy actor-critic algorithms (PPO, A2C, REINFORCE).

Each algorithm file only says how it turns a trajectory into a loss and how many gradient steps it
takes; configuration checks, state, collection, bootstrapping and metrics live here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax.configs.algorithms import ActorCriticHParams as ActorCriticHParams
from rlcx_jax.configs.algorithms import GAEHParams as GAEHParams
from rlcx_jax.configs.algorithms import OnPolicyConfig as OnPolicyConfig
from rlcx_jax.envs.normalize import RunningStats, update_stats
from rlcx_jax.nets.policy import distribution, greedy_action, sample_action
from rlcx_jax.rl import common, rollout
from rlcx_jax.rl.common import Agent, Hooks, Params, Trainer, TrainState
from rlcx_jax.rl.losses import ActorCriticAux, PolicyBatch, policy_gradient_loss
from rlcx_jax.rl.returns import gae

ActorCriticState = TrainState


@struct.dataclass
class OnPolicyMetrics(common.BlockMetrics):
    """Per-update (or per block of `log_every` updates) fixed-shape metrics; `ext` holds every
    extension loss term's value and aux."""

    episode: rollout.EpisodeMetrics
    loss: jax.Array
    aux: ActorCriticAux
    env_steps: jax.Array
    ext: dict[str, Any]


def value(agent: Agent, params: Params, stats: RunningStats, obs: jax.Array) -> jax.Array:
    return agent.apply(params, agent.prep_obs(stats, obs), method="value")


def behaviour_policy(agent: Agent, params: Params, stats: RunningStats) -> rollout.PolicyFn:
    """Sample actions with the policy head alone; log-probabilities and values are computed
    after the rollout for the whole trajectory in one batched call (`collect`)."""

    def policy_fn(key: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
        policy_out = agent.apply(params, agent.prep_obs(stats, obs), method="policy")
        return sample_action(policy_out, agent.spec, key), None

    return policy_fn


@struct.dataclass
class Collected:
    """A trajectory plus what every estimator needs: V(s_t), the bootstrap value V(s_{t+1}), the
    discount, and the behaviour policy's log-probabilities of the actions taken."""

    traj: rollout.Transition
    log_prob: jax.Array
    v_tm1: jax.Array
    v_t: jax.Array
    discount_t: jax.Array


def collect(agent: Agent, state: TrainState, key: jax.Array) -> tuple[TrainState, Collected]:
    """Collect `num_steps` x `num_envs` transitions and compute bootstrap values.

    The rollout itself only runs the policy head. Afterwards one batched forward pass over the
    T + 1 observations (the trajectory and the current ones) gives the log-probabilities and
    V(s_t) for every step; v_t is then the rollout's own next-step value, except where an episode
    was truncated (the critic on the pre-reset observation, computed only if any truncation
    happened in this rollout). On termination the discount is zero, so nothing is bootstrapped.
    """
    policy_fn = behaviour_policy(agent, state.params, state.obs_stats)
    runner, traj = rollout.collect(agent.env, state.env_params, policy_fn, state.runner, key, agent.config.num_steps)
    all_obs = jnp.concatenate([traj.obs, runner.obs[None]], axis=0)
    policy_out, values = agent.apply(state.params, agent.prep_obs(state.obs_stats, all_obs))
    log_prob = distribution(policy_out[:-1], agent.spec).log_prob(traj.action)
    v_tm1, v_next = values[:-1], values[1:]
    v_final = truncation_values(agent, state, traj.truncated, traj.next_obs)
    v_t = jnp.where(traj.truncated, v_final, v_next)
    discount_t = state.hparams.gamma * (1.0 - traj.terminated.astype(jnp.float32))
    state = state.replace(runner=runner)
    return state, Collected(traj=traj, log_prob=log_prob, v_tm1=v_tm1, v_t=v_t, discount_t=discount_t)


def truncation_values(agent: Agent, state: TrainState, truncated: jax.Array, next_obs: jax.Array) -> jax.Array:
    """V(s') on the pre-reset observation of every truncated step ([T, N]; zero elsewhere).

    Truncations are rare, so the critic runs on groups of N (= num_envs) of them, gathered by
    position, in a `while_loop` that stops once every truncation is evaluated: usually no group or
    one. (A `lax.cond` on "any truncation" would be cheaper unbatched, but under `vmap` over seeds
    it becomes a select that runs the critic on all T * N observations every update.)
    """
    flags = jnp.reshape(truncated, (-1,))
    obs = jnp.reshape(next_obs, (-1,) + next_obs.shape[2:])
    size, group = flags.shape[0], truncated.shape[1]
    rank = jnp.cumsum(flags) - 1  # among the truncated steps
    count = rank[-1] + 1

    def evaluate_group(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, values = carry
        (idx,) = jnp.nonzero(flags & (rank // group == i), size=group, fill_value=size)
        v = value(agent, state.params, state.obs_stats, obs[jnp.minimum(idx, size - 1)])
        return i + 1, values.at[idx].set(v, mode="drop")

    _, values = jax.lax.while_loop(
        lambda c: c[0] * group < count, evaluate_group, (jnp.zeros((), count.dtype), jnp.zeros((size,), jnp.float32))
    )
    return jnp.reshape(values, truncated.shape)


def finish_update(
    agent: Agent,
    state: TrainState,
    collected: Collected,
    loss: jax.Array,
    aux: ActorCriticAux,
    ext_aux: dict[str, Any],
) -> tuple[TrainState, OnPolicyMetrics]:
    """Update observation statistics and the step counter; summarise the update."""
    obs_stats = state.obs_stats
    if agent.config.normalize_obs:
        obs_stats = update_stats(obs_stats, collected.traj.obs)
    step = state.update_step + 1
    state = state.replace(obs_stats=obs_stats, update_step=step)
    metrics = OnPolicyMetrics(
        episode=rollout.EpisodeMetrics.from_stats(collected.traj.episode),
        loss=loss,
        aux=aux,
        env_steps=step * agent.config.steps_per_update,
        ext=ext_aux,
    )
    return state, metrics


def policy_batch(
    agent: Agent, state: TrainState, col: Collected, advantage: jax.Array, target: jax.Array, behaviour: bool = False
) -> PolicyBatch:
    """The flat (T * N) batch of an update, with every extension's per-sample extras.

    Advantages are standardised here, once over the whole batch before any minibatching, when
    `normalize_advantages`; `behaviour` adds the behaviour policy's log-probabilities and values."""
    if agent.config.normalize_advantages:
        advantage = standardize(advantage)
    batch = jax.tree.map(
        flatten_time,
        PolicyBatch(
            obs=agent.prep_obs(state.obs_stats, col.traj.obs),
            action=col.traj.action,
            advantage=advantage,
            target=target,
            log_prob=col.log_prob if behaviour else None,
            value=col.v_tm1 if behaviour else None,
        ),
    )
    return batch.replace(extras=agent.terms.batch_extras(state.ext, state.hparams.ext, batch))


def standardize(advantage: jax.Array) -> jax.Array:
    """Zero mean, unit standard deviation over the whole batch (once, before any minibatching)."""
    return (advantage - advantage.mean()) / (advantage.std() + 1e-8)


Estimator = Callable[[Collected, Any], tuple[jax.Array, jax.Array, Any]]


def gae_estimate(col: Collected, hp: GAEHParams) -> tuple[jax.Array, jax.Array, GAEHParams]:
    """GAE(lambda) advantages (Schulman et al. 2016) and their lambda-return targets A + V(s)."""
    traj = col.traj
    advantage = gae(traj.reward, col.discount_t, col.v_tm1, col.v_t, hp.gae_lambda, traj.truncated)
    return advantage, advantage + col.v_tm1, hp


def single_step_update(agent: Agent, state: TrainState, estimate: Estimator) -> tuple[TrainState, OnPolicyMetrics]:
    """Collect one rollout and take one policy-gradient step on it (A2C, REINFORCE).

    `estimate(collected, hparams) -> (advantage, target, loss_hparams)` is what distinguishes the
    algorithms; the loss is `losses.policy_gradient_loss`.
    """
    key, (key_collect,) = common.next_keys(state.key, agent.config.prng_impl, 1)
    state = state.replace(key=key)

    # COLLECT TRAJECTORIES
    state, col = collect(agent, state, key_collect)

    # CALCULATE ADVANTAGE
    advantage, target, loss_hparams = estimate(col, state.hparams)
    batch = policy_batch(agent, state, col, advantage, target)

    # UPDATE NETWORK (one step)
    loss_fn = agent.terms.add_to(policy_gradient_loss)
    (loss, (aux, ext_aux)), grads = agent.value_and_grad(loss_fn)(
        state.params, batch, state.ext, state.hparams.ext, loss_hparams, agent.apply, agent.spec
    )
    params, opt_state = agent.gradient_step(state.params, state.opt_state, state.hparams, grads)
    state = state.replace(params=params, opt_state=opt_state)
    return finish_update(agent, state, col, loss, aux, common.mean_ext_aux(ext_aux))


def flatten_time(x: jax.Array) -> jax.Array:
    """(T, N, ...) -> (T * N, ...)."""
    return jnp.reshape(x, (-1,) + x.shape[2:])


def act(
    agent: Agent, params: Params, obs_stats: RunningStats, obs: jax.Array, key: jax.Array, greedy: bool
) -> jax.Array:
    """The trained policy: a sample, or the mode when `greedy`."""
    policy_out = agent.apply(params, agent.prep_obs(obs_stats, obs), method="policy")
    if greedy:
        return greedy_action(policy_out, agent.spec)
    return sample_action(policy_out, agent.spec, key)


def make_trainer(
    config: OnPolicyConfig,
    hooks: Hooks,
    update: Callable[[Agent, TrainState], tuple[TrainState, OnPolicyMetrics]],
) -> Trainer:
    """Build init / learn / train / act for an on-policy algorithm given its `update`."""
    agent = common.build_agent(config, hooks)
    return common.make_trainer(agent, common.init_train_state, update, act, greedy_default=False)
