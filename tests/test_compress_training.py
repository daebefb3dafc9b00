"""Pruning and quantization during training: the optax transformation, the schedule, and their use
through the compression extension in the core algorithms (tiny budgets: these check mechanics, not
return)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlcx_jax import nets
from rlcx_jax.compress import masks as M
from rlcx_jax.compress.quant import QuantSpec, quantize_tree
from rlcx_jax.compress.training import (
    QAT_INCLUDE,
    RANKING_SCOPE,
    CompressConfig,
    CompressHParams,
    find_masks,
    kmeans_project,
    kmeans_qat_transform,
    prune_transform,
    zhu_gupta_sparsity,
)
from rlcx_jax.rl import dqn, ppo
from rlcx_jax.seams import make_apply

SMALL_PPO = ppo.PPOConfig(num_envs=4, num_steps=32, total_timesteps=4 * 32 * 24, update_epochs=2, num_minibatches=2)


def with_compress(config, compress: CompressConfig):
    return dataclasses.replace(config, extensions=(compress,))


def sparsity_hparams(hparams, sparsity):
    return hparams.with_ext("compress", CompressHParams(sparsity=sparsity))


def _kernel_sparsity(params) -> dict[str, float]:
    report = M.sparsity(params).per_layer
    return {k: v for k, v in report.items() if k.endswith("kernel")}


# ----------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------
def test_zhu_gupta_schedule_matches_formula() -> None:
    start, end, final = 10, 110, 0.9
    steps = np.arange(0, 130)
    ours = np.asarray(jax.vmap(lambda t: zhu_gupta_sparsity(t, final, start, end))(steps))
    p = np.clip((steps - start) / (end - start), 0.0, 1.0)
    np.testing.assert_allclose(ours, final * (1 - (1 - p) ** 3), rtol=1e-6, atol=1e-7)
    assert ours[0] == 0.0 and ours[start] == 0.0 and abs(ours[end] - final) < 1e-6 and abs(ours[-1] - final) < 1e-6


def _run_transform(config: CompressConfig, sparsity: float, steps: int, key: jax.Array):
    """Random-walk updates through [adam -> prune]; returns params and masks after every step."""
    params = {"torso": {"Dense_0": {"kernel": jax.random.normal(key, (16, 32)), "bias": jnp.zeros(32)}}}
    tx = optax.chain(optax.adam(1e-2), prune_transform(config, sparsity, steps, include=(r".*kernel",)))

    def body(carry, k):
        p, s = carry
        grads = jax.tree.map(lambda x: jax.random.normal(k, x.shape), p)
        u, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (p, find_masks(s))

    keys = jax.random.split(key, steps)
    return jax.lax.scan(body, (params, tx.init(params)), keys)[1]


def test_gradual_transform_follows_schedule_and_keeps_pruned_weights_zero() -> None:
    steps, every = 40, 4
    config = CompressConfig(prune_schedule="gradual", prune_start=0.25, prune_end=0.75, prune_every=every)
    history, mask_history = jax.jit(lambda k: _run_transform(config, 0.8, steps, k))(jax.random.PRNGKey(0))
    kernels = np.asarray(history["torso"]["Dense_0"]["kernel"])
    masks = np.asarray(mask_history["torso"]["Dense_0"]["kernel"])
    start, end, n = 10, 30, kernels[0].size
    for t in range(steps):
        # The masks in the state are exactly the zeros of the parameters.
        np.testing.assert_array_equal(kernels[t] != 0, masks[t])
        last_update = t if start <= t <= end and ((t - start) % every == 0 or t == end) else None
        if last_update is not None:
            expected = round(float(zhu_gupta_sparsity(t, 0.8, start, end)) * n)
            assert int((~masks[t]).sum()) == expected, t
        if t > 0:  # the pruned set only grows
            assert np.all(masks[t] <= masks[t - 1])
    assert int((~masks[-1]).sum()) == round(0.8 * n)
    np.testing.assert_array_equal(np.asarray(history["torso"]["Dense_0"]["bias"])[-1] != 0, True)  # biases untouched


def test_default_layer_budgets_are_erk_so_a_narrow_input_layer_keeps_its_units() -> None:
    """The default spreads 90% over a 4x256 and a 256x256 kernel by ERK (Evci et al. 2020): density
    ~ (n_in + n_out) / (n_in n_out) makes the first layer dense (hand computed: eps * (260 + 512) =
    6656 kept gives it density 2.2 > 1, capped), so the second keeps 6656 - 1024 = 5632. Uniform
    budgets would leave ~0.9^4 = 66% of the first layer's units without any input."""
    config = CompressConfig(prune_schedule="oneshot")
    assert config.prune_distribution == "erk"
    k0, k1 = jax.random.split(jax.random.PRNGKey(3))
    params = {"torso": {"Dense_0": {"kernel": jax.random.normal(k0, (4, 256))},
                        "Dense_1": {"kernel": jax.random.normal(k1, (256, 256))}}}
    for distribution, first_kept, inputless in (("erk", 1024, 0.0), ("uniform", 102, 0.5)):
        tx = prune_transform(dataclasses.replace(config, prune_distribution=distribution), 0.9, 10)
        _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        masks = find_masks(state)["torso"]
        first, second = np.asarray(masks["Dense_0"]["kernel"]), np.asarray(masks["Dense_1"]["kernel"])
        assert first.sum() + second.sum() == 6656 and first.sum() == first_kept, distribution
        dead = np.mean(~first.any(axis=0))
        assert (dead == 0.0) if inputless == 0.0 else (dead > inputless), (distribution, dead)


