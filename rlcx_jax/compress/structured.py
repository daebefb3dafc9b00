"""Structured pruning: remove whole hidden units (Dense neurons, Conv filters) and physically shrink
the network.

A unit's importance is the norm of its incoming weights: the column of a Dense kernel (in, out) or
the whole filter of a Conv kernel (kh, kw, in, out) (L1 filter pruning, Li et al. 2017; "l2" is the
alternative). In every hidden layer of every torso the `round((1 - s) * width)` units (at least 1)
with the largest norm are kept; ties drop the lower index first (stable sort). Heads are never
pruned: the action and value outputs keep their size.

Two views of the same pruning:
* `structured_masks`: a bool mask tree (`masks.apply_masks`) zeroing a pruned unit's kernel column
  and bias entry, and the rows of the next layer that read it (for a Conv filter c feeding the
  flattened Dense input, every row (h * W' + w) * C + c).
* `shrink`: the physically smaller parameter tree plus the `NetConfig` with the new widths; its
  network computes the same function as the masked original (every activation maps 0 to 0).

After unstructured pruning many units are dead without being removed: `fold_dead_units` finds them
from the zeros themselves and clears what they store (Han et al. 2015: "neurons with zero input
connections or zero output connections may be safely pruned").

Unit counts change shapes, so sparsity must be a concrete Python number here (not traced); the
params themselves may be traced. Separate actor and critic torsos rank their units independently but
keep the same count per layer, so one NetConfig describes the shrunk network. Which torsos exist and
which output layers read them comes from the network's own layout (`nets.layout(net_config, head)`);
the layers inside a torso are those of the built-in "mlp" and "cnn" torsos (other registered torsos
can be pruned with masks, not shrunk). Params may be the bare `params` dict or the `{"params": ...}`
variables dict returned by `Module.init`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlcx_jax import nets
from rlcx_jax.compress.masks import validate_sparsity
from rlcx_jax.nets import NetConfig

__all__ = ["NORMS", "unit_scores", "kept_units", "structured_masks", "shrink", "fold_dead_units", "count_params"]

Tree = Any
Path = tuple[str, ...]
NORMS = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A prunable hidden layer: where it lives, its width, and the layers reading its output units."""

    path: Path
    width: int
    consumers: tuple[Path, ...]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}")


def _unit_norm(kernel: jax.Array, norm: str) -> jax.Array:
    """Norm of each output unit's incoming weights (reduce every axis but the last)."""
    axes = tuple(range(kernel.ndim - 1))
    if norm == "l1":
        return jnp.sum(jnp.abs(kernel), axis=axes)
    return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes))


def _thaw(tree: Tree) -> Tree:
    """Nested plain (mutable) dicts; leaves are shared, not copied."""
    if isinstance(tree, Mapping):
        return {k: _thaw(v) for k, v in tree.items()}
    return tree


def _unwrap(params: Tree) -> tuple[dict[str, Any], Callable[[Tree], Tree]]:
    """Accept `{"params": {...}}` (Module.init) as well as the bare params dict."""
    if not isinstance(params, Mapping):
        raise ValueError(f"Expected a dict of parameters, got {type(params).__name__}")
    if set(params) == {"params"}:
        return _thaw(params["params"]), lambda t: {"params": t}
    return _thaw(params), lambda t: t


