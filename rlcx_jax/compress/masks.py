"""Unstructured pruning masks over Flax parameter trees (docs/architecture.md, "Conventions": masks are pytrees
parallel to params, layers are chosen by regex over the parameter path).

Conventions
-----------
* A parameter's *path* is its '/'-joined dict keys, e.g. ``"actor_torso/Dense_0/kernel"``; layers
  are chosen by regex through the one selector of `nets.paths` (roles of a network's layout become
  regexes with `layout.patterns`).
* A *selection* is a tree of Python bools parallel to params (static: never pass it through `jit` as
  an argument; close over it instead). Default selection: every ``kernel``; biases stay dense.
* A *mask tree* is parallel to params; every leaf is a **bool** array of the parameter's shape
  (True = keep). Unselected leaves get an all-True mask, so params and masks always have the same
  structure and `apply_masks` is one `tree.map`.
* Pruning by rank, never by a Python slice: with ``k = round(sparsity * n)`` (computed in float32,
  round half to even) the ``k`` lowest-scoring weights are zeroed. `jnp.argsort(stable=True)` breaks
  ties: among equal scores the lower flat index is pruned first. Because ``k`` is an array, sparsity
  may be a Python float or a traced scalar: every mask builder works under `jit` and under `vmap`
  over sparsity (e.g. a sweep of pruning levels, or the Zhu & Gupta 2017 gradual schedule inside a
  `lax.scan`).
* Sparsity must lie in [0, 1). It is checked for Python numbers and concrete arrays; a traced value
  cannot be inspected, so a caller that traces sparsity validates it before `jit` (hyperparameters
  are validated in Python, before jit).

Layer-wise distributions of the sparsity budget (`masks_from_scores`):
* ``"uniform"``: every selected leaf loses exactly ``round(s * n_leaf)`` weights (Zhu & Gupta 2017).
* ``"global"``: one ranking over all selected weights, exactly ``round(s * N)`` zeros in total.
* ``"erk"``: Erdos-Renyi-Kernel (Evci et al. 2020, RigL): the density of a leaf is proportional to
  ``sum(shape) / prod(shape)``, scaled so that the non-zeros total ``(1 - s) * N``; leaves whose
  density would exceed 1 are made dense and the scale is recomputed for the rest. Each leaf keeps
  exactly ``round(density * n_leaf)`` weights, so the total equals the target up to per-leaf
  rounding (at most half a weight per leaf). For a Python float the densities are computed in
  NumPy float64 from the static shapes; for a traced sparsity in float32 jnp with a fixed number
  of rescaling rounds (one per leaf, which always suffices since each round either converges or
  makes at least one more leaf dense). The two precisions can round a leaf's count differently
  when density * n_leaf lies within float32 error of a half; then the counts differ by one.

N:M semi-structured sparsity (`nm_masks`): in every group of ``m`` consecutive weights along the
kernel's input axis keep the ``n`` largest (2:4 is the pattern sparse tensor cores accelerate,
Mishra et al. 2021).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax.configs.compress import DISTRIBUTIONS as DISTRIBUTIONS
from rlcx_jax.configs.compress import check_sparsity
from rlcx_jax.nets import paths as paths_lib
from rlcx_jax.nets.paths import Patterns, param_paths, path_str

__all__ = [
    "DISTRIBUTIONS",
    "SparsityReport",
    "param_paths",
    "select",
    "apply_masks",
    "check_masks",
    "ones_masks",
    "validate_sparsity",
    "magnitude_scores",
    "random_scores",
    "saliency_scores",
    "erk_densities",
    "masks_from_scores",
    "magnitude_masks",
    "random_masks",
    "saliency_masks",
    "nm_masks_from_scores",
    "nm_masks",
    "sparsity",
]

Tree = Any  # a pytree (nested dicts of arrays for Flax params)

DEFAULT_INCLUDE: tuple[str, ...] = (r".*kernel",)


# ----------------------------------------------------------------------------------------------
# Paths and selection
# ----------------------------------------------------------------------------------------------
def _flatten(tree: Tree) -> tuple[list[str], list[Any], Any]:
    """(paths, leaves, treedef) of a pytree, in jax's leaf order."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in with_path], [x for _, x in with_path], treedef


