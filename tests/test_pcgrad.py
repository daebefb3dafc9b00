"""PCGrad (Yu et al. 2020): the projections against a plain-loop float64 NumPy reference of
Algorithm 1, its geometric properties (no conflict left between two tasks, norms never grow), and the
optax transformation over stacked per-task gradient trees (shapes, reductions, jit, vmap, chaining)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rlcx_jax.multitask import PCGradState, pcgrad, project_conflicting, projection_order, weighted_task_sum

# jitted once per shape (and per key / no key): test time is compile time
project = jax.jit(project_conflicting)
order_of = jax.jit(projection_order, static_argnums=1)
order_and_project = jax.jit(lambda g, key: (projection_order(key, g.shape[0]), project_conflicting(g, key)))
RTOL = 1e-5
ATOL = 1e-6
DOT_TOL = 1e-6
"""Relative tolerance of a "non-negative" dot product: g_i^PC . g_j >= -DOT_TOL ||g_i|| ||g_j||, scaled by
the ORIGINAL norms (the rounding left after removing a component is relative to g_i, and g_i^PC itself
can be that rounding, as for antiparallel gradients)."""


def reference_pcgrad(grads: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Algorithm 1 of Yu et al. (2020) as plain Python loops in float64: task i visits the tasks in
    `order[i]` and removes its component along each original g_j it conflicts with."""
    g = np.asarray(grads, np.float64)
    out = np.empty_like(g)
    for i in range(g.shape[0]):
        v = g[i].copy()
        for j in order[i]:
            assert j != i
            dot = float(np.dot(v, g[j]))
            sq = float(np.dot(g[j], g[j]))
            if dot < 0 and sq > 0:
                v = v - dot / sq * g[j]
        out[i] = v
    return out


def fixed_order(num_tasks: int) -> np.ndarray:
    return np.array([[j for j in range(num_tasks) if j != i] for i in range(num_tasks)])


def dots_ok(projected: np.ndarray, grads: np.ndarray) -> bool:
    """Each projected gradient has a non-negative dot with the other task's original gradient (T=2)."""
    p, g = np.asarray(projected, np.float64), np.asarray(grads, np.float64)
    for i, j in ((0, 1), (1, 0)):
        if p[i] @ g[j] < -DOT_TOL * np.linalg.norm(g[i]) * np.linalg.norm(g[j]):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# project_conflicting
