"""Machinery shared by the on-policy actor-critic algorithms (PPO, A2C, REINFORCE).

Each algorithm file only says how it turns a trajectory into a loss and how many gradient steps it
takes; configuration checks, state, collection, bootstrapping and metrics live here once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax import envs, nets
from rlcx_jax.envs.normalize import RunningStats, init_stats, normalize, update_stats
from rlcx_jax.rl import rollout
from rlcx_jax.rl.common import (
    ApplyFn,
    Hooks,
    Params,
    Trainer,
    TrainOutput,
    check_positive,
    check_prng_impl,
    make_apply,
    next_keys,
    seed_key,
    make_optimizer,
    scan_updates,
)
from rlcx_jax.compress.training import CompressConfig, compress_hooks
from rlcx_jax.rl.losses import ActorCriticAux, PolicyBatch, policy_gradient_loss
from rlcx_jax.rl.policy import distribution, greedy_action


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
    """Static settings common to the on-policy algorithms (hashable; not traced)."""

    env: str = "CartPole-v1"
    env_kwargs: tuple[tuple[str, Any], ...] = ()
    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 500_000
    net: nets.NetConfig = nets.NetConfig()
    anneal_lr: bool = True
    normalize_obs: bool = False
    log_every: int = 1
    prng_impl: str = "threefry2x32"
    normalize_advantages: bool = True
    compress: CompressConfig = CompressConfig()

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def optimizer_steps_per_update(self) -> int:
        return 1

    def validate(self) -> None:
        envs.check_env_name(self.env)
        for name in ("num_envs", "num_steps", "total_timesteps", "log_every"):
            check_positive(name, getattr(self, name))
        if self.num_updates < 1:
            raise ValueError(
                f"total_timesteps ({self.total_timesteps}) is smaller than one update "
                f"(num_envs * num_steps = {self.steps_per_update})"
            )
        if self.num_updates % self.log_every != 0:
            raise ValueError(
                f"The number of updates ({self.num_updates}) must be a multiple of log_every "
                f"({self.log_every})"
            )
        self.net.validate()
        check_prng_impl(self.prng_impl)
        self.compress.validate()


@struct.dataclass
class ActorCriticState:
    """Training state of an on-policy agent; `hparams` travel with it so `learn` is self-contained."""

    params: Params
    opt_state: optax.OptState
    runner: rollout.EnvRunner
    obs_stats: RunningStats
    key: jax.Array
    update_step: jax.Array
    hparams: Any
    env_params: Any


@struct.dataclass
class OnPolicyMetrics:
    """Per-update (or per block of `log_every` updates) fixed-shape metrics."""

    episode: rollout.EpisodeMetrics
    loss: jax.Array
    aux: ActorCriticAux
    env_steps: jax.Array

    def reduce(self) -> "OnPolicyMetrics":
        mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
        return OnPolicyMetrics(
            episode=self.episode.reduce(),
            loss=mean(self.loss),
            aux=jax.tree.map(mean, self.aux),
            env_steps=self.env_steps[-1],
        )


@dataclasses.dataclass(frozen=True)
class Agent:
    """Everything static an on-policy algorithm builds once from its config."""

    config: OnPolicyConfig
    env: Any
    env_params: Any
    spec: nets.ActionSpec
    obs_shape: tuple[int, ...]
    network: Any
    apply: ApplyFn
    hooks: Hooks

    def prep_obs(self, stats: RunningStats, obs: jax.Array) -> jax.Array:
        return normalize(stats, obs) if self.config.normalize_obs else obs

    def value(self, params: Params, stats: RunningStats, obs: jax.Array) -> jax.Array:
        return self.apply(params, self.prep_obs(stats, obs), method="value")

    def optimizer(self, hparams: Any) -> optax.GradientTransformation:
        anneal = None
        if self.config.anneal_lr:
            anneal = self.config.num_updates * self.config.optimizer_steps_per_update
        return make_optimizer(hparams.lr, hparams.max_grad_norm, self.hooks, anneal, hparams=hparams)

    def behaviour_policy(self, params: Params, stats: RunningStats) -> rollout.PolicyFn:
        """Sample actions with the policy head alone; log-probabilities and values are computed
        after the rollout for the whole trajectory in one batched call (`collect`)."""

        def policy_fn(key: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
            policy_out = self.apply(params, self.prep_obs(stats, obs), method="policy")
            return distribution(policy_out, self.spec).sample(seed=key), None

        return policy_fn


def build_agent(config: OnPolicyConfig, hooks: Hooks = Hooks()) -> Agent:
    """Validate the config (before anything compiles) and build env, network and apply."""
    config.validate()
    env, env_params = envs.make_training_env(config.env, config.env_kwargs)
    spec = nets.action_spec(env.action_space(env_params))
    obs_shape = tuple(env.observation_space(env_params).shape)
    network = nets.make(config.net, obs_shape, spec, head="actor_critic")
    hooks = compress_hooks(config.compress, config.num_updates * config.optimizer_steps_per_update, hooks)
    return Agent(config, env, env_params, spec, obs_shape, network, make_apply(network, hooks), hooks)


def init_state(agent: Agent, key: jax.Array, hparams: Any, env_params: Any = None) -> ActorCriticState:
    """Initial parameters, optimizer state and reset environments."""
    env_params = agent.env_params if env_params is None else env_params
    key, (key_net, key_env) = next_keys(
        jax.random.key_data(seed_key(key, agent.config.prng_impl)), agent.config.prng_impl, 2
    )
    dummy = jnp.zeros((1,) + agent.obs_shape, jnp.float32)
    params = agent.network.init(key_net, dummy)["params"]
    opt_state = agent.optimizer(hparams).init(params)
    runner = rollout.reset(agent.env, env_params, key_env, agent.config.num_envs)
    return ActorCriticState(
        params=params,
        opt_state=opt_state,
        runner=runner,
        obs_stats=init_stats(agent.obs_shape),
        key=key,
        update_step=jnp.zeros((), jnp.int32),
        hparams=hparams,
        env_params=env_params,
    )


@struct.dataclass
class Collected:
    """A trajectory plus what every estimator needs: V(s_t), the bootstrap value V(s_{t+1}), the
    discount, and the behaviour policy's log-probabilities of the actions taken."""

    traj: rollout.Transition
    log_prob: jax.Array
    v_tm1: jax.Array
    v_t: jax.Array
    discount_t: jax.Array