def select(params: Tree, include: Patterns = DEFAULT_INCLUDE, exclude: Patterns = ()) -> Tree:
    """Tree of Python bools: True where the path fully matches an `include` regex and no `exclude`
    regex, with the selection rules of `nets.paths` (an include regex matching nothing, or an empty
    selection, is a ValueError listing the paths).

    Example: ``select(params, layout.patterns(["torso"], [r".*kernel"]))`` prunes torso kernels only.
    """
    return paths_lib.select(params, include, exclude)


def _selection(tree: Tree, selected: Tree | None) -> list[bool]:
    """The selection as a flat list of bools in leaf order (default: every kernel)."""
    if selected is None:
        selected = select(tree)
    _check_structure(tree, selected, "selection")
    flags = [bool(s) for s in jax.tree_util.tree_leaves(selected)]
    if not any(flags):
        raise ValueError(f"The selection is empty; available paths: {param_paths(tree)}")
    return flags


# ----------------------------------------------------------------------------------------------
# Mask trees
# ----------------------------------------------------------------------------------------------
def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _check_structure(params: Tree, other: Tree, what: str) -> None:
    """ValueError naming the paths present on one side only, when the tree structures differ."""
    same: bool = jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(other)  # type: ignore[operator]
    if same:
        return
    p_paths, o_paths = set(param_paths(params)), set(param_paths(other))
    raise ValueError(
        f"The {what} tree does not match the params tree: missing paths {sorted(p_paths - o_paths)}, "
        f"extra paths {sorted(o_paths - p_paths)}"
        + ("" if p_paths != o_paths else " (same paths, different container types)")
    )


def check_masks(params: Tree, masks: Tree) -> None:
    """Raise ValueError (with the offending paths) unless `masks` has the structure of `params` and
    every mask leaf has its parameter's shape. Reads shapes only (works on `jax.ShapeDtypeStruct`),
    so it can run before anything is compiled."""
    _check_structure(params, masks, "mask")
    paths, p_leaves, _ = _flatten(params)
    m_leaves = jax.tree_util.tree_leaves(masks)
    bad = [
        f"{path}: param {_shape(p)} vs mask {_shape(m)}"
        for path, p, m in zip(paths, p_leaves, m_leaves)
        if _shape(p) != _shape(m)
    ]
    if bad:
        raise ValueError("Mask shapes do not match the params: " + "; ".join(bad))


def apply_masks(params: Tree, masks: Tree) -> Tree:
    """Zero the pruned weights: ``where(mask, w, 0)`` leaf by leaf (gradients of pruned weights
    are zero too). Masks are bool; a numeric mask counts non-zero as keep."""
    check_masks(params, masks)
    return _where_tree(params, masks)


@jax.jit
def _where_tree(params: Tree, masks: Tree) -> Tree:
    return jax.tree.map(lambda w, m: jnp.where(jnp.asarray(m, bool), w, jnp.zeros_like(w)), params, masks)


def ones_masks(params: Tree) -> Tree:
    """The dense mask tree (all True), e.g. the initial state of a gradual pruning schedule."""
    return jax.tree.map(lambda w: jnp.ones(_shape(w), bool), params)


# ----------------------------------------------------------------------------------------------
# Sparsity values
# ----------------------------------------------------------------------------------------------
def validate_sparsity(sparsity: float | jax.Array) -> float | None:
    """Check a sparsity before use: a scalar in [0, 1). Returns it as a Python float when concrete,
    None when it is traced (a traced value cannot be checked; the caller validates it)."""
    if isinstance(sparsity, jax.core.Tracer):
        if sparsity.shape != ():
            raise ValueError(f"Sparsity must be a scalar, got shape {sparsity.shape}")
        return None
    return check_sparsity(sparsity)


def _num_pruned(sparsity: float | jax.Array, n: int) -> jax.Array:
    """k = round(sparsity * n) as an int32 array, computed in float32 (same for float and traced)."""
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * np.float32(n)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Importance scores (higher = more important)
# ----------------------------------------------------------------------------------------------
def magnitude_scores(params: Tree) -> Tree:
    """|w|: magnitude pruning (Han et al. 2015; the criterion of Zhu & Gupta 2017)."""
    return _abs_tree(params)


@jax.jit
def _abs_tree(tree: Tree) -> Tree:
    return jax.tree.map(jnp.abs, tree)


