"""The on-device ring-buffer replay: write position, size, overwrite order, sampling, jit / vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax.rl import replay

CAPACITY, N = 6, 2


def _items(start: int, n: int = N) -> dict:
    ids = jnp.arange(start, start + n, dtype=jnp.int32)
    return {"id": ids, "obs": jnp.stack([ids.astype(jnp.float32)] * 3, axis=-1), "flag": ids % 2 == 0}


def _example() -> dict:
    return jax.tree.map(lambda x: x[0], _items(0))


def test_init_buffer_shapes_and_dtypes():
    buf = replay.init_buffer(_example(), CAPACITY)
    assert buf.capacity == CAPACITY
    assert buf.data["id"].shape == (CAPACITY,) and buf.data["id"].dtype == jnp.int32
    assert buf.data["obs"].shape == (CAPACITY, 3) and buf.data["obs"].dtype == jnp.float32
    assert buf.data["flag"].dtype == jnp.bool_
    assert int(buf.position) == 0 and int(buf.size) == 0


def test_ring_semantics_reference():
    """Add 5 batches of 2 into capacity 6 and compare with a Python ring after each add."""
    buf = replay.init_buffer(_example(), CAPACITY)
    ring = [0] * CAPACITY
    pos = size = 0
    add = jax.jit(replay.add_batch)
    for k in range(5):
        buf = add(buf, _items(100 + N * k))
        for j in range(N):
            ring[pos] = 100 + N * k + j
            pos = (pos + 1) % CAPACITY
        size = min(size + N, CAPACITY)
        assert int(buf.position) == pos and int(buf.size) == size
        np.testing.assert_array_equal(buf.data["id"], ring)  # unwritten slots stay zero in both
        np.testing.assert_array_equal(buf.data["obs"][:, 0], np.asarray(ring, np.float32))
    # After 10 writes into 6 slots: the oldest four were overwritten, 104..109 remain.
    assert sorted(np.asarray(buf.data["id"]).tolist()) == list(range(104, 110))
    np.testing.assert_array_equal(buf.data["flag"], np.asarray(buf.data["id"]) % 2 == 0)


def test_sample_only_from_valid_items():
    buf = replay.init_buffer(_example(), CAPACITY)
    buf = replay.add_batch(buf, _items(7))  # size 2: ids 7, 8 (the rest are zero-filled)
    sample = jax.jit(replay.sample, static_argnums=2)(buf, jax.random.PRNGKey(0), 500)
    ids = np.asarray(sample["id"])
    assert set(ids.tolist()) == {7, 8}
    # Items stay whole: every leaf is indexed with the same index.
    np.testing.assert_array_equal(sample["obs"][:, 2], ids.astype(np.float32))
    np.testing.assert_array_equal(sample["flag"], ids % 2 == 0)


def test_sample_is_uniform_over_a_full_buffer():
    buf = replay.init_buffer(_example(), CAPACITY)
    for k in range(3):
        buf = replay.add_batch(buf, _items(N * k))
    ids = np.asarray(replay.sample(buf, jax.random.PRNGKey(1), 6000)["id"])
    counts = np.bincount(ids, minlength=CAPACITY)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 expected each


def test_vmap_over_independent_buffers():
    """One buffer per seed (vmapped training): each behaves like a single buffer."""
    example = _example()
    bufs = jax.vmap(lambda _: replay.init_buffer(example, CAPACITY))(jnp.arange(3))
    batches = jax.vmap(lambda s: _items(0))(jnp.arange(3))
    batches = {**batches, "id": batches["id"] + 10 * jnp.arange(3)[:, None]}
    add = jax.jit(jax.vmap(replay.add_batch))
    for _ in range(4):
        bufs = add(bufs, batches)
        batches = {**batches, "id": batches["id"] + N}
    single = replay.init_buffer(example, CAPACITY)
    b = {**_items(0), "id": _items(0)["id"] + 10}
    for _ in range(4):
        single = replay.add_batch(single, b)
        b = {**b, "id": b["id"] + N}
    np.testing.assert_array_equal(bufs.data["id"][1], single.data["id"])
    np.testing.assert_array_equal(bufs.position, [single.position] * 3)
    np.testing.assert_array_equal(bufs.size, [CAPACITY] * 3)
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    samples = jax.vmap(replay.sample, in_axes=(0, 0, None))(bufs, keys, 8)
    np.testing.assert_array_equal(samples["id"][1], replay.sample(single, keys[1], 8)["id"])