# ----------------------------------------------------------------------------------------------
def test_two_conflicting_tasks_no_longer_conflict():
    grads = np.array([[1.0, 0.5, -2.0, 0.3], [-1.5, 0.2, 1.0, 2.0]], np.float32)
    assert grads[0] @ grads[1] < 0
    projected = np.asarray(project(jnp.asarray(grads), None))
    assert dots_ok(projected, grads)
    assert not np.allclose(projected, grads)
    np.testing.assert_allclose(projected, reference_pcgrad(grads, fixed_order(2)), rtol=RTOL, atol=ATOL)
    # the closed form for two tasks
    g1, g2 = grads.astype(np.float64)
    np.testing.assert_allclose(projected[0], g1 - (g1 @ g2) / (g2 @ g2) * g2, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(projected[1], g2 - (g1 @ g2) / (g1 @ g1) * g1, rtol=RTOL, atol=ATOL)


def test_non_conflicting_gradients_pass_unchanged_bitwise():
    rng = np.random.default_rng(0)
    grads = np.abs(rng.normal(size=(5, 7))).astype(np.float32)  # all pairwise dots > 0
    grads[0] = 0.0
    grads[0, 2] = 1.0
    grads[1, :] = 0.0
    grads[1, 3] = 2.0  # orthogonal to task 0: a dot of exactly 0 is no conflict
    grads[2, 4] = -0.0  # a negative zero keeps its sign
    grads[3, 2:4] = -0.0
    assert all(grads[i] @ grads[j] >= 0 for i in range(5) for j in range(5))
    # orthogonal tasks with negative entries: subtracting a zero multiple of g_j would turn -0.0 into +0.0
    signed = np.array([[1.0, 0.0, -0.0], [0.0, 1.0, -1.0], [2.0, 3.0, 0.5]], np.float32)
    assert all(signed[i] @ signed[j] >= 0 for i in range(3) for j in range(3))
    for g in (grads, signed):
        for key in (None, jax.random.PRNGKey(3)):
            projected = np.asarray(project(jnp.asarray(g), key))
            np.testing.assert_array_equal(projected.view(np.uint32), g.view(np.uint32))


def test_projection_order_rows_are_the_other_tasks():
    np.testing.assert_array_equal(np.asarray(order_of(None, 4)), fixed_order(4))
    orders = np.asarray(order_of(jax.random.PRNGKey(7), 6))
    assert orders.shape == (6, 5) and orders.dtype == np.int32
    for i, row in enumerate(orders):
        assert sorted(row) == [j for j in range(6) if j != i]
    assert not np.array_equal(orders, fixed_order(6))
    # one independent order per task (Algorithm 1 draws one inside the loop over tasks): the ranks of
    # the other tasks differ between rows
    rows = np.asarray(order_of(jax.random.PRNGKey(8), 8))
    ranks = rows - (rows > np.arange(8)[:, None])
    assert len({tuple(r) for r in ranks}) > 1
    np.testing.assert_array_equal(np.asarray(order_of(jax.random.PRNGKey(7), 6)), orders)
    assert projection_order(None, 1).shape == (1, 0)


@pytest.mark.parametrize("num_tasks", [4, 5, 6, 7, 8])
def test_random_tasks_match_reference_in_the_same_order(num_tasks: int):
    rng = np.random.default_rng(num_tasks)
    grads = rng.normal(size=(num_tasks, 9)).astype(np.float32)
    key = jax.random.PRNGKey(100 + num_tasks)
    order, projected = map(np.asarray, order_and_project(jnp.asarray(grads), key))
    expected = reference_pcgrad(grads, order)
    np.testing.assert_allclose(projected, expected, rtol=RTOL, atol=ATOL)
    assert not np.allclose(projected, grads)  # some projections happened
    # the order matters here, so the test pins the order used
    assert not np.allclose(expected, reference_pcgrad(grads, order[:, ::-1]), rtol=RTOL, atol=ATOL)


def test_zero_norm_task_gradient_gives_no_nan():
    grads = jnp.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1.0, 1.0, 0.0]])
    projected = np.asarray(project(grads, jax.random.PRNGKey(0)))
    assert np.all(np.isfinite(projected))
    np.testing.assert_array_equal(projected[0], 0.0)
    np.testing.assert_allclose(projected, reference_pcgrad(np.asarray(grads), fixed_order(3)), rtol=RTOL, atol=ATOL)
    # through the transformation: one task's whole gradient tree is zero
    tree = jax.tree.map(lambda x: x.at[1].set(0.0), task_grads(5))
    out, _ = update_fn("sum", 3)(tree, pcgrad(seed=3).init(None))
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(out))
    assert_trees_close(
        out, reference_combined(tree, np.asarray(order_of(jax.random.split(jax.random.PRNGKey(3))[1], T)))
    )
    # differentiable through the projections: the guard leaves no NaN in the unselected branch
    grad = jax.grad(lambda g: jnp.sum(project_conflicting(g, None) ** 2))(grads)
    assert np.all(np.isfinite(np.asarray(grad)))
    # a gradient so small its squared norm underflows to 0 is never projected onto
    tiny = jnp.array([[1e-30, 0.0], [-1.0, 0.5]])
    assert float(jnp.sum(tiny[0] ** 2)) == 0.0 and float(tiny[0] @ tiny[1]) < 0
    projected = np.asarray(project(tiny, None))
    assert np.all(np.isfinite(projected))
    np.testing.assert_array_equal(projected[1], np.asarray(tiny[1]))


# ----------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ----------------------------------------------------------------------------------------------
_element = st.floats(-100.0, 100.0, width=32).map(lambda x: 0.0 if abs(x) < 1e-3 else x)
_project_keyed = jax.jit(lambda g, seed: project_conflicting(g, jax.random.PRNGKey(seed)))


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, (2, 6), elements=_element))
def test_two_tasks_never_conflict_after_projection(grads: np.ndarray):
    projected = np.asarray(project(grads, None))
    assert np.all(np.isfinite(projected))
    assert dots_ok(projected, grads)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float32, (3, 6), elements=_element), st.integers(0, 2**31 - 1))
def test_projection_never_increases_norm(grads: np.ndarray, seed: int):
    projected = np.asarray(_project_keyed(grads, seed))
    before = np.linalg.norm(grads.astype(np.float64), axis=1)
    after = np.linalg.norm(projected.astype(np.float64), axis=1)
    assert np.all(after <= before * (1 + 1e-6) + 1e-12)


# ----------------------------------------------------------------------------------------------
# The optax transformation
# ----------------------------------------------------------------------------------------------
T = 3