def collect(agent: Agent, state: ActorCriticState, key: jax.Array) -> tuple[ActorCriticState, Collected]:
    """Collect `num_steps` x `num_envs` transitions and compute bootstrap values.

    The rollout itself only runs the policy head. Afterwards one batched forward pass over the
    T + 1 observations (the trajectory and the current ones) gives the log-probabilities and
    V(s_t) for every step; v_t is then the rollout's own next-step value, except where an episode
    was truncated (the critic on the pre-reset observation, computed only if any truncation
    happened in this rollout). On termination the discount is zero, so nothing is bootstrapped.
    """
    policy_fn = agent.behaviour_policy(state.params, state.obs_stats)
    runner, traj = rollout.collect(
        agent.env, state.env_params, policy_fn, state.runner, key, agent.config.num_steps
    )
    all_obs = jnp.concatenate([traj.obs, runner.obs[None]], axis=0)
    policy_out, values = agent.apply(state.params, agent.prep_obs(state.obs_stats, all_obs))
    log_prob = distribution(policy_out[:-1], agent.spec).log_prob(traj.action)
    v_tm1, v_next = values[:-1], values[1:]
    v_final = jax.lax.cond(
        jnp.any(traj.truncated),
        lambda: agent.value(state.params, state.obs_stats, traj.next_obs),
        lambda: jnp.zeros_like(v_tm1),
    )
    v_t = jnp.where(traj.truncated, v_final, v_next)
    discount_t = state.hparams.gamma * (1.0 - traj.terminated.astype(jnp.float32))
    state = state.replace(runner=runner)
    return state, Collected(traj=traj, log_prob=log_prob, v_tm1=v_tm1, v_t=v_t, discount_t=discount_t)