def test_fixed_schedule_keeps_initial_zeros() -> None:
    config = CompressConfig(prune_schedule="fixed")
    params = {"torso": {"kernel": jnp.array([[0.0, 1.0], [2.0, 0.0]])}}
    tx = optax.chain(optax.sgd(0.1), prune_transform(config, 0.0, 10, include=(r".*kernel",)))
    state = tx.init(params)
    for _ in range(3):
        u, state = tx.update({"torso": {"kernel": jnp.ones((2, 2))}}, state, params)
        params = optax.apply_updates(params, u)
    k = np.asarray(params["torso"]["kernel"])
    assert k[0, 0] == 0 and k[1, 1] == 0 and k[0, 1] != 1.0 and k[1, 0] != 2.0


# ----------------------------------------------------------------------------------------------
# Through the algorithms, as an extension
# ----------------------------------------------------------------------------------------------
class TestPrunedPPO:
    """One compiled program, vmapped over two sparsity levels (a traced hyperparameter)."""

    @pytest.fixture(scope="class")
    @classmethod
    def sweep(cls):
        compress = CompressConfig(prune_schedule="gradual", prune_distribution="uniform", prune_end=0.5, prune_every=4)
        trainer = ppo.make(with_compress(SMALL_PPO, compress))
        levels = jnp.array([0.5, 0.9], jnp.float32)
        hparams = jax.vmap(lambda s: sparsity_hparams(ppo.PPOHParams(), s))(levels)
        hparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), hparams)
        out = jax.jit(jax.vmap(trainer.train, in_axes=(None, 0)))(jax.random.PRNGKey(0), hparams)
        return trainer, levels, out

    def test_each_lane_reaches_its_sparsity_and_heads_stay_dense(self, sweep) -> None:
        _, levels, out = sweep
        for i, level in enumerate(np.asarray(levels)):
            params = jax.tree.map(lambda x: x[i], out.state.params)
            report = _kernel_sparsity(params)
            for path, frac in report.items():
                if "head" in path:
                    assert frac == 0.0, path
                else:
                    assert abs(frac - level) < 1e-2, (path, frac, level)

    def test_masks_in_state_match_zero_weights(self, sweep) -> None:
        _, _, out = sweep
        masks = find_masks(out.state)
        assert masks is not None
        for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(out.state.params)):
            np.testing.assert_array_equal(np.asarray(m), np.asarray(p) != 0)

    def test_lane_equals_separate_run(self, sweep) -> None:
        trainer, levels, out = sweep
        single = jax.jit(trainer.train)(jax.random.PRNGKey(0), sparsity_hparams(ppo.PPOHParams(), jnp.float32(levels[1])))
        for a, b in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(out.state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b)[1], atol=1e-5)


