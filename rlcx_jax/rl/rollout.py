"""The one rollout function, shared by every algorithm, evaluation, and later distillation and
meta-learning. It is parameterised by a policy function and `env_params`, steps `num_envs` copies
of the environment with `vmap`, and runs `num_steps` steps in `lax.scan`.
"""

from __future__ import annotations

import math
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

    Every key the rollout needs is split up front in one call, outside the sequential loop. Small
    per-environment values travel through the loop bit-cast into one uint32 array each way
    (`_pack`): the environment states in the loop's carry (one loop-carried buffer instead of one per
    state field, each of which XLA copied every step), and the step's scalars (reward, flags,
    discrete action, episode statistics) in its output (one write per step instead of one per field).
    The same values bit for bit.
    """
    num_envs = runner.obs.shape[0]
    keys = jax.random.split(key, (num_steps, num_envs + 1))
    state_leaves, state_def = jax.tree.flatten(runner.env_state)
    state_layout = _layout(state_leaves, num_envs, max_width=16)
    out_layout: list[Any] = []  # the Transition's structure and layout, recorded while the body is traced

    def body(carry: tuple[Any, jax.Array], k: jax.Array) -> tuple[tuple[Any, jax.Array], Any]:
        packed_state, obs = carry
        env_state = jax.tree.unflatten(state_def, _unpack(packed_state[0], packed_state[1], state_layout))
        r, transition = _step(env, env_params, policy_fn, EnvRunner(env_state=env_state, obs=obs), k)
        leaves, treedef = jax.tree.flatten(transition)
        out_layout[:] = [treedef, _layout(leaves, num_envs, max_width=1)]
        packed_state = _pack(jax.tree.leaves(r.env_state), state_layout, num_envs)
        return (packed_state, r.obs), _pack(leaves, out_layout[1], num_envs)

    init = (_pack(state_leaves, state_layout, num_envs), runner.obs)
    (packed_state, obs), (columns, rest) = jax.lax.scan(body, init, keys)
    env_state = jax.tree.unflatten(state_def, _unpack(packed_state[0], packed_state[1], state_layout))
    treedef, layout = out_layout
    return EnvRunner(env_state=env_state, obs=obs), jax.tree.unflatten(treedef, _unpack(columns, rest, layout))


Layout = list["tuple[Any, tuple[int, ...]] | None"]
"""Per leaf: (dtype, per-environment shape) if it is packed, else None."""


def _layout(leaves: list[jax.Array], num_envs: int, max_width: int) -> Layout:
    """Which leaves `_pack` bit-casts into uint32 columns: per-environment values ([num_envs, ...]) of 32
    bits or bools with at most `max_width` entries per environment. (Wider leaves such as observations
    stay apart: packing them too made XLA:CPU split the step into more kernels.)"""

    def packable(x: jax.Array) -> bool:
        return (
            x.ndim >= 1
            and x.shape[0] == num_envs
            and (x.dtype == jnp.bool_ or x.dtype.itemsize == 4)
            and math.prod(x.shape[1:]) <= max_width
        )

    return [(x.dtype, tuple(x.shape[1:])) if packable(x) else None for x in leaves]


def _pack(leaves: list[jax.Array], layout: Layout, num_envs: int) -> tuple[jax.Array, list[Any]]:
    """(uint32 [num_envs, k]: the bits of every leaf `layout` packs, side by side; the leaves with those
    replaced by None). Bit casts (bools as 0 / 1), so `_unpack` restores every value exactly."""

    def bits(x: jax.Array) -> jax.Array:
        x = jnp.reshape(x, (num_envs, -1))
        return x.astype(jnp.uint32) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, jnp.uint32)

    columns = [bits(x) for x, spec in zip(leaves, layout) if spec is not None]
    packed = jnp.concatenate(columns, axis=-1) if columns else jnp.zeros((num_envs, 0), jnp.uint32)
    return packed, [None if spec is not None else x for x, spec in zip(leaves, layout)]


def _unpack(packed: jax.Array, rest: list[Any], layout: Layout) -> list[Any]:
    """The leaves `_pack` took apart, from its output (possibly stacked: any leading axes before the
    environment axis, as a scan stacks them over time)."""
    leaves, j = [], 0
    for x, spec in zip(rest, layout):
        if spec is None:
            leaves.append(x)
            continue
        dtype, shape = spec
        width = math.prod(shape)
        column = jnp.reshape(packed[..., j : j + width], packed.shape[:-1] + shape)
        j += width
        leaves.append(column.astype(bool) if dtype == jnp.bool_ else jax.lax.bitcast_convert_type(column, dtype))
    return leaves
