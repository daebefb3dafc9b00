"""Run a batched function with its leading (seed / setting / task) axis sharded over devices.

    from rlcx_jax import shard
    train_many = shard.sharded(jax.vmap(trainer.train))     # instead of xla.jit(jax.vmap(...))
    out = train_many(keys, hparams)                          # rows come back in input order

Every argument and every output of the wrapped function carries the same leading axis (as a
`vmap`ped `train` does). The axis is split evenly over a one-dimensional `jax.sharding.Mesh`
of all devices (GPUs, TPU cores, or CPU devices forced with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`); `jax.jit` partitions the program, each
device runs its rows, nothing is exchanged between them. A count that does not divide the device
count is padded by repeating the last row, and the padding is dropped from the outputs, so the
caller sees exactly its own rows. Across hosts (after `jax.distributed.initialize()`), the mesh
spans every process's devices, each process builds only its own shards from the (identical)
host inputs, and `gather` brings the outputs back to every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlcx_jax import xla

AXIS = "runs"


def run_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (named `AXIS`) over `devices`, by default every device of every process."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("a mesh needs at least one device")
    return Mesh(np.array(devices), (AXIS,))


def leading_size(tree: Any) -> int:
    """The common leading-axis length of every leaf of `tree` (an error names the disagreement)."""
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"every input needs the same leading (run) axis; got leading sizes {sorted(sizes)}")
    return sizes.pop()


def padded_size(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def pad_rows(tree: Any, size: int) -> Any:
    """Every leaf extended along its leading axis to `size` rows by repeating its last row.

    Repeated rows are valid inputs (a real key, a real setting), so padded runs compute ordinary
    numbers (no NaN, no special cases) and are simply dropped afterwards. Typed PRNG keys stay keys."""

    def pad(x: Any) -> Any:
        if _is_key(x):
            return jax.random.wrap_key_data(pad(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)]) if size > x.shape[0] else x

    return jax.tree.map(pad, tree)


def place(tree: Any, mesh: Mesh) -> Any:
    """Host arrays as global arrays split along the leading axis over `mesh`; each process builds
    only the shards of its own devices (`jax.make_array_from_callback`), so this works across hosts."""
    sharding = NamedSharding(mesh, PartitionSpec(AXIS))

    def one(x: Any) -> jax.Array:
        if _is_key(x):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def gather(tree: Any) -> Any:
    """Sharded outputs as host NumPy arrays on every process (an all-gather when there are several).

    Typed PRNG keys cannot become NumPy arrays: they are gathered as their key data and come back
    as keys (single process: `jax.device_get` returns them as they are)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def one(x: Any) -> Any:
        if _is_key(x):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def jit_rows(fn: Callable[..., Any], mesh: Mesh, fused_products: bool = False) -> Any:
    """`fn` jitted (rlcx_jax.xla options; `fused_products`: `TrainConfig.fused_products` for the seeds
    one device trains) with
    every output split along its leading axis over `mesh`; inputs come split the same way from
    `place_rows`. `.lower(*placed).compile()` compiles ahead."""
    return xla.jit(fn, fused_products=fused_products, out_shardings=NamedSharding(mesh, PartitionSpec(AXIS)))


def place_rows(args: Any, mesh: Mesh) -> Any:
    """`args` padded to a multiple of the mesh size (`pad_rows`) and placed row-split over it (`place`)."""
    return place(pad_rows(args, padded_size(leading_size(args), mesh.size)), mesh)


def sharded(fn: Callable[..., Any], mesh: Mesh | None = None) -> Callable[..., Any]:
    """`fn` (batched over a leading axis of all its inputs and outputs) jitted with that axis split
    over `mesh` (default: `run_mesh()`). Calls pad to a multiple of the mesh size, place the rows,
    run, and return host arrays with the padding dropped, rows in input order. Compiled once per
    input shape."""
    mesh = mesh or run_mesh()
    compiled = jit_rows(fn, mesh)

    def call(*args: Any) -> Any:
        n = leading_size(args)
        out = gather(compiled(*place_rows(args, mesh)))
        return jax.tree.map(lambda x: x[:n], out)

    return call