def test_dqn_oneshot_pruned_weights_stay_zero() -> None:
    config = dqn.DQNConfig(
        num_envs=4, train_frequency=4, buffer_size=256, batch_size=32, learning_starts=64,
        target_update_period=40, total_timesteps=1_000, log_every=25,
        extensions=(CompressConfig(prune_schedule="oneshot", prune_distribution="global"),),
    )
    out = jax.jit(dqn.make(config).train)(jax.random.PRNGKey(1), sparsity_hparams(dqn.DQNHParams(), 0.8))
    torso = [v for k, v in _kernel_sparsity(out.state.params).items() if k.startswith("torso")]
    total = sum(np.asarray(x).size for x in jax.tree.leaves(out.state.params["torso"]) if np.asarray(x).ndim == 2)
    zeros = sum(int((np.asarray(x) == 0).sum()) for x in jax.tree.leaves(out.state.params["torso"]) if np.asarray(x).ndim == 2)
    assert zeros == round(0.8 * total) and len(torso) == 2
    assert np.all(np.asarray(out.state.params["q_head"]["kernel"]) != 0)  # the Q head is not pruned


def test_qat_trains_through_fake_quantized_forward() -> None:
    """With `qat_bits`, the network that acts and learns is the fake-quantized one: the trained agent's
    forward pass equals the plain network applied to the quantized kernels, bit for bit, and training
    moved the float weights behind them."""
    cc = CompressConfig(qat_bits=4, qat_activations=False)
    config = with_compress(SMALL_PPO, cc)
    trainer = ppo.make(config)
    init = jax.jit(trainer.init)(jax.random.PRNGKey(0), ppo.PPOHParams())
    out = jax.jit(trainer.train)(jax.random.PRNGKey(0), ppo.PPOHParams())
    params = out.state.params
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init.params)))
    obs = jax.random.normal(jax.random.PRNGKey(1), (16,) + trainer.agent.obs_shape)
    quantized = quantize_tree(params, cc.qat_spec(), include=QAT_INCLUDE)
    plain = make_apply(trainer.agent.network)
    for a, b in zip(jax.tree.leaves(trainer.agent.apply(params, obs)), jax.tree.leaves(plain(quantized, obs))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... which is not the float network (4 bits changes the outputs).
    assert not np.array_equal(np.asarray(trainer.agent.apply(params, obs)[1]), np.asarray(plain(params, obs)[1]))


# ----------------------------------------------------------------------------------------------
# k-means QAT: trained weight sharing with frozen assignments
# ----------------------------------------------------------------------------------------------
def _np_lloyd_from(x: np.ndarray, c: np.ndarray, iters: int) -> np.ndarray:
    c = np.sort(c.astype(np.float64))
    for _ in range(iters):
        idx = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        c = np.sort(np.array([x[idx == j].mean() if np.any(idx == j) else c[j] for j in range(len(c))]))
    return c


def test_kmeans_qat_freezes_clusters_trains_centroids_and_reassigns_on_schedule() -> None:
    """Hand-built steps through the transform and its projection, against NumPy: step 0 clusters
    the weights (four obvious groups); a weight pushed next to another group keeps its cluster
    (frozen) and drags its centroid (the mean of the latent weights); at the re-assignment step it
    changes cluster; the parameters are always exactly centroid[cluster]; biases are updated as usual."""
    cc = CompressConfig(qat_bits=2, qat_scheme="kmeans", qat_activations=False, qat_recluster_every=3,
                        qat_recluster_iters=4)
    tx = kmeans_qat_transform(cc)
    f32 = np.float32
    groups = np.array([-2.0, -1.0, 0.5, 3.0], f32)
    latent = np.repeat(groups, 3) + np.tile(np.array([-0.05, 0.0, 0.05], f32), 4)
    params = {"dense": {"kernel": jnp.asarray(latent.reshape(3, 4)), "bias": jnp.zeros(4)}}
    state = tx.init(params)
    moves = [np.zeros(12, f32) for _ in range(4)]
    codes = centroids = np.zeros(4)
    moves[1][2] = 1.4  # -1.95 -> -0.55: nearer the -1.0 group, but its cluster is frozen until step 3
    for step, move in enumerate(moves):
        updates = {"dense": {"kernel": jnp.asarray(move.reshape(3, 4)), "bias": jnp.full(4, 0.25)}}
        out, state = tx.update(updates, state, params)
        params = kmeans_project(optax.apply_updates(params, out), state)
        latent = latent + move
        if step == 0:
            codes = np.repeat(np.arange(4), 3)
        elif step == 3:
            c = _np_lloyd_from(latent, centroids, 4)
            codes = np.argmin(np.abs(latent[:, None] - c[None, :]), axis=1)
        centroids = np.array([latent[codes == j].mean() for j in range(4)])
        np.testing.assert_array_equal(np.asarray(state.kmeans.codes[0]).reshape(-1), codes)
        np.testing.assert_allclose(np.asarray(state.kmeans.centroids[0]), centroids, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(state.kmeans.latent[0]).reshape(-1), latent, rtol=1e-6)
        kernel = np.asarray(params["dense"]["kernel"]).reshape(-1)
        np.testing.assert_array_equal(kernel, np.asarray(state.kmeans.centroids[0])[codes])
        np.testing.assert_array_equal(np.asarray(params["dense"]["bias"]), 0.25 * (step + 1))
    assert codes[2] == 1  # re-assigned at step 3 (it was in cluster 0 for steps 1 and 2)


def _shared_levels(kernel: np.ndarray, mask: np.ndarray | None = None) -> int:
    return len(np.unique(kernel if mask is None else kernel[mask]))


def test_kmeans_qat_network_is_its_own_exported_policy() -> None:
    """PPO with k-means QAT (and pruning): the parameters are the shared weights (at most 2^b
    levels per kernel, 2^b - 1 besides the pruned zeros), the forward pass runs them unchanged (no
    per-call re-fit), training moved them, and PTQ / export with the same spec gives them back bit
    for bit, so the shipped file is the trained network."""
    bits, prune = 3, "gradual"
    cc = CompressConfig(qat_bits=bits, qat_scheme="kmeans", qat_per_channel=False, qat_activations=False,
                        prune_schedule=prune, prune_end=0.5, prune_every=4)
    trainer = ppo.make(with_compress(SMALL_PPO, cc))
    assert trainer.agent.hooks.param_transform is None
    hparams = sparsity_hparams(ppo.PPOHParams(), 0.5 if prune != "none" else 0.0)
    init = jax.jit(trainer.init)(jax.random.PRNGKey(0), hparams)
    out = jax.jit(trainer.train)(jax.random.PRNGKey(0), hparams)
    params, masks = out.state.params, find_masks(out.state)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    mask_of = {} if masks is None else {jax.tree_util.keystr(p): np.asarray(v)
                                        for p, v in jax.tree_util.tree_leaves_with_path(masks)}
    kernels = [k for k in flat if "kernel" in k]
    assert len(kernels) == 6
    for k in kernels:
        if masks is None:
            assert _shared_levels(flat[k]) <= 2**bits, k
        else:
            assert _shared_levels(flat[k], mask_of[k]) <= 2**bits - 1 and np.all(flat[k][~mask_of[k]] == 0), k
    if prune != "none":
        assert (~mask_of["['actor_torso']['Dense_1']['kernel']"]).mean() > 0.4
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init.params)))
    shipped = quantize_tree(params, QuantSpec("kmeans", bits), include=QAT_INCLUDE, masks=masks)
    for a, b in zip(jax.tree.leaves(shipped), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    obs = jax.random.normal(jax.random.PRNGKey(1), (16,) + trainer.agent.obs_shape)
    plain = make_apply(trainer.agent.network)
    for a, b in zip(jax.tree.leaves(trainer.agent.apply(params, obs)), jax.tree.leaves(plain(params, obs))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kmeans_qat_starts_from_parameters_set_after_init() -> None:
    """Fine-tuning (seeds vmapped as the benchmarks run them): parameters put into the state after
    `init` are what the first clustering sees, and the result is its own k-means quantization."""
    from rlcx_jax.rl.common import vmap_learn

    cc = CompressConfig(qat_bits=2, qat_scheme="kmeans", qat_per_channel=False, qat_activations=False,
                        qat_recluster_every=2)
    trainer = ppo.make(with_compress(SMALL_PPO, cc))
    state = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(jax.random.split(jax.random.PRNGKey(4), 2),
                                                               ppo.PPOHParams())
    other = jax.jit(jax.vmap(ppo.make(SMALL_PPO).init, in_axes=(0, None)))(
        jax.random.split(jax.random.PRNGKey(9), 2), ppo.PPOHParams())
    state = state.with_params(jax.tree.map(lambda x: x + 5.0, other.params))  # far from any init weight
    n = 6
    shared, _ = jax.jit(vmap_learn(trainer, n, state))(state)
    kernel = lambda p: np.asarray(p["actor_torso"]["Dense_1"]["kernel"][0])  # noqa: E731
    first, levels = kernel(state.params), np.unique(kernel(shared.params))
    assert len(levels) <= 4 and first.min() - 0.1 < levels.min() and levels.max() < first.max() + 0.1
    params = jax.tree.map(lambda x: x[0], shared.params)
    shipped = quantize_tree(params, QuantSpec("kmeans", 2), include=QAT_INCLUDE)
    for a, b in zip(jax.tree.leaves(shipped), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "compress, hparams, match",
    [
        (CompressConfig(prune_schedule="sometimes"), ppo.PPOHParams(), "prune_schedule"),
        (CompressConfig(prune_distribution="lognormal"), ppo.PPOHParams(), "prune_distribution"),
        (CompressConfig(prune_start=0.8, prune_end=0.2), ppo.PPOHParams(), "prune_start"),
        (CompressConfig(qat_bits=1), ppo.PPOHParams(), "bits"),
        (CompressConfig(qat_bits=17), ppo.PPOHParams(), "bits"),
        (CompressConfig(qat_bits=4, qat_scheme="kmeans"), ppo.PPOHParams(), "set qat_activations=False"),
        (CompressConfig(qat_bits=4, qat_scheme="kmeans", qat_activations=False, qat_recluster_every=0),
         ppo.PPOHParams(), "qat_recluster_every"),
        (CompressConfig(qat_bits=4, qat_scheme="kmeans", qat_activations=False, qat_recluster_iters=1.5),
         ppo.PPOHParams(), "qat_recluster_iters"),
        (CompressConfig(prune_schedule="oneshot"), sparsity_hparams(ppo.PPOHParams(), 1.0), "Sparsity must be in"),
        (CompressConfig(prune_schedule="oneshot"), sparsity_hparams(ppo.PPOHParams(), -0.1), "Sparsity must be in"),
        (CompressConfig(prune_schedule="none"), sparsity_hparams(ppo.PPOHParams(), 0.5), "needs prune_schedule"),
    ],
)
def test_bad_compression_settings_fail_before_compiling(compress, hparams, match) -> None:
    with pytest.raises(ValueError, match=match):
        config = with_compress(SMALL_PPO, compress)
        ppo.make(config)
        hparams.validate(config.extensions)


def test_regex_selecting_nothing_fails_at_trace_time() -> None:
    config = with_compress(SMALL_PPO, CompressConfig(prune_schedule="oneshot", prune_include=(r"nothing.*",)))
    with pytest.raises(ValueError, match="nothing"):
        jax.eval_shape(ppo.make(config).init, jax.random.PRNGKey(0), sparsity_hparams(ppo.PPOHParams(), 0.5))


# ----------------------------------------------------------------------------------------------
# Recipes and accounting
# ----------------------------------------------------------------------------------------------
def test_lottery_ticket_rewinds_survivors_and_keeps_masks() -> None:
    from rlcx_jax.workflows import recipes

    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    rounds = recipes.lottery_ticket("ppo", SMALL_PPO, ppo.PPOHParams(), keys, [0.5, 0.75], rewind_updates=4)
    assert [r.sparsity for r in rounds] == [0.0, 0.5, 0.75]
    prev = None
    for r in rounds[1:]:
        kernel = np.asarray(r.state.params["actor_torso"]["Dense_1"]["kernel"])
        mask = np.asarray(r.masks["actor_torso"]["Dense_1"]["kernel"])
        assert np.all(kernel[~mask] == 0)
        assert abs((~mask[0]).mean() - r.sparsity) < 1e-3
        if prev is not None:  # the pruned set only grows from round to round
            assert np.all(mask <= prev)
        prev = mask


def test_prune_and_finetune_keeps_the_mask() -> None:
    from rlcx_jax.workflows import recipes

    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    trainer = ppo.make(SMALL_PPO)
    trained = jax.jit(jax.vmap(trainer.train, in_axes=(0, None)))(keys, ppo.PPOHParams())
    state, _, masks = recipes.prune_and_finetune(
        "ppo", SMALL_PPO, ppo.PPOHParams(), keys, trained.state.params, 0.8, finetune_timesteps=4 * 32 * 8
    )
    for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(state.params)):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
    assert abs(_kernel_sparsity(jax.tree.map(lambda x: x[0], state.params))["actor_torso/Dense_0/kernel"] - 0.8) < 0.01


def test_size_and_flops_accounting() -> None:
    from rlcx_jax.compress import size

    params = {
        "actor_torso": {"Dense_0": {"kernel": jnp.ones((4, 8)).at[0].set(0.0), "bias": jnp.zeros(8)}},
        "critic_torso": {"Dense_0": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}},
        "policy_head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)},
        "value_head": {"kernel": jnp.ones((8, 1)), "bias": jnp.zeros(1)},
    }
    report = size.count(params, bits=8)
    assert report.params == 32 + 8 + 32 + 8 + 16 + 2 + 8 + 1
    assert report.nonzeros == 24 + 32 + 16 + 8 and report.bits == 8 * report.nonzeros
    paths = nets.layout(nets.NetConfig(), "actor_critic").prefixes("policy")
    assert size.flops_per_forward(params, (4,), paths) == 2 * (24 + 16)
    conv = {"Conv_0": {"kernel": jnp.ones((3, 3, 4, 16))}}
    assert size.flops_per_forward(conv, (10, 10, 4)) == 2 * 3 * 3 * 4 * 16 * 8 * 8
    latency = size.measure_latency(lambda p, x: x @ p["k"], {"k": jnp.ones((4, 4))}, jnp.ones((1, 4)), repeats=5, rounds=2)
    assert 0 < latency < 1.0