def random_scores(params: Tree, key: jax.Array) -> Tree:
    """Independent uniform noise for every weight: the random-pruning baseline."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, _uniform_leaves(key, tuple(_shape(w) for w in leaves)))


@functools.partial(jax.jit, static_argnums=1)
def _uniform_leaves(key: jax.Array, shapes: tuple[tuple[int, ...], ...]) -> list[jax.Array]:
    """One draw for the whole tree, cut into leaves (one PRNG call compiles much faster than many)."""
    sizes = [int(np.prod(s)) for s in shapes]
    flat = jax.random.uniform(key, (sum(sizes),))
    return [x.reshape(s) for x, s in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), shapes)]


def saliency_scores(params: Tree, grads: Tree) -> Tree:
    """|w * dL/dw|: first-order Taylor estimate of the loss change when w is removed (SNIP,
    Lee et al. 2019; Molchanov et al. 2017)."""
    _check_structure(params, grads, "gradient")
    return _abs_tree(jax.tree.map(jnp.multiply, params, grads))


# ----------------------------------------------------------------------------------------------
# Layer-wise budgets
# ----------------------------------------------------------------------------------------------
def _erk_scale(n: Any, raw: Any, dense: Any, target: Any, xp: Any) -> Any:
    """epsilon with sum_{sparse l} eps * raw_l * n_l = target - sum_{dense l} n_l (0 if none sparse)."""
    budget = target - xp.sum(xp.where(dense, n, 0.0))
    denom = xp.sum(xp.where(dense, 0.0, raw * n))
    return xp.where(denom > 0, budget / xp.where(denom > 0, denom, 1.0), 0.0)


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float | jax.Array) -> Any:
    """Per-layer densities of the Erdos-Renyi-Kernel distribution (Evci et al. 2020).

    raw_l = sum(shape_l) / prod(shape_l); density_l = min(1, eps * raw_l) with eps chosen so that
    sum_l density_l * n_l = (1 - sparsity) * N. Layers that would exceed density 1 are made dense
    and eps is recomputed over the others. NumPy float64 for a concrete sparsity, float32 jnp for a
    traced one (same algorithm, one round per layer).
    """
    concrete = validate_sparsity(sparsity)
    xp: Any = np if concrete is not None else jnp
    n = xp.asarray([float(np.prod(s)) for s in shapes])
    raw = xp.asarray([float(np.sum(s)) / float(np.prod(s)) for s in shapes])
    target = (1.0 - (concrete if concrete is not None else sparsity)) * xp.sum(n)
    dense = xp.zeros(len(shapes), bool)
    for _ in range(len(shapes)):
        dense = dense | (_erk_scale(n, raw, dense, target, xp) * raw > 1.0)
    eps = _erk_scale(n, raw, dense, target, xp)
    return xp.where(dense, 1.0, xp.clip(eps * raw, 0.0, 1.0))


def _sortable_key(scores: jax.Array) -> jax.Array:
    """uint32 keys ordered like the float32 scores (IEEE-754 bits; -0.0 counts as 0.0)."""
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32) + 0.0, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _keep_by_rank(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """Flat bool mask keeping all but the k lowest scores (stable: ties prune the lower index).

    The same mask as ranking by a stable argsort, computed without sorting: a bisection over the
    32-bit keys finds the k-th smallest score t (32 passes of compare-and-count), then every score
    below t is pruned, and of the scores equal to t the lowest-indexed `k - #below` are. On XLA:CPU
    a sort of a 64x64 kernel costs about 10x more than this, and gradual pruning ranks every few
    optimizer steps. (NaN scores are not ordered as argsort orders them.)
    """
    key = _sortable_key(scores)
    k = jnp.asarray(k, jnp.int32)

    def bisect(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # the k-th smallest key lies in [lo, hi]
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(key <= mid) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    kth, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    below, tied = key < kth, key == kth
    tied_pruned = tied & (jnp.cumsum(tied) <= k - jnp.sum(below))
    return jnp.where(k > 0, ~below & ~tied_pruned, True)


def _erk_keep_counts(shapes: Sequence[tuple[int, ...]], sparsity: float | jax.Array) -> Any:
    """Weights kept per layer: round(density_l * n_l) (NumPy ints if concrete, int32 jnp if traced)."""
    density = erk_densities(shapes, sparsity)
    n = np.array([np.prod(s) for s in shapes], np.float64)
    if isinstance(density, np.ndarray):
        return np.round(density * n).astype(np.int32)
    return jnp.round(density * n.astype(np.float32)).astype(jnp.int32)


def _uniform_keep(flat: list[jax.Array], sparsity: jax.Array) -> list[jax.Array]:
    return [_keep_by_rank(s, _num_pruned(sparsity, s.shape[0])) for s in flat]


def _global_keep(flat: list[jax.Array], sparsity: jax.Array) -> list[jax.Array]:
    sizes = [s.shape[0] for s in flat]
    keep = _keep_by_rank(jnp.concatenate([s.astype(jnp.float32) for s in flat]), _num_pruned(sparsity, sum(sizes)))
    return jnp.split(keep, np.cumsum(sizes)[:-1])


def _erk_keep(
    flat: list[jax.Array], shapes: list[tuple[int, ...]], sparsity: jax.Array, kept: jax.Array | None
) -> list[jax.Array]:
    if kept is None:  # traced sparsity: densities in float32 jnp
        kept = _erk_keep_counts(shapes, sparsity)
    return [_keep_by_rank(s, s.shape[0] - kept[i]) for i, s in enumerate(flat)]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _masks_core(
    leaves: list[jax.Array],
    flags: tuple[bool, ...],
    distribution: str,
    sparsity: jax.Array,
    erk_kept: jax.Array | None,
) -> list[jax.Array]:
    """One jitted program per (tree, selection, distribution): eager calls compile once instead of
    once per primitive, and a sweep over sparsity reuses it (sparsity is an argument, not static).
    `erk_kept` carries the per-layer counts computed on the host for a concrete sparsity."""
    chosen = [jnp.ravel(x) for x, f in zip(leaves, flags) if f]
    if distribution == "uniform":
        keep = _uniform_keep(chosen, sparsity)
    elif distribution == "global":
        keep = _global_keep(chosen, sparsity)
    else:
        keep = _erk_keep(chosen, [x.shape for x, f in zip(leaves, flags) if f], sparsity, erk_kept)
    it = iter(keep)
    return [next(it).reshape(x.shape) if f else jnp.ones(x.shape, bool) for x, f in zip(leaves, flags)]


# ----------------------------------------------------------------------------------------------
# Masks from scores
# ----------------------------------------------------------------------------------------------
def masks_from_scores(
    scores: Tree,
    sparsity: float | jax.Array,
    distribution: str = "uniform",
    selected: Tree | None = None,
    params: Tree | None = None,
) -> Tree:
    """Bool mask tree pruning the lowest-scoring selected weights.

    scores: tree parallel to params (e.g. `magnitude_scores(params)`); higher = keep.
    sparsity: fraction of selected weights to zero, Python float or (traced) scalar in [0, 1).
    distribution: "uniform" | "global" | "erk" (see the module docstring for the exact counts).
    selected: tree of bools (`select`); default every kernel.
    params: optional; if given, the scores' structure and shapes are checked against it.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"Unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    if params is not None:
        check_masks(params, scores)
    concrete = validate_sparsity(sparsity)
    flags = tuple(_selection(scores, selected))
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    erk_kept = None
    if distribution == "erk" and concrete is not None:  # host float64 densities from static shapes
        erk_kept = jnp.asarray(_erk_keep_counts([_shape(x) for x, f in zip(leaves, flags) if f], concrete))
    out = _masks_core(leaves, flags, distribution, jnp.asarray(sparsity, jnp.float32), erk_kept)
    return jax.tree_util.tree_unflatten(treedef, out)