def _node(tree: Mapping[str, Any], path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _static_sparsity(sparsity: float | jax.Array) -> float:
    value = validate_sparsity(sparsity)
    if value is None:
        raise ValueError(
            "Structured pruning changes layer widths, so sparsity must be a concrete Python number, not a traced value"
        )
    return value


def _keep_count(width: int, sparsity: float) -> int:
    """round((1 - s) * width) units, at least one."""
    return max(1, int(round((1.0 - sparsity) * width)))


def kept_units(scores: jax.Array, keep: int) -> jax.Array:
    """Sorted indices of the `keep` highest scores (stable ranking: ties drop the lower index)."""
    order = jnp.argsort(scores, stable=True)
    return jnp.sort(order[scores.shape[0] - keep :])


# ----------------------------------------------------------------------------------------------
# Layout: which layers are prunable and who reads them (shape checks only, before any compile)
# ----------------------------------------------------------------------------------------------
SHRINKABLE_TORSOS = ("mlp", "cnn")


def _torsos_and_heads(params: Mapping[str, Any], cfg: NetConfig, head: str) -> list[tuple[str, tuple[Path, ...]]]:
    """(torso name, output layers reading its features), from the network's declared layout."""
    feeds = nets.layout(cfg, head).feeds
    missing = [t for t, consumers in feeds for name in (t, *consumers) if name not in params]
    if missing:
        raise ValueError(
            f"The params (top-level keys {sorted(params)}) do not match a {head!r} network with "
            f"net_config={cfg} (missing {sorted(set(missing))})"
        )
    extra_torsos = {"actor_torso", "critic_torso", "torso"} & set(params) - {t for t, _ in feeds}
    if extra_torsos:
        raise ValueError(
            f"net_config.separate_critic={cfg.separate_critic} does not match the params "
            f"(top-level keys {sorted(params)})"
        )
    return [(torso, tuple((c,) for c in consumers)) for torso, consumers in feeds]


def _kernel_shape(params: Mapping[str, Any], path: Path) -> tuple[int, ...]:
    try:
        layer = _node(params, path)
        return tuple(layer["kernel"].shape)
    except (KeyError, TypeError) as err:
        raise ValueError(f"Expected a layer with a kernel at {'/'.join(path)}") from err


def _check_layer(params: Mapping[str, Any], path: Path, width: int, cfg: NetConfig) -> None:
    shape = _kernel_shape(params, path)
    bias = _node(params, path).get("bias")
    is_conv = path[-1].startswith("Conv")
    want_ndim = 4 if is_conv else 2
    if len(shape) != want_ndim or shape[-1] != width or bias is None or tuple(bias.shape) != (width,):
        raise ValueError(
            f"{'/'.join(path)}: kernel {shape} / bias {None if bias is None else tuple(bias.shape)} does not "
            f"match net_config (expected width {width}, {want_ndim}-d kernel)"
        )
    if is_conv and shape[:2] != (cfg.conv_kernel, cfg.conv_kernel):
        raise ValueError(f"{'/'.join(path)}: kernel {shape} does not match conv_kernel={cfg.conv_kernel}")


def _check_consumer(params: Mapping[str, Any], layer: _Layer, consumer: Path) -> None:
    rows = _kernel_shape(params, consumer)[-2]
    conv = layer.path[-1].startswith("Conv")
    if (conv and rows % layer.width) or (not conv and rows != layer.width):
        raise ValueError(
            f"{'/'.join(consumer)} has {rows} input rows, inconsistent with {layer.width} units of "
            f"{'/'.join(layer.path)} (net_config does not match the params)"
        )


def _torso_layers(params: Mapping[str, Any], torso: str, heads: tuple[Path, ...], cfg: NetConfig) -> list[_Layer]:
    names = (["Conv_0"] if cfg.torso == "cnn" else []) + [f"Dense_{i}" for i in range(len(cfg.hidden))]
    widths = ([cfg.conv_features] if cfg.torso == "cnn" else []) + list(cfg.hidden)
    found = sorted(params[torso]) if isinstance(params[torso], Mapping) else []
    if found != sorted(names):
        raise ValueError(
            f"{torso} has layers {found}, but net_config (torso={cfg.torso!r}, hidden={cfg.hidden}) expects {names}"
        )
    layers = []
    for i, (name, width) in enumerate(zip(names, widths)):
        path = (torso, name)
        consumers = ((torso, names[i + 1]),) if i + 1 < len(names) else heads
        _check_layer(params, path, width, cfg)
        layer = _Layer(path, width, consumers)
        for consumer in consumers:
            _check_consumer(params, layer, consumer)
        layers.append(layer)
    return layers


def _layout(params: Mapping[str, Any], cfg: NetConfig, head: str) -> list[_Layer]:
    """Every prunable layer of `params` as described by `cfg`; ValueError on any mismatch."""
    if not isinstance(cfg, NetConfig):
        raise ValueError(f"net_config must be a nets.NetConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.torso not in SHRINKABLE_TORSOS:
        raise ValueError(
            f"Structured pruning knows the layers of the {SHRINKABLE_TORSOS} torsos, not {cfg.torso!r}; "
            "prune it with unstructured masks (compress.masks) instead"
        )
    layers: list[_Layer] = []
    for torso, heads in _torsos_and_heads(params, cfg, head):
        layers += _torso_layers(params, torso, heads, cfg)
    return layers


# ----------------------------------------------------------------------------------------------
# Scores and the ranking shared by masks and shrink
# ----------------------------------------------------------------------------------------------
def _walk_layers(tree: Any, path: Path = ()) -> list[tuple[Path, Mapping[str, Any]]]:
    """(path, layer dict) for every dict holding a 'kernel', depth first in key order."""
    if not isinstance(tree, Mapping):
        return []
    found = [(path, tree)] if "kernel" in tree else []
    for key in sorted(tree):
        found += _walk_layers(tree[key], path + (str(key),))
    return found


def unit_scores(params: Tree, norm: str = "l1") -> dict[str, jax.Array]:
    """Per-unit importance of every layer inside a torso (a path component ending in 'torso'):
    the L1 (Li et al. 2017) or L2 norm of each output unit's incoming weights, i.e. column norms of
    a Dense kernel (in, out) and per-filter norms of a Conv kernel (kh, kw, in, out).
    Keys are layer paths such as "actor_torso/Dense_0"; values have shape (width,)."""
    _check_norm(norm)
    return {
        "/".join(path): _unit_norm(layer["kernel"], norm)
        for path, layer in _walk_layers(params)
        if any(p.endswith("torso") for p in path)
    }


def _kept(params: Mapping[str, Any], layers: tuple[_Layer, ...], sparsity: float, norm: str) -> dict[Path, jax.Array]:
    """Indices of the kept units of every prunable layer."""
    out = {}
    for layer in layers:
        scores = _unit_norm(_node(params, layer.path)["kernel"], norm)
        out[layer.path] = kept_units(scores, _keep_count(layer.width, sparsity))
    return out


def _prepare(
    params: Tree, net_config: NetConfig, sparsity: float | jax.Array, norm: str, head: str
) -> tuple[dict[str, Any], Callable[[Tree], Tree], tuple[_Layer, ...], float]:
    """Validate everything from shapes only, before anything is computed or compiled."""
    _check_norm(norm)
    s = _static_sparsity(sparsity)
    inner, wrap = _unwrap(params)
    return inner, wrap, tuple(_layout(inner, net_config, head)), s


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def _and_mask(masks: dict[str, Any], path: Path, leaf: str, keep: jax.Array) -> None:
    node = _node(masks, path)
    node[leaf] = node[leaf] & keep


def _rows_keep(unit_keep: jax.Array, rows: int) -> jax.Array:
    """Rows of a consumer kernel that read kept units: row p * C + c reads unit c."""
    return jnp.tile(unit_keep, rows // unit_keep.shape[0])


def structured_masks(
    params: Tree, net_config: NetConfig, sparsity: float | jax.Array, norm: str = "l1", head: str = "actor_critic"
) -> Tree:
    """Bool mask tree zeroing the pruned hidden units of every torso: their kernel columns (whole
    filters for Conv), bias entries, and the rows of the next layer or heads that read them.

    sparsity: concrete fraction of units to remove per hidden layer (each keeps
    `round((1 - s) * width)`, at least 1). Heads keep all outputs.
    """
    inner, wrap, layers, s = _prepare(params, net_config, sparsity, norm, head)
    return wrap(_masks_impl(inner, layers, s, norm))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _masks_impl(inner: dict[str, Any], layers: tuple[_Layer, ...], sparsity: float, norm: str) -> dict[str, Any]:
    """One jitted program per (tree, config, sparsity): cheap eager calls, inlined under jit."""
    kept = _kept(inner, layers, sparsity, norm)
    masks = _thaw(jax.tree.map(lambda x: jnp.ones(x.shape, bool), inner))
    for layer in layers:
        unit_keep = jnp.zeros(layer.width, bool).at[kept[layer.path]].set(True)
        _and_mask(masks, layer.path, "kernel", unit_keep)
        _and_mask(masks, layer.path, "bias", unit_keep)
        for consumer in layer.consumers:
            rows = _kernel_shape(inner, consumer)[-2]
            _and_mask(masks, consumer, "kernel", _rows_keep(unit_keep, rows)[:, None])
    return masks


# ----------------------------------------------------------------------------------------------
# Physical shrinking
# ----------------------------------------------------------------------------------------------
def _grouped(kernel: jax.Array, width: int) -> jax.Array:
    """A consumer kernel's rows grouped by the unit they read: (positions, width, out)."""
    rows, out = kernel.shape
    return kernel.reshape(rows // width, width, out)


def _gather_rows(kernel: jax.Array, idx: jax.Array, width: int) -> jax.Array:
    """Keep the rows reading units `idx`: view rows as (P, width), take along width, flatten back."""
    return jnp.take(_grouped(kernel, width), idx, axis=1).reshape(-1, kernel.shape[-1])


def _shrunk_config(cfg: NetConfig, sparsity: float) -> NetConfig:
    hidden = tuple(_keep_count(w, sparsity) for w in cfg.hidden)
    if cfg.torso == "cnn":
        return dataclasses.replace(cfg, hidden=hidden, conv_features=_keep_count(cfg.conv_features, sparsity))
    return dataclasses.replace(cfg, hidden=hidden)


def shrink(
    params: Tree, net_config: NetConfig, sparsity: float | jax.Array, norm: str = "l1", head: str = "actor_critic"
) -> tuple[Tree, NetConfig]:
    """Physically remove the units `structured_masks` would zero.

    Returns (small_params, small_net_config): `nets.make(small_net_config, ...)` applied to
    small_params gives the same outputs as the original network applied to
    `apply_masks(params, structured_masks(params, net_config, sparsity, norm))`, with fewer
    parameters and FLOPs. Supports mlp and cnn torsos, q and actor-critic heads (separate or
    shared torso); other leaves (heads' biases, log_std) are kept as they are.
    """
    inner, wrap, layers, s = _prepare(params, net_config, sparsity, norm, head)
    return wrap(_shrink_impl(inner, layers, s, norm)), _shrunk_config(net_config, s)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _shrink_impl(inner: dict[str, Any], layers: tuple[_Layer, ...], sparsity: float, norm: str) -> dict[str, Any]:
    kept = _kept(inner, layers, sparsity, norm)
    small = _thaw(inner)
    for layer in layers:
        idx = kept[layer.path]
        node = _node(small, layer.path)
        node["kernel"] = jnp.take(node["kernel"], idx, axis=-1)
        node["bias"] = jnp.take(node["bias"], idx, axis=0)
        for consumer in layer.consumers:
            cnode = _node(small, consumer)
            cnode["kernel"] = _gather_rows(cnode["kernel"], idx, layer.width)
    return small


# ----------------------------------------------------------------------------------------------
# Dead units left by unstructured pruning
# ----------------------------------------------------------------------------------------------
def fold_dead_units(params: Tree, net_config: NetConfig, head: str = "actor_critic") -> Tree:
    """Clear the hidden units that unstructured pruning left dead, keeping every shape.

    For each hidden layer, in order (Han et al. 2015, "Learning both Weights and Connections"):

    * a unit with no incoming weight (its kernel column, or Conv filter, all zero) outputs the
      constant c_j = act(b_j). Its contribution to every consumer is folded into the consumer's
      bias, b'_k = b_k + c_j * sum_{rows r reading j} W[r, k], and those rows and b_j become zero;
    * a unit that no consumer reads (all its consumer rows zero) gets its incoming weights and bias
      zeroed: nothing reads them.

    The folded network computes the same function in exact arithmetic; in float32 the consumers'
    sums are rounded in another order (a few ulp). A consumer unit whose every input was folded
    becomes constant itself and is folded in turn, because layers are visited input to output.
    Only zeros are created, so masks of the original stay valid; what it saves shows in a sparse
    artifact (`export`: fewer stored weights and biases). mlp and cnn torsos, like `shrink`.
    """
    inner, wrap = _unwrap(params)
    layers = tuple(_layout(inner, net_config, head))
    return wrap(_fold_impl(inner, layers, net_config.activation))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fold_impl(inner: dict[str, Any], layers: tuple[_Layer, ...], activation: str) -> dict[str, Any]:
    act = nets.ACTIVATIONS[activation]
    out = _thaw(inner)
    for layer in layers:  # input to output: constant units fold into their consumers' biases
        node = _node(out, layer.path)
        constant = jnp.all(node["kernel"] == 0, axis=tuple(range(node["kernel"].ndim - 1)))
        value = jnp.where(constant, act(node["bias"]), 0.0)
        for consumer in layer.consumers:
            cnode = _node(out, consumer)
            grouped = _grouped(cnode["kernel"], layer.width)
            cnode["bias"] = cnode["bias"] + jnp.einsum("pjk,j->k", grouped, value).astype(cnode["bias"].dtype)
            cnode["kernel"] = jnp.where(constant[None, :, None], 0.0, grouped).reshape(cnode["kernel"].shape)
    for layer in reversed(layers):  # output to input: units nobody reads lose their weights
        node = _node(out, layer.path)
        read = jnp.zeros(layer.width, bool)
        for consumer in layer.consumers:
            read = read | jnp.any(_grouped(_node(out, consumer)["kernel"], layer.width) != 0, axis=(0, 2))
        node["kernel"] = jnp.where(read, node["kernel"], 0.0).astype(node["kernel"].dtype)
        node["bias"] = jnp.where(read, node["bias"], 0.0).astype(node["bias"].dtype)
    return out


def count_params(params: Tree) -> int:
    """Number of scalars in a parameter tree (a convenience for reports and tests)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
