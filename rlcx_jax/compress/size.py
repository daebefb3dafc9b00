"""Size and cost accounting of a (compressed) network: parameters, non-zeros, bits, artifact bytes,
FLOPs per forward pass and measured inference latency.

FLOPs count a multiply-add as two operations and skip multiplications by a pruned (zero) weight, the
convention of the sparse-training literature (Evci et al. 2020): a Dense kernel with `nnz` non-zeros
costs 2 * nnz per example, a convolution 2 * nnz * (output positions). Biases and activations are
ignored. Only the layers a policy's forward pass uses are counted when `paths` is given: the network's
own layout names them, `nets.layout(net_config, head).prefixes("policy")` (the actor's torso and head of
an actor-critic, or the whole Q-network).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax.nets.paths import param_paths

Params = Any

__all__ = ["SizeReport", "count", "flops_per_forward", "measure_latency"]


class SizeReport(NamedTuple):
    """Counts over the selected parameters (all of them by default)."""

    params: int
    nonzeros: int
    bits: int  # storage bits of the values alone: non-zeros x bit width (no indices)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / max(self.params, 1)


def _leaves(params: Params, paths: Sequence[str] | None) -> dict[str, np.ndarray]:
    flat = dict(zip(param_paths(params), (np.asarray(x) for x in jax.tree.leaves(params))))
    if paths is None:
        return flat
    return {p: v for p, v in flat.items() if any(p == prefix or p.startswith(prefix + "/") for prefix in paths)}


def count(params: Params, bits: int = 32, paths: Sequence[str] | None = None) -> SizeReport:
    """Parameters, non-zeros and value bits (`bits` per non-zero) of the selected layers."""
    leaves = _leaves(params, paths)
    total = sum(v.size for v in leaves.values())
    nonzeros = sum(int(np.count_nonzero(v)) for v in leaves.values())
    return SizeReport(params=total, nonzeros=nonzeros, bits=nonzeros * bits)


def flops_per_forward(params: Params, obs_shape: Sequence[int], paths: Sequence[str] | None = None) -> int:
    """FLOPs of one forward pass for one observation (2 per non-zero multiply-add).

    Dense kernels (2-D) cost 2 * nnz. Conv kernels (4-D, VALID padding, stride 1 as in the MinAtar
    torso) cost 2 * nnz * H_out * W_out, with the spatial size taken from `obs_shape`.
    """
    total = 0
    for path, value in _leaves(params, paths).items():
        if not path.endswith("kernel"):
            continue
        nnz = int(np.count_nonzero(value))
        if value.ndim == 4:
            kh, kw = value.shape[:2]
            positions = (int(obs_shape[0]) - kh + 1) * (int(obs_shape[1]) - kw + 1)
            total += 2 * nnz * positions
        else:
            total += 2 * nnz
    return total


def measure_latency(
    forward: Callable[[Params, jax.Array], Any],
    params: Params,
    obs: jax.Array,
    repeats: int = 200,
    rounds: int = 5,
) -> float:
    """Median seconds of one jitted `forward(params, obs)` call (compiled and warmed up first).

    Each round times `repeats` back-to-back calls; the median over `rounds` resists a noisy host.
    """
    fn = jax.jit(forward)
    jax.block_until_ready(fn(params, obs))
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = None
        for _ in range(repeats):
            out = fn(params, obs)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / repeats)
    return float(np.median(per_call))


def batch_of(obs_shape: Sequence[int], batch: int = 1, seed: int = 0) -> jax.Array:
    """A fixed batch of Gaussian observations for latency measurements."""
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, *obs_shape), jnp.float32)
