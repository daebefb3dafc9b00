"""Wrappers over gymnax 1.x environments (single env; vectorise with `jax.vmap`).

Each wrapper keeps the gymnax 1.x step signature
`step(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)`,
so wrappers compose and the rollout code never needs to know which are present.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class Wrapper:
    """Forward everything not overridden to the wrapped environment."""

    def __init__(self, env: Any):
        self._env = env

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    @property
    def unwrapped(self) -> Any:
        return getattr(self._env, "unwrapped", self._env)


@struct.dataclass
class EpisodeStats:
    """Statistics of the episode that ended at this step (valid where `done`)."""

    episode_return: jax.Array
    episode_length: jax.Array
    done: jax.Array
    terminated: jax.Array


@struct.dataclass
class EpisodeStatsState:
    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array


class EpisodeStatsWrapper(Wrapper):
    """Tracks running return and length, and reports them in `info["episode"]` when an episode ends.

    `info["episode"].terminated` says whether the episode ended by termination (True) or by the
    time limit (False), so a learning curve can tell "balanced for 500 steps" from "fell over".
    """

    def reset(self, key: jax.Array, params: Any) -> tuple[jax.Array, EpisodeStatsState]:
        obs, env_state = self._env.reset(key, params)
        return obs, EpisodeStatsState(env_state, jnp.float32(0.0), jnp.int32(0))

    def step(
        self, key: jax.Array, state: EpisodeStatsState, action: jax.Array, params: Any
    ) -> tuple[jax.Array, EpisodeStatsState, jax.Array, jax.Array, jax.Array, dict]:
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        done = jnp.logical_or(terminated, truncated)
        ep_return = state.episode_return + reward.astype(jnp.float32)
        ep_length = state.episode_length + 1
        info = dict(info)
        info["episode"] = EpisodeStats(
            episode_return=ep_return,
            episode_length=ep_length,
            done=done,
            terminated=jnp.asarray(terminated, bool),
        )
        new_state = EpisodeStatsState(
            env_state=env_state,
            episode_return=jnp.where(done, 0.0, ep_return),
            episode_length=jnp.where(done, 0, ep_length),
        )
        return obs, new_state, reward, terminated, truncated, info


class FlattenObservationWrapper(Wrapper):
    """Flattens (image) observations to vectors for MLPs; `final_observation` too."""

    def observation_shape(self, params: Any) -> tuple[int, ...]:
        shape = self._env.observation_space(params).shape
        size = 1
        for d in shape:
            size *= d
        return (size,)

    def reset(self, key: jax.Array, params: Any) -> tuple[jax.Array, Any]:
        obs, state = self._env.reset(key, params)
        return jnp.reshape(obs, (-1,)), state

    def step(self, key, state, action, params):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        info = dict(info)
        if "final_observation" in info:
            info["final_observation"] = jnp.reshape(info["final_observation"], (-1,))
        return jnp.reshape(obs, (-1,)), state, reward, terminated, truncated, info


class ClipActionWrapper(Wrapper):
    """Clips continuous actions to the action space bounds before the environment sees them.

    The agent keeps the unclipped sample, so its log-probability stays exact.
    """

    def step(self, key, state, action, params):
        space = self._env.action_space(params)
        return self._env.step(key, state, jnp.clip(action, space.low, space.high), params)


class RescaleActionWrapper(Wrapper):
    """The agent acts in [-1, 1]^d; the environment receives low + (a + 1) (high - low) / 2.

    Its action space is Box(-1, 1) (so a `ClipActionWrapper` outside it clips to [-1, 1]): a
    Gaussian policy with unit standard deviation then explores the whole range, whatever the
    environment's units (rllab's `normalize`, which Finn et al. 2017 used for point navigation,
    whose actions are +-0.1)."""

    def action_space(self, params: Any) -> Any:
        from gymnax.environments import spaces

        space = self._env.action_space(params)
        return spaces.Box(-1.0, 1.0, space.shape, jnp.float32)

    def step(self, key, state, action, params):
        space = self._env.action_space(params)
        low, high = jnp.asarray(space.low, jnp.float32), jnp.asarray(space.high, jnp.float32)
        return self._env.step(key, state, low + (action + 1.0) * 0.5 * (high - low), params)
