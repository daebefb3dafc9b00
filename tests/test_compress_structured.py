"""Structured pruning (rlcx_jax.compress.structured): unit masks and physical shrinking."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import nets
from rlcx_jax.compress import masks as M
from rlcx_jax.compress import structured as S

DISCRETE = nets.ActionSpec(discrete=True, num_actions=3)
CONTINUOUS = nets.ActionSpec(discrete=False, shape=(2,))
MINATAR = (10, 10, 4)

# name -> (net_config, obs_shape, action spec, head)
CASES: dict[str, tuple[nets.NetConfig, tuple[int, ...], nets.ActionSpec, str]] = {
    "mlp-ac-separate": (nets.NetConfig(hidden=(64, 64)), (4,), DISCRETE, "actor_critic"),
    "mlp-ac-shared": (nets.NetConfig(hidden=(64, 48), separate_critic=False), (4,), DISCRETE, "actor_critic"),
    "mlp-ac-continuous": (nets.NetConfig(hidden=(16,), activation="relu"), (3,), CONTINUOUS, "actor_critic"),
    "mlp-q": (nets.NetConfig(hidden=(64, 64), activation="relu"), (4,), DISCRETE, "q"),
    "mlp-q-dueling": (nets.NetConfig(hidden=(64, 64), activation="relu", dueling=True), (4,), DISCRETE, "q"),
    "cnn-ac": (nets.NetConfig(torso="cnn", hidden=(32,), activation="relu"), MINATAR, DISCRETE, "actor_critic"),
    "cnn-q-no-hidden": (nets.NetConfig(torso="cnn", hidden=(), activation="relu"), MINATAR, DISCRETE, "q"),
}


@functools.cache
def _case(name: str) -> tuple[Any, dict[str, Any], nets.NetConfig, Any]:
    """(network, params with random normal leaves, config, observations). Shapes from eval_shape,
    so no initialiser is compiled; random biases make a missed bias mask visible."""
    cfg, obs_shape, spec, head = CASES[name]
    net = nets.make(cfg, obs_shape, spec, head)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1,) + obs_shape))["params"]
    rng = np.random.default_rng(len(name))
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[0]), jnp.float32), shapes)
    obs = jnp.asarray(rng.normal(size=(5,) + obs_shape), jnp.float32)
    return net, params, cfg, obs


# ----------------------------------------------------------------------------------------------
# shrink == masked, with fewer parameters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_shrink_matches_masked_network(name: str) -> None:
    net, params, cfg, obs = _case(name)
    _, obs_shape, spec, head = CASES[name]
    half = dataclasses.replace(cfg, hidden=tuple(w // 2 for w in cfg.hidden))
    want_cfg = dataclasses.replace(half, conv_features=8) if cfg.torso == "cnn" else half
    small_net = nets.make(want_cfg, obs_shape, spec, head)

    def both(p: Any) -> tuple[Any, Any, Any]:
        """Both sides in one jitted program (one compilation; also shows both run under jit)."""
        masked = M.apply_masks(p, S.structured_masks(p, cfg, 0.5, head=head))
        small, small_cfg = S.shrink(p, cfg, 0.5, head=head)
        assert small_cfg == want_cfg
        return net.apply({"params": masked}, obs), small_net.apply({"params": small}, obs), small

    want, got, small = jax.jit(both)(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    want_shapes = jax.eval_shape(small_net.init, jax.random.PRNGKey(0), jnp.zeros((1,) + obs_shape))["params"]
    assert jax.tree.map(lambda x: x.shape, small) == jax.tree.map(lambda x: x.shape, want_shapes)
    assert S.count_params(small) < S.count_params(params)


# ----------------------------------------------------------------------------------------------
# The masks zero whole units, the ones with the smallest norms, and the rows that read them
# ----------------------------------------------------------------------------------------------
def _layer_masks(masks: dict[str, Any], torso: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    node = masks[torso][layer]
    return np.asarray(node["kernel"]), np.asarray(node["bias"])


@pytest.mark.parametrize("norm", S.NORMS)
def test_masks_remove_whole_weakest_units(norm: str) -> None:
    _, params, cfg, _ = _case("mlp-ac-separate")
    masks = S.structured_masks(params, cfg, 0.25, norm)
    for torso, head in [("actor_torso", "policy_head"), ("critic_torso", "value_head")]:
        rows = np.ones(4, bool)  # the observation is never pruned
        for i in range(2):
            kernel_mask, bias_mask = _layer_masks(masks, torso, f"Dense_{i}")
            units = kernel_mask.any(axis=0)
            assert units.sum() == 48  # round(0.75 * 64)
            np.testing.assert_array_equal(kernel_mask, rows[:, None] & units[None, :])  # whole columns
            np.testing.assert_array_equal(bias_mask, units)
            w = np.asarray(params[torso][f"Dense_{i}"]["kernel"])
            score = np.abs(w).sum(0) if norm == "l1" else np.sqrt((w**2).sum(0))
            assert score[~units].max() <= score[units].min()  # the weakest units go
            rows = units  # the next layer's rows that read pruned units are zeroed
        head_mask = np.asarray(masks[head]["kernel"])
        np.testing.assert_array_equal(head_mask, np.broadcast_to(rows[:, None], head_mask.shape))
        assert np.asarray(masks[head]["bias"]).all()  # heads keep every output


def test_cnn_masks_zero_filters_and_flattened_rows() -> None:
    _, params, cfg, _ = _case("cnn-ac")
    masks = S.structured_masks(params, cfg, 0.5)
    kernel_mask, bias_mask = _layer_masks(masks, "actor_torso", "Conv_0")
    filters = kernel_mask.reshape(-1, 16).all(axis=0)
    assert filters.sum() == 8 and np.array_equal(kernel_mask.reshape(-1, 16).any(axis=0), filters)
    np.testing.assert_array_equal(bias_mask, filters)
    rows = np.asarray(masks["actor_torso"]["Dense_0"]["kernel"]).any(axis=1)  # (8 * 8 * 16,)
    for r in [0, 5, 16 + 3, 63 * 16 + 15]:  # row (h * W' + w) * C + c reads filter c
        assert rows[r] == filters[r % 16]
    assert rows.sum() == 64 * 8
    scores = S.unit_scores(params)["actor_torso/Conv_0"]
    assert np.asarray(scores)[~filters].max() <= np.asarray(scores)[filters].min()


def test_unit_scores_are_column_norms() -> None:
    _, params, _, _ = _case("cnn-ac")
    l1, l2 = S.unit_scores(params, "l1"), S.unit_scores(params, "l2")
    assert sorted(l1) == ["actor_torso/Conv_0", "actor_torso/Dense_0", "critic_torso/Conv_0", "critic_torso/Dense_0"]
    conv = np.asarray(params["critic_torso"]["Conv_0"]["kernel"])
    np.testing.assert_allclose(l1["critic_torso/Conv_0"], np.abs(conv).reshape(-1, 16).sum(0), rtol=1e-5)
    dense = np.asarray(params["actor_torso"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(l2["actor_torso/Dense_0"], np.linalg.norm(dense, axis=0), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Edge counts, wrapped params, jit
# ----------------------------------------------------------------------------------------------
def test_zero_sparsity_is_identity_and_at_least_one_unit_is_kept() -> None:
    _, params, cfg, _ = _case("mlp-q")
    small, small_cfg = S.shrink(params, cfg, 0.0, head="q")
    assert small_cfg == cfg
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    tiny, tiny_cfg = S.shrink({"params": params}, cfg, 0.999, head="q")  # Module.init's wrapper is accepted
    assert tiny_cfg.hidden == (1, 1) and set(tiny) == {"params"}
    assert tiny["params"]["q_head"]["kernel"].shape == (1, 3)


def test_structured_masks_under_jit() -> None:
    _, params, cfg, _ = _case("mlp-ac-shared")
    jitted = jax.jit(lambda p: S.structured_masks(p, cfg, 0.5))(params)
    eager = S.structured_masks(params, cfg, 0.5)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(a, b)
    # The shared torso feeds both heads: both lose the same rows.
    np.testing.assert_array_equal(eager["policy_head"]["kernel"].any(1), eager["value_head"]["kernel"].any(1))
    assert int(eager["value_head"]["kernel"].sum()) == 24


# ----------------------------------------------------------------------------------------------
# Bad inputs fail clearly, before anything compiles
# ----------------------------------------------------------------------------------------------
def test_bad_inputs() -> None:
    _, params, cfg, _ = _case("mlp-ac-separate")
    with pytest.raises(ValueError, match="Unknown norm 'l3'"):
        S.shrink(params, cfg, 0.5, norm="l3")
    with pytest.raises(ValueError, match="Unknown norm"):
        S.unit_scores(params, "linf")
    for s in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"Sparsity must be in \[0, 1\)"):
            S.structured_masks(params, cfg, s)
    with pytest.raises(ValueError, match="concrete Python number"):
        jax.jit(lambda s: S.structured_masks(params, cfg, s))(0.5)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (nets.NetConfig(hidden=(32, 64)), r"actor_torso/Dense_0: kernel \(4, 64\).*expected width 32"),
        (nets.NetConfig(hidden=(64,)), r"actor_torso has layers \['Dense_0', 'Dense_1'\].*expects \['Dense_0'\]"),
        (nets.NetConfig(separate_critic=False), "separate_critic=False does not match"),
        (nets.NetConfig(torso="cnn"), r"expects \['Conv_0', 'Dense_0', 'Dense_1'\]"),
        (nets.NetConfig(activation="sigmoid"), "Unknown activation"),
    ],
)
def test_config_mismatch(cfg: nets.NetConfig, message: str) -> None:
    _, params, _, _ = _case("mlp-ac-separate")
    shapes = jax.eval_shape(lambda: params)  # shape checks only: nothing is computed
    with pytest.raises(ValueError, match=message):
        S.structured_masks(shapes, cfg, 0.5)


def test_cnn_config_mismatch() -> None:
    _, params, cfg, _ = _case("cnn-ac")
    with pytest.raises(ValueError, match=r"Conv_0: kernel \(3, 3, 4, 16\).*expected width 8"):
        S.shrink(params, nets.NetConfig(torso="cnn", hidden=(32,), conv_features=8), 0.5)
    with pytest.raises(ValueError, match="does not match conv_kernel=5"):
        S.shrink(params, nets.NetConfig(torso="cnn", hidden=(32,), conv_kernel=5), 0.5)


# ----------------------------------------------------------------------------------------------
# fold_dead_units: units left dead by unstructured pruning
# ----------------------------------------------------------------------------------------------
def _np_mlp_policy(p: dict[str, Any], obs: np.ndarray) -> np.ndarray:
    """Independent float64 NumPy forward of the 2-layer tanh actor (actor_torso -> policy_head)."""
    h = np.asarray(obs, np.float64)
    for name in ("Dense_0", "Dense_1"):
        layer = p["actor_torso"][name]
        h = np.tanh(h @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64))
    head = p["policy_head"]
    return h @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)


def _sparse_mlp(density: float, seed: int = 0) -> tuple[Any, dict[str, Any], nets.NetConfig, np.ndarray]:
    """The mlp-ac-separate case with random biases and ~density of its torso kernels kept."""
    net, params, cfg, _ = _case("mlp-ac-separate")
    rng = np.random.default_rng(seed)

    def prune(path: Any, x: jax.Array) -> jax.Array:
        keep = rng.random(x.shape) < density if "torso" in jax.tree_util.keystr(path) and x.ndim == 2 else True
        return jnp.where(keep, x, 0.0)

    params = jax.tree_util.tree_map_with_path(prune, params)
    obs = rng.normal(size=(64, 4)).astype(np.float32) * 2.0
    return net, params, cfg, obs


def test_fold_dead_units_keeps_the_function_and_clears_the_dead() -> None:
    net, params, cfg, obs = _sparse_mlp(0.1)
    folded = S.fold_dead_units(params, cfg)
    # Same function as the unpruned-by-fold network: against an independent float64 forward.
    np.testing.assert_allclose(_np_mlp_policy(folded, obs), _np_mlp_policy(params, obs), atol=1e-5)
    np.testing.assert_allclose(net.apply({"params": folded}, obs, method="policy"), _np_mlp_policy(params, obs), atol=1e-5)
    a0, a1 = params["actor_torso"]["Dense_0"], params["actor_torso"]["Dense_1"]
    f0, f1 = folded["actor_torso"]["Dense_0"], folded["actor_torso"]["Dense_1"]
    no_input = np.all(np.asarray(a0["kernel"]) == 0, axis=0)
    assert no_input.sum() > 20  # 4 inputs at 10% density: most first-layer units have none
    # Hand check of the fold for every constant unit j: b1' = b1 + sum_j tanh(b0_j) W1[j, :].
    want_b1 = np.asarray(a1["bias"], np.float64) + np.tanh(np.asarray(a0["bias"], np.float64))[no_input] @ np.asarray(
        a1["kernel"], np.float64
    )[no_input]
    dead1 = np.all(np.asarray(f1["kernel"]) == 0, axis=0)  # layer-2 units folded in turn get bias 0
    np.testing.assert_allclose(np.asarray(f1["bias"])[~dead1], want_b1[~dead1], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(f1["kernel"])[no_input] == 0) and np.all(np.asarray(f0["bias"])[no_input] == 0)
    # Kernels only lose entries: every kernel weight is unchanged or zero (biases absorb the folds).
    for x, y in zip(jax.tree.leaves(params["actor_torso"]), jax.tree.leaves(folded["actor_torso"])):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 1:
            continue
        assert np.all((y == x) | (y == 0))
    before = sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(params))
    after = sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(folded))
    assert after < 0.8 * before


def test_fold_dead_units_chains_and_clears_unread_units_exactly() -> None:
    net, params, cfg, obs = _case("mlp-ac-separate")
    p = jax.tree.map(np.array, params)
    d0, d1, head = p["actor_torso"]["Dense_0"], p["actor_torso"]["Dense_1"], p["policy_head"]
    # Layer-2 unit 5 reads only layer-1 unit 3, which has no inputs: both are constant.
    d0["kernel"][:, 3] = 0.0
    d1["kernel"][:, 5] = 0.0
    d1["kernel"][3, 5] = 0.7
    # Layer-1 unit 9 is read by nobody: its inputs and bias go, exactly.
    d1["kernel"][9, :] = 0.0
    folded = jax.tree.map(np.asarray, S.fold_dead_units(p, cfg))
    f0, f1, fh = folded["actor_torso"]["Dense_0"], folded["actor_torso"]["Dense_1"], folded["policy_head"]
    assert np.all(f1["kernel"][:, 5] == 0) and f1["bias"][5] == 0 and np.all(fh["kernel"][5] == 0)
    want_head_bias = head["bias"] + np.tanh(d1["bias"][5] + np.tanh(d0["bias"][3]) * 0.7) * head["kernel"][5]
    np.testing.assert_allclose(fh["bias"], want_head_bias, rtol=1e-6)
    assert np.all(f0["kernel"][:, 9] == 0) and f0["bias"][9] == 0
    np.testing.assert_allclose(_np_mlp_policy(folded, np.asarray(obs)), _np_mlp_policy(p, np.asarray(obs)), atol=1e-5)


def test_fold_dead_units_without_dead_units_is_bitwise_identity_under_jit_and_vmap() -> None:
    net, params, cfg, obs = _case("mlp-q")
    same = S.fold_dead_units(params, cfg, head="q")
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, sparse, cfg_ac, _ = _sparse_mlp(0.1, seed=2)
    eager = S.fold_dead_units(sparse, cfg_ac)
    jitted = jax.jit(lambda q: S.fold_dead_units(q, cfg_ac))(sparse)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), sparse)
    batched = jax.vmap(lambda q: S.fold_dead_units(q, cfg_ac))(stacked)
    for x, y, z in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(batched)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z)[1])


def test_fold_dead_units_folds_a_constant_unit_into_both_dueling_streams() -> None:
    """A constant last-layer unit of a dueling Q-network's torso feeds the advantage (q_head) and the
    value (q_value) stream: both biases absorb it, so Q is unchanged."""
    net, params, cfg, obs = _case("mlp-q-dueling")
    p = jax.tree.map(np.array, params)
    d1, adv, val = p["torso"]["Dense_1"], p["q_head"], p["q_value"]
    d1["kernel"][:, 7] = 0.0  # unit 7 outputs relu(0.8) whatever the input
    d1["bias"][7] = 0.8
    folded = jax.tree.map(np.asarray, S.fold_dead_units(p, cfg, head="q"))
    f1, fa, fv = folded["torso"]["Dense_1"], folded["q_head"], folded["q_value"]
    assert f1["bias"][7] == 0 and np.all(fa["kernel"][7] == 0) and np.all(fv["kernel"][7] == 0)
    np.testing.assert_allclose(fa["bias"], adv["bias"] + 0.8 * adv["kernel"][7], rtol=1e-6)
    np.testing.assert_allclose(fv["bias"], val["bias"] + 0.8 * val["kernel"][7], rtol=1e-6)
    np.testing.assert_allclose(net.apply({"params": folded}, obs), net.apply({"params": p}, obs), atol=1e-5)


def test_fold_dead_units_cnn_filter_folds_into_every_position() -> None:
    net, params, cfg, obs = _case("cnn-ac")
    p = jax.tree.map(np.array, params)
    p["actor_torso"]["Conv_0"]["kernel"][..., 2] = 0.0  # filter 2 outputs relu(b_2) everywhere
    p["actor_torso"]["Conv_0"]["bias"][2] = 0.5
    folded = jax.tree.map(np.asarray, S.fold_dead_units(p, cfg))
    rows = folded["actor_torso"]["Dense_0"]["kernel"].reshape(-1, cfg.conv_features, 32)
    assert np.all(rows[:, 2] == 0) and folded["actor_torso"]["Conv_0"]["bias"][2] == 0
    np.testing.assert_allclose(
        net.apply({"params": folded}, obs, method="policy"), net.apply({"params": p}, obs, method="policy"), atol=1e-5
    )
    with pytest.raises(ValueError, match="does not match"):
        S.fold_dead_units(p, nets.NetConfig(torso="cnn", hidden=(16,), activation="relu"))
