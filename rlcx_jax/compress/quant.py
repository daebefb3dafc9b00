"""Quantization as pure transforms over parameter trees and activations.

Three schemes, all "fake quantization" (quantize, then dequantize back to float32) so a quantized
network runs through the ordinary float forward pass and can be trained (QAT) or evaluated (PTQ):

- ``uniform``: affine integer quantization (Jacob et al. 2018, "Quantization and Training of Neural
  Networks for Efficient Integer-Arithmetic-Only Inference"). Symmetric: ``scale = a / (2^(b-1)-1)``
  with ``a = max|x|`` and codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``; asymmetric: the range is widened
  to contain 0, ``scale = (hi - lo) / (2^b - 1)``, an integer zero point ``z = round(-lo/scale)`` and
  codes in ``[0, 2^b - 1]``, so that real 0 is exactly representable (pruned weights stay 0).
- ``log``: power-of-two quantization (Miyashita et al. 2016, "Convolutional Neural Networks using
  Logarithmic Data Representation"): ``sign(x) * 2^round(log2|x|)``, the exponent clipped to the
  ``M = 2^(b-1) - 1`` levels ending at ``e_max = round(log2 max|x|)``. One bit holds the sign and the
  magnitude code 0 is reserved for exact zero, so a code is ``sign * m`` with ``m`` in ``[0, M]`` and
  fits in ``b`` bits; values below the window saturate to its smallest power (only exact zeros are 0).
- ``kmeans``: weight sharing (Han et al. 2016, "Deep Compression"): a per-tensor codebook of
  ``2^b`` centroids fitted by a fixed number of 1-D Lloyd iterations, started from the optimal
  clustering found by dynamic programming over up to ~512 equal-weight groups of the values (or,
  ``kmeans_init="linear"``, evenly between min and max), every weight replaced by its nearest
  centroid. With a pruning mask, code 0 is reserved for exact zero and ``2^b - 1`` centroids are
  fitted to the kept weights only. A tensor with no more distinct values than centroids is its own
  codebook, so quantizing twice gives the same tensor as quantizing once.

Gradients use the straight-through estimator (Bengio et al. 2013): the backward pass of quantization
is the identity inside the clipping range ``[lo, hi]`` (both bounds inclusive) and zero outside. For
k-means the range is the whole real line (identity STE), as in Han et al. who fine-tune the shared
centroids, here approximated by letting gradients reach the underlying float weights. The use of
fake quantization for RL policies, PTQ at 8 bits and QAT below, follows QuaRL (Krishnan et al. 2019).

Everything here is jittable and vmappable; static configuration lives in the hashable `QuantSpec`.
`quantize_codes` / `dequantize` expose the integer codes that `export.py` writes; `fake_quant` is
*defined* as ``dequantize(quantize_codes(x))`` (plus the STE), so both agree bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rlcx_jax.configs.compress import DYNAMIC_RANGES as DYNAMIC_RANGES
from rlcx_jax.configs.compress import KMEANS_INITS as KMEANS_INITS
from rlcx_jax.configs.compress import MAX_BITS as MAX_BITS
from rlcx_jax.configs.compress import MIN_BITS as MIN_BITS
from rlcx_jax.configs.compress import RANGE_METHODS as RANGE_METHODS
from rlcx_jax.configs.compress import SCHEMES as SCHEMES
from rlcx_jax.configs.compress import QuantSpec as QuantSpec
from rlcx_jax.nets.paths import Patterns, compile_patterns, flatten_with_paths, path_str, selected_paths

__all__ = [
    "QuantSpec",
    "QTensor",
    "SCHEMES",
    "RANGE_METHODS",
    "OUTPUT_SUFFIX",
    "DEFAULT_INCLUDE",
    "fake_quant",
    "fake_quant_uniform",
    "straight_through",
    "uniform_affine",
    "quantize_codes",
    "dequantize",
    "code_range",
    "quantize_tree",
    "weight_param_transform",
    "kmeans_centroids",
    "kmeans_assign",
    "lloyd_1d",
    "cluster_means",
    "select_paths",
    "path_str",
    "flatten_with_paths",
    "masks_by_path",
    "activation_range",
    "activation_interceptor",
    "calibrate",
]

Params = Any
Ranges = dict[str, tuple[jax.Array, jax.Array]]

DEFAULT_INCLUDE = (r".*kernel",)
LAYER_TYPES: tuple[type, ...] = (nn.Dense, nn.Conv)
# Calibrated ranges of a layer's output are stored under "<module path>" + OUTPUT_SUFFIX.
OUTPUT_SUFFIX = ":output"
# Smallest normal float32: the floor of every scale, so zero ranges (constant or all-zero tensors)
# give finite codes and never 0/0, even with the CPU's flush-to-zero of subnormals.
_FLT_MIN = float(np.finfo(np.float32).tiny)
_MIN_EXP, _MAX_EXP = -126, 127  # exponents of normal float32 powers of two
_COMPARE_ALL_LIMIT = 2**22  # k-means assignment: elements x midpoints compared at once
_COMPARE_ALL_MIDS = 32  # ... and only while there are fewer midpoints than this
_DP_CELLS = 2**22  # k-means: k x atoms^2, the size of the exact dynamic program per tensor
_TINY = np.float32(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------------------------
# Static configuration
# ----------------------------------------------------------------------------------------------
def code_range(scheme: str, bits: int, symmetric: bool = True) -> tuple[int, int]:
    """(qmin, qmax): the integer codes a scheme produces at `bits`."""
    if scheme == "log" or (scheme == "uniform" and symmetric):
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


@struct.dataclass
class QTensor:
    """Integer codes of one tensor and what is needed to map them back to float32.

    codes: int32, the tensor's shape. uniform: `scale` (float32) and `zero_point` (int32), shape ()
    per tensor or (C,) per channel; value = (code - zero_point) * scale. log: `exponent` (int32,
    e_max, () or (C,)); value = sign(code) * 2^(e_max - M + |code|), 0 for code 0. kmeans:
    `codebook` (float32, (2^bits,)); value = codebook[code]; `zero_reserved` means codebook[0] == 0
    holds pruned weights.
    """

    codes: jax.Array
    scale: jax.Array | None = None
    zero_point: jax.Array | None = None
    exponent: jax.Array | None = None
    codebook: jax.Array | None = None
    scheme: str = struct.field(pytree_node=False, default="uniform")
    bits: int = struct.field(pytree_node=False, default=8)
    symmetric: bool = struct.field(pytree_node=False, default=True)
    zero_reserved: bool = struct.field(pytree_node=False, default=False)

    @property
    def qmin(self) -> int:
        return code_range(self.scheme, self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return code_range(self.scheme, self.bits, self.symmetric)[1]

    def zero_code(self) -> jax.Array | None:
        """The code (broadcastable to `codes`) that decodes to exactly 0, or None if there is none."""
        if self.scheme == "uniform":
            return self.zero_point
        if self.scheme == "log":
            return jnp.zeros((), jnp.int32)
        return jnp.zeros((), jnp.int32) if self.zero_reserved else None


# ----------------------------------------------------------------------------------------------
# Straight-through estimator (Bengio et al. 2013)
# ----------------------------------------------------------------------------------------------
@jax.custom_vjp
def straight_through(x: jax.Array, y: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Forward: `y` (the quantized `x`). Backward: d/dx = 1 where lo <= x <= hi, else 0.

    `y` should not depend on `x` through a differentiable path (pass `stop_gradient(y)`); `lo` and
    `hi` broadcast against `x` and get zero gradients (ranges are not learned here).
    """
    return y


