"""Deep Q-Network (Mnih et al. 2015), with the double-DQN target (van Hasselt et al. 2016) as an
option: epsilon-greedy collection from vectorised envs into an on-device replay buffer, `gradient_steps`
gradient steps every `train_frequency` env steps, and a hard (tau = 1) or Polyak target update; the
network may be a dueling one (`NetConfig.dueling`, Wang et al. 2016).

Defaults are PureJaxRL's CartPole DQN settings, except that gradients are clipped at global norm 10
and Adam's epsilon is 1e-5 (PureJaxRL: no clip, 1e-8; `max_grad_norm`, `adam_eps`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlcx_jax.configs.algorithms import DQNConfig, DQNHParams
from rlcx_jax.envs.normalize import RunningStats
from rlcx_jax.rl import common, replay, rollout
from rlcx_jax.rl.common import Agent, Hooks, Params, Trainer, TrainState
from rlcx_jax.rl.losses import QBatch, q_learning_loss


@struct.dataclass
class DQNState(TrainState):
    """The common training state plus the target network and the replay buffer; `obs_stats` is
    kept for a uniform policy interface (DQN does not normalise observations)."""

    target_params: Params = None
    buffer: Any = None  # replay.ReplayBuffer

    def with_params(self, params: Params) -> DQNState:
        """New parameters, with the target network reset to them."""
        return self.replace(params=params, target_params=params)


@struct.dataclass
class DQNMetrics(common.BlockMetrics):
    """Per-update (or per block of `log_every` updates) DQN metrics; epsilon is the block's last."""

    LAST: ClassVar[tuple[str, ...]] = ("epsilon", "env_steps")

    episode: rollout.EpisodeMetrics
    loss: jax.Array
    q_mean: jax.Array
    epsilon: jax.Array
    env_steps: jax.Array
    ext: dict[str, Any]


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


def init(agent: Agent, key: jax.Array, hparams: DQNHParams, env_params: Any = None) -> DQNState:
    """The common initial state plus a target network equal to the online one and an empty buffer."""
    config: DQNConfig = agent.config
    base = common.init_train_state(agent, key, hparams, env_params)
    obs = base.runner.obs[0]
    zero = jnp.zeros((), jnp.float32)
    example = QBatch(obs=obs, action=jnp.zeros((), jnp.int32), reward=zero, discount=zero, next_obs=obs)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return DQNState(**fields, target_params=base.params, buffer=replay.init_buffer(example, config.buffer_size))


def _td_loss(
    params: Params, batch: QBatch, target_params: Params, apply: Any, double: bool, huber_delta: float | None
) -> tuple[jax.Array, Any]:
    return q_learning_loss(params, target_params, batch, apply, double, huber_delta)


def update(agent: Agent, state: DQNState) -> tuple[DQNState, DQNMetrics]:
    config: DQNConfig = agent.config
    hp = state.hparams
    key, (key_collect, key_sample) = common.next_keys(state.key, config.prng_impl, 2)
    env_steps = state.update_step * config.train_frequency

    # COLLECT TRANSITIONS (epsilon-greedy) INTO THE REPLAY BUFFER
    epsilon = epsilon_schedule(config, env_steps)

    def policy_fn(k: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
        return epsilon_greedy(agent.apply(state.params, obs), k, epsilon), None

    vec_steps = config.train_frequency // config.num_envs
    runner, traj = rollout.collect(agent.env, state.env_params, policy_fn, state.runner, key_collect, vec_steps)
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
    loss_fn = agent.terms.add_to(_td_loss)
    zero = jnp.zeros((), jnp.float32)

    def gradient_step(carry: tuple[Params, Any], key: jax.Array) -> tuple[tuple[Params, Any], Any]:
        params, opt_state = carry
        batch = replay.sample(buffer, key, config.batch_size)
        batch = batch.replace(extras=agent.terms.batch_extras(state.ext, hp.ext, batch))
        (loss, (aux, ext_aux)), grads = agent.value_and_grad(loss_fn)(
            params, batch, state.ext, hp.ext, state.target_params, agent.apply, config.double, config.huber_delta
        )
        return agent.gradient_step(params, opt_state, hp, grads), (loss, aux.q_mean, ext_aux)

    def learn_step(operand: tuple[Params, Any]) -> tuple[Params, Any, jax.Array, jax.Array, dict[str, Any]]:
        if config.gradient_steps == 1:  # one step on key_sample itself (the stream of a plain DQN)
            (params, opt_state), (loss, q_mean, ext_aux) = gradient_step(operand, key_sample)
            return params, opt_state, loss, q_mean, common.mean_ext_aux(ext_aux)
        keys = jax.random.split(key_sample, config.gradient_steps)
        (params, opt_state), (loss, q_mean, ext_aux) = jax.lax.scan(gradient_step, operand, keys)
        return params, opt_state, jnp.mean(loss), jnp.mean(q_mean), common.mean_ext_aux(ext_aux)

    def skip(operand: tuple[Params, Any]) -> tuple[Params, Any, jax.Array, jax.Array, dict[str, Any]]:
        ext_shape = jax.eval_shape(learn_step, operand)[4]
        return operand[0], operand[1], zero, zero, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ext_shape)

    ready = buffer.size >= config.learning_starts
    params, opt_state, loss, q_mean, ext_aux = jax.lax.cond(ready, learn_step, skip, (state.params, state.opt_state))

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
        ext=ext_aux,
    )
    return new_state, metrics


def act(
    agent: Agent, params: Params, obs_stats: RunningStats, obs: jax.Array, key: jax.Array, greedy: bool
) -> jax.Array:
    """Greedy, or epsilon-greedy with the final epsilon."""
    q = agent.apply(params, obs)
    if greedy:
        return jnp.argmax(q, axis=-1)
    return epsilon_greedy(q, key, agent.config.eps_end)


def make(config: DQNConfig = DQNConfig(), hooks: Hooks = Hooks()) -> Trainer:
    """Validate `config` and build init / learn / train / act for it."""
    return common.make_trainer(common.build_agent(config, hooks), init, update, act, greedy_default=True)


def make_train(config: DQNConfig = DQNConfig(), hooks: Hooks = Hooks()):
    """The pure `train(key, hparams, env_params=None) -> TrainOutput` for `config`."""
    return make(config, hooks).train