def finish_update(
    agent: Agent,
    state: ActorCriticState,
    collected: Collected,
    loss: jax.Array,
    aux: ActorCriticAux,
) -> tuple[ActorCriticState, OnPolicyMetrics]:
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
    )
    return state, metrics


def gradient_step(
    agent: Agent, state: ActorCriticState, loss_fn: Callable[..., Any], batch: Any, hparams: Any
) -> tuple[ActorCriticState, jax.Array, ActorCriticAux]:
    """One optimizer step on `loss_fn(params, batch, hparams, apply, spec) -> (loss, aux)`."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, hparams, agent.apply, agent.spec
    )
    updates, opt_state = agent.optimizer(state.hparams).update(grads, state.opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return state, loss, aux


def normalize(advantage: jax.Array) -> jax.Array:
    """Zero mean, unit standard deviation over the whole batch (once, before any minibatching)."""
    return (advantage - advantage.mean()) / (advantage.std() + 1e-8)


Estimator = Callable[[Collected, Any], tuple[jax.Array, jax.Array, Any]]


def single_step_update(
    agent: Agent, state: ActorCriticState, estimate: Estimator
) -> tuple[ActorCriticState, OnPolicyMetrics]:
    """Collect one rollout and take one policy-gradient step on it (A2C, REINFORCE).

    `estimate(collected, hparams) -> (advantage, target, loss_hparams)` is what distinguishes the
    algorithms; the loss is `losses.policy_gradient_loss`.
    """
    key, (key_collect,) = next_keys(state.key, agent.config.prng_impl, 1)
    state = state.replace(key=key)

    # COLLECT TRAJECTORIES
    state, col = collect(agent, state, key_collect)

    # CALCULATE ADVANTAGE
    advantage, target, loss_hparams = estimate(col, state.hparams)
    if agent.config.normalize_advantages:
        advantage = normalize(advantage)
    batch = jax.tree.map(
        flatten_time,
        PolicyBatch(
            obs=agent.prep_obs(state.obs_stats, col.traj.obs),
            action=col.traj.action,
            advantage=advantage,
            target=target,
        ),
    )

    # UPDATE NETWORK (one step)
    state, loss, aux = gradient_step(agent, state, policy_gradient_loss, batch, loss_hparams)
    return finish_update(agent, state, col, loss, aux)


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
    return distribution(policy_out, agent.spec).sample(seed=key)




def make_trainer(
    config: OnPolicyConfig,
    hooks: Hooks,
    update: Callable[[Agent, ActorCriticState], tuple[ActorCriticState, OnPolicyMetrics]],
) -> Trainer:
    """Build init / learn / train / act for an on-policy algorithm given its `update`."""
    agent = build_agent(config, hooks)

    def init(key: jax.Array, hparams: Any, env_params: Any = None) -> ActorCriticState:
        return init_state(agent, key, hparams, env_params)

    def learn(state: ActorCriticState, n_updates: int) -> tuple[ActorCriticState, OnPolicyMetrics]:
        return scan_updates(lambda s: update(agent, s), state, n_updates, config.log_every)

    def train(key: jax.Array, hparams: Any, env_params: Any = None) -> TrainOutput:
        state, metrics = learn(init(key, hparams, env_params), config.num_updates)
        return TrainOutput(state=state, metrics=metrics)

    def policy(params: Params, obs_stats: RunningStats, obs: jax.Array, key: jax.Array, greedy: bool = False) -> jax.Array:
        return act(agent, params, obs_stats, obs, key, greedy)

    return Trainer(config, init, learn, train, policy, config.num_updates, config.log_every)
