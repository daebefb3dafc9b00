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

    Every key the rollout needs is split up front in one call, outside the sequential loop. The
    per-environment scalars of a step (reward, flags, discrete action, episode statistics) leave the
    loop packed into one uint32 array (`_pack_scalars`): one write per step instead of one per field,
    the same values bit for bit.
    """
    keys = jax.random.split(key, (num_steps, runner.obs.shape[0] + 1))
    num_envs = runner.obs.shape[0]
    layout: list[Any] = []  # the Transition's structure, recorded while the body is traced

    def body(r: EnvRunner, k: jax.Array) -> tuple[EnvRunner, tuple[jax.Array, list[Any]]]:
        r, transition = _step(env, env_params, policy_fn, r, k)
        leaves, treedef = jax.tree.flatten(transition)
        layout[:] = [treedef, [x.dtype if _packable(x, num_envs) else None for x in leaves]]
        return r, _pack_scalars(leaves, num_envs)

    runner, (columns, rest) = jax.lax.scan(body, runner, keys)
    return runner, _unpack_scalars(columns, rest, *layout)


def _packable(x: jax.Array, num_envs: int) -> bool:
    """A per-environment scalar of 32 bits or a bool: it fits one uint32 column. (Wider leaves such as
    observations stay apart: packing them too made XLA:CPU split the write into more kernels.)"""
    return x.shape == (num_envs,) and (x.dtype == jnp.bool_ or x.dtype.itemsize == 4)


def _pack_scalars(leaves: list[jax.Array], num_envs: int) -> tuple[jax.Array, list[Any]]:
    """(uint32 [num_envs, k]: the bits of every packable leaf, the leaves with those replaced by None).
    Bit casts (bools as 0 / 1), so `_unpack_scalars` restores every value exactly."""

    def bits(x: jax.Array) -> jax.Array:
        return x.astype(jnp.uint32) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, jnp.uint32)

    columns = [bits(x) for x in leaves if _packable(x, num_envs)]
    packed = jnp.stack(columns, axis=-1) if columns else jnp.zeros((num_envs, 0), jnp.uint32)
    return packed, [None if _packable(x, num_envs) else x for x in leaves]


def _unpack_scalars(columns: jax.Array, rest: list[Any], treedef: Any, dtypes: list[Any]) -> Any:
    """The Transition from `_pack_scalars`'s output stacked over time; `dtypes[i]` is leaf i's dtype if
    it was packed, else None (kept as it is)."""
    leaves, j = [], 0
    for x, dtype in zip(rest, dtypes):
        if dtype is None:
            leaves.append(x)
            continue
        col = columns[..., j]
        leaves.append(col.astype(bool) if dtype == jnp.bool_ else jax.lax.bitcast_convert_type(col, dtype))
        j += 1
    return jax.tree.unflatten(treedef, leaves)
