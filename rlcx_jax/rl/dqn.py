"""Deep Q-Network (Mnih et al. 2015), with the double-DQN target (van Hasselt et al. 2016) as an
option: epsilon-greedy collection from vectorised envs into an on-device replay buffer, one gradient
step every `train_frequency` env steps, and a hard (tau = 1) or Polyak target update.

Defaults are PureJaxRL's CartPole DQN settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax import envs, nets
from rlcx_jax.envs.normalize import RunningStats, init_stats
from rlcx_jax.rl import replay, rollout
from rlcx_jax.rl.common import (
    Hooks,
    Params,
    Trainer,
    TrainOutput,
    check_positive,
    check_prng_impl,
    check_range,
    check_sparsity,
    make_apply,
    next_keys,
    seed_key,
    make_optimizer,
    scan_updates,
)
from rlcx_jax.compress.training import CompressConfig, compress_hooks
from rlcx_jax.rl.losses import QBatch, q_learning_loss


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    """Static DQN settings. Counts are in environment steps (summed over the vectorised envs)."""

    env: str = "CartPole-v1"
    env_kwargs: tuple[tuple[str, Any], ...] = ()
    num_envs: int = 10
    total_timesteps: int = 500_000
    buffer_size: int = 10_000
    batch_size: int = 128
    learning_starts: int = 10_000
    train_frequency: int = 10
    target_update_period: int = 500
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay_fraction: float = 0.5
    double: bool = False
    huber_delta: float | None = None
    net: nets.NetConfig = nets.NetConfig(hidden=(120, 84), activation="relu")
    log_every: int = 50
    prng_impl: str = "threefry2x32"
    compress: CompressConfig = CompressConfig()

    @property
    def steps_per_update(self) -> int:
        return self.train_frequency

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.train_frequency

    def validate(self) -> None:
        envs.check_env_name(self.env)
        for name in ("num_envs", "total_timesteps", "buffer_size", "batch_size", "train_frequency",
                     "target_update_period", "log_every"):
            check_positive(name, getattr(self, name))
        if self.learning_starts < 0:
            raise ValueError(f"learning_starts must be >= 0, got {self.learning_starts}")
        if self.train_frequency % self.num_envs != 0:
            raise ValueError(
                f"train_frequency ({self.train_frequency}) must be a multiple of num_envs ({self.num_envs}):"
                " one update collects train_frequency / num_envs vectorised steps"
            )
        if self.buffer_size % self.train_frequency != 0:
            raise ValueError(
                f"buffer_size ({self.buffer_size}) must be a multiple of train_frequency ({self.train_frequency})"
            )
        if self.target_update_period % self.train_frequency != 0:
            raise ValueError(
                f"target_update_period ({self.target_update_period}) must be a multiple of "
                f"train_frequency ({self.train_frequency})"
            )
        if self.learning_starts > self.buffer_size:
            raise ValueError(
                f"learning_starts ({self.learning_starts}) exceeds buffer_size ({self.buffer_size}): "
                "the buffer never holds that many transitions, so no gradient step would ever be taken"
            )
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps ({self.total_timesteps}) is below train_frequency")
        if self.num_updates % self.log_every != 0:
            raise ValueError(
                f"The number of updates ({self.num_updates}) must be a multiple of log_every ({self.log_every})"
            )
        check_prng_impl(self.prng_impl)
        check_range("eps_start", self.eps_start, 0.0, 1.0)
        check_range("eps_end", self.eps_end, 0.0, 1.0)
        check_range("eps_decay_fraction", self.eps_decay_fraction, 0.0, 1.0)
        self.net.validate()
        self.compress.validate()


@struct.dataclass
class DQNHParams:
    lr: float = 2.5e-4
    gamma: float = 0.99
    tau: float = 1.0
    max_grad_norm: float = 10.0
    sparsity: float = 0.0  # target of CompressConfig.prune_schedule (traced: one vmap sweeps it)

    def validate(self) -> None:
        check_positive("lr", self.lr)
        check_range("gamma", self.gamma, 0.0, 1.0)
        check_range("tau", self.tau, 0.0, 1.0)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_sparsity(self.sparsity)


@struct.dataclass
class DQNState:
    params: Params
    target_params: Params
    opt_state: optax.OptState
    buffer: replay.ReplayBuffer
    runner: rollout.EnvRunner
    obs_stats: RunningStats  # kept for a uniform policy interface; DQN does not normalise
    key: jax.Array
    update_step: jax.Array
    hparams: DQNHParams
    env_params: Any


@struct.dataclass
class DQNMetrics:
    episode: rollout.EpisodeMetrics
    loss: jax.Array
    q_mean: jax.Array
    epsilon: jax.Array
    env_steps: jax.Array

    def reduce(self) -> "DQNMetrics":
        return DQNMetrics(
            episode=self.episode.reduce(),
            loss=jnp.mean(self.loss, axis=0),
            q_mean=jnp.mean(self.q_mean, axis=0),
            epsilon=self.epsilon[-1],
            env_steps=self.env_steps[-1],
        )


def epsilon_schedule(config: DQNConfig, env_steps: jax.Array) -> jax.Array:
    """Linear decay from eps_start to eps_end over eps_decay_fraction of training."""
    decay_steps = max(config.eps_decay_fraction * config.total_timesteps, 1.0)
    frac = jnp.clip(env_steps / decay_steps, 0.0, 1.0)
    return config.eps_start + frac * (config.eps_end - config.eps_start)


def epsilon_greedy(q: jax.Array, key: jax.Array, epsilon: jax.Array) -> jax.Array:
    key_explore, key_action = jax.random.split(key)
    greedy = jnp.argmax(q, axis=-1)
    random = jax.random.randint(key_action, greedy.shape, 0, q.shape[-1])
    explore = jax.random.uniform(key_explore, greedy.shape) < epsilon
    return jnp.where(explore, random, greedy)


def make(config: DQNConfig = DQNConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    config.validate()
    env, default_env_params = envs.make_training_env(config.env, config.env_kwargs)
    spec = nets.action_spec(env.action_space(default_env_params))
    obs_shape = tuple(env.observation_space(default_env_params).shape)
    network = nets.make(config.net, obs_shape, spec, head="q")
    gradient_steps = config.num_updates - config.learning_starts // config.train_frequency
    hooks = compress_hooks(config.compress, max(gradient_steps, 1), hooks)
    apply = make_apply(network, hooks)
    vec_steps = config.train_frequency // config.num_envs

    def optimizer(hp: DQNHParams) -> optax.GradientTransformation:
        return make_optimizer(hp.lr, hp.max_grad_norm, hooks, hparams=hp)

    def init(key: jax.Array, hparams: DQNHParams, env_params: Any = None) -> DQNState:
        env_params = default_env_params if env_params is None else env_params
        impl = config.prng_impl
        key, (key_net, key_env) = next_keys(jax.random.key_data(seed_key(key, impl)), impl, 2)
        params = network.init(key_net, jnp.zeros((1,) + obs_shape, jnp.float32))["params"]
        runner = rollout.reset(env, env_params, key_env, config.num_envs)
        example = QBatch(
            obs=runner.obs[0],
            action=jnp.zeros((), jnp.int32),
            reward=jnp.zeros((), jnp.float32),
            discount=jnp.zeros((), jnp.float32),
            next_obs=runner.obs[0],
        )
        return DQNState(
            params=params,
            target_params=params,
            opt_state=optimizer(hparams).init(params),
            buffer=replay.init_buffer(example, config.buffer_size),
            runner=runner,
            obs_stats=init_stats(obs_shape),
            key=key,
            update_step=jnp.zeros((), jnp.int32),
            hparams=hparams,
            env_params=env_params,
        )

    def update(state: DQNState) -> tuple[DQNState, DQNMetrics]:
        hp = state.hparams
        key, (key_collect, key_sample) = next_keys(state.key, config.prng_impl, 2)
        env_steps = state.update_step * config.train_frequency

        # COLLECT TRANSITIONS (epsilon-greedy) INTO THE REPLAY BUFFER
        epsilon = epsilon_schedule(config, env_steps)

        def policy_fn(k: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
            return epsilon_greedy(apply(state.params, obs), k, epsilon), None

        runner, traj = rollout.collect(env, state.env_params, policy_fn, state.runner, key_collect, vec_steps)
        flat = lambda x: jnp.reshape(x, (-1,) + x.shape[2:])  # noqa: E731
        items = QBatch(
            obs=flat(traj.obs),
            action=flat(traj.action).astype(jnp.int32),
            reward=flat(traj.reward),
            discount=flat(hp.gamma * (1.0 - traj.terminated.astype(jnp.float32))),
            next_obs=flat(traj.next_obs),
        )
        buffer = replay.add_batch(state.buffer, items)
        env_steps = env_steps + config.train_frequency

        # UPDATE NETWORK (once the buffer holds learning_starts transitions)
        def learn_step(operand: tuple[Params, Any]) -> tuple[Params, Any, jax.Array, jax.Array]:
            params, opt_state = operand
            batch = replay.sample(buffer, key_sample, config.batch_size)
            (loss, aux), grads = jax.value_and_grad(q_learning_loss, has_aux=True)(
                params, state.target_params, batch, apply, config.double, config.huber_delta
            )
            updates, opt_state = optimizer(hp).update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, aux.q_mean

        def skip(operand: tuple[Params, Any]) -> tuple[Params, Any, jax.Array, jax.Array]:
            zero = jnp.zeros((), jnp.float32)
            return operand[0], operand[1], zero, zero

        ready = buffer.size >= config.learning_starts
        params, opt_state, loss, q_mean = jax.lax.cond(
            ready, learn_step, skip, (state.params, state.opt_state)
        )

        # UPDATE TARGET NETWORK every target_update_period env steps
        do_target = jnp.logical_and(ready, env_steps % config.target_update_period == 0)
        step_size = jnp.where(do_target, hp.tau, 0.0)
        target_params = optax.incremental_update(params, state.target_params, step_size)

        new_state = state.replace(
            params=params,
            target_params=target_params,
            opt_state=opt_state,
            buffer=buffer,
            runner=runner,
            key=key,
            update_step=state.update_step + 1,
        )
        metrics = DQNMetrics(
            episode=rollout.EpisodeMetrics.from_stats(traj.episode),
            loss=loss,
            q_mean=q_mean,
            epsilon=epsilon,
            env_steps=env_steps,
        )
        return new_state, metrics

    def learn(state: DQNState, n_updates: int) -> tuple[DQNState, DQNMetrics]:
        return scan_updates(update, state, n_updates, config.log_every)

    def train(key: jax.Array, hparams: DQNHParams, env_params: Any = None) -> TrainOutput:
        state, metrics = learn(init(key, hparams, env_params), config.num_updates)
        return TrainOutput(state=state, metrics=metrics)

    def act(params: Params, obs_stats: Any, obs: jax.Array, key: jax.Array, greedy: bool = True) -> jax.Array:
        q = apply(params, obs)
        if greedy:
            return jnp.argmax(q, axis=-1)
        return epsilon_greedy(q, key, config.eps_end)

    return Trainer(config, init, learn, train, act, config.num_updates, config.log_every)


def make_train(config: DQNConfig = DQNConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
