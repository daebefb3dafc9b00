"""Unstructured pruning masks (rlcx_jax.compress.masks) against slow NumPy references."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import nets
from rlcx_jax.compress import masks as M

SPARSITIES = (0.0, 0.3, 0.5, 0.9)


# ----------------------------------------------------------------------------------------------
# Fixtures and NumPy references
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    """The CartPole actor-critic (64, 64) tree with random normal leaves (no ties, non-zero biases).
    Shapes come from `eval_shape`, so no initialiser is compiled."""
    net = nets.make(nets.NetConfig(hidden=(64, 64)), (4,), nets.ActionSpec(discrete=True, num_actions=2))
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), shapes)


def _flat_selected(tree: Any, selected: Any) -> list[tuple[str, np.ndarray]]:
    paths = M.param_paths(tree)
    leaves = jax.tree.leaves(tree)
    flags = jax.tree.leaves(selected)
    return [(p, np.asarray(x)) for p, x, f in zip(paths, leaves, flags) if f]


def _k(s: float, n: int) -> int:
    """The documented count: round(s * n) in float32, half to even."""
    return int(np.round(np.float32(s) * np.float32(n)))


def _np_prune(scores: np.ndarray, k: int) -> np.ndarray:
    """Reference: drop the k smallest scores (stable, lower index first on ties)."""
    keep = np.ones(scores.size, bool)
    keep[np.argsort(scores.ravel(), kind="stable")[:k]] = False
    return keep.reshape(scores.shape)


def _np_erk(shapes: list[tuple[int, ...]], s: float) -> np.ndarray:
    """Reference ERK (Evci et al. 2020, as in RigL's code): make the layer with the largest raw
    density dense, one at a time, while eps * raw exceeds 1."""
    n = np.array([np.prod(x) for x in shapes], np.float64)
    raw = np.array([np.sum(x) / np.prod(x) for x in shapes], np.float64)
    dense = np.zeros(len(shapes), bool)
    while True:
        eps = ((1 - s) * n.sum() - n[dense].sum()) / (raw[~dense] * n[~dense]).sum()
        candidates = np.where(~dense, raw, -np.inf)
        if eps * candidates.max() <= 1:
            return np.where(dense, 1.0, eps * raw)
        dense[np.argmax(candidates)] = True


def _assert_masks_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x, y in zip(M.param_paths(a), jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


# ----------------------------------------------------------------------------------------------
# Paths, selection, mask trees
# ----------------------------------------------------------------------------------------------
def test_paths_and_select(params: Any) -> None:
    paths = M.param_paths(params)
    assert "actor_torso/Dense_0/kernel" in paths and "value_head/bias" in paths and len(paths) == 12
    sel = M.select(params)
    chosen = {p for p, f in zip(paths, jax.tree.leaves(sel)) if f}
    assert chosen == {p for p in paths if p.endswith("kernel")}
    torso_only = M.select(params, exclude=(r".*head.*",))
    assert sum(jax.tree.leaves(torso_only)) == 4
    assert sum(jax.tree.leaves(M.select(params, include=r".*bias"))) == 6  # a single string works


def test_select_nothing_raises_with_paths(params: Any) -> None:
    with pytest.raises(ValueError, match="'.\\*weight' matches no parameter.*actor_torso/Dense_0/kernel"):
        M.select(params, include=(r".*weight",))
    with pytest.raises(ValueError, match="select no parameter"):
        M.select(params, exclude=(r".*",))
    with pytest.raises(ValueError, match="Invalid include regex"):
        M.select(params, include=("(",))


def test_apply_and_check_masks(params: Any) -> None:
    masks = M.magnitude_masks(params, 0.5)
    pruned = M.apply_masks(params, masks)
    for w, m, q in zip(jax.tree.leaves(params), jax.tree.leaves(masks), jax.tree.leaves(pruned)):
        assert m.dtype == jnp.bool_ and m.shape == w.shape
        np.testing.assert_array_equal(q, np.where(m, w, 0.0))
    # Shapes only: works on ShapeDtypeStruct trees before anything compiles.
    M.check_masks(jax.eval_shape(lambda: params), jax.eval_shape(lambda: masks))

    missing = {k: v for k, v in masks.items() if k != "value_head"}
    with pytest.raises(ValueError, match=r"missing paths \['value_head/bias', 'value_head/kernel'\]"):
        M.apply_masks(params, missing)
    bad = jax.tree.map(lambda m: m, masks)
    bad["actor_torso"]["Dense_1"]["kernel"] = jnp.ones((64, 32), bool)
    with pytest.raises(ValueError, match=r"actor_torso/Dense_1/kernel: param \(64, 64\) vs mask \(64, 32\)"):
        M.check_masks(params, bad)


def test_sparsity_report_hand_computed() -> None:
    tree = {"a": {"kernel": jnp.array([[0.0, 1.0], [2.0, 0.0]])}, "b": {"bias": jnp.array([0.0, 0.0, 3.0])}}
    report = M.sparsity(tree)
    assert report.per_layer == {"a/kernel": 0.5, "b/bias": 2 / 3}
    assert (report.zeros, report.size) == (4, 7) and report.total == pytest.approx(4 / 7)
    only_a = M.sparsity(tree, selected={"a": {"kernel": True}, "b": {"bias": False}})
    assert only_a.total == 0.5 and list(only_a.per_layer) == ["a/kernel"]
    masks = {"a": {"kernel": jnp.array([[True, False], [False, False]])}, "b": {"bias": jnp.ones(3, bool)}}
    assert M.sparsity(masks).per_layer == {"a/kernel": 0.75, "b/bias": 0.0}


# ----------------------------------------------------------------------------------------------
# Distributions: exact counts, and the weights removed are the smallest
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", SPARSITIES)
def test_uniform_magnitude_matches_reference(params: Any, s: float) -> None:
    sel = M.select(params)
    masks = M.magnitude_masks(params, s)
    for (path, w), (_, m) in zip(_flat_selected(params, sel), _flat_selected(masks, sel)):
        assert int(np.sum(~m)) == _k(s, w.size), path
        np.testing.assert_array_equal(m, _np_prune(np.abs(w), _k(s, w.size)), err_msg=path)
        if 0 < s:  # every removed |w| is at most every kept one
            assert np.abs(w[~m]).max() <= np.abs(w[m]).min()
    for x, f in zip(jax.tree.leaves(masks), jax.tree.leaves(sel)):
        assert f or bool(np.all(x))  # biases untouched


@pytest.mark.parametrize("s", SPARSITIES)
def test_global_magnitude_single_threshold(params: Any, s: float) -> None:
    sel = M.select(params)
    masks = M.magnitude_masks(params, s, "global")
    w = np.concatenate([np.abs(x).ravel() for _, x in _flat_selected(params, sel)])
    m = np.concatenate([x.ravel() for _, x in _flat_selected(masks, sel)])
    assert int(np.sum(~m)) == _k(s, w.size)
    np.testing.assert_array_equal(m, _np_prune(w, _k(s, w.size)))


@pytest.mark.parametrize("s", (0.0, 0.5, 0.8, 0.9, 0.98))
def test_erk_densities_match_reference(params: Any, s: float) -> None:
    sel = M.select(params)
    chosen = _flat_selected(params, sel)
    shapes = [x.shape for _, x in chosen]
    want = _np_erk(shapes, s)
    np.testing.assert_allclose(M.erk_densities(shapes, s), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda t: M.erk_densities(shapes, t))(s), want, rtol=1e-5)
    if s == 0.9:
        assert want.max() == 1.0 and want.min() < 0.1  # the value head (64, 1) is made dense

    masks = M.magnitude_masks(params, s, "erk")
    kept = [int(np.sum(m)) for _, m in _flat_selected(masks, sel)]
    sizes = [x.size for _, x in chosen]
    assert kept == [int(np.round(d * n)) for d, n in zip(want, sizes)]
    assert abs(sum(kept) - (1 - s) * sum(sizes)) <= 0.5 * len(sizes)
    for (_, w), (_, m) in zip(chosen, _flat_selected(masks, sel)):
        np.testing.assert_array_equal(m, _np_prune(np.abs(w), w.size - int(np.sum(m))))


def test_ties_are_deterministic() -> None:
    tree = {"kernel": jnp.ones((2, 3))}
    masks = M.magnitude_masks(tree, 0.5)  # k = 3 of 6 equal scores: the first three go
    np.testing.assert_array_equal(masks["kernel"], [[False, False, False], [True, True, True]])


def test_saliency_uses_weight_times_gradient(params: Any) -> None:
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape) / np.abs(w), jnp.float32), params)
    sel = M.select(params)
    masks = M.saliency_masks(params, grads, 0.7)
    for (path, w), (_, g), (_, m) in zip(
        _flat_selected(params, sel), _flat_selected(grads, sel), _flat_selected(masks, sel)
    ):
        np.testing.assert_array_equal(m, _np_prune(np.abs(w * g), _k(0.7, w.size)), err_msg=path)
    by_magnitude = M.magnitude_masks(params, 0.7)
    assert not np.array_equal(masks["actor_torso"]["Dense_1"]["kernel"], by_magnitude["actor_torso"]["Dense_1"]["kernel"])
    with pytest.raises(ValueError, match="gradient tree does not match"):
        M.saliency_scores(params, {"actor_torso": grads["actor_torso"]})


def test_random_masks_exact_counts_and_keys(params: Any) -> None:
    sel = M.select(params)
    a = M.random_masks(params, 0.6, jax.random.PRNGKey(0))
    b = M.random_masks(params, 0.6, jax.random.PRNGKey(0))
    c = M.random_masks(params, 0.6, jax.random.PRNGKey(1))
    _assert_masks_equal(a, b)
    assert not np.array_equal(a["critic_torso"]["Dense_1"]["kernel"], c["critic_torso"]["Dense_1"]["kernel"])
    for _, m in _flat_selected(a, sel):
        assert int(np.sum(~m)) == _k(0.6, m.size)


# ----------------------------------------------------------------------------------------------
# jit and vmap over sparsity give the unbatched answer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", M.DISTRIBUTIONS)
def test_same_under_jit_and_vmap(params: Any, distribution: str) -> None:
    ss = (0.0, 0.5, 0.9)
    # Three leaves keep the compilations cheap.
    sel = dict(include=(r"actor_torso/.*kernel", r"policy_head/kernel"))
    batched = jax.jit(jax.vmap(lambda s: M.magnitude_masks(params, s, distribution, **sel)))(jnp.array(ss))
    for i, s in enumerate(ss):
        lane = jax.tree.map(lambda x: x[i], batched)
        _assert_masks_equal(lane, M.magnitude_masks(params, s, distribution, **sel))


# ----------------------------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------------------------
def _np_nm(w: np.ndarray, n: int, m: int) -> np.ndarray:
    """Reference for axis -2: loop over every group of m consecutive input weights."""
    keep = np.zeros(w.shape, bool)
    x = np.moveaxis(np.abs(w), -2, 0)
    k = np.moveaxis(keep, -2, 0)  # a view: writes land in keep
    for idx in np.ndindex(x.shape[1:]):
        for g in range(0, x.shape[0], m):
            col = x[(slice(g, g + m),) + idx]
            k[(slice(g, g + m),) + idx] = _np_prune(col, m - n)
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm_pattern(params: Any, n: int, m: int) -> None:
    conv = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 8, 5))
    tree = {"net": params, "Conv_0": {"kernel": conv, "bias": jnp.zeros(5)}}
    masks = M.nm_masks(tree, n, m, exclude=(r".*Dense_0/kernel",) if m == 8 else ())
    sel = M.select(tree, exclude=(r".*Dense_0/kernel",) if m == 8 else ())
    for (path, w), (_, k) in zip(_flat_selected(tree, sel), _flat_selected(masks, sel)):
        groups = np.moveaxis(k, -2, 0).reshape((-1, m) + np.moveaxis(k, -2, 0).shape[1:])
        assert np.all(groups.sum(axis=1) == n), path  # exactly n kept in each group
        np.testing.assert_array_equal(k, _np_nm(w, n, m), err_msg=path)
    assert M.sparsity(masks, sel).total == pytest.approx(1 - n / m)


def test_nm_errors(params: Any) -> None:
    tree = {"a": {"kernel": jnp.ones((6, 8))}}
    with pytest.raises(ValueError, match=r"a/kernel \(shape \(6, 8\)\) has length 6, not divisible by 4"):
        M.nm_masks(tree, 2, 4)
    M.nm_masks(tree, 1, 2)  # 6 is divisible by 2
    for n, m in [(4, 4), (0, 4), (5, 4), (1, 1)]:
        with pytest.raises(ValueError, match="1 <= n <= m - 1"):
            M.nm_masks(params, n, m)
    with pytest.raises(ValueError, match="needs a kernel with an input axis"):
        M.nm_masks(params, include=r".*bias")


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan"), jnp.float32(1.0)])
def test_bad_sparsity(params: Any, s: Any) -> None:
    with pytest.raises(ValueError, match=r"Sparsity must be in \[0, 1\)"):
        M.magnitude_masks(params, s)


def test_other_bad_inputs(params: Any) -> None:
    with pytest.raises(ValueError, match="must be a real scalar"):
        M.magnitude_masks(params, jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="Unknown distribution 'erdos'"):
        M.magnitude_masks(params, 0.5, "erdos")
    with pytest.raises(ValueError, match="selection tree does not match"):
        M.masks_from_scores(M.magnitude_scores(params), 0.5, selected={"actor_torso": True})
    with pytest.raises(ValueError, match="mask tree does not match"):
        M.masks_from_scores({"x": jnp.ones(3)}, 0.5, params=params)
