"""Evaluation of a trained policy: `num_episodes` environments in parallel, one episode each,
all inside one `lax.scan` (jittable and vmappable over seeds)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rlcx_jax import envs, prng
from rlcx_jax.envs.normalize import init_stats
from rlcx_jax.rl import rollout
from rlcx_jax.rl.common import Trainer


def episode_horizon(env_params: Any, default: int = 1000) -> int:
    """Steps needed for every episode to end (time limit of the env, when it has one)."""
    return int(getattr(env_params, "max_steps_in_episode", default))


def make_evaluator(
    trainer: Trainer, num_episodes: int, greedy: bool, max_steps: int | None = None
) -> Callable[..., jax.Array]:
    """Build `evaluate(params, obs_stats, key, env_params=None) -> returns[num_episodes]`.

    Each of `num_episodes` parallel environments runs until its first episode ends; its return is
    recorded. Auto-reset continues the envs afterwards, but later episodes are ignored.
    """
    config = trainer.config
    env, default_env_params = envs.make_training_env(config.env, config.env_kwargs)
    horizon = max_steps or episode_horizon(default_env_params)

    def evaluate(params: Any, obs_stats: Any, key: jax.Array, env_params: Any = None) -> jax.Array:
        env_params = default_env_params if env_params is None else env_params
        key_reset, key_run = jax.random.split(prng.loop_free(key))
        runner = rollout.reset(env, env_params, key_reset, num_episodes)

        def policy_fn(k: jax.Array, obs: jax.Array) -> tuple[jax.Array, None]:
            return trainer.act(params, obs_stats, obs, k, greedy), None

        def body(carry: tuple[rollout.EnvRunner, jax.Array, jax.Array], k: jax.Array):
            r, finished, returns = carry
            r, tr = rollout.step(env, env_params, policy_fn, r, k)
            first = jnp.logical_and(tr.episode.done, jnp.logical_not(finished))
            returns = jnp.where(first, tr.episode.episode_return, returns)
            return (r, jnp.logical_or(finished, tr.episode.done), returns), None

        init = (runner, jnp.zeros(num_episodes, bool), jnp.zeros(num_episodes, jnp.float32))
        (_, _, returns), _ = jax.lax.scan(body, init, jax.random.split(key_run, horizon))
        return returns

    return evaluate


def default_greedy(algorithm: str) -> bool:
    """DQN is evaluated greedily; policy-gradient agents with their stochastic policy."""
    return algorithm == "dqn"


def evaluate(
    algorithm: str,
    config: Any,
    params: Any,
    key: jax.Array,
    num_episodes: int = 32,
    obs_stats: Any = None,
    greedy: bool | None = None,
    env_params: Any = None,
) -> jax.Array:
    """Returns of `num_episodes` episodes of the policy with `params` (one seed, jitted)."""
    from rlcx_jax import rl

    trainer = rl.make(algorithm, config)
    greedy = default_greedy(algorithm) if greedy is None else greedy
    if obs_stats is None:
        env, env_params0 = envs.make(config.env, **dict(config.env_kwargs))
        obs_stats = init_stats(tuple(env.observation_space(env_params0).shape))
    fn = jax.jit(make_evaluator(trainer, num_episodes, greedy))
    return fn(params, obs_stats, key, env_params)
