"""The one rollout function, shared by every algorithm, evaluation, and later distillation and
meta-learning. It is parameterised by a policy function and `env_params`, steps `num_envs` copies
of the environment with `vmap`, and runs `num_steps` steps in `lax.scan`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rlcx_jax.envs.wrappers import EpisodeStats

# policy_fn(key, obs[num_envs, ...]) -> (action[num_envs, ...], extras pytree with leading num_envs)
PolicyFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `x` where `mask`; zero when the mask is empty (never NaN)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@struct.dataclass
class EnvRunner:
    """Where the vectorised environments are: their states and current observations."""

    env_state: Any
    obs: jax.Array


@struct.dataclass
class Transition:
    """One time step for every environment (time-major once stacked by `collect`).

    next_obs is the observation after the action *before* any auto-reset (gymnax 1.x
    `info["final_observation"]`), so a truncated episode can be bootstrapped from it.
    """

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    next_obs: jax.Array
    extras: Any
    episode: EpisodeStats


@struct.dataclass
class EpisodeMetrics:
    """Fixed-shape summary of the episodes that finished inside a block of steps."""

    episode_return: jax.Array
    episode_length: jax.Array
    episode_count: jax.Array
    terminated_fraction: jax.Array

    @staticmethod
    def from_stats(episode: EpisodeStats) -> EpisodeMetrics:
        done = episode.done
        return EpisodeMetrics(
            episode_return=masked_mean(episode.episode_return, done),
            episode_length=masked_mean(episode.episode_length.astype(jnp.float32), done),
            episode_count=jnp.sum(done).astype(jnp.float32),
            terminated_fraction=masked_mean(episode.terminated.astype(jnp.float32), done),
        )

    def reduce(self) -> EpisodeMetrics:
        """Combine a stacked block (leading axis) into one, weighting by episode counts."""
        w = self.episode_count
        total = jnp.sum(w, axis=0)
        denom = jnp.maximum(total, 1.0)
        return EpisodeMetrics(
            episode_return=jnp.sum(self.episode_return * w, axis=0) / denom,
            episode_length=jnp.sum(self.episode_length * w, axis=0) / denom,
            episode_count=total,
            terminated_fraction=jnp.sum(self.terminated_fraction * w, axis=0) / denom,
        )


def reset(env: Any, env_params: Any, key: jax.Array, num_envs: int) -> EnvRunner:
    """Reset `num_envs` environments (vmapped)."""
    keys = jax.random.split(key, num_envs)
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(keys, env_params)
    return EnvRunner(env_state=env_state, obs=obs)


def step(
    env: Any, env_params: Any, policy_fn: PolicyFn, runner: EnvRunner, key: jax.Array
) -> tuple[EnvRunner, Transition]:
    """One vectorised step: act, step every env (auto-reset), record the transition."""
    return _step(env, env_params, policy_fn, runner, jax.random.split(key, runner.obs.shape[0] + 1))


def _step(
    env: Any, env_params: Any, policy_fn: PolicyFn, runner: EnvRunner, keys: jax.Array
) -> tuple[EnvRunner, Transition]:
    """`step` with its keys already split: keys[0] acts, keys[1:] step the environments."""
    action, extras = policy_fn(keys[0], runner.obs)
    obs, env_state, reward, terminated, truncated, info = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
        keys[1:], runner.env_state, action, env_params
    )
    transition = Transition(
        obs=runner.obs,
        action=action,
        reward=reward.astype(jnp.float32),
        terminated=jnp.asarray(terminated, bool),
        truncated=jnp.logical_and(jnp.asarray(truncated, bool), jnp.logical_not(terminated)),
        next_obs=info["final_observation"],
        extras=extras,
        episode=info["episode"],
    )
    return EnvRunner(env_state=env_state, obs=obs), transition


def collect(
    env: Any,
    env_params: Any,
    policy_fn: PolicyFn,
    runner: EnvRunner,
    key: jax.Array,
    num_steps: int,
) -> tuple[EnvRunner, Transition]:
    """Run `num_steps` vectorised steps; returns the new runner and a time-major Transition.

    Every key the rollout needs is split up front in one call, outside the sequential loop.
    """
    keys = jax.random.split(key, (num_steps, runner.obs.shape[0] + 1))

    def body(r: EnvRunner, k: jax.Array) -> tuple[EnvRunner, Transition]:
        return _step(env, env_params, policy_fn, r, k)

    return jax.lax.scan(body, runner, keys)