def task_grads(seed: int = 0, batch: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    """Per-task gradients of a [3, 2] kernel and a [2] bias: leaves [*batch, T, ...]."""
    rng = np.random.default_rng(seed)
    return {
        "kernel": jnp.asarray(rng.normal(size=(*batch, T, 3, 2)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(*batch, T, 2)), jnp.float32),
    }


@functools.cache
def update_fn(reduction: str, seed: int | None):
    """The jitted `update` of `pcgrad(reduction, seed)`, compiled once per test session."""
    return jax.jit(pcgrad(reduction, seed).update)


def reference_combined(tree: dict[str, jax.Array], order: np.ndarray) -> dict[str, np.ndarray]:
    """Sum over tasks of the reference projections of [kernel, bias] flattened per task."""
    kernel, bias = np.asarray(tree["kernel"]), np.asarray(tree["bias"])
    flat = np.concatenate([kernel.reshape(T, -1), bias.reshape(T, -1)], axis=1)
    total = reference_pcgrad(flat, order).sum(axis=0)
    return {"kernel": total[:6].reshape(3, 2), "bias": total[6:]}


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.shape(x) == np.shape(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_transform_combines_to_unstacked_tree_equal_to_reference():
    grads = task_grads()
    # fixed order
    state = pcgrad(seed=None).init(None)
    assert state == PCGradState(key=None)
    out, new_state = update_fn("sum", None)(grads, state)
    assert {k: v.shape for k, v in out.items()} == {"kernel": (3, 2), "bias": (2,)}
    assert new_state.key is None
    assert_trees_close(out, reference_combined(grads, fixed_order(T)))
    # random order: drawn from the state's key, PRNGKey(seed), split every update
    state = pcgrad(seed=3).init(None)
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(jax.random.PRNGKey(3)))
    next_key, order_key = jax.random.split(state.key)
    out, new_state = update_fn("sum", 3)(grads, state)
    np.testing.assert_array_equal(np.asarray(new_state.key), np.asarray(next_key))
    assert_trees_close(out, reference_combined(grads, np.asarray(order_of(order_key, T))))
    _, third = update_fn("sum", 3)(grads, new_state)
    assert not np.array_equal(np.asarray(third.key), np.asarray(new_state.key))


def test_mean_is_sum_over_tasks():
    grads = task_grads(1)
    state = pcgrad(seed=3).init(None)
    summed, _ = update_fn("sum", 3)(grads, state)
    mean, _ = update_fn("mean", 3)(grads, state)
    assert_trees_close(mean, jax.tree.map(lambda x: x / T, summed), rtol=1e-6, atol=0)
    assert not np.allclose(np.asarray(mean["bias"]), np.asarray(summed["bias"]))


def test_transform_under_jit_and_vmap_equals_unjitted():
    reduction = "mean"
    tx = pcgrad(reduction, seed=5)
    grads = task_grads(2)
    state = tx.init(None)
    assert_trees_close(update_fn(reduction, 5)(grads, state), tx.update(grads, state))
    # an outer batch of independent problems, each with its own key
    batch = 3
    batched = task_grads(3, batch=(batch,))
    states = PCGradState(key=jax.random.split(jax.random.PRNGKey(9), batch))
    vmapped = jax.jit(jax.vmap(tx.update))(batched, states)
    for b in range(batch):
        one = tx.update(jax.tree.map(lambda x: x[b], batched), PCGradState(key=states.key[b]))
        assert_trees_close(jax.tree.map(lambda x: x[b], vmapped), one)


def test_chains_before_an_ordinary_optimizer():
    params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.ones((2,))}
    grads = task_grads(4)
    combined, _ = update_fn("sum", 0)(grads, pcgrad().init(params))
    tx = optax.chain(pcgrad(), optax.sgd(0.1))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, combined))
    new_params = optax.apply_updates(params, updates)
    assert jax.tree.map(jnp.shape, new_params) == jax.tree.map(jnp.shape, params)


def test_leaves_without_a_common_task_axis_are_rejected():
    tx = pcgrad()
    with pytest.raises(ValueError, match="task axis"):
        tx.update({"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))}, tx.init(None))
    with pytest.raises(ValueError, match="task axis"):
        tx.update({"a": jnp.zeros((3, 2)), "b": jnp.zeros(())}, tx.init(None))


def test_bad_reduction_is_a_one_line_value_error():
    with pytest.raises(ValueError, match="reduction") as info:
        pcgrad("max")
    assert "\n" not in str(info.value) and "'max'" in str(info.value)


# ----------------------------------------------------------------------------------------------
# weighted_task_sum
# ----------------------------------------------------------------------------------------------
def test_weighted_task_sum():
    grads = task_grads(6)
    weights = jnp.array([0.5, -1.0, 2.0])
    out = weighted_task_sum(grads, weights)
    expected = {
        k: np.einsum("t,t...->...", np.asarray(weights, np.float64), np.asarray(v, np.float64))
        for k, v in grads.items()
    }
    assert_trees_close(out, expected)
    with pytest.raises(ValueError, match="one per task"):
        weighted_task_sum(grads, jnp.ones(2))