# ----------------------------------------------------------------------------------------------
# Mask updates stay rare under vmap over seeds (the ranking is a sort behind a real `lax.cond`)
# ----------------------------------------------------------------------------------------------
def _ranking_outside_cond(jaxpr: Any, inside_cond: bool = False) -> int:
    """Equations of the mask ranking (its named scope) in `jaxpr`, recursively, that no `cond` encloses."""
    count = 0
    for eqn in jaxpr.eqns:
        if not inside_cond and RANKING_SCOPE in str(eqn.source_info.name_stack):
            count += 1
        nested = inside_cond or eqn.primitive.name == "cond"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _ranking_outside_cond(inner, nested)
    return count


def _ranking_inside(jaxpr: Any) -> int:
    """All equations of the mask ranking, wherever they are."""
    count = 0
    for eqn in jaxpr.eqns:
        count += RANKING_SCOPE in str(eqn.source_info.name_stack)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _ranking_inside(inner)
    return count


def _learn_jaxprs(algorithm: str, config: Any, hparams: Any) -> tuple[Any, Any]:
    from rlcx_jax import rl
    from rlcx_jax.rl.common import vmap_learn

    trainer = rl.make(algorithm, config)
    state = jax.eval_shape(jax.vmap(trainer.init, in_axes=(0, None)), jax.random.split(jax.random.PRNGKey(0), 2), hparams)
    shared = jax.make_jaxpr(vmap_learn(trainer, 2, state))(state).jaxpr
    plain = jax.make_jaxpr(jax.vmap(lambda s: trainer.learn(s, 2)))(state).jaxpr
    return shared, plain


