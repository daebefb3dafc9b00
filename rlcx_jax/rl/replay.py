"""A replay buffer kept on the device as a pytree ring buffer (jittable, vmappable)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReplayBuffer:
    """`data` is a pytree whose leaves have leading axis `capacity`.

    position: next write index; size: number of valid items (saturates at capacity).
    """

    data: Any
    position: jax.Array
    size: jax.Array

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]


def init_buffer(example_item: Any, capacity: int) -> ReplayBuffer:
    """An empty buffer shaped like `example_item` (a single item, no batch axis)."""
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + jnp.shape(x), jnp.asarray(x).dtype), example_item)
    return ReplayBuffer(data=data, position=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def add_batch(buffer: ReplayBuffer, items: Any) -> ReplayBuffer:
    """Write a batch of `n` items (leading axis n) at the write position.

    The capacity must be a multiple of n (checked by the algorithm's config), so a batch never
    wraps around the end and one `dynamic_update_slice` per leaf suffices.
    """
    n = jax.tree.leaves(items)[0].shape[0]
    capacity = buffer.capacity
    data = jax.tree.map(
        lambda store, x: jax.lax.dynamic_update_slice_in_dim(store, x.astype(store.dtype), buffer.position, 0),
        buffer.data,
        items,
    )
    return ReplayBuffer(
        data=data,
        position=(buffer.position + n) % capacity,
        size=jnp.minimum(buffer.size + n, capacity),
    )


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Any:
    """Uniformly sample `batch_size` items (with replacement) from the valid part."""
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda x: x[idx], buffer.data)