def _straight_through_fwd(x, y, lo, hi):
    return y, (x, lo, hi)


def _straight_through_bwd(residuals, g):
    x, lo, hi = residuals
    inside = (x >= lo) & (x <= hi)
    return (
        jnp.where(inside, g, jnp.zeros_like(g)).astype(x.dtype),
        jnp.zeros_like(g),
        jnp.zeros_like(lo),
        jnp.zeros_like(hi),
    )


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


# ----------------------------------------------------------------------------------------------
# Ranges
# ----------------------------------------------------------------------------------------------
def _reduce_axes(x: jax.Array, per_channel: bool) -> tuple[int, ...] | None:
    """Axes to reduce for a range: all (per tensor) or all but the last (per channel)."""
    if per_channel and x.ndim >= 1:
        return tuple(range(x.ndim - 1))
    return None


def _minmax(x: jax.Array, per_channel: bool) -> tuple[jax.Array, jax.Array]:
    axes = _reduce_axes(x, per_channel)
    return jnp.min(x, axis=axes), jnp.max(x, axis=axes)


def _range_over(
    x: jax.Array, spec: QuantSpec, axes: tuple[int, ...] | None, keepdims: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) of `x` (float32, no gradient) reduced over `axes` by `spec.range_method`."""
    if spec.range_method == "minmax":
        return jnp.min(x, axis=axes, keepdims=keepdims), jnp.max(x, axis=axes, keepdims=keepdims)
    if axes == ():  # one element per range: its own range
        return (-jnp.abs(x), jnp.abs(x)) if spec.symmetric else (x, x)
    p = float(spec.percentile)
    if spec.symmetric:
        a = jnp.percentile(jnp.abs(x), p, axis=axes, keepdims=keepdims)
        return -a, a
    return (
        jnp.percentile(x, 100.0 - p, axis=axes, keepdims=keepdims),
        jnp.percentile(x, p, axis=axes, keepdims=keepdims),
    )


def activation_range(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) of an activation tensor by `spec.range_method` (per channel = last axis if asked).

    "minmax" gives (min x, max x). "percentile" with p = spec.percentile gives (-a, a) with
    a = percentile(|x|, p) if symmetric, else (percentile(x, 100 - p), percentile(x, p)); clipping
    rare outliers spends the levels on the bulk of the distribution.
    """
    x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    return _range_over(x, spec, _reduce_axes(x, spec.per_channel))


