"""Compression of continuous-action (Gaussian) policies: the continuous agreement measure against
hand-computed cases, and export/load reproducing the evaluated policy's actions bit for bit for
every quantization scheme, with a mask and after structured shrink."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlcx_jax import nets
from rlcx_jax.compress import structured
from rlcx_jax.compress.export import export, load
from rlcx_jax.compress.quant import QuantSpec, quantize_tree
from rlcx_jax.nets.policy import (
    action_agreement,
    action_gap,
    agreement_label,
    distribution,
    executed_action,
    greedy_action,
)
from rlcx_jax.seams import Hooks
from rlcx_jax.workflows.compress_run import QUANT_INCLUDE, policy_forward

F32 = np.float32
PENDULUM = nets.ActionSpec(discrete=False, shape=(1,), low=-2.0, high=2.0)
TWO_D = nets.ActionSpec(discrete=False, shape=(2,), low=-1.0, high=1.0)
DISCRETE = nets.ActionSpec(discrete=True, num_actions=3)


# ----------------------------------------------------------------------------------------------
# The agreement measure (hand-computed references)
# ----------------------------------------------------------------------------------------------
def test_continuous_agreement_hand_cases() -> None:
    """Range [-2, 2] (width 4), tolerance 1%: two actions agree within 0.04 of each other, after
    clipping to the bounds."""
    a = jnp.asarray([[0.0], [0.0], [0.5], [2.5], [-3.0], [1.9], [0.0]], jnp.float32)
    b = jnp.asarray([[0.0], [0.03], [0.6], [3.0], [-2.0], [2.5], [1e-7]], jnp.float32)
    # gaps / 4:       0     0.0075  0.025  0 (both clip to 2)  0 (both -2)  0.025 (2 - 1.9)  2.5e-8
    agree = [True, True, False, True, True, False, True]
    assert float(action_agreement(a, b, PENDULUM)) == pytest.approx(np.mean(agree))
    gaps = np.asarray([0.0, 0.03, 0.1, 0.0, 0.0, 0.1, 1e-7]) / 4.0
    assert float(action_gap(a, b, PENDULUM)) == pytest.approx(gaps.mean(), rel=1e-5)
    # A looser tolerance counts the 0.1-apart pairs too (0.1 / 4 = 2.5% of the range).
    assert float(action_agreement(a, b, PENDULUM, tol=0.026)) == 1.0


def test_multi_dimensional_action_agrees_only_when_every_dimension_does() -> None:
    """Range [-1, 1] (width 2), tolerance 1% = 0.02 per dimension: the worst dimension decides."""
    a = jnp.asarray([[0.0, 0.0], [0.0, 0.0], [0.5, -0.5]], jnp.float32)
    b = jnp.asarray([[0.01, -0.01], [0.0, 0.05], [0.5, -0.5]], jnp.float32)
    assert float(action_agreement(a, b, TWO_D)) == pytest.approx(2 / 3)
    # gap: mean over states and dims of |a - b| / 2 = (0.01 + 0.01 + 0 + 0.05 + 0 + 0) / 2 / 6
    assert float(action_gap(a, b, TWO_D)) == pytest.approx(0.07 / 12, rel=1e-5)


def test_discrete_agreement_is_exact_equality() -> None:
    a, b = jnp.asarray([0, 1, 2, 2]), jnp.asarray([0, 1, 1, 2])
    assert float(action_agreement(a, b, DISCRETE)) == 0.75
    assert float(action_gap(a, b, DISCRETE)) == 0.25
    assert agreement_label(DISCRETE) == "greedy agreement"
    assert "within 1% of range" in agreement_label(PENDULUM)


def test_agreement_is_the_same_under_jit_and_vmap_and_takes_batch_axes() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 50, 2)).astype(F32)  # (seeds, states, action dims)
    b = (a + rng.normal(size=a.shape) * 0.02).astype(F32)
    whole = float(action_agreement(a, b, TWO_D))
    per_seed = np.asarray(jax.vmap(lambda x, y: action_agreement(x, y, TWO_D))(a, b))
    jitted = float(jax.jit(lambda x, y: action_agreement(x, y, TWO_D))(a, b))
    assert jitted == whole and per_seed.mean() == pytest.approx(whole)
    # NumPy reference, written from the definition.
    gap = np.abs(np.clip(a, -1, 1) - np.clip(b, -1, 1)) / 2.0
    np.testing.assert_allclose(per_seed, (gap.max(-1) <= 0.01).mean(-1), rtol=1e-6)
    assert 0.0 < whole < 1.0  # the noise puts some states on each side of the tolerance
    gap_vmapped = np.asarray(jax.vmap(lambda x, y: action_gap(x, y, TWO_D))(a, b))
    np.testing.assert_allclose(gap_vmapped, gap.mean(axis=(1, 2)), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# A Gaussian policy (Pendulum-shaped: obs (3,), one action in [-2, 2])
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian():
    config = nets.NetConfig(hidden=(32, 32))
    net = nets.make(config, (3,), PENDULUM)
    params = jax.jit(net.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3)))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: np.asarray(p + 0.05 * rng.normal(size=p.shape), F32), params)
    # A policy head whose means span most of the action range and pass its upper bound (clipping).
    params["policy_head"]["kernel"] = params["policy_head"]["kernel"] * F32(15.0)
    params["log_std"] = np.asarray([-0.7], F32)
    obs = (rng.normal(size=(512, 3)) * np.asarray([0.7, 0.7, 4.0])).astype(F32)
    return config, net, params, obs


def test_agreement_with_itself_is_one_and_drops_monotonically_with_weight_noise(gaussian) -> None:
    _, net, params, obs = gaussian
    forward = jax.jit(policy_forward(net, Hooks(), PENDULUM))
    reference = forward(params, obs)
    mean = np.asarray(reference)[:, 0]
    assert mean.min() < -1.5 and mean.max() > 2.0 and np.mean(np.abs(mean) < 2.0) > 0.9  # inside and clipped
    assert float(action_agreement(reference, reference, PENDULUM)) == 1.0
    assert float(action_gap(reference, reference, PENDULUM)) == 0.0
    direction = jax.tree.map(lambda p: np.random.default_rng(7).normal(size=p.shape).astype(F32), params)
    agreements, gaps = [], []
    for scale in (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1):
        noisy = jax.tree.map(lambda p, d: p + F32(scale) * d, params, direction)  # noqa: B023
        actions = forward(noisy, obs)
        agreements.append(float(action_agreement(actions, reference, PENDULUM)))
        gaps.append(float(action_gap(actions, reference, PENDULUM)))
    assert agreements[0] == 1.0 and gaps[0] == 0.0
    assert all(x >= y for x, y in zip(agreements, agreements[1:])), agreements
    assert all(x <= y for x, y in zip(gaps, gaps[1:])), gaps
    assert agreements[-1] < 0.1 and agreements[2] > 0.5, agreements  # the measure spans its range


EXACT_SCHEMES = [QuantSpec(s, b) for s in ("uniform", "log", "kmeans") for b in (8, 4)]


def _random_kernel_masks(params, density: float, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: rng.random(x.shape) < density if "kernel" in jax.tree_util.keystr(p) else None, params
    )


@pytest.mark.parametrize("qspec", EXACT_SCHEMES, ids=lambda q: f"{q.scheme}{q.bits}")
@pytest.mark.parametrize("variant", ["masked", "shrunk"])
def test_exported_gaussian_policy_reproduces_evaluated_actions_bitwise(gaussian, qspec, variant, tmp_path) -> None:
    """The evaluated policy is the jitted forward of the fake-quantized weights (as `rlcx compress`
    evaluates it); the loaded artifact's mean actions, log-std, clipped and sampled actions equal it
    bit for bit."""
    config, net, params, obs = gaussian
    # Means shifted up, so that pruning still leaves states whose mean passes the upper bound.
    params = {**params, "policy_head": {**params["policy_head"], "bias": np.asarray([1.5], F32)}}
    masks = None
    if variant == "masked":
        masks = _random_kernel_masks(params, 0.4, seed=qspec.bits)
    else:
        params, config = structured.shrink(params, config, 0.5)
        assert config.hidden == (16, 16)
        net = nets.make(config, (3,), PENDULUM)
    evaluated = jax.jit(lambda p, m: quantize_tree(p, qspec, include=QUANT_INCLUDE, masks=m))(params, masks)
    path = tmp_path / "pendulum.rlcx"
    export(params, path, masks=masks, qspec=qspec, include=QUANT_INCLUDE, net_config=config, obs_shape=(3,),
           action_spec=PENDULUM)
    art = load(path)
    assert art.action_spec == PENDULUM and art.net_config == config

    expected = np.asarray(jax.jit(policy_forward(net, Hooks(), PENDULUM))(evaluated, obs))
    got = np.asarray(art.policy(obs))
    assert got.shape == (512, 1) and np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(np.asarray(art.params["log_std"]).view(np.uint32), params["log_std"].view(np.uint32))
    executed = np.asarray(art.act(obs))
    np.testing.assert_array_equal(executed, np.clip(expected, -2.0, 2.0))
    assert np.mean(np.abs(expected) > 2.0) > 0.05  # clipping is exercised

    key = jax.random.PRNGKey(3)

    def sample(p, x, k):
        return executed_action(distribution(net.apply({"params": p}, x, method="policy"), PENDULUM).sample(seed=k),
                               PENDULUM)

    sampled = np.asarray(jax.jit(sample)(evaluated, obs, key))
    np.testing.assert_array_equal(np.asarray(art.act(obs, key)), sampled)
    assert np.mean(np.abs(sampled - executed) > 1e-3) > 0.5  # sampling really differs from the mean
    # The comparison above is between compressed policies: the quantized policy is not the float one,
    # except with k-means when no kernel has more values than levels (then each value is its own level).
    float_actions = np.asarray(greedy_action(net.apply({"params": params}, obs, method="policy"), PENDULUM))
    sizes = [v.size for p, v in jax.tree_util.tree_leaves_with_path(params) if "kernel" in jax.tree_util.keystr(p)]
    lossless = qspec.scheme == "kmeans" and masks is None and max(sizes) <= 2**qspec.bits
    assert np.array_equal(float_actions, expected) == lossless