TINY_DQN = dqn.DQNConfig(num_envs=2, train_frequency=2, buffer_size=64, batch_size=8, learning_starts=8,
                         target_update_period=8, total_timesteps=200, log_every=1)


@pytest.mark.parametrize("algorithm, config, hparams", [
    ("ppo", SMALL_PPO, ppo.PPOHParams()),
    ("dqn", TINY_DQN, dqn.DQNHParams()),
])
def test_mask_ranking_is_a_real_branch_under_vmap_over_seeds(algorithm, config, hparams) -> None:
    pruned = with_compress(config, CompressConfig(prune_schedule="gradual"))
    shared, plain = _learn_jaxprs(algorithm, pruned, sparsity_hparams(hparams, 0.9))
    assert _ranking_inside(shared) > 0  # the ranking is in the program
    # With the step counters shared, all of the ranking sits inside a cond: it runs only when due.
    assert _ranking_outside_cond(shared) == 0
    # A plain vmap batches the counters: the cond becomes a select and the ranking runs every step.
    assert _ranking_outside_cond(plain) > 0


def test_shared_counters_give_the_same_masks_and_parameters_as_plain_vmap() -> None:
    from rlcx_jax.rl.common import vmap_learn

    compress = CompressConfig(prune_schedule="gradual", prune_distribution="uniform", prune_end=0.5, prune_every=4)
    trainer = ppo.make(with_compress(SMALL_PPO, compress))
    state = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(
        jax.random.split(jax.random.PRNGKey(4), 2), sparsity_hparams(ppo.PPOHParams(), 0.8)
    )
    n = trainer.num_updates
    shared, _ = jax.jit(vmap_learn(trainer, n, state))(state)
    plain, _ = jax.jit(jax.vmap(lambda s: trainer.learn(s, n)))(state)
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert abs(_kernel_sparsity(jax.tree.map(lambda x: x[1], shared.params))["actor_torso/Dense_0/kernel"] - 0.8) < 0.01