def sample_range(x: jax.Array, spec: QuantSpec, feature_axes: int = 1) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) of every sample's own activations: reduced over the trailing `feature_axes` axes
    (1 for a Dense input, 3 for a Conv input), kept as size-1 axes so they broadcast against x.

    Unlike a per-tensor dynamic range, the quantized value of one observation then does not depend
    on which other observations share its batch: a policy acts the same in a 4-env rollout, a
    128-sample minibatch and a 1-observation evaluation (PPO's importance ratios need that).
    `spec.per_channel` does not apply (a sample's channels share its range).
    """
    x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    return _range_over(x, spec, tuple(range(max(x.ndim - feature_axes, 0), x.ndim)), keepdims=True)


# ----------------------------------------------------------------------------------------------
# Uniform affine quantization (Jacob et al. 2018)
# ----------------------------------------------------------------------------------------------
def _levels(bits: int | jax.Array, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """(qmin, qmax) as float32; `bits` may be a traced integer array."""
    b = jnp.asarray(bits, jnp.int32)
    if symmetric:
        qmax = (jnp.left_shift(jnp.int32(1), b - 1) - 1).astype(jnp.float32)
        return -qmax, qmax
    return jnp.zeros((), jnp.float32), (jnp.left_shift(jnp.int32(1), b) - 1).astype(jnp.float32)


def uniform_affine(
    lo: jax.Array | float, hi: jax.Array | float, bits: int | jax.Array, symmetric: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Scale, zero point (integer-valued float32) and the clipping range for a range [lo, hi].

    Symmetric: a = max(|lo|, |hi|), scale = a / (2^(b-1) - 1), zero point 0, range [-a, a].
    Asymmetric: the range widened to [min(lo, 0), max(hi, 0)] (0 exactly representable),
    scale = (hi - lo) / (2^b - 1), zero point = round(-lo / scale) clipped to [0, 2^b - 1].
    Scales are floored at the smallest normal float32, so a zero range gives finite codes.
    The division by the level count is written as a product with its reciprocal: under jit XLA
    rewrites division by a constant that way, and eager and jitted results must agree bitwise.
    """
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    qmin, qmax = _levels(bits, symmetric)
    if symmetric:
        a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = jnp.maximum(a * (1.0 / qmax), _FLT_MIN)
        return scale, jnp.zeros_like(scale), -a, a
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = jnp.maximum((hi - lo) * (1.0 / (qmax - qmin)), _FLT_MIN)
    zero_point = jnp.clip(jnp.round(qmin - lo * (1.0 / scale)), qmin, qmax)
    return scale, zero_point, lo, hi


def _uniform_encode(
    x: jax.Array, scale: jax.Array, zero_point: jax.Array, qmin: jax.Array, qmax: jax.Array
) -> jax.Array:
    """Integer-valued float codes: clip(round(x * (1 / scale)) + z, qmin, qmax).

    A product with the reciprocal, not a division: XLA turns division by a broadcast scalar into
    that product inside some fusions only, and eager, jitted and exported codes must be identical.
    """
    return jnp.clip(jnp.round(x * (1.0 / scale)) + zero_point, qmin, qmax)


def _uniform_decode(codes: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    """(q - z) * scale, in float32."""
    return (codes.astype(jnp.float32) - zero_point.astype(jnp.float32)) * scale


def fake_quant_uniform(
    x: jax.Array,
    lo: jax.Array | float,
    hi: jax.Array | float,
    bits: int | jax.Array,
    symmetric: bool = True,
) -> jax.Array:
    """Uniform fake quantization with explicit (possibly traced) range and (possibly traced) bits.

    `lo`/`hi` broadcast against `x` (a scalar, or shape (C,) for per-channel ranges on the last
    axis); `bits` may be a traced int array (e.g. vmapped over bit widths), in which case it is not
    validated. Straight-through gradient inside the clipping range of `uniform_affine`.
    Bitwise equal to `fake_quant(x, QuantSpec("uniform", bits, symmetric), lo, hi)` for static bits.
    """
    x = jnp.asarray(x)
    xf = x.astype(jnp.float32)
    scale, zero_point, lo_eff, hi_eff = uniform_affine(lo, hi, bits, symmetric)
    qmin, qmax = _levels(bits, symmetric)
    y = _uniform_decode(_uniform_encode(xf, scale, zero_point, qmin, qmax), scale, zero_point)
    return straight_through(xf, jax.lax.stop_gradient(y), lo_eff, hi_eff).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Power-of-two quantization (Miyashita et al. 2016)
# ----------------------------------------------------------------------------------------------
def _pow2(e: jax.Array) -> jax.Array:
    """2^e for integer e in [-126, 127], exactly, by building the float32 bit pattern."""
    e = jnp.clip(e.astype(jnp.int32), _MIN_EXP, _MAX_EXP)
    return jax.lax.bitcast_convert_type(jnp.left_shift(e + 127, 23), jnp.float32)


def _log_encode(x: jax.Array, a: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """(codes, e_max): code = sign(x) * m, m = e - e_max + M in [1, M] for x != 0, 0 for x == 0."""
    levels = 2 ** (bits - 1) - 1
    e_max = jnp.clip(jnp.round(jnp.log2(jnp.maximum(a, _FLT_MIN))), _MIN_EXP, _MAX_EXP).astype(jnp.int32)
    e_low = jnp.maximum(e_max - (levels - 1), _MIN_EXP)
    mag = jnp.abs(x)
    nonzero = mag > 0
    e = jnp.round(jnp.log2(jnp.where(nonzero, mag, 1.0)))
    e = jnp.clip(e, e_low.astype(jnp.float32), e_max.astype(jnp.float32)).astype(jnp.int32)
    codes = jnp.sign(x).astype(jnp.int32) * (e - e_max + levels)
    return jnp.where(nonzero, codes, 0), e_max


def _log_decode(codes: jax.Array, e_max: jax.Array, bits: int) -> jax.Array:
    levels = 2 ** (bits - 1) - 1
    value = _pow2(e_max - levels + jnp.abs(codes))
    return jnp.where(codes == 0, 0.0, jnp.where(codes < 0, -value, value)).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# k-means weight sharing (Han et al. 2016)
# ----------------------------------------------------------------------------------------------
def _nearest_sorted(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest of ascending `centroids` (ties to the lower index), via the midpoints."""
    mids = (centroids[:-1] + centroids[1:]) * 0.5
    # Comparing against all midpoints is fastest for a few of them (XLA:CPU, 4096 values: 20 us for
    # 15 vs 42 us binary search); from ~64 centroids on the binary search wins (63 vs 166 us; 8 bits:
    # 25 vs 153 us on 1024 values).
    few = mids.size < _COMPARE_ALL_MIDS and x.size * mids.size <= _COMPARE_ALL_LIMIT
    method = "compare_all" if few else "scan"
    return jnp.searchsorted(mids, x, side="left", method=method).astype(jnp.int32)


def _linear_init(x: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """lo + (hi - lo) * i / (k - 1) over the kept (weight > 0) values (Han et al. 2016's linear init)."""
    kept = weights > 0
    any_kept = jnp.any(kept)
    lo = jnp.where(any_kept, jnp.min(jnp.where(kept, x, jnp.inf)), 0.0)
    hi = jnp.where(any_kept, jnp.max(jnp.where(kept, x, -jnp.inf)), 0.0)
    return lo + (hi - lo) * (jnp.arange(k, dtype=jnp.float32) * np.float32(1.0 / (k - 1)))


def _atoms(xs: jax.Array, ws: jax.Array, n_atoms: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sorted values grouped into `n_atoms` runs of equal weight (each value its own atom when there
    are no more values than atoms): per atom (weight, sum, sum of squares), the sums taken about the
    weighted mean (returned last) so that their prefix sums lose little to cancellation."""
    total = jnp.sum(ws)
    mean = jnp.sum(ws * xs) / jnp.maximum(total, _TINY)
    d = xs - mean
    if xs.size <= n_atoms:
        return ws, ws * d, ws * d * d, mean
    cum = jnp.cumsum(ws)
    ids = jnp.floor((cum - 0.5 * ws) * (n_atoms / jnp.maximum(total, _TINY))).astype(jnp.int32)
    ids = jnp.clip(ids, 0, n_atoms - 1)

    def per_atom(v: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(v, ids, num_segments=n_atoms, indices_are_sorted=True)

    return per_atom(ws), per_atom(ws * d), per_atom(ws * d * d), mean


def _optimal_segments(w: jax.Array, s: jax.Array, q: jax.Array, k: int) -> jax.Array:
    """Boundaries 0 = b_0 <= ... <= b_k = B of the k runs of B ascending atoms with the least total
    squared error: 1-D k-means solved exactly by dynamic programming (Wang & Song 2011,
    Ckmeans.1d.dp). SSE of atoms [i, j) = Q - S^2 / W from prefix sums;
    D_1[j] = SSE(0, j), D_m[j] = min_{i <= j} D_{m-1}[i] + SSE(i, j), then back-tracking."""
    n = w.shape[0]
    pw, ps, pq = (jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(a)]) for a in (w, s, q))
    i, j = jnp.arange(n + 1)[:, None], jnp.arange(n + 1)[None, :]
    dw, ds = pw[j] - pw[i], ps[j] - ps[i]
    sse = jnp.where(i <= j, jnp.maximum(pq[j] - pq[i] - ds * ds / jnp.maximum(dw, _TINY), 0.0), jnp.inf)

    def layer(d: jax.Array, _: None) -> tuple[jax.Array, jax.Array]:
        total = d[:, None] + sse
        return jnp.min(total, axis=0), jnp.argmin(total, axis=0).astype(jnp.int32)

    _, starts = jax.lax.scan(layer, sse[0], None, length=k - 1)  # starts[m-2][j]: last run's start in D_m

    def back(end: jax.Array, start_of: jax.Array) -> tuple[jax.Array, jax.Array]:
        return start_of[end], start_of[end]

    _, begins = jax.lax.scan(back, jnp.int32(n), starts, reverse=True)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), begins, jnp.full((1,), n, jnp.int32)])


def _optimal_init(x: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """Centroids of the optimal clustering of the sorted values grouped into
    B = min(n, max(k, sqrt(2^22 / k))) atoms of equal weight (k B^2 work; exact for tensors of up to
    B values, e.g. 512 at 4 bits; at 8 bits B = k and the atoms are the clusters). A cluster left
    empty (fewer distinct atoms than clusters) starts at the smallest kept value."""
    order = jnp.argsort(x)
    xs, ws = x[order], weights[order]
    n_atoms = int(min(x.size, max(k, np.floor(np.sqrt(_DP_CELLS / k)))))
    w, s, q, mean = _atoms(xs, ws, n_atoms)
    if n_atoms > k:
        bounds = _optimal_segments(w, s, q, k)
    else:  # no more atoms than clusters: one atom each (equal-weight quantile bins), the rest empty
        bounds = jnp.minimum(jnp.arange(k + 1, dtype=jnp.int32), n_atoms)
    pw, ps = (jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(a)]) for a in (w, s))
    size = pw[bounds[1:]] - pw[bounds[:-1]]
    smallest = jnp.min(jnp.where(ws > 0, xs, jnp.inf))
    fallback = jnp.where(jnp.isfinite(smallest), smallest, 0.0)
    centre = mean + (ps[bounds[1:]] - ps[bounds[:-1]]) / jnp.maximum(size, _TINY)
    return jnp.sort(jnp.where(size > 0, centre, fallback))


def cluster_means(x: jax.Array, weights: jax.Array, codes: jax.Array, previous: jax.Array) -> jax.Array:
    """The weighted mean of the values of each cluster, sum_i w_i x_i [c_i = j] / sum_i w_i [c_i = j]
    (flat `x`, `weights` and cluster indices `codes`); a cluster without weight keeps `previous[j]`."""
    k = previous.shape[0]
    sums = jax.ops.segment_sum(weights * x, codes, num_segments=k)
    counts = jax.ops.segment_sum(weights, codes, num_segments=k)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), previous)


def kmeans_assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest of ascending `centroids` for every value of `x` (ties to the lower one)."""
    return _nearest_sorted(x, centroids)


def lloyd_1d(x: jax.Array, weights: jax.Array, init: jax.Array, iters: int) -> jax.Array:
    """Ascending centroids of 1-D weighted k-means after `iters` Lloyd steps (Lloyd 1982) from
    `init`: assign each value to its nearest centroid, move each centroid to its cluster's weighted
    mean. An empty cluster keeps its centroid. Centroids are re-sorted after each step (1-D Lloyd
    keeps them ordered up to rounding).
    """

    def step(c: jax.Array, _: None) -> tuple[jax.Array, None]:
        return jnp.sort(cluster_means(x, weights, _nearest_sorted(x, c), c)), None

    centroids, _ = jax.lax.scan(step, init, None, length=iters)
    return centroids


def _distinct_values(x: jax.Array, weights: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(the first k distinct kept values in ascending order, padded with the largest of them; how
    many distinct kept values there are). A tensor with at most k of them is its own codebook."""
    xs = jnp.sort(jnp.where(weights > 0, x, jnp.inf))
    new = jnp.isfinite(xs) & jnp.concatenate([jnp.ones((1,), bool), xs[1:] != xs[:-1]])
    slot = jnp.where(new, jnp.cumsum(new) - 1, k)  # k: not a new value, or one beyond the k-th
    distinct = jnp.full((k,), jnp.inf, jnp.float32).at[slot].set(xs, mode="drop")
    n = jnp.sum(new)
    largest = jnp.max(jnp.where(jnp.isfinite(distinct), distinct, -jnp.inf))
    return jnp.where(jnp.isfinite(distinct), distinct, jnp.where(n > 0, largest, 0.0)), n


def kmeans_centroids(x: jax.Array, weights: jax.Array, k: int, spec: QuantSpec) -> jax.Array:
    """Ascending k centroids of the weighted 1-D k-means of flat `x`: `spec.kmeans_iters` Lloyd steps
    from `spec.kmeans_init`; exactly the distinct values when there are at most k of them (so that
    quantizing an already quantized tensor gives it back unchanged)."""
    init = (_optimal_init if spec.kmeans_init == "optimal" else _linear_init)(x, weights, k)
    fitted = lloyd_1d(x, weights, init, spec.kmeans_iters)
    distinct, n = _distinct_values(x, weights, k)
    return jnp.where(n <= k, distinct, fitted)


def _kmeans_quantize(x: jax.Array, spec: QuantSpec, mask: jax.Array | None) -> QTensor:
    flat = x.reshape(-1)
    reserve = mask is not None
    k = 2**spec.bits - int(reserve)
    weights = jnp.ones_like(flat) if mask is None else mask.reshape(-1).astype(jnp.float32)
    centroids = kmeans_centroids(flat, weights, k, spec)
    codes = _nearest_sorted(flat, centroids)
    if mask is not None:  # reserve code 0 for pruned weights
        codes = jnp.where(mask.reshape(-1), codes + 1, 0)
        centroids = jnp.concatenate([jnp.zeros((1,), jnp.float32), centroids])
    return QTensor(
        codes=codes.reshape(x.shape),
        codebook=centroids,
        scheme="kmeans",
        bits=spec.bits,
        symmetric=spec.symmetric,
        zero_reserved=reserve,
    )


# ----------------------------------------------------------------------------------------------
# Codes <-> floats, and fake quantization
# ----------------------------------------------------------------------------------------------
def _check_call(x: Any, spec: QuantSpec, lo: Any, hi: Any, mask: Any) -> None:
    """Python-side checks of a quantization call (before tracing or compiling anything)."""
    spec.validate()
    if spec.scheme == "kmeans" and (lo is not None or hi is not None):
        raise ValueError("k-means derives its codebook from the data; explicit lo/hi are not supported")
    if (lo is None) != (hi is None):
        raise ValueError("Give both lo and hi, or neither")
    if mask is not None and np.shape(mask) != np.shape(x):
        raise ValueError(f"mask shape {np.shape(mask)} does not match tensor shape {np.shape(x)}")


@functools.partial(jax.jit, static_argnums=1)
def _quantize(
    x: jax.Array, spec: QuantSpec, lo: Any, hi: Any, mask: jax.Array | None
) -> tuple[QTensor, jax.Array, jax.Array]:
    """Codes of float32 `x` (masked entries already 0) and the STE clipping range (lo_eff, hi_eff).

    Jitted (one compiled program per spec and shape; inlined when called under an outer jit)."""
    if spec.scheme == "kmeans":
        inf = jnp.float32(jnp.inf)
        return _kmeans_quantize(x, spec, mask), -inf, inf
    if lo is None:
        lo, hi = _minmax(x, spec.per_channel)
    lo = jax.lax.stop_gradient(jnp.asarray(lo, jnp.float32))
    hi = jax.lax.stop_gradient(jnp.asarray(hi, jnp.float32))
    if spec.scheme == "uniform":
        scale, zero_point, lo_eff, hi_eff = uniform_affine(lo, hi, spec.bits, spec.symmetric)
        qmin, qmax = _levels(spec.bits, spec.symmetric)
        codes = _uniform_encode(x, scale, zero_point, qmin, qmax).astype(jnp.int32)
        q = QTensor(
            codes=codes,
            scale=scale,
            zero_point=zero_point.astype(jnp.int32),
            scheme="uniform",
            bits=spec.bits,
            symmetric=spec.symmetric,
        )
        return q, lo_eff, hi_eff
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    codes, e_max = _log_encode(x, a, spec.bits)
    q = QTensor(codes=codes, exponent=e_max, scheme="log", bits=spec.bits, symmetric=True)
    return q, -a, a


def _masked_f32(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    x = jnp.asarray(x).astype(jnp.float32)
    return x if mask is None else jnp.where(mask, x, 0.0)


def quantize_codes(x: jax.Array, spec: QuantSpec, lo: Any = None, hi: Any = None, mask: Any = None) -> QTensor:
    """Integer codes of `x` (see `QTensor`); `dequantize` of the result equals `fake_quant` bitwise.

    lo/hi: explicit range (uniform/log), broadcast against `x`; derived from `x` (min/max, per
    channel if `spec.per_channel`) when None. mask: entries where it is False/0 are set to 0 first
    (and get the zero code); for k-means, code 0 is then reserved for 0.
    """
    _check_call(x, spec, lo, hi, mask)
    m = None if mask is None else jnp.asarray(mask).astype(bool)
    return _quantize(jax.lax.stop_gradient(_masked_f32(x, m)), spec, lo, hi, m)[0]


@jax.jit
def _dequantize(q: QTensor) -> jax.Array:
    if q.scheme == "uniform":
        assert q.scale is not None and q.zero_point is not None
        return _uniform_decode(q.codes, q.scale, q.zero_point)
    if q.scheme == "log":
        assert q.exponent is not None
        return _log_decode(q.codes, q.exponent, q.bits)
    assert q.codebook is not None
    return jnp.take(q.codebook, q.codes, axis=0)


def dequantize(q: QTensor) -> jax.Array:
    """Float32 values of the codes (the same arithmetic as the forward pass of `fake_quant`)."""
    if q.scheme not in SCHEMES:
        raise ValueError(f"Unknown quantization scheme {q.scheme!r}")
    return _dequantize(q)


@functools.partial(jax.jit, static_argnums=1)
def _fake_quant(x: jax.Array, spec: QuantSpec, lo: Any, hi: Any, mask: jax.Array | None) -> jax.Array:
    xf = _masked_f32(x, mask)
    q, lo_eff, hi_eff = _quantize(jax.lax.stop_gradient(xf), spec, lo, hi, mask)
    y = jax.lax.stop_gradient(_dequantize(q))
    return straight_through(xf, y, lo_eff, hi_eff).astype(x.dtype)


def fake_quant(x: jax.Array, spec: QuantSpec, lo: Any = None, hi: Any = None, mask: Any = None) -> jax.Array:
    """Quantize then dequantize `x` (same shape and dtype), with a straight-through gradient.

    Forward: `dequantize(quantize_codes(x, spec, lo, hi, mask))`. Backward (Bengio et al. 2013):
    d/dx = 1 inside the clipping range [lo, hi] (bounds inclusive; the symmetric range is [-a, a],
    a = max(|lo|, |hi|); the asymmetric one is widened to contain 0) and 0 outside; identity for
    k-means; 0 where `mask` is False. Ranges derived from `x` are treated as constants. The spec
    is validated in Python first; the computation is one jitted program per spec and shape.
    """
    _check_call(x, spec, lo, hi, mask)
    m = None if mask is None else jnp.asarray(mask).astype(bool)
    return _fake_quant(jnp.asarray(x), spec, lo, hi, m)


# ----------------------------------------------------------------------------------------------
# Parameter trees: selection by path, PTQ of weights, the QAT parameter transform
# ----------------------------------------------------------------------------------------------
def select_paths(params: Params, include: Patterns = DEFAULT_INCLUDE, exclude: Patterns = ()) -> list[str]:
    """Leaf paths selected by `include` / `exclude` under the one rule set of `nets.paths` (an
    include regex matching nothing, or an empty selection, is a ValueError listing the paths)."""
    return selected_paths(params, include, exclude)


def masks_by_path(params: Params, masks: Any) -> dict[str, Any]:
    """{param path: mask} for the masked leaves; checks paths and shapes."""
    if masks is None:
        return {}
    shapes = {p: np.shape(v) for p, v in flatten_with_paths(params).items()}
    found = flatten_with_paths(masks)
    for p, m in found.items():
        if p not in shapes:
            raise ValueError(f"mask path {p!r} is not a parameter; paths are {list(shapes)}")
        if np.shape(m) != shapes[p]:
            raise ValueError(f"mask {p!r} has shape {np.shape(m)}, parameter has {shapes[p]}")
    return found


def quantize_tree(
    params: Params,
    spec: QuantSpec,
    include: Patterns = DEFAULT_INCLUDE,
    exclude: Patterns = (),
    masks: Any = None,
) -> Params:
    """Fake-quantize the selected leaves (weights PTQ; with the STE also the QAT transform).

    Leaves are selected by `re.fullmatch` of their '/'-joined path (`select_paths`). `masks` (a
    pytree of boolean arrays parallel to params, missing/None leaves = unmasked) zeroes pruned
    entries of every masked leaf, quantized or not; for k-means it also reserves the zero code. The
    result is exactly what `export.export(params, masks=masks, qspec=spec, ...)` ships.
    """
    spec.validate()
    selected = set(select_paths(params, include, exclude))
    mask_of = masks_by_path(params, masks)

    def transform(path: Any, leaf: jax.Array) -> jax.Array:
        name = path_str(path)
        mask = mask_of.get(name)
        if name in selected:
            return fake_quant(leaf, spec, mask=mask)
        if mask is not None:
            return jnp.where(jnp.asarray(mask).astype(bool), leaf, jnp.zeros_like(leaf))
        return leaf

    return jax.tree_util.tree_map_with_path(transform, params)


def weight_param_transform(
    spec: QuantSpec,
    include: Patterns = DEFAULT_INCLUDE,
    exclude: Patterns = (),
    masks: Any = None,
) -> Callable[[Params], Params]:
    """`params -> quantize_tree(params, spec, ...)` for `Hooks.param_transform` (QAT weights).

    The spec and regexes are checked now, in Python, before any compilation.
    """
    spec.validate()
    compile_patterns(include, "include")
    compile_patterns(exclude, "exclude")

    def transform(params: Params) -> Params:
        return quantize_tree(params, spec, include, exclude, masks)

    return transform


# ----------------------------------------------------------------------------------------------
# Activations: interceptor (QAT, dynamic or calibrated PTQ) and calibration
# ----------------------------------------------------------------------------------------------
def _module_path(module: nn.Module) -> str:
    return "/".join(str(k) for k in module.path)


def _is_layer_call(context: Any, layer_types: tuple[type, ...], args: tuple[Any, ...]) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, layer_types) and len(args) > 0


def _check_activation_spec(spec: QuantSpec) -> None:
    spec.validate()
    if spec.scheme == "kmeans":
        raise ValueError("k-means weight sharing fits a codebook to weights; use 'uniform' or 'log' for activations")


def activation_interceptor(
    spec: QuantSpec,
    ranges: Mapping[str, tuple[Any, Any]] | None = None,
    outputs: bool = False,
    layer_types: tuple[type, ...] = LAYER_TYPES,
    dynamic: str = "sample",
) -> Callable[..., Any]:
    """A `flax.linen.intercept_methods` interceptor fake-quantizing the input of every Dense/Conv.

    ranges=None: dynamic quantization, the range measured on the fly: dynamic="sample" gives each
    sample its own range (`sample_range`; batch-independent, the default), "tensor" one range per
    call (`activation_range`; depends on the batch). ranges={module path: (lo, hi)} (from
    `calibrate`): static calibrated ranges (PTQ / QAT with fixed ranges). outputs=True also
    quantizes layer outputs (ranges under path + OUTPUT_SUFFIX). The STE lets gradients through
    inside the ranges, so `Hooks(weight_param_transform(...), activation_interceptor(...))` is
    quantization-aware training in any algorithm.
    """
    _check_activation_spec(spec)
    if dynamic not in DYNAMIC_RANGES:
        raise ValueError(f"dynamic must be one of {DYNAMIC_RANGES}, got {dynamic!r}")

    def quantize(x: jax.Array, key: str, feature_axes: int) -> jax.Array:
        if ranges is None and dynamic == "sample":
            lo, hi = sample_range(x, spec, feature_axes)
        elif ranges is None:
            lo, hi = activation_range(x, spec)
        elif key in ranges:
            lo, hi = ranges[key]
        else:
            raise ValueError(f"No calibrated range for layer {key!r}; ranges hold {sorted(ranges)}")
        return fake_quant(x, spec, lo, hi)

    def interceptor(next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], context: Any) -> Any:
        if not _is_layer_call(context, layer_types, args):
            return next_fun(*args, **kwargs)
        path = _module_path(context.module)
        feature_axes = 3 if isinstance(context.module, nn.Conv) else 1  # (H, W, C) or (features,)
        out = next_fun(quantize(args[0], path, feature_axes), *args[1:], **kwargs)
        return quantize(out, path + OUTPUT_SUFFIX, 1) if outputs else out

    return interceptor


def calibrate(
    apply_fn: Callable[..., Any],
    params: Params,
    observations: jax.Array,
    spec: QuantSpec,
    outputs: bool = False,
    layer_types: tuple[type, ...] = LAYER_TYPES,
) -> Ranges:
    """Activation ranges {module path: (lo, hi)} measured on a batch of observations.

    Runs `apply_fn(params, observations)` once (e.g. `rl.common.make_apply(network)`, or one with
    quantized weights) with an interceptor recording `activation_range` of each Dense/Conv input
    (and output if `outputs`). A layer called several times gets the union of its ranges. apply_fn
    must not be jitted (the interceptor has to run); observations come e.g. from rollouts.
    """
    _check_activation_spec(spec)
    stats: dict[str, tuple[jax.Array, jax.Array]] = {}

    def record(key: str, x: jax.Array) -> None:
        lo, hi = activation_range(x, spec)
        if isinstance(lo, jax.core.Tracer):
            raise ValueError("calibrate needs an un-jitted apply_fn (its interceptor records values)")
        if key in stats:
            lo, hi = jnp.minimum(stats[key][0], lo), jnp.maximum(stats[key][1], hi)
        stats[key] = (lo, hi)

    def interceptor(next_fun: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], context: Any) -> Any:
        if not _is_layer_call(context, layer_types, args):
            return next_fun(*args, **kwargs)
        path = _module_path(context.module)
        record(path, args[0])
        out = next_fun(*args, **kwargs)
        if outputs:
            record(path + OUTPUT_SUFFIX, out)
        return out

    with nn.intercept_methods(interceptor):
        apply_fn(params, observations)
    if not stats:
        raise ValueError("calibrate recorded no Dense/Conv call; is apply_fn jitted or the network empty?")
    return stats