def magnitude_masks(
    params: Tree,
    sparsity: float | jax.Array,
    distribution: str = "uniform",
    include: Patterns = DEFAULT_INCLUDE,
    exclude: Patterns = (),
) -> Tree:
    """Magnitude pruning: zero the selected weights with the smallest |w| (Zhu & Gupta 2017)."""
    return masks_from_scores(magnitude_scores(params), sparsity, distribution, select(params, include, exclude))


def random_masks(
    params: Tree,
    sparsity: float | jax.Array,
    key: jax.Array,
    distribution: str = "uniform",
    include: Patterns = DEFAULT_INCLUDE,
    exclude: Patterns = (),
) -> Tree:
    """Random pruning with the same exact per-layer counts as magnitude pruning (a baseline)."""
    return masks_from_scores(random_scores(params, key), sparsity, distribution, select(params, include, exclude))


def saliency_masks(
    params: Tree,
    grads: Tree,
    sparsity: float | jax.Array,
    distribution: str = "uniform",
    include: Patterns = DEFAULT_INCLUDE,
    exclude: Patterns = (),
) -> Tree:
    """Saliency pruning: zero the selected weights with the smallest |w * g| (`saliency_scores`)."""
    scores = saliency_scores(params, grads)
    return masks_from_scores(scores, sparsity, distribution, select(params, include, exclude))


