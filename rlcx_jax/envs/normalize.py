"""Running observation normalisation kept in the training state (not inside the env).

Keeping the statistics beside the parameters means vectorised stepping stays a plain `vmap`,
evaluation and export use the same statistics, and a checkpoint restores them with the policy.
The update is the parallel mean/variance merge of Chan et al. (1979).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RunningStats:
    mean: jax.Array
    var: jax.Array
    count: jax.Array


def init_stats(obs_shape: tuple[int, ...]) -> RunningStats:
    return RunningStats(
        mean=jnp.zeros(obs_shape, jnp.float32),
        var=jnp.ones(obs_shape, jnp.float32),
        count=jnp.float32(1e-4),
    )


def update_stats(stats: RunningStats, batch: jax.Array) -> RunningStats:
    """Merge a batch of observations (leading axes are batch axes) into the running statistics."""
    obs_ndim = stats.mean.ndim
    flat = jnp.reshape(batch, (-1,) + batch.shape[batch.ndim - obs_ndim :]).astype(jnp.float32)
    b_mean = flat.mean(axis=0)
    b_var = flat.var(axis=0)
    b_count = jnp.float32(flat.shape[0])
    delta = b_mean - stats.mean
    total = stats.count + b_count
    mean = stats.mean + delta * b_count / total
    m2 = stats.var * stats.count + b_var * b_count + delta**2 * stats.count * b_count / total
    return RunningStats(mean=mean, var=m2 / total, count=total)


def normalize_observation(stats: RunningStats, obs: jax.Array, clip: float = 10.0) -> jax.Array:
    """clip((obs - mean) / sqrt(var + 1e-8), -clip, clip) with the running statistics."""
    return jnp.clip((obs - stats.mean) / jnp.sqrt(stats.var + 1e-8), -clip, clip)