# ----------------------------------------------------------------------------------------------
# N:M semi-structured sparsity
# ----------------------------------------------------------------------------------------------
def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise ValueError(f"N:M needs integer n and m, got n={n!r}, m={m!r}")
    if m < 2 or not 1 <= n <= m - 1:
        raise ValueError(f"N:M sparsity needs m >= 2 and 1 <= n <= m - 1, got n={n}, m={m}")


def _nm_axis(shape: tuple[int, ...], m: int, axis: int, path: str) -> int:
    """The grouping axis of one selected leaf, checked: it exists and m divides its length."""
    if len(shape) < 2:
        raise ValueError(f"N:M needs a kernel with an input axis; {path} has shape {shape}")
    ax = axis % len(shape)
    if shape[ax] % m:
        raise ValueError(
            f"N:M with m={m}: axis {ax} of {path} (shape {shape}) has length {shape[ax]}, not divisible by {m}"
        )
    return ax


def _nm_keep(score: jax.Array, n: int, m: int, ax: int) -> jax.Array:
    """Keep the n highest scores in each group of m consecutive entries along `ax`."""
    x = jnp.moveaxis(score, ax, -1)
    groups = x.reshape(x.shape[:-1] + (x.shape[-1] // m, m))
    rank = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1, stable=True)
    return jnp.moveaxis((rank >= m - n).reshape(x.shape), -1, ax)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_core(leaves: list[jax.Array], axes: tuple[int | None, ...], n: int, m: int) -> list[jax.Array]:
    """One jitted program for the whole tree (axis None: unselected leaf, all True)."""
    return [jnp.ones(x.shape, bool) if ax is None else _nm_keep(x, n, m, ax) for x, ax in zip(leaves, axes)]


def nm_masks_from_scores(scores: Tree, n: int = 2, m: int = 4, axis: int = -2, selected: Tree | None = None) -> Tree:
    """N:M masks (Mishra et al. 2021): in every group of m consecutive entries along `axis` keep the
    n highest scores (ties: the lower index is pruned first). The default axis -2 is the input axis
    of Flax kernels: axis 0 of a Dense kernel (in, out), the input-channel axis of a Conv kernel
    (kh, kw, in, out). Sparsity is exactly 1 - n/m on every selected leaf."""
    _check_nm(n, m)
    flags = _selection(scores, selected)
    paths, leaves, treedef = _flatten(scores)
    axes = tuple(_nm_axis(_shape(x), int(m), axis, p) if f else None for p, x, f in zip(paths, leaves, flags))
    return jax.tree_util.tree_unflatten(treedef, _nm_core(leaves, axes, int(n), int(m)))


def nm_masks(
    params: Tree,
    n: int = 2,
    m: int = 4,
    axis: int = -2,
    include: Patterns = DEFAULT_INCLUDE,
    exclude: Patterns = (),
) -> Tree:
    """N:M magnitude masks: keep the n largest |w| of every m consecutive input weights (2:4 by
    default). Raises ValueError if a selected kernel's input axis is not divisible by m."""
    return nm_masks_from_scores(magnitude_scores(params), n, m, axis, select(params, include, exclude))


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
class SparsityReport(NamedTuple):
    """Fraction of zeros overall (`total` = zeros / size over the counted leaves) and per leaf path."""

    total: float
    per_layer: dict[str, float]
    zeros: int
    size: int


def _count_zeros(x: Any) -> int:
    a = np.asarray(x)
    return int(np.sum(~a)) if a.dtype == bool else int(np.sum(a == 0))


def sparsity(params_or_masks: Tree, selected: Tree | None = None) -> SparsityReport:
    """Zeros of a params tree (w == 0) or a mask tree (False) over the selected leaves (default:
    all leaves). A host-side report (NumPy): call it outside `jit`."""
    paths, leaves, _ = _flatten(params_or_masks)
    flags = [True] * len(leaves) if selected is None else _selection(params_or_masks, selected)
    per_layer: dict[str, float] = {}
    zeros = size = 0
    for path, x, f in zip(paths, leaves, flags):
        if not f:
            continue
        z, s = _count_zeros(x), int(np.prod(_shape(x)))
        per_layer[path] = z / s if s else 0.0
        zeros, size = zeros + z, size + s
    return SparsityReport(zeros / size if size else 0.0, per_layer, zeros, size)
